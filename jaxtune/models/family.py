"""What a model family provides, and the registry that finds families by HF ``model_type``.

A family is one package under ``jaxtune/models/`` (or anywhere else) that calls
:func:`register_family` when it is imported. Nothing else in jaxtune names a family: the
loader, the trainer, LoRA and export ask the registry for the :class:`Family` of a config's
``model_type`` and use only what the protocols below promise.

Families are found without a central list:

- every sub-package of ``jaxtune.models`` is imported the first time the registry is asked
  (``jaxtune/models/<family>/__init__.py`` registers itself);
- installed packages can add families through the ``jaxtune.families`` entry-point group
  (the entry point names a module, importing it registers the family);
- code can import a package that registers itself (tests do this with a toy family).

This mirrors Levanter's ``HFCompatConfig`` + ``LmHeadModel``: the config knows how to go to
and from ``config.json``, the model exposes ``hidden_states`` and ``unembed``, and the table
(``jaxtune.models.table``) knows where every HF tensor goes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax

from jaxtune.errors import JaxtuneError
from jaxtune.models.table import ParamTable, Rule

ENTRY_POINT_GROUP = "jaxtune.families"


class UnknownModelTypeError(JaxtuneError, ValueError):
    """config.json names a model_type no registered family builds."""


@runtime_checkable
class FamilyConfig(Protocol):
    """A family's architecture config: hashable (static under jit), to and from config.json.

    ``to_hf_config()`` must give back exactly the ``config.json`` that ``from_hf_config`` read
    (every key and value, in the spelling the file had), so an export writes the original file.
    """

    model_type: str
    num_hidden_layers: int
    tie_word_embeddings: bool
    vocab_size: int
    hidden_size: int

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> FamilyConfig: ...

    def to_hf_config(self) -> dict[str, Any]: ...


@runtime_checkable
class CausalLM(Protocol):
    """A family's NNX model.

    Built as ``model_cls(config, *, param_dtype, compute_dtype, scan_layers, remat, attention,
    rngs)``. ``hidden_states(input_ids_BT, positions_BT=None, segment_ids_BT=None)`` returns the
    final-norm hidden states ``[B, T, D]`` in the compute dtype; ``unembed(hidden_D)`` returns
    float32 logits ``[..., V]``; calling the model is ``unembed(hidden_states(...))``. The
    chunked loss calls the two halves separately so full logits are never materialised.
    Optional: ``hidden_states_and_aux`` (see :func:`hidden_states_and_aux`), for a model with
    an auxiliary loss of its own.

    **Generation (the KV cache contract).** A family generates (``jaxtune.generation``) when
    ``hidden_states`` also takes ``cache=None`` and, given a cache, returns
    ``(hidden_states, updated cache)``. Without a cache nothing changes (training). The cache
    is a ``jaxtune.generation.cache.KVCache``; the family never builds one, it only threads it:

    1. the model, where it builds ``AttentionMask.causal(positions, segment_ids)``, instead
       calls ``mask, cache = cache.attend(positions_BT, segment_ids_BT)`` when a cache is given
       (the new tokens' queries over the cache slots: causal, padding and windows all from
       slot positions and segment ids);
    2. passes ``cache=cache.layers`` to ``stack.apply_layers``, which then returns
       ``(x, layers_kv)`` (threaded through the scan, or the Python loop without scan), and
       finishes with ``cache = cache.update(layers_kv)``;
    3. each ``DecoderLayer.__call__`` takes ``cache=None``, passes it on as
       ``layers.Attention(..., cache=cache)`` (which then returns ``(out, cache)``: it writes
       its new keys/values at ``cache.index`` and attends over all slots) and returns
       ``(x, cache)`` when given one. A layer with no attention returns its cache unchanged.

    The cache's shape comes from ``config.num_hidden_layers``, ``num_key_value_heads`` and
    ``head_dim`` (or the model's ``kv_cache_layout(ring=True) -> (layers, kv_heads, head_dim
    [, window])``, a window making that stack a ring of the window, or ``{kind: layout}``), its
    dtype from ``hidden_states``' output (the compute dtype). Positions passed while
    generating are the true token positions (prompts are left-padded with segment 0).
    """

    config: Any

    def hidden_states(self, input_ids_BT: jax.Array, positions_BT: jax.Array | None = None,
                      segment_ids_BT: jax.Array | None = None, cache: Any = None
                      ) -> jax.Array: ...

    def unembed(self, hidden_D: jax.Array) -> jax.Array: ...

    def __call__(self, input_ids_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array: ...


def hidden_states_and_aux(model: Any, input_ids_BT: jax.Array,
                          positions_BT: jax.Array | None = None,
                          segment_ids_BT: jax.Array | None = None
                          ) -> tuple[jax.Array, dict[str, Any] | None]:
    """Hidden states and the model's auxiliary output, for losses (an optional protocol method).

    A model whose forward pass has a training loss of its own (an MoE router's load-balancing
    loss) implements ``hidden_states_and_aux(input_ids_BT, positions_BT, segment_ids_BT) ->
    (hidden_BTD, {"loss": scalar, "metrics": {name: scalar}})``: ``loss`` is already weighted
    and is added to the objective's loss (``jaxtune.loss.add_model_aux``), ``metrics`` are
    reported. Any other model gives ``(hidden_states(...), None)``.
    """
    method = getattr(model, "hidden_states_and_aux", None)
    if method is None:
        return model.hidden_states(input_ids_BT, positions_BT, segment_ids_BT), None
    return method(input_ids_BT, positions_BT, segment_ids_BT)


#: The constructor keywords every family's model accepts.
MODEL_OPTIONS = ("param_dtype", "compute_dtype", "scan_layers", "remat", "attention")


@dataclass(frozen=True)
class Family:
    """One architecture: config class, model class, HF table and the HF classes it exports to.

    ``hf_table(config)`` returns the rules (``jaxtune.models.table.Rule``) that map every HF
    tensor to a parameter; ``architectures`` maps each model type to the transformers class
    name written into an exported ``config.json`` when the original had none.
    ``layers_path`` is the module that holds the decoder layers (stacked or a list).
    ``declined`` pairs related model types the family does not build with the reason, so that a
    user of one is told what is missing rather than only that it is unknown.
    ``fused_experts(hf_module)``: for a family whose transformers model holds experts fused
    in 3-D parameters, where the expert projection ``hf_module`` (a checkpoint name, one
    expert) lives in memory (:class:`FusedExpert`), else None; PEFT adapters name those.
    ``layer_groups(config)``: for a family whose scanned layers are several stacked modules
    (one per kind of layer, ``model.layers.<group>``), each HF layer's ``(group, index in the
    group)`` (see ``jaxtune.models.table``); None when the layers are one stack.
    """

    name: str
    model_types: tuple[str, ...]
    config_cls: type
    model_cls: type
    hf_table: Callable[[Any], tuple[Rule, ...]]
    architectures: dict[str, str]
    layers_path: str = "model.layers"
    declined: tuple[tuple[str, str], ...] = ()
    fused_experts: Callable[[str], FusedExpert | None] | None = None
    layer_groups: Callable[[Any], tuple[tuple[str, int], ...]] | None = None


@dataclass(frozen=True)
class FusedExpert:
    """Where transformers keeps one expert projection: ``module.parameter`` ``[E, out, in]``,
    rows ``part`` of ``parts`` equal blocks (gate then up in ``gate_up_proj``); ``nesting``
    is the parameter's place among the module's parameters (PEFT nests its wrappers so)."""

    module: str  # model.layers.3.mlp.experts
    parameter: str  # gate_up_proj
    part: int
    parts: int
    nesting: int


_FAMILIES: dict[str, Family] = {}
_DECLINED: dict[str, tuple[str, str]] = {}  # model_type -> (family name, reason)
_discovered = False


def register_family(family: Family) -> None:
    """Make ``family`` the builder for each of its HF model types (its package calls this)."""
    missing = [mt for mt in family.model_types if mt not in family.architectures]
    if missing:
        raise JaxtuneError(f"family {family.name}: no HF architecture for model types {missing}.")
    for mt in family.model_types:
        other = _FAMILIES.get(mt)
        if other is not None and other.name != family.name:
            raise JaxtuneError(f"model_type '{mt}' is registered by family {other.name} and "
                               f"again by {family.name}.")
        _FAMILIES[mt] = family
    for mt, reason in family.declined:
        _DECLINED[mt] = (family.name, reason)


def _discover() -> None:
    """Import every family package under ``jaxtune.models`` and every entry-point family."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    # This module's own folder is jaxtune/models: every package in it is a family.
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.ispkg:
            importlib.import_module(f"{package}.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.split(":")[0])


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def get_family(model_type: str | None) -> Family:
    """The family for an HF ``model_type``; the error lists the supported ones."""
    _discover()
    try:
        return _FAMILIES[model_type]
    except KeyError:
        if model_type in _DECLINED:
            name, reason = _DECLINED[model_type]
            raise UnknownModelTypeError(
                f"model_type '{model_type}' (from config.json) is not supported by the {name} "
                f"family: {reason}") from None
        raise UnknownModelTypeError(
            f"model_type '{model_type}' (from config.json) is not supported. jaxtune builds "
            f"these model types: {', '.join(supported_model_types())}."
        ) from None


def family_of(config: Any) -> Family:
    """The family of a family config (by its ``model_type``)."""
    return get_family(config.model_type)


def family_table(config: Any, scan_layers: bool = False) -> ParamTable:
    """The family's HF table for ``config`` bound to its layers path. Going from parameters
    to HF keys, ``scan_layers`` does not matter (a path says whether it is stacked)."""
    family = family_of(config)
    groups = family.layer_groups(config) if family.layer_groups is not None else None
    return ParamTable(family.hf_table(config), layers_path=family.layers_path,
                      scan_layers=scan_layers, layer_groups=groups)


def write_back_hf_config(config: Any, config_cls: Any,
                         modelled: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``config.json`` for a family config that keeps its source file in ``hf_source`` (JSON).

    The source comes back exactly as it was (no key added, none respelled: downstream tools
    such as vLLM and GGUF converters read these files), except for fields that changed since
    it was read (``replace``, overrides): those are written in the family's spelling,
    ``modelled(config)``. A config built without a source is written from ``modelled`` alone.
    """
    import json

    source = json.loads(getattr(config, "hf_source", "") or "{}")
    now = modelled(config)
    if not source:
        return now
    before = modelled(config_cls.from_hf_config(source))
    changed = {k: v for k, v in now.items() if k not in before or before[k] != v}
    return {**source, **changed}

"""LoRA runs: merged weights and PEFT adapters, streamed from the checkpoint.

A LoRA checkpoint holds only the trainable parameters: each adapter's ``lora_a`` ``[*in, r]``
and ``lora_b`` ``[r, *out]`` (stacked over layers under ``scan_layers``) and the parameters of
``modules_to_save``. The base model is re-read from ``model.path``, unquantised, whatever the
run trained on (``lora.base_dtype``, ``lora.quantize_base``).

- ``merged``: each targeted kernel becomes ``W + scale * A . B``, summed in float32 from the
  original base weights and cast once to the export dtype; every other parameter is the
  base's (or the trained ``modules_to_save`` value). One layer is in flight at a time.
- ``adapter``: PEFT's folder, ``adapter_config.json`` + ``adapter_model.safetensors`` with
  PEFT's key names (``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
  ``...lora_B.weight`` ``[out, r]``, ``base_model.model.<module>.weight`` for modules_to_save),
  loadable by ``peft.PeftModel.from_pretrained(base, DIR)``. MoE expert adapters go to
  transformers' fused expert parameters through PEFT's ``target_parameters``: per layer
  ``<experts>.lora_A.weight`` ``[E*r, in]`` (expert-major rows), ``lora_B.weight``
  ``[out, r*E]`` (expert-minor columns); gate and up are one block-diagonal adapter of rank
  2r on ``gate_up_proj`` (``rank_pattern`` / ``alpha_pattern`` keep the scale), nested under
  ``base_layer.`` when ``down_proj`` is adapted too (:func:`_expert_groups`).
- ``both``: merged into ``--out`` and the adapter into ``<out>-adapter``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxtune.dtypes import numpy_dtype
from jaxtune.export import hf_folder
from jaxtune.export.errors import ExportError
from jaxtune.export.safetensors_out import TensorGroup, TensorSpec, write_safetensors
from jaxtune.export.tensors import ParamSource, hf_groups, model_sources, natural_key
from jaxtune.export.writer import read_generation_config, reference_model, write_hf_export
from jaxtune.lora import SavedParam, fuse_adapters, lora_delta, lora_scale, peft_layout
from jaxtune.models.family import FusedExpert, family_of, family_table
from jaxtune.models.table import ParamTable
from jaxtune.run_dir import RunCheckpoint, SavedArray, adapter_model
from jaxtune.sharding import host_array

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PREFIX = "base_model.model."
_ADAPTER_NAME = re.compile(r"params\.(?P<module>.+)\.lora\.lora_(?P<which>[ab])(?:\.value)?")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapted Linear: its module path (stacked or not) and its saved A and B."""

    module: str  # e.g. model.layers.self_attn.q_proj (stacked) or lm_head
    a: SavedArray
    b: SavedArray

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


def find_adapters(ckpt: RunCheckpoint) -> dict[str, Adapter]:
    """The adapters saved in ``ckpt``, keyed by the kernel path they update."""
    found: dict[str, dict[str, SavedArray]] = {}
    for name, saved in ckpt.arrays.items():
        m = _ADAPTER_NAME.fullmatch(name)
        if m:
            found.setdefault(m.group("module"), {})[m.group("which")] = saved
    incomplete = [k for k, v in found.items() if set(v) != {"a", "b"}]
    if incomplete:
        raise ExportError(f"Checkpoint {ckpt.directory}/{ckpt.step} has half adapters "
                          f"(lora_a without lora_b or back) for {incomplete}.")
    return {f"{k}.kernel": Adapter(k, v["a"], v["b"]) for k, v in found.items()}


# --------------------------------------------------------------------------- the base


def base_sources(base_dir: Path, config: Any, scan_layers: bool) -> dict[str, ParamSource]:
    """Lazy sources for every base parameter, read from the original safetensors (in their
    dtype, unquantised) and laid out as jaxtune parameters by the family's table."""
    from jaxtune.models import abstract_model
    from jaxtune.weights import checkpoint_index, plan_load, read_block

    abstract = abstract_model(config, scan_layers=scan_layers)
    _, state = nnx.split(abstract)
    plans = plan_load(family_of(config), config, state, checkpoint_index(base_dir),
                      scan_layers=scan_layers, where=str(base_dir))

    out = {}
    for path, plan in plans.items():
        dtype = numpy_dtype(next(iter(plan.sources.values())).dtype)

        def read(lo: int, hi: int, plan=plan, dtype=dtype) -> np.ndarray:
            whole = [slice(0, n) for n in plan.shape]
            if plan.depth:
                whole[0] = slice(lo, hi)
            return read_block(plan, tuple(whole), dtype)

        out[path] = ParamSource(path, plan.shape, dtype, plan.depth > 0, read, 1)
    return out


# --------------------------------------------------------------------------- merged


def merged_source(ckpt: RunCheckpoint, base: ParamSource, adapter: Adapter,
                  scale: float) -> ParamSource:
    """``base + scale * A . B`` in float32, a block of layers at a time.

    A and B (small: rank columns) are read once per pass and kept until the last layer.
    """
    cache: dict[str, np.ndarray] = {}
    depth = _adapter_depth(adapter, base.shape)

    def read(lo: int, hi: int) -> np.ndarray:
        if not cache:
            cache["a"], cache["b"] = ckpt.read_float32(adapter.a), ckpt.read_float32(adapter.b)
        a, b = cache["a"], cache["b"]
        w = np.asarray(base.read(lo, hi), np.float32)
        if depth:
            a, b = a[lo:hi], b[lo:hi]
        if not depth or hi == base.shape[0]:
            cache.clear()
        return w + lora_delta(a, b, np.float32(scale), depth).reshape(w.shape)

    return ParamSource(base.path, base.shape, np.dtype(np.float32), base.stacked, read, 1)


def merged_sources(ckpt: RunCheckpoint, base_dir: Path, config: Any,
                   adapters: dict[str, Adapter]) -> list[ParamSource]:
    """Every parameter of the merged model: base, merged kernel, or trained (saved) value."""
    lc = ckpt.config.lora
    scale = lora_scale(lc.alpha, lc.rank, lc.rslora)
    scan = ckpt.config.model.scan_layers
    out, unknown = [], [k for k in adapters]
    for path, base in base_sources(base_dir, config, scan).items():
        saved = ckpt.find(path)
        if saved is not None:  # modules_to_save: trained fully
            if saved.shape != base.shape:
                raise ExportError(f"{path}: checkpoint has {list(saved.shape)}, the base "
                                  f"model {list(base.shape)}.")
            out.append(ckpt.source(path))
        elif path in adapters:
            unknown.remove(path)
            out.append(merged_source(ckpt, base, adapters[path], scale))
        else:
            out.append(base)
    if unknown:
        raise ExportError(f"Adapters in the checkpoint update kernels the base model lacks: "
                          f"{unknown}. Is model.path the base the run trained on?")
    return out


# --------------------------------------------------------------------------- PEFT adapter


def _adapter_depth(adapter: Adapter, kernel_shape: tuple[int, ...]) -> int:
    """Leading stacked axes of an adapter: from A ``[*lead, *in, r]``, B ``[*lead, r, *out]``
    and the kernel ``[*lead, *in, *out]``, ``len(A) + len(B) - 2 - len(kernel)``."""
    return len(adapter.a.shape) + len(adapter.b.shape) - 2 - len(kernel_shape)


def _hf_modules(table: ParamTable, kernel_path: str, shape: tuple[int, ...]) -> list[str]:
    names = table.hf_module_names(kernel_path, shape)
    if names is None:
        raise ExportError(f"No Hugging Face module for {kernel_path}.")
    return names


def _fused(config: Any, name: str) -> FusedExpert | None:
    """Where transformers keeps the expert projection ``name`` fused, or None (a Linear)."""
    where = family_of(config).fused_experts
    return where(name) if where is not None else None


@dataclasses.dataclass
class PeftTargets:
    """What an adapter adapts: Linear modules (``target_modules``) and fused expert
    parameters (``target_parameters``, full name -> rank: r times the parts adapted)."""

    modules: list[str]
    parameters: dict[str, int]


class _Reader:
    """``read()`` -> float32 (A, B), with their shapes known before reading."""

    def __init__(self, shapes: tuple[tuple[int, ...], tuple[int, ...]],
                 read: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self.shapes = shapes
        self._read = read

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read()


def peft_groups(adapters: list[tuple[str, tuple[int, ...], Callable[[], tuple]]], config: Any,
                dtype: np.dtype) -> tuple[list[TensorGroup], PeftTargets]:
    """PEFT tensors (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` per stacked slice) and
    what they adapt. Each adapter is ``(kernel_path, kernel_shape, read)`` where ``read()``
    gives float32 ``(A, B)`` as jaxtune holds them; the one PEFT layout writer for adapters in
    memory and in checkpoints. Expert adapters go to :func:`_expert_groups`."""
    table = family_table(config)
    groups, modules = [], []
    experts: dict[tuple[tuple[str, ...], str], dict[int, tuple]] = {}
    for kernel_path, kernel_shape, read in adapters:
        names = _hf_modules(table, kernel_path, kernel_shape)
        depth = table.stack_depth(kernel_path)
        fused = _fused(config, names[0])
        if fused is not None:
            layers = tuple(dict.fromkeys(_fused(config, n).module for n in names))
            experts.setdefault((layers, fused.parameter), {})[fused.part] = (fused, read, depth)
            continue
        a_shape, b_shape = read.shapes
        r = a_shape[-1]
        n_in, n_out = math.prod(a_shape[depth:-1]), math.prod(b_shape[depth + 1:])
        modules += names
        specs = []
        for name in names:
            specs += [TensorSpec(f"{ADAPTER_PREFIX}{name}.lora_A.weight", (r, n_in), dtype),
                      TensorSpec(f"{ADAPTER_PREFIX}{name}.lora_B.weight", (n_out, r), dtype)]

        def produce(read=read, depth=depth) -> Iterator[np.ndarray]:
            a, b = read()
            for _, pa, pb in peft_layout(a, b, depth):
                yield pa
                yield pb

        groups.append(TensorGroup(specs, produce))
    expert_groups, parameters = _expert_groups(experts, dtype)
    groups = sorted(groups + expert_groups, key=lambda g: natural_key(g.specs[0].key))
    return groups, PeftTargets(modules, parameters)


def _expert_groups(experts: dict[tuple[tuple[str, ...], str], dict[int, tuple]],
                   dtype: np.dtype) -> tuple[list[TensorGroup], dict[str, int]]:
    """Expert adapters as PEFT's ``ParamWrapper`` holds them on transformers' fused 3-D
    parameters: per layer ``<experts>.lora_A.weight`` ``[E*r, in]``, ``lora_B.weight``
    ``[out, r*E]`` (:func:`peft_layout` with ``experts``). Gate and up share ``gate_up_proj``:
    one adapter of rank 2r, A side by side and B block-diagonal (:func:`fuse_adapters`),
    exactly the two updates. Two parameters targeted on one module nest: PEFT wraps them in
    the module's parameter order, so each one wrapped before the last gains ``base_layer.``."""
    targeted: dict[str, list[int]] = {}
    for (layers, _), parts in experts.items():
        nesting = next(iter(parts.values()))[0].nesting
        for module in layers:
            targeted.setdefault(module, []).append(nesting)
    groups, parameters = [], {}
    for (layers, parameter), parts in experts.items():
        fused, read, depth = next(iter(parts.values()))
        a_shape, b_shape = read.shapes
        n_experts, r = a_shape[depth - 1], a_shape[-1]
        rank = r * len(parts)
        n_in, n_out = math.prod(a_shape[depth:-1]), math.prod(b_shape[depth + 1:]) * fused.parts
        specs = []
        for module in layers:
            wrap = ".base_layer" * sum(n > fused.nesting for n in targeted[module])
            key = f"{ADAPTER_PREFIX}{module}{wrap}"
            specs += [TensorSpec(f"{key}.lora_A.weight", (rank * n_experts, n_in), dtype),
                      TensorSpec(f"{key}.lora_B.weight", (n_out, rank * n_experts), dtype)]
            parameters[f"{module}.{parameter}"] = rank

        def produce(parts=parts, n=fused.parts, depth=depth) -> Iterator[np.ndarray]:
            read = {k: v[1]() for k, v in parts.items()}
            a, b = fuse_adapters([read.get(k) for k in range(n)])
            for _, pa, pb in peft_layout(a, b, depth, experts=True):
                yield pa
                yield pb

        groups.append(TensorGroup(specs, produce))
    return groups, parameters


def adapter_groups(ckpt: RunCheckpoint, config: Any, adapters: dict[str, Adapter],
                   dtype: np.dtype) -> tuple[list[TensorGroup], PeftTargets]:
    """PEFT tensors for every adapter saved in a checkpoint, and what they adapt."""
    table = family_table(config)
    items = []
    for kernel_path, ad in adapters.items():
        depth = table.stack_depth(kernel_path) or 0
        kernel_shape = tuple(ad.a.shape[:-1]) + tuple(ad.b.shape[depth + 1:])
        items.append((kernel_path, kernel_shape, _Reader(
            (ad.a.shape, ad.b.shape),
            lambda ad=ad: (ckpt.read_float32(ad.a), ckpt.read_float32(ad.b)))))
    return peft_groups(items, config, dtype)


def saved_module_groups(ckpt: RunCheckpoint, config: Any,
                        dtype: np.dtype) -> tuple[list[TensorGroup], list[str]]:
    """``modules_to_save`` parameters under PEFT's names, and their HF modules."""
    paths = []
    for name in ckpt.arrays:
        if not name.startswith("params.") or _ADAPTER_NAME.fullmatch(name):
            continue
        paths.append(name.removeprefix("params.").removesuffix(".value"))
    sources = [ckpt.source(p) for p in paths]
    return _peft_names(hf_groups(sources, config, dtype), config.tie_word_embeddings)


def _peft_names(groups: list[TensorGroup], tied: bool) -> tuple[list[TensorGroup], list[str]]:
    """HF tensors of fully trained modules under PEFT's names, and those modules.

    With tied embeddings a trained embedding is also written as ``lm_head.weight``: PEFT's
    ``ensure_weight_tying`` expects both (its own save_pretrained writes both).
    """
    renamed, modules = [], set()
    for g in groups:
        specs = [dataclasses.replace(s, key=ADAPTER_PREFIX + s.key) for s in g.specs]
        modules.update(s.key.rsplit(".", 1)[0] for s in g.specs)
        renamed.append(TensorGroup(specs, g.produce))
        if tied and len(g.specs) == 1 and g.specs[0].key.endswith("embed_tokens.weight"):
            head = dataclasses.replace(g.specs[0], key=f"{ADAPTER_PREFIX}lm_head.weight")
            renamed.append(TensorGroup([head], g.produce))
    return renamed, sorted(modules, key=natural_key)


def peft_target_modules(config: Any, adapted: list[str]) -> list[str] | str | None:
    """PEFT's ``target_modules``: short names (``q_proj``...) when they select exactly the
    adapted modules, else a regex over the full module names."""
    from jaxtune.models import abstract_model

    table = family_table(config)
    abstract = abstract_model(config, scan_layers=False)
    kernels = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(map(str, path))
        if name.endswith(".kernel"):  # fused experts are no modules in transformers
            kernels += [m for m in _hf_modules(table, name, tuple(var.get_value().shape))
                        if _fused(config, m) is None]
    if not adapted:
        return None
    adapted_set = set(adapted)
    short = sorted({m.rsplit(".", 1)[-1] for m in adapted_set})
    if {m for m in kernels if m.rsplit(".", 1)[-1] in short} == adapted_set:
        return short
    return "^(" + "|".join(re.escape(m) for m in sorted(adapted_set, key=natural_key)) + ")$"


def adapter_config(*, rank: int, alpha: float, rslora: bool, dropout: float, base_path: str,
                   target_modules: list[str] | str | None, modules_to_save: list[str],
                   tied: bool = False,
                   target_parameters: dict[str, int] | None = None) -> dict[str, Any]:
    """``adapter_config.json`` (PEFT fills every field left out with its default).

    ``target_parameters``: fused expert parameters -> their rank. One of rank ``k * r``
    (gate and up fused) gets ``rank_pattern`` and an ``alpha_pattern`` that keeps PEFT's
    scale ``alpha / r`` (``alpha / sqrt(r)`` with rslora) the trained one. PEFT refuses
    dropout on them; it does not act at inference, so it is written as 0.

    ``tied``: the model ties ``lm_head`` to the embedding; when the embedding is trained
    fully, PEFT must keep the two tied (``ensure_weight_tying``), as the trained model did.
    """
    tie = tied and any(m.endswith("embed_tokens") for m in modules_to_save)
    params = target_parameters or {}
    ranks = {k: v for k, v in params.items() if v != rank}
    if len(set(ranks.values())) == 1:  # one rank for all: the short name selects them
        ranks = {k.rsplit(".", 1)[-1]: v for k, v in ranks.items()}
    scale = lora_scale(alpha, rank, rslora)
    experts = {
        "target_parameters": sorted(params, key=natural_key),
        "rank_pattern": ranks,
        "alpha_pattern": {k: scale * (math.sqrt(v) if rslora else v) for k, v in ranks.items()},
    } if params else {}
    return {
        **({"ensure_weight_tying": True} if tie else {}),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0 if params else dropout,
        "use_rslora": rslora,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        **experts,
    }


def _write_adapter_folder(tmp: Path, groups: list[TensorGroup], config: dict[str, Any],
                          tokenizer) -> None:
    write_safetensors(tmp, groups, 2**62, prefix="adapter_model")  # PEFT reads one file
    hf_folder.write_json(tmp / ADAPTER_CONFIG, config)
    if tokenizer is not None:
        hf_folder.save_tokenizer(tokenizer, tmp)


def save_peft_adapter(model: nnx.Module, out: Path, tokenizer, *, dtype: np.dtype | None,
                      overwrite: bool, base_model_name_or_path: str = "") -> Path:
    """A model in memory with adapters -> a PEFT adapter folder (adapters are small, so they
    are gathered whole; ``modules_to_save`` parameters stream as usual)."""
    from jaxtune.lora import LoraAdapter

    config = model.config
    dtype = np.dtype(dtype or np.float32)
    items, ranks, scales = [], set(), set()
    for path, module in nnx.iter_graph(model):
        adapter = getattr(module, "lora", None)
        if not isinstance(adapter, LoraAdapter):
            continue
        a_var, b_var = adapter.lora_a, adapter.lora_b
        kernel = module.kernel
        kernel_shape = tuple(kernel.get_value().shape if isinstance(kernel, nnx.Variable)
                             else kernel.shape)
        ranks.add(a_var.get_value().shape[-1])
        scales.add(adapter.scale)
        read = _Reader((a_var.get_value().shape, b_var.get_value().shape),
                       lambda a=a_var, b=b_var: (host_array(a.get_value()).astype(np.float32),
                                                 host_array(b.get_value()).astype(np.float32)))
        items.append((".".join(map(str, (*path, "kernel"))), kernel_shape, read))
    if len(ranks) != 1 or len(scales) != 1:
        raise ExportError(f"PEFT's adapter_config holds one rank and one alpha; these adapters "
                          f"have ranks {sorted(ranks)} and scales {sorted(scales)}.")
    groups, targets = peft_groups(items, config, dtype)
    saved = hf_groups(model_sources(nnx.state(model, SavedParam)), config, dtype)
    saved, saved_modules = _peft_names(saved, config.tie_word_embeddings)
    rank, scale = ranks.pop(), scales.pop()
    cfg = adapter_config(rank=rank, alpha=scale * rank, rslora=False, dropout=0.0,
                         base_path=base_model_name_or_path,
                         target_modules=peft_target_modules(config, targets.modules),
                         modules_to_save=saved_modules, tied=config.tie_word_embeddings,
                         target_parameters=targets.parameters)
    with hf_folder.staged_output(out, overwrite) as tmp:
        _write_adapter_folder(tmp, groups + saved, cfg, tokenizer)
    return out


# --------------------------------------------------------------------------- the export


def adapter_dir_for(out: Path, mode: str) -> Path:
    """Where ``mode`` puts the PEFT adapter: ``out`` itself, or ``<out>-adapter`` for both."""
    return out.parent / f"{out.name}-adapter" if mode == "both" else out


def export_lora_run(ckpt: RunCheckpoint, out: Path, *, mode: str, base_dir: Path,
                    base_hf: dict[str, Any], config: Any, out_dtype: np.dtype,
                    adapter_dtype: np.dtype, max_shard_size: str, tokenizer, verify: bool,
                    overwrite: bool, echo: Callable[[str], Any]) -> Path:
    """Export a LoRA run as merged weights, a PEFT adapter, or both (see module docstring)."""
    adapters = find_adapters(ckpt)
    if not adapters:
        raise ExportError(f"Checkpoint {ckpt.directory}/{ckpt.step} of a LoRA run holds no "
                          "adapters (params.*.lora.lora_a).")
    adapter_out = adapter_dir_for(out, mode)
    if mode == "both":
        hf_folder.check_output(adapter_out, overwrite, (ckpt.run_dir, base_dir))
    cfg = ckpt.config
    exits = []
    if mode in ("merged", "both"):
        sources = merged_sources(ckpt, base_dir, config, adapters)
        _, weight_map = write_hf_export(
            out, sources, config, out_dtype=out_dtype, max_shard_size=max_shard_size,
            hf_config=hf_folder.export_hf_config(base_hf, cfg.model.overrides, out_dtype),
            generation=read_generation_config(base_dir), tokenizer=tokenizer,
            overwrite=overwrite,
            verify=(lambda tmp: _verify_merged(tmp, ckpt, base_dir, config, sources, out_dtype,
                                               tokenizer, echo)) if verify else None)
        exits.append(f"merged weights in {out} ({len(weight_map)} tensors, "
                     f"{np.dtype(out_dtype).name})")
    if mode in ("adapter", "both"):
        groups, targets = adapter_groups(ckpt, config, adapters, adapter_dtype)
        saved_groups, saved_modules = saved_module_groups(ckpt, config, adapter_dtype)
        lc = cfg.lora
        peft_cfg = adapter_config(rank=lc.rank, alpha=lc.alpha, rslora=lc.rslora,
                                  dropout=lc.dropout, base_path=cfg.model.path,
                                  target_modules=peft_target_modules(config, targets.modules),
                                  modules_to_save=saved_modules,
                                  tied=config.tie_word_embeddings,
                                  target_parameters=targets.parameters)
        with hf_folder.staged_output(adapter_out, overwrite) as tmp:
            _write_adapter_folder(tmp, groups + saved_groups, peft_cfg, tokenizer)
            if verify:
                _verify_adapter(tmp, ckpt, base_dir, config, adapter_dtype, tokenizer, echo)
        exits.append(f"PEFT adapter in {adapter_out} ({len(targets.modules)} adapted modules, "
                     f"{len(targets.parameters)} expert parameters, "
                     f"{np.dtype(adapter_dtype).name})")
    echo(f"exported step {ckpt.step} of LoRA run {ckpt.run_dir}: " + "; ".join(exits))
    return out


# --------------------------------------------------------------------------- verify


def _tolerance(dtype: np.dtype) -> float:
    from jaxtune.export import verify

    return verify.EXACT_TOLERANCE if np.dtype(dtype).itemsize >= 4 else \
        verify.ROUNDED_TOLERANCE


def _verify_merged(tmp: Path, ckpt: RunCheckpoint, base_dir: Path, config: Any,
                   sources: list[ParamSource], out_dtype: np.dtype, tokenizer, echo) -> None:
    from jaxtune.export import verify

    scan = ckpt.config.model.scan_layers
    checks = [
        verify.Check("jaxtune (the written merged values)", lambda: verify.jaxtune_logits(
            reference_model(config, sources, scan, round_to=out_dtype))),
        verify.Check("the adapter-applied model", lambda: verify.jaxtune_logits(
            adapter_model(ckpt, base_dir)), _tolerance(out_dtype)),
    ]
    verify.verify(tmp, checks, vocab_size=config.vocab_size, tokenizer=tokenizer, echo=echo)


def _verify_adapter(tmp: Path, ckpt: RunCheckpoint, base_dir: Path, config: Any,
                    dtype: np.dtype, tokenizer, echo) -> None:
    from jaxtune.export import verify

    checks = [verify.Check("the adapter-applied model", lambda: verify.jaxtune_logits(
        adapter_model(ckpt, base_dir)), _tolerance(dtype))]
    verify.verify(tmp, checks, vocab_size=config.vocab_size, tokenizer=tokenizer, echo=echo,
                  hf=lambda: verify.peft_logits(base_dir, tmp), check_generation=False)

"""Model families, keyed by Hugging Face ``model_type``.

A :class:`Family` bundles what loading, training and export need for one architecture: its
config class (``from_hf_config(dict)`` / ``to_hf_config()``), its NNX model class and its HF
parameter table. Adding a family means one folder under ``models/`` and one
:func:`register_family` call here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtune.errors import JaxtuneError
from jaxtune.models import llama
from jaxtune.models.table import Rule, Transform


class UnknownModelTypeError(JaxtuneError, ValueError):
    """config.json names a model_type no registered family builds."""


@dataclass(frozen=True)
class Family:
    """One architecture: config class, model class and HF table (see module docstring)."""

    name: str
    model_types: tuple[str, ...]
    config_cls: type
    model_cls: type
    hf_table: Callable[[Any], tuple[Rule, ...]]  # config -> rules
    layers_path: str = "model.layers"  # the module holding the decoder layers (stacked or not)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Make ``family`` the builder for each of its HF model types."""
    for mt in family.model_types:
        _FAMILIES[mt] = family


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str | None) -> Family:
    """The family for an HF ``model_type``; the error lists the supported ones."""
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnknownModelTypeError(
            f"model_type '{model_type}' (from config.json) is not supported. jaxtune builds "
            f"these model types: {', '.join(supported_model_types())}."
        ) from None


register_family(Family("llama", llama.MODEL_TYPES, llama.LlamaConfig, llama.Llama,
                       llama.hf_table))

from jaxtune.models.build import abstract_model, init_model  # noqa: E402  (uses the registry)

__all__ = ["Family", "Rule", "Transform", "UnknownModelTypeError", "abstract_model",
           "get_family", "init_model", "register_family", "supported_model_types"]

"""Logical-axis rules: defaults, overrides, de-duplication of mesh axes."""

import pytest
from jax.sharding import PartitionSpec as P

from jaxtune.sharding import DEFAULT_RULES, logical_to_spec, make_rules


def test_default_rules():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "seq")) == P(("data", "fsdp"))
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor")


def test_mesh_axis_used_once_per_array():
    # Activations: batch takes fsdp, so embed falls back to replicated.
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"))


def test_overrides():
    rules = make_rules({"embed": [], "mlp": ["fsdp", "tensor"]})
    assert logical_to_spec(("embed", "mlp"), rules) == P(None, ("fsdp", "tensor"))
    assert DEFAULT_RULES["embed"] == ("fsdp",)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        make_rules({"mlp": ["model"]})


def test_lora_adapters_split_over_fsdp_on_the_rank_or_another_dim():
    """An adapter's non-embed half takes fsdp on its rank, or, where fsdp does not divide the
    rank, on the largest other dim it divides (never a stacked layers/experts dim)."""
    import types

    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 16, "tensor": 1, "expert": 1})
    cases = [  # (logical axes, shape) -> spec (Qwen2.5-32B sizes)
        ((("embed", "lora_rank"), (5120, 16)), P("fsdp")),  # A of q: embed as before
        ((("lora_rank", "heads", "head_dim"), (16, 40, 128)), P("fsdp")),  # B of q: the rank
        ((("lora_rank", "heads", "head_dim"), (8, 40, 128)), P(None, None, "fsdp")),
        ((("mlp", "lora_rank"), (27648, 8)), P("fsdp")),  # A of down: mlp takes it
        ((("layers", "lora_rank", "mlp"), (64, 8, 27648)), P(None, None, "fsdp")),
        ((("layers", "lora_rank", "heads"), (64, 8, 6)), P()),  # nothing divides: whole
        ((("embed", "heads", "head_dim"), (5120, 40, 128)), P("fsdp")),  # base weights: as ever
        ((("lora_rank", "mlp"), (8, 27648)), P(None, "fsdp")),
    ]
    for (names, shape), want in cases:
        assert logical_to_spec(names, None, mesh, shape) == want, (names, shape)
    off = make_rules({"lora_rank": []})  # the old layout, by the rules
    assert logical_to_spec(("lora_rank", "mlp"), off, mesh, (8, 27648)) == P()

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

"""The seams other work builds on: no import cycles, families found without a central list,
and the free reference model of LoRA runs."""

import ast
import pathlib

import jax
import numpy as np

import jaxtune
from jaxtune import lora
from jaxtune.config import LoraConfig
from jaxtune.models import supported_model_types
from jaxtune.objectives import reference_available, reference_model

PACKAGE = pathlib.Path(jaxtune.__file__).parent


def _imports(modules: dict[str, pathlib.Path], name: str) -> set[str]:
    """Modules of jaxtune that ``name`` imports anywhere (module level or in a function);
    ``from pkg import sub`` counts as importing ``pkg.sub`` only."""
    out = set()
    for node in ast.walk(ast.parse(modules[name].read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                if modules[name].name != "__init__.py":
                    parts = parts[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def test_no_import_cycles():
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ("jaxtune",) + f.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: _imports(modules, m) for m in modules}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_families_are_found_without_a_central_list():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())


def test_lora_reference_with_adapters_disabled_is_the_base_exactly(tiny_hf_model):
    path = tiny_hf_model("qwen3")
    base = jaxtune.from_pretrained(path)
    ids = np.random.RandomState(0).randint(0, 389, (2, 11))
    base_logits = np.asarray(jax.jit(lambda ids: base(ids))(ids))  # compiled like the reference
    model, trainable = lora.apply_lora(base, LoraConfig(rank=4, alpha=8, targets=["all-linear"]))
    # Trained adapters (B no longer zero), so the adapted model differs from the base.
    from flax import nnx

    params = nnx.state(model, trainable)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, params))
    assert not np.allclose(np.asarray(model(ids)), base_logits, atol=1e-3)

    @jax.jit
    def ref_logits(ids):
        with reference_available(None), reference_model(model) as ref:
            return ref(ids)

    np.testing.assert_array_equal(np.asarray(ref_logits(ids)), base_logits)
    assert not np.allclose(np.asarray(model(ids)), base_logits, atol=1e-3)  # back on after

"""LoRA / QLoRA on the tiny Llama: fresh adapters are exact, PEFT computes the same adapted
model from our weights, merge equals the adapter model, training touches only adapters, int8 /
NF4 bases stay within their error bounds, dropout is training-only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune import lora
from jaxtune.config import ConfigError, LoraConfig, MeshConfig, OptimizerConfig, TrainerConfig
from jaxtune.export.tensors import iter_hf_tensors as to_hf_tensors
from jaxtune.mesh import make_mesh
from jaxtune.objectives import make_loss_fn
from jaxtune.optim import make_optimizer
from jaxtune.quant import NF4_CODEBOOK, QuantizedKernel, QuantizedParam, quantize_kernel
from jaxtune.sharding import make_rules
from jaxtune.train_state import create_train_state, tree_bytes
from jaxtune.train_step import jit_train_step, train_step
from jaxtune.weights import from_pretrained
from tests.train_helpers import put, synthetic_batch

VOCAB = 389


def lora_stepper(model_dir, cfg: LoraConfig, mesh_sizes=(1, 1, 1), devices=None, *,
                 scan_layers=False, lr=1e-2, optimizer="adamw"):
    """(base model, LoRA train state, jitted step, mesh): the trainer's LoRA path in small."""
    devices = devices or jax.devices()[: int(np.prod(mesh_sizes))]
    mesh = make_mesh(MeshConfig(*mesh_sizes), devices)
    rules = make_rules()
    base = from_pretrained(model_dir, mesh=mesh, rules=rules, scan_layers=scan_layers)
    model, trainable = lora.apply_lora(base, cfg, mesh=mesh, rules=rules, seed=0)
    opt_cfg = OptimizerConfig(name=optimizer, learning_rate=lr, schedule="constant")
    opt = make_optimizer(opt_cfg, 10, nnx.state(model, trainable))
    state = create_train_state(model, opt, mesh=mesh, rules=rules, trainable=trainable)
    loss_fn = make_loss_fn(TrainerConfig(loss_chunk_size=64))
    if cfg.dropout:
        loss_fn = lora.with_dropout(loss_fn)
    fn = jit_train_step(train_step, state, mesh, rules, loss_fn=loss_fn, optimizer=opt)
    return base, state, fn, mesh


def flat_numpy(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(state)}


def _ids(seed=0, shape=(2, 13)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def _perturb(model, scale=0.05, seed=1):
    """Give every adapter (B included) non-zero weights, as after some training."""
    state = nnx.state(model, lora.LoraParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


@pytest.fixture(scope="module")
def base_model(tiny_hf_model):
    return from_pretrained(tiny_hf_model("llama"))


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("name,scan", [("llama", False), ("llama", True),
                                       ("llama_tied_bias", False)])
def test_fresh_adapters_give_base_logits_exactly(tiny_hf_model, name, scan):
    base = from_pretrained(tiny_hf_model(name), scan_layers=scan)
    ids = _ids()
    model, trainable = lora.apply_lora(base, LoraConfig(rank=4, targets=["all-linear"]))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))
    # The base's arrays are reused, not copied (a large base is never held twice).
    new = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    assert all(new[p] is v.get_value() for p, v in nnx.to_flat_state(nnx.state(base)))
    adapters = nnx.state(model, trainable)
    per_layer = 7  # q k v o gate up down
    assert len(jax.tree.leaves(adapters)) == 2 * per_layer * (1 if scan else 3)
    for path, var in nnx.to_flat_state(adapters):
        axes = var.get_metadata()["logical_axes"]
        assert var.get_value().dtype == jnp.float32
        assert ("lora_rank" in axes) and (axes[0] == "layers") == scan, (path, axes)
        if path[-1] == "lora_b":
            assert not np.any(np.asarray(var.get_value()))
    # lm_head is not in all-linear; A is PEFT's uniform(+-1/sqrt(fan_in)).
    assert "lm_head" not in {p[0] for p, _ in nnx.to_flat_state(adapters)}
    a = np.asarray(next(v.get_value() for p, v in nnx.to_flat_state(adapters)
                        if p[-1] == "lora_a" and "q_proj" in p))
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(72) and a.std() > 0.5 / np.sqrt(3 * 72)


def test_targets_by_name_regex_and_errors(tiny_hf_model, base_model):
    def names(targets, model=base_model):
        return {".".join(map(str, p)) for p in lora.resolve_targets(model, targets)}

    assert names(["q_proj", "v_proj"]) == {f"model.layers.{i}.self_attn.{p}_proj"
                                           for i in range(3) for p in "qv"}
    assert names([r"model\.layers\.[01]\.mlp\..*"]) == {
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    assert names(["lm_head"]) == {"lm_head"}
    assert len(names(["all-linear"])) == 21
    with pytest.raises(ConfigError, match="qq_proj.*match no module"):
        names(["qq_proj"])
    with pytest.raises(ConfigError, match="not linear layers.*modules_to_save"):
        names(["embed_tokens"])
    stacked = from_pretrained(tiny_hf_model("llama"), scan_layers=True)
    assert names(["q_proj"], stacked) == {"model.layers.self_attn.q_proj"}
    with pytest.raises(ConfigError, match="layers \\[0\\] of 3.*scan_layers"):
        names([r"model\.layers\.0\.self_attn\.q_proj"], stacked)
    tied = from_pretrained(tiny_hf_model("llama_tied_bias"))
    with pytest.raises(ConfigError, match="ties lm_head to embed_tokens"):
        lora.apply_lora(tied, LoraConfig(rank=2, modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match="both LoRA targets and modules_to_save"):
        lora.apply_lora(base_model, LoraConfig(rank=2, targets=["lm_head"],
                                               modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match="dropout"):
        lora.apply_lora(base_model, LoraConfig(rank=2, dropout=1.0))
    assert lora.lora_scale(16, 4) == 4.0 and lora.lora_scale(16, 4, rslora=True) == 8.0
    same, filt = lora.apply_lora(base_model, LoraConfig(rank=0))
    assert same is base_model and filt is nnx.Param


def test_config_rejects_lora_keys_without_a_lora_run():
    from jaxtune.config import config_from_dict

    for extra in ({"base_dtype": "bfloat16"}, {"modules_to_save": ["lm_head"]},
                  {"quantize_base": "int8"}):
        with pytest.raises(ConfigError, match="rank' > 0"):
            config_from_dict({"lora": {"rank": 0, **extra}})
    assert config_from_dict({"lora": {"rank": 8, "base_dtype": "bfloat16",
                                      "quantize_base": "nf4"}}).lora.rank == 8


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_computes_the_same_adapted_model(tiny_hf_model, base_model, rslora):
    """Our A, B and scale in PEFT's layout, loaded into PEFT on the transformers model, give
    the logits of our adapter model (layout, flattening order and scaling all checked)."""
    import peft
    import torch
    import transformers

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head"]
    cfg = LoraConfig(rank=3, alpha=5.0, rslora=rslora, targets=targets)
    model, _ = lora.apply_lora(base_model, cfg, seed=4)
    _perturb(model, 0.1)
    ids = _ids(2)
    ours = np.asarray(model(ids))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_model("llama")).eval()
    pcfg = peft.LoraConfig(r=3, lora_alpha=5.0, use_rslora=rslora, target_modules=targets,
                           lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(hf, pcfg)
    weights = lora.lora_state(model)
    assert len(weights) == 7 * 3 + 1
    sd = {}
    for module, w in weights.items():
        assert w.scale == pytest.approx(lora.lora_scale(5.0, 3, rslora))
        sd[f"base_model.model.{module}.lora_A.default.weight"] = torch.from_numpy(w.a)
        sd[f"base_model.model.{module}.lora_B.default.weight"] = torch.from_numpy(w.b)
    missing, unexpected = pm.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        theirs = pm(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_merge_equals_adapter_model_and_exports(base_model):
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["all-linear", "lm_head"])
    model, _ = lora.apply_lora(base_model, cfg)
    _perturb(model)
    ids = _ids(3)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - np.asarray(base_model(ids))).max() > 0.1
    merged = lora.merge(model)
    np.testing.assert_allclose(np.asarray(merged(ids)), adapted, rtol=1e-5, atol=2e-5)
    assert not nnx.state(merged, lora.LoraParam)  # a plain model: it exports strictly
    keys = {k for k, _ in to_hf_tensors(merged)}
    assert keys == {k for k, _ in to_hf_tensors(base_model)}
    with pytest.raises(Exception, match="must be merged"):
        list(to_hf_tensors(model))
    # keep_adapters then unmerge gives the adapter model back (float32 round trip).
    kept = lora.merge(model, keep_adapters=True)
    np.testing.assert_allclose(np.asarray(kept(ids)), adapted, rtol=1e-5, atol=2e-5)
    back = lora.unmerge(kept)
    np.testing.assert_allclose(np.asarray(back(ids)), adapted, rtol=1e-5, atol=2e-5)
    before, after = flat_numpy(nnx.state(model)), flat_numpy(nnx.state(back))
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_allclose(after[k], before[k], atol=2e-6, err_msg=k)
    # The PEFT layout composes to the merged kernel in HF layout: W_hf + scale * B @ A.
    hf_base, hf_merged = dict(to_hf_tensors(base_model)), dict(to_hf_tensors(merged))
    for module, w in lora.lora_state(model).items():
        delta = hf_merged[module + ".weight"] - hf_base[module + ".weight"]
        np.testing.assert_allclose(delta, w.scale * w.b @ w.a, atol=2e-6, err_msg=module)


def test_merge_from_unquantised_base_in_float32(tiny_hf_model, base_model):
    """A bf16-base (or int8-base) run merges onto the float32 base it came from: the merged
    kernels equal f32 base + scale * A . B, with no bf16 rounding of the sum."""
    for extra in (dict(base_dtype="bfloat16"), dict(quantize_base="int8")):
        model, _ = lora.apply_lora(base_model, LoraConfig(rank=4, **extra))
        _perturb(model)
        merged = lora.merge(model, base=base_model)
        want = lora.merge(_with_base(model, base_model))
        got_flat, want_flat = flat_numpy(nnx.state(merged)), flat_numpy(nnx.state(want))
        for k in want_flat:
            assert got_flat[k].dtype == np.float32, k
            np.testing.assert_array_equal(got_flat[k], want_flat[k], err_msg=k)


def _with_base(model, base):
    """The adapter model with its frozen part replaced by ``base``'s float32 parameters."""
    fresh, _ = lora.apply_lora(base, LoraConfig(rank=4))
    nnx.update(fresh, nnx.state(model, lora.LoraParam))
    return fresh


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("scan", [False, True])
def test_training_changes_only_adapters(tiny_hf_model, scan):
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"],
                     modules_to_save=["lm_head"], base_dtype="bfloat16")
    base, state, fn, mesh = lora_stepper(tiny_hf_model("llama"), cfg, scan_layers=scan)
    base_flat = flat_numpy(nnx.state(base))
    frozen0 = flat_numpy(state.frozen)
    params0 = flat_numpy(state.params)
    adapter_shapes = sorted(v.shape for v in params0.values())
    batch = put(synthetic_batch(4, 16, VOCAB), mesh)
    losses = []
    for _ in range(3):
        state, m = fn(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    # The frozen base is bitwise what it was (bf16 rounding of the loaded f32 weights).
    frozen = flat_numpy(state.frozen)
    assert frozen.keys() == frozen0.keys()
    for k, v in frozen.items():
        assert v.dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(v, frozen0[k], err_msg=k)
        np.testing.assert_array_equal(v, base_flat[k].astype(jnp.bfloat16), err_msg=k)
    params = flat_numpy(state.params)
    assert {k.split(".")[0] for k in params} == {"model", "lm_head"}
    for k, v in params.items():
        assert v.dtype == np.float32, k
        assert not np.array_equal(v, params0[k]), f"{k} did not train"
    np.testing.assert_array_equal(params0["lm_head.kernel"], base_flat["lm_head.kernel"])
    # Optimizer state: Adam's two moments per trainable leaf, nothing base-shaped.
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in opt_arrays) == sorted(adapter_shapes * 2)
    assert all(x.dtype == jnp.float32 for x in opt_arrays)
    assert tree_bytes(state.opt_state) < 2.2 * tree_bytes(state.params)


def test_int8_base_error_bound_and_training(tiny_hf_model, base_model):
    model, _ = lora.apply_lora(base_model, LoraConfig(rank=4, quantize_base="int8"))
    base_kernels = {".".join(map(str, p[:-1])): np.asarray(v.get_value())
                    for p, v in nnx.to_flat_state(nnx.state(base_model))
                    if p[-1] == "kernel"}
    quantised = 0
    for path, linear in lora._linears(model):
        name = ".".join(map(str, path))
        if name == "lm_head":
            assert type(linear.kernel) is nnx.Param  # the output layer stays unquantised
            continue
        k = linear.kernel
        assert isinstance(k, QuantizedKernel) and k.codes.get_value().dtype == jnp.int8
        scale = np.asarray(k.scale.get_value())
        err = np.abs(np.asarray(k[...]) - base_kernels[name])
        assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-9), name  # round-to-nearest bound
        assert _rms(err) < 0.01 * _rms(base_kernels[name]), name  # ~0.9% for Gaussian weights
        quantised += 1
    assert quantised == 21
    ids = _ids(4)
    ref = np.asarray(base_model(ids))
    # The logits move about 2.5x as much as with a bf16 base (3.3% vs 1.3% here).
    bf16, _ = lora.apply_lora(base_model, LoraConfig(rank=4, base_dtype="bfloat16"))
    err_int8 = _rms(np.asarray(model(ids)) - ref) / _rms(ref)
    err_bf16 = _rms(np.asarray(bf16(ids)) - ref) / _rms(ref)
    assert 0 < err_int8 < 0.05 and err_int8 < 4 * err_bf16, (err_int8, err_bf16)
    assert _quantised_fraction(model, base_model) < 0.27  # 1 byte per weight + scales

    cfg = LoraConfig(rank=4, quantize_base="int8", targets=["all-linear"])
    _, state, fn, mesh = lora_stepper(tiny_hf_model("llama"), cfg, scan_layers=True)
    codes0 = flat_numpy(nnx.state(state.frozen, QuantizedParam))
    batch = put(synthetic_batch(4, 16, VOCAB), mesh)
    losses = []
    for _ in range(3):
        state, m = fn(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    codes = flat_numpy(nnx.state(state.frozen, QuantizedParam))
    for k in codes0:
        np.testing.assert_array_equal(codes[k], codes0[k], err_msg=k)


def test_quantised_matmul_backward_equals_autodiff(tiny_hf_model, fmt="nf4", scan=True):
    """The frozen-kernel matmul's own backward (which recomputes the dequantised kernel instead
    of keeping it) gives the gradients autodiff gives on the dequantised float32 model."""
    from jaxtune.loss import cross_entropy_loss

    base = from_pretrained(tiny_hf_model("llama"), scan_layers=scan)
    quantised, _ = lora.apply_lora(base, LoraConfig(rank=4, quantize_base=fmt))
    _perturb(quantised)
    plain, _ = lora.apply_lora(base, LoraConfig(rank=4))
    nnx.update(plain, nnx.state(quantised, lora.LoraParam))
    for (path, lin), (_, qlin) in zip(lora._linears(plain), lora._linears(quantised),
                                      strict=True):
        if path != ("lm_head",):
            lin.kernel.set_value(qlin.kernel.dequantize())
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(2, 16, VOCAB).items()}

    @jax.jit
    def grads(model):
        graphdef, params, rest = nnx.split(model, lora.LoraParam, ...)
        loss = lambda p: cross_entropy_loss(nnx.merge(graphdef, p, rest), batch)[0]  # noqa: E731
        return jax.value_and_grad(loss)(params)

    (loss_q, grads_q), (loss_p, grads_p) = grads(quantised), grads(plain)
    assert float(loss_q) == pytest.approx(float(loss_p), rel=1e-6)
    flat_q, flat_p = flat_numpy(grads_q), flat_numpy(grads_p)
    for k in flat_p:
        assert np.abs(flat_p[k]).max() > 0, k
        np.testing.assert_allclose(flat_q[k], flat_p[k], rtol=1e-4, atol=1e-6, err_msg=k)


def _nf4_reference(w: np.ndarray, block: int) -> np.ndarray:
    """NF4 by the definition: per block of ``block`` inputs (per output), divide by absmax and
    take the nearest codebook value (a tie goes to the lower one)."""
    i, o = w.shape
    blocks = w.reshape(i // block, block, o)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    dist = np.abs(blocks[..., None] / absmax[..., None] - NF4_CODEBOOK)
    codes = np.argmin(dist, axis=-1)  # argmin takes the first (lower) of equal distances
    return (NF4_CODEBOOK[codes] * absmax).reshape(i, o)


def test_nf4_is_exact_to_its_definition(tiny_hf_model, base_model):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 10)).astype(np.float32)
    q = quantize_kernel(jnp.asarray(w), "nf4", num_in=1, lead=0, logical_axes=("embed", "mlp"))
    assert q.codes.get_value().dtype == jnp.uint8 and q.codes.get_value().shape == (2, 32, 10)
    np.testing.assert_array_equal(np.asarray(q[...]), _nf4_reference(w, 64))
    # Weights already on the codebook grid (scaled per block) come back bit for bit.
    grid = (NF4_CODEBOOK[rng.integers(0, 16, (128, 10))] * 0.37).astype(np.float32)
    grid[0] = grid[64] = 0.37  # each block's absmax is on the grid
    qg = quantize_kernel(jnp.asarray(grid), "nf4", num_in=1, lead=0, logical_axes=None)
    np.testing.assert_array_equal(np.asarray(qg[...]), grid)
    # Multi-dim inputs (o_proj [N, H, D]) and a stacked layers axis, 72 inputs -> blocks of 36.
    w3 = rng.normal(size=(2, 6, 12, 5)).astype(np.float32)
    q3 = quantize_kernel(jnp.asarray(w3), "nf4", num_in=2, lead=1,
                         logical_axes=("layers", "heads", "head_dim", "embed"))
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(q3[...])[layer].reshape(72, 5),
                                      _nf4_reference(w3[layer].reshape(72, 5), 36))

    # On Gaussian weights NF4's error is ~9% RMS (QLoRA's figure), int8's under 1%.
    w = rng.normal(size=(4096, 8)).astype(np.float32)
    nf4 = quantize_kernel(jnp.asarray(w), "nf4", num_in=1, lead=0, logical_axes=None)
    assert 0.08 < _rms(np.asarray(nf4[...]) - w) / _rms(w) < 0.1

    model, _ = lora.apply_lora(base_model, LoraConfig(rank=4, quantize_base="nf4"))
    for path, linear in lora._linears(model):
        assert isinstance(linear.kernel, QuantizedKernel) == (path != ("lm_head",))
    ids = _ids(5)
    ref, got = np.asarray(base_model(ids)), np.asarray(model(ids))
    assert 0 < _rms(got - ref) / _rms(ref) < 0.6  # this small random net amplifies noise
    assert _quantised_fraction(model, base_model) < 0.16  # half a byte per weight + scales


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _quantised_fraction(model, base) -> float:
    """Bytes of the quantised kernels over the bytes of the float32 kernels they replace."""
    kernels = sum(v.get_value().nbytes for p, v in nnx.to_flat_state(nnx.state(base))
                  if p[-1] == "kernel" and p[0] != "lm_head")
    return tree_bytes(nnx.state(model, QuantizedParam)) / kernels


# --------------------------------------------------------------------------- dropout


def test_dropout_only_in_training(base_model):
    cfg = LoraConfig(rank=4, dropout=0.5, targets=["q_proj", "up_proj"])
    model, _ = lora.apply_lora(base_model, cfg, seed=0)
    _perturb(model, 0.2)
    ids = _ids(6)
    plain = np.asarray(model(ids))
    with lora.dropout_rng(jax.random.key(1)):
        drop1 = np.asarray(model(ids))
        drop1_again = np.asarray(model(ids))
    with lora.dropout_rng(jax.random.key(2)):
        drop2 = np.asarray(model(ids))
    assert np.abs(drop1 - plain).max() > 1e-3 and np.abs(drop1 - drop2).max() > 1e-3
    np.testing.assert_array_equal(drop1, drop1_again)
    np.testing.assert_array_equal(np.asarray(model(ids)), plain)  # deterministic outside

    # Inverted dropout: averaged over masks, one layer's update equals the undropped one.
    linear = model.model.layers[0].mlp.up_proj
    x = jax.random.normal(jax.random.key(3), (4, 72))
    y0 = jnp.zeros((4, 200))
    clean = linear.lora.add(y0, x)

    def dropped(key):
        with lora.dropout_rng(key):
            return linear.lora.add(y0, x)

    mean = jnp.mean(jax.vmap(dropped)(jax.random.split(jax.random.key(4), 4000)), axis=0)
    assert float(jnp.linalg.norm(mean - clean)) < 0.05 * float(jnp.linalg.norm(clean))
    # Each adapter draws its own mask: q_proj of layers 0 and 1 see different inputs dropped.
    salts = {int(layer.self_attn.q_proj.lora.salt[...]) for layer in model.model.layers}
    assert len(salts) == 3


def test_dropout_train_step_with_scan(tiny_hf_model):
    """In the train step (stacked layers, key from the micro-batch rng) dropout is on; the
    plain loss of the same parameters, as evaluation computes it, is deterministic."""
    cfg = LoraConfig(rank=4, dropout=0.3, targets=["all-linear"])
    _, state, fn, mesh = lora_stepper(tiny_hf_model("llama"), cfg, scan_layers=True,
                                      optimizer="sgd")
    batch = put(synthetic_batch(4, 16, VOCAB, seed=0), mesh)
    plain = jax.jit(lambda st, b: make_loss_fn(TrainerConfig(loss_chunk_size=64))(
        st.model(), {**b, "rng": jax.random.key(0)})[0])
    before = float(plain(state, batch))
    state, m1 = fn(state, batch)
    # B is zero at the first step, so dropout cannot change its loss...
    assert float(m1["loss"]) == pytest.approx(before, rel=1e-6)
    after = float(plain(state, batch))
    assert float(plain(state, batch)) == after
    state, m2 = fn(state, batch)
    # ...but once B has trained, the dropped-out training loss differs from the plain one.
    assert abs(float(m2["loss"]) - after) > 1e-4

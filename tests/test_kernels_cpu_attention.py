"""The fused CPU attention kernel (``attention: cpu_flash``) against the pure-XLA reference and
the model's own XLA attention: forward and gradients, float32, with odd lengths and head dims
(the kernel pads both to its vector width), GQA, packing, windows (static and traced, as a
scan over layers gives them) and the fallbacks."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.kernels import compiling_for
from jaxtune.kernels.cpu_attention import _note, cpu_attention, unavailable_reason
from jaxtune.kernels.splash import reference_attention
from jaxtune.models.layers import dot_product_attention, resolve_attention_impl
from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv, training_mask


def _segments(rows: int, t: int, seed: int = 0) -> jax.Array:
    """Packed rows: contiguous documents of random lengths, trailing padding (segment 0)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, t), np.int32)
    for r in range(rows):
        at, doc = 0, 1
        while at < t - 8:
            n = int(rng.integers(5, t // 2))
            out[r, at:at + n] = doc
            at, doc = at + n, doc + 1
    return jnp.asarray(out)


# rows, length, query heads, KV heads, head dim, packed, window
CASES = {
    "tiny-odd": (3, 5, 2, 1, 7, False, None),
    "gqa-odd-head-dim": (2, 37, 6, 2, 12, False, None),
    "packed-two-blocks": (2, 130, 4, 4, 64, True, None),
    "window-packed-gqa": (1, 200, 6, 3, 40, True, 33),
    "wide-head": (1, 70, 2, 2, 256, False, None),
}


def test_the_kernel_builds_on_this_machine():
    # The suite's machines have a C++ compiler: a missing kernel here is a failure, not a skip.
    assert unavailable_reason() is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_forward_and_grads(case):
    rows, t, n, kv, h, packed, window = CASES[case]
    q, k, v = qkv(n, kv, rows=rows, t=t, h=h)
    seg = _segments(rows, t) if packed else None
    got = out_and_grads(lambda q, k, v: cpu_attention(q, k, v, segment_ids_BT=seg,
                                                      window=window), q, k, v)
    want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, segment_ids_BT=seg,
                                                             window=window), q, k, v)
    assert_same_out_and_grads(got, want, tol=2e-5)


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(),
                    reason="the AVX2 build needs an x86 CPU with AVX2")
def test_the_avx2_build_matches_the_reference():
    """The kernel built for AVX2 (8-float vectors, a 4-row micro-kernel), as an AVX2-only
    machine builds it, whatever vector width this CPU has: in its own process, since the FFI
    targets are registered once per process."""
    script = textwrap.dedent(f"""
        from jaxtune.kernels import cpu_attention as ca
        from jaxtune.kernels.splash import reference_attention
        from tests.kernel_helpers import assert_same_out_and_grads, out_and_grads, qkv
        from tests.test_kernels_cpu_attention import CASES, _segments
        assert ca.MARCH == "x86-64-v3" and ca.unavailable_reason() is None
        for rows, t, n, kv, h, packed, window in CASES.values():
            q, k, v = qkv(n, kv, rows=rows, t=t, h=h)
            seg = _segments(rows, t) if packed else None
            got = out_and_grads(lambda q, k, v: ca.cpu_attention(
                q, k, v, segment_ids_BT=seg, window=window), q, k, v)
            want = out_and_grads(lambda q, k, v: reference_attention(
                q, k, v, segment_ids_BT=seg, window=window), q, k, v)
            assert_same_out_and_grads(got, want, tol=2e-5)
        print("{len(CASES)} cases ok")
    """)
    env = {**os.environ, "JAXTUNE_CPU_ATTENTION_MARCH": "x86-64-v3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert done.returncode == 0 and f"{len(CASES)} cases ok" in done.stdout, done.stderr[-3000:]


def test_layers_dispatch_to_the_kernel_and_match_xla(caplog):
    """Through ``dot_product_attention``: positions restarting per document (the training
    mask), a custom scale, and no fallback note."""
    _note.cache_clear()
    q, k, v = qkv(4, 2, rows=2, t=150, h=16)
    seg = _segments(2, 150, seed=1)
    starts = jax.vmap(lambda s: jnp.searchsorted(s, s, side="left"))(seg)
    positions = jnp.arange(150)[None] - starts
    mask = training_mask(q, seg).replace(q_positions_BT=positions, k_positions_BS=positions)

    def attend(impl):
        return lambda q, k, v: dot_product_attention(q, k, v, mask=mask, window=None,
                                                     implementation=impl, scale=0.3)

    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.cpu_attention"):
        got = out_and_grads(attend("cpu_flash"), q, k, v)
    assert "falls back" not in caplog.text
    assert_same_out_and_grads(got, out_and_grads(attend("xla"), q, k, v), tol=2e-5)


def test_a_traced_window_per_layer_runs_in_the_kernel():
    """Under a scan over layers each layer's window is a traced scalar (a full layer's is
    huge): the kernel takes it as an operand."""
    q, k, v = qkv(2, 2, rows=1, t=96, h=16)
    windows = jnp.asarray([9, 2**30], jnp.int32)

    def per_layer(q, k, v):
        def body(carry, w):
            return carry, cpu_attention(q, k, v, segment_ids_BT=None, window=w)
        return jax.lax.scan(body, 0, windows)[1]

    got = jax.jit(per_layer)(q, k, v)
    np.testing.assert_allclose(got[0], reference_attention(q, k, v, window=9), atol=2e-5)
    np.testing.assert_allclose(got[1], reference_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("change, note", [
    (dict(softcap=5.0), "logit soft-capping"),
    (dict(dtype=jnp.bfloat16), "compute dtype bfloat16"),
])
def test_unsupported_case_falls_back_to_xla_with_a_note(caplog, change, note):
    _note.cache_clear()  # one note per reason and process
    q, k, v = (x.astype(change.get("dtype", jnp.float32)) for x in qkv(2, 2, rows=1, t=40, h=8))
    kw = dict(mask=training_mask(q, None), window=None, softcap=change.get("softcap"))
    with caplog.at_level(logging.WARNING, logger="jaxtune.kernels.cpu_attention"):
        got = dot_product_attention(q, k, v, implementation="cpu_flash", **kw)
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=1e-6)
    assert "cpu_flash attention falls back to XLA attention: " + note in caplog.text


def test_auto_picks_the_kernel_on_cpu_in_float32_only():
    assert resolve_attention_impl("auto", jnp.float32, 64) == "cpu_flash"
    assert resolve_attention_impl("auto", jnp.bfloat16, 64) == "xla"
    assert resolve_attention_impl("auto", jnp.float32, 64, softcap=True) == "xla"
    with compiling_for("tpu"):
        assert resolve_attention_impl("auto", jnp.float32, 64) == "splash"
        with pytest.raises(Exception, match="cpu_flash is the CPU kernel"):
            resolve_attention_impl("cpu_flash", jnp.float32, 64)

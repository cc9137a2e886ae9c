"""Fused causal attention for XLA:CPU: a C++ kernel of ours behind XLA's FFI.

Axis letters: B batch, T length (queries are the keys), N query heads, K key/value heads,
H head dim.

Why: XLA:CPU has no fused attention. It runs attention as small batched matmuls and row
reductions over materialised ``[B, N, T, S]`` logits, probabilities and their gradients, at
about three times the CPU time of PyTorch's fused SDPA kernel on the same shapes (the op-class
profile in docs/benchmarks.md). :func:`cpu_attention` is what ``attention: cpu_flash`` runs and
what ``auto`` takes on CPU in float32: causal grouped-query attention with packing (segment
ids) and an optional sliding window, forward and backward each one FFI call
(``cpu_attention.cc``). The forward saves the output and each row's log-sum-exp, and the
backward recomputes the probabilities from them (flash attention's backward), so nothing of
size ``T x S`` outlives a 64-row block.

The mask is the training mask of :class:`jaxtune.models.layers.AttentionMask` when queries are
the keys: query ``i`` sees key ``j <= i`` of the same segment (and, with a window ``w``, only
``i - j < w``), by index as splash and the Pallas GPU kernel read it; positions within a
packed document count up from its start, so this is the same mask.

The kernel is compiled once per machine with the system's C++ compiler (``$CXX`` or ``g++``,
``-O3 -march=native``) into ``$JAXTUNE_CACHE/kernels`` (default ``~/.cache/jaxtune``), keyed by
its source, the compiler, jax's FFI headers and the CPU's flags. Where it cannot be built or
does not apply (no compiler, bfloat16 compute, soft-capped logits, a mesh that splits the
sequence or splits KV heads unlike query heads), the caller's XLA attention runs instead, with
a one-line note naming the reason. The tests compare it with
:func:`jaxtune.kernels.splash.reference_attention`, the same function in plain XLA ops. Under
a mesh it runs inside ``shard_map`` over each device's rows and heads
(:mod:`jaxtune.kernels.specs`), like the TPU and GPU kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxtune.kernels import KERNEL_RESIDUALS
from jaxtune.kernels.specs import shard_attention, spec_or_fallback

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cc")
#: The instruction set: this CPU's own by default; ``JAXTUNE_CPU_ATTENTION_MARCH`` names
#: another (the tests build the AVX2 code path, ``x86-64-v3``, on AVX-512 machines too).
MARCH = os.environ.get("JAXTUNE_CPU_ATTENTION_MARCH", "native")
FLAGS = ("-O3", f"-march={MARCH}", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"jaxtune_cpu_attention_fwd": "JaxtuneCpuAttentionForward",
            "jaxtune_cpu_attention_bwd": "JaxtuneCpuAttentionBackward"}


def _cpu_flags() -> str:
    """The CPU's feature flags: ``-march=native`` code is only valid where they match."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        import platform

        return platform.processor()


def _cache_dir() -> Path:
    root = Path(os.environ.get("JAXTUNE_CACHE", "~/.cache/jaxtune")).expanduser()
    return root / "kernels"


def _build(compiler: str) -> Path:
    """The compiled library's path, compiling it first when this machine has none cached."""
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(),
                 Path(include, "xla/ffi/api/ffi.h").read_bytes(), _cpu_flags().encode()):
        key.update(part)
    path = _cache_dir() / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent builds never see half a library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or loaded on this machine (None when it is ready: built,
    loaded and registered with XLA)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler '{compiler}' on PATH to build the CPU attention kernel"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return f"the CPU attention kernel could not be built ({e})"
    return None


def unsupported_reason(q_BTNH: jax.Array, k_BSKH: jax.Array, window: Any,
                       softcap: float | None = None) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    t, s, h = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[-1]
    if t != s:
        return f"query length {t} differs from key length {s} (the kernel is for training)"
    if softcap is not None:
        return "logit soft-capping (the kernel has none)"
    if h != k_BSKH.shape[-1]:
        return "query and key head dims differ"
    dtypes = {jnp.dtype(x.dtype).name for x in (q_BTNH, k_BSKH)}
    if dtypes != {"float32"}:
        return f"compute dtype {', '.join(sorted(dtypes))} (the kernel is float32)"
    return unavailable_reason()


@functools.lru_cache(maxsize=32)
def _note(reason: str) -> None:
    log.warning("cpu_flash attention falls back to XLA attention: %s.", reason)


def _forward(q, k, v, seg, window, scale):
    b, t, n, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    return jax.ffi.ffi_call("jaxtune_cpu_attention_fwd", out_types, vmap_method="sequential")(
        q, k, v, seg, window, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, seg, window, scale):
    return _forward(q, k, v, seg, window, scale)[0]


def _attention_fwd(q, k, v, seg, window, scale):
    # Named, so remat policies that keep matmul outputs keep these too (jaxtune.models.stack).
    out, lse = (checkpoint_name(x, KERNEL_RESIDUALS) for x in _forward(q, k, v, seg, window,
                                                                       scale))
    return out, (q, k, v, seg, window, out, lse)


def _attention_bwd(scale, res, d_out):
    q, k, v, seg, window, out, lse = res
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32))
    dq, dk, dv = jax.ffi.ffi_call("jaxtune_cpu_attention_bwd", out_types,
                                  vmap_method="sequential")(
        q, k, v, seg, window, out, lse, d_out.astype(jnp.float32), scale=np.float32(scale))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _local(q_BTNH, k_BSKH, v_BSKH, seg_BT, *, window, scale):
    """The kernel over one device's rows and heads (segment 1 everywhere when unpacked)."""
    if seg_BT is None:
        seg_BT = jnp.ones(q_BTNH.shape[:2], jnp.int32)
    return _attention(q_BTNH, k_BSKH, v_BSKH, seg_BT, window, scale)


def cpu_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    segment_ids_BT: jax.Array | None,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    fallback: Callable[..., jax.Array] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal GQA attention by the fused CPU kernel, sharded over the current mesh.

    Same contract as :func:`jaxtune.models.layers.dot_product_attention` when queries are the
    keys. ``fallback(q, k, v, segment_ids_BT=..., window=...)`` runs when the kernel cannot
    (see :func:`unsupported_reason`), after a one-line note; without one that case raises.
    """
    spec, out = spec_or_fallback("cpu_flash", unsupported_reason(q_BTNH, k_BSKH, window, softcap),
                                 _note, fallback, q_BTNH, k_BSKH, v_BSKH,
                                 segment_ids_BT=segment_ids_BT, window=window, heads_first=False)
    if out is not None:
        return out
    h = q_BTNH.shape[-1]
    scale = h ** -0.5 if scale is None else float(scale)
    # 0 tells the kernel "no window"; a traced window (one per scanned layer) is an operand too.
    width = jnp.asarray(0 if window is None else window, jnp.int32)
    seg_BT = None if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    local = functools.partial(_local, window=width, scale=scale)
    return shard_attention(local, spec, q_BTNH, k_BSKH, v_BSKH, seg_BT)


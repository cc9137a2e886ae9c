"""Shared NNX building blocks: Linear, Embed, RMSNorm, RoPE (with scaling), attention, gated MLP.

Axis letters (used in names and einsums): B batch, T query length, S key length, D embed,
N query heads, K key/value heads, H head dim, F mlp, V vocab, L layers.

Every projection in every model goes through :class:`Linear`. Its kernel layout is
``[*in_shape, *out_shape]`` and ``__call__`` contracts the trailing ``len(in_shape)`` axes of
the input with the leading axes of the kernel, so heads stay their own axis and no reshape or
transpose is needed around attention:

=========================  ==============  ====================================
projection                 kernel          logical axes
=========================  ==============  ====================================
``q_proj``                 ``[D, N, H]``   ``(embed, heads, head_dim)``
``k_proj`` / ``v_proj``    ``[D, K, H]``   ``(embed, kv_heads, head_dim)``
``o_proj``                 ``[N, H, D]``   ``(heads, head_dim, embed)``
``gate_proj``/``up_proj``  ``[D, F]``      ``(embed, mlp)``
``down_proj``              ``[F, D]``      ``(mlp, embed)``
``lm_head``                ``[D, V]``      ``(embed, vocab)``
=========================  ==============  ====================================

The bias, when present, has the output shape (e.g. ``[N, H]`` for ``q_proj``). Parameters are
stored in ``param_dtype``; a layer computes in the dtype of its input (the model's compute
dtype), casting its weights on the way in.

LoRA (``jaxtune.lora``) plugs into a Linear from outside: it sets ``Linear.lora`` to an adapter
that adds its low-rank update to the output, and may replace ``kernel`` by a frozen quantised
kernel (``jaxtune.quant``) that does the matmul itself, dequantising on the fly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxtune.errors import JaxtuneError
from jaxtune.kernels import target_platform
from jaxtune.neftune import add_noise
from jaxtune.sharding import constrain

Initializer = Callable[..., jax.Array]
INIT_STD = 0.02  # HF's default initializer_range


def _normal(std: float = INIT_STD) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


# --------------------------------------------------------------------------- Linear


def over_rows(x: jax.Array, num_in: int, matmul: Callable[..., jax.Array]) -> jax.Array:
    """``matmul(rows, dimension_numbers)`` over ``x`` with every axis before its trailing
    ``num_in`` merged into one rows axis, the result's leading axes restored.

    A projection over rows has a plain ``[rows, in]^T . [rows, out]`` weight gradient. With
    batch and length separate, XLA:CPU first writes each output gradient out transposed (a
    strided copy fused into the elementwise backward before it), which cost a SwiGLU MLP's
    forward + backward half its time (450 -> 230 ms at 8 x 512 tokens, 512 -> 1376). The TPU
    and GPU compilers merge these axes themselves; the result is the same, bit for bit."""
    lead = x.shape[:x.ndim - num_in]
    rows = x.reshape((-1,) + x.shape[len(lead):])
    y = matmul(rows, ((tuple(range(1, rows.ndim)), tuple(range(num_in))), ((), ())))
    return y.reshape(lead + y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rows_matmul(rows: jax.Array, kernel: jax.Array, dims, out_dtype: Any) -> jax.Array:
    """``rows [R, *in] . kernel [*in, *out] -> [R, *out]`` with :func:`over_rows`'s dimension
    numbers, whose weight gradient is written ``rows^T . dy`` (see :func:`project`)."""
    return jax.lax.dot_general(rows, kernel, dims, preferred_element_type=out_dtype)


def _rows_matmul_fwd(rows, kernel, dims, out_dtype):
    # The matmul itself, not a call of _rows_matmul: the remat policies that keep matmul
    # outputs (dots_saveable, minimal) see it here. Behind a nested custom-VJP call they did
    # not, and the backward ran every projection again (the quickstart's temporaries fell from
    # 0.73 to 0.19 GiB and its step went from 8.4 to 10 s).
    y = jax.lax.dot_general(rows, kernel, dims, preferred_element_type=out_dtype)
    return y, (rows, kernel)


def _rows_matmul_bwd(dims, out_dtype, residuals, dy):
    rows, kernel = residuals
    num_in = len(dims[0][1])
    out_axes = tuple(range(1, dy.ndim))
    dx = jax.lax.dot_general(dy, kernel, ((out_axes, tuple(range(num_in, kernel.ndim))),
                                          ((), ())), preferred_element_type=out_dtype)
    # rows first: JAX's own transpose rule writes this gradient as dy^T . rows, and XLA:CPU then
    # copies dy out transposed before the matmul, once per projection (three times per
    # layer for q, k and v). With rows as the left operand its matmul reads both as they are.
    dw = jax.lax.dot_general(rows, dy, (((0,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return dx.astype(rows.dtype), dw.astype(kernel.dtype)


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def project(x: jax.Array, kernel: jax.Array, num_in: int,
            out_dtype: Any = None) -> jax.Array:
    """``x . kernel`` over the trailing ``num_in`` axes of ``x`` (the leading ``num_in`` of
    ``kernel``), as a matmul over merged rows (:func:`over_rows`).

    Its weight gradient is ``rows^T . dy`` with the rows as the left operand (a custom VJP):
    JAX's transpose rule gives ``dy^T . rows``, for which XLA:CPU writes each output gradient
    out transposed, a strided copy of ``[rows, out]`` per projection (10-25 ms each at
    ``scripts/bench_train.py``'s M size). Same products and sums; the TPU and GPU compilers
    lay out either form alike."""
    return over_rows(x, num_in, lambda rows, dims: _rows_matmul(rows, kernel, dims, out_dtype))


class Linear(nnx.Module):
    """``y = x . kernel (+ bias)`` over the trailing ``len(in_shape)`` axes of ``x``.

    Args:
      in_shape / out_shape: the contracted input dims and the produced output dims.
      in_axes / out_axes: their logical axis names (the kernel carries both, the bias the
        output ones).
      use_bias: add a bias of shape ``out_shape`` (zeros at init).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        in_axes: Sequence[str],
        out_axes: Sequence[str],
        use_bias: bool = False,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        init = kernel_init or _normal()
        self.kernel = nnx.Param(
            init(rngs.params(), in_shape + out_shape, param_dtype),
            logical_axes=tuple(in_axes) + tuple(out_axes),
        )
        self.bias = (
            nnx.Param(jnp.zeros(out_shape, param_dtype), logical_axes=tuple(out_axes))
            if use_bias
            else None
        )
        self.num_in = len(in_shape)
        self.lora = None  # a LoRA adapter (jaxtune.lora.apply_lora) sets this

    def __call__(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
        """Apply the projection; ``out_dtype`` (e.g. float32) sets the accumulation dtype."""
        if isinstance(self.kernel, nnx.Variable):
            y = project(x, self.kernel[...].astype(x.dtype), self.num_in, out_dtype)
        else:  # a quantised kernel (jaxtune.quant.QuantizedKernel), over merged rows too
            y = over_rows(x, self.num_in, lambda rows, dims: self.kernel.dot(rows, dims,
                                                                             out_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora is not None:
            y = self.lora.add(y, x)
        return y


# --------------------------------------------------------------------------- Buffer


class Buffer(nnx.Variable):
    """A checkpoint tensor the model reads but never trains: transformers' persistent buffers
    (Gemma 4's per-layer ``layer_scalar``). Loaded and exported like a parameter (it is in
    :data:`WEIGHTS`), but not an ``nnx.Param``, so training keeps it frozen as transformers
    does."""


#: Every variable a checkpoint holds: parameters and buffers (what loading and export cover).
WEIGHTS = nnx.Any(nnx.Param, Buffer)


# --------------------------------------------------------------------------- Embed, RMSNorm


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; also the output projection when embeddings are tied."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            _normal()(rngs.params(), (vocab_size, dim), param_dtype),
            logical_axes=("vocab", "embed"),
        )

    def __call__(self, ids_BT: jax.Array, dtype: Any) -> jax.Array:
        # NEFTune's noise when the train step asks for it (jaxtune.neftune); none otherwise.
        return add_noise(jnp.take(self.embedding[...], ids_BT, axis=0).astype(dtype))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied lm_head), accumulated in float32."""
        table_VD = self.embedding[...].astype(x_BTD.dtype)
        return jnp.einsum("...D,VD->...V", x_BTD, table_VD, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis, computed in float32 as transformers does.

    ``plus_one`` is Gemma's form: the weight is stored as an offset from 1 (zeros at init),
    ``(1 + w)`` is taken in float32 and the result is rounded to the input dtype only after
    the multiply (Llama rounds before it). ``f32_weight``: Gemma 4's ``x * w`` with the
    multiply in float32 too, rounded after it. ``with_scale=False``: no weight at all (Gemma
    4's value norm and router norm).
    """

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed",
                 param_dtype: Any = jnp.float32, plus_one: bool = False,
                 f32_weight: bool = False, with_scale: bool = True):
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = (nnx.Param(init((dim,), param_dtype), logical_axes=(axis_name,))
                      if with_scale else None)
        self.eps = eps
        self.plus_one = plus_one
        self.f32_weight = f32_weight

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale is None:
            return normed.astype(x.dtype)
        if self.plus_one:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        if self.f32_weight:
            return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)
        # transformers rounds to the input dtype before multiplying by the weight.
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


# --------------------------------------------------------------------------- RoPE

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


@dataclass(frozen=True)
class RopeParameters:
    """RoPE settings in transformers' ``rope_parameters`` spelling (unset fields are None)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn
    partial_rotary_factor: float | None = None  # proportional (Gemma 4's full layers)

    @classmethod
    def from_hf(cls, params: dict[str, Any], max_position_embeddings: int) -> RopeParameters:
        """Parse a standardised ``rope_parameters`` dict (``rope_type`` and ``rope_theta`` set)."""
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise JaxtuneError(
                f"RoPE type '{rope_type}' is not supported; jaxtune supports "
                f"{', '.join(ROPE_TYPES)}. Check rope_parameters / rope_scaling in config.json."
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(params) - known - {"type"})
        partial = params.get("partial_rotary_factor", 1.0)
        if unknown or (rope_type != "proportional" and partial not in (None, 1.0)):
            raise JaxtuneError(
                f"RoPE parameters {unknown or ['partial_rotary_factor']} are not supported "
                f"for rope_type '{rope_type}'."
            )
        fields = {k: v for k, v in params.items() if k in known}
        fields["rope_type"] = rope_type
        if rope_type in ("llama3", "yarn"):
            fields.setdefault("original_max_position_embeddings", max_position_embeddings)
        need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor",)}.get(rope_type, ())
        missing = [k for k in need if fields.get(k) is None]
        if missing:
            raise JaxtuneError(f"RoPE type '{rope_type}' needs {missing} in rope_parameters.")
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@functools.lru_cache(maxsize=64)
def rope_frequencies(rope: RopeParameters, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[H/2]`` (float32) and the cos/sin scale, as transformers computes them.

    Follows ``transformers.modeling_rope_utils`` for the default, linear, llama3, yarn and
    proportional types. ``proportional`` (Gemma 4's full layers) rotates the first
    ``partial_rotary_factor * H / 2`` frequency pairs with exponents over the whole head dim
    and leaves the rest unrotated (frequency 0), then divides by ``factor``.
    """
    dim = head_dim
    base = float(rope.rope_theta)
    if rope.rope_type == "proportional":
        angles = int((rope.partial_rotary_factor if rope.partial_rotary_factor is not None
                      else 1.0) * dim // 2)
        exponents = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / np.float32(
            dim)
        rotated = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
        inv_freq = np.concatenate([rotated, np.zeros(dim // 2 - angles, np.float32)])
        return (inv_freq / np.float32(rope.factor or 1.0)).astype(np.float32), 1.0
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    scale = 1.0
    kind = rope.rope_type
    if kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope)
    elif kind == "yarn":
        inv_freq, scale = _yarn_inv_freq(rope, dim, base)
    return inv_freq.astype(np.float32), float(scale)


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeParameters) -> np.ndarray:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(rope: RopeParameters, dim: int, base: float) -> tuple[np.ndarray, float]:
    factor = rope.factor
    orig_len = rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extra_factor = (1 - ramp).astype(np.float32)
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq.astype(np.float32), attention_factor


def rope_cos_sin(positions_BT: jax.Array, rope: RopeParameters, head_dim: int,
                 dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables ``[B, T, H/2]`` for the given positions, in ``dtype``."""
    inv_freq, scale = rope_frequencies(rope, head_dim)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return (jnp.cos(angles_BTh) * scale).astype(dtype), (jnp.sin(angles_BTh) * scale).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dim (transformers' ``rotate_half`` convention).

    As ``x * [cos, cos] + [x2, x1] * [-sin, sin]``: the same products and sums as
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` (bit for bit), but the only concatenations are of
    ``x``'s halves and of the small tables, so the rotation is one elementwise pass; the two
    half-width results joined at the end made XLA:CPU emit slow concatenate fusions forward
    and backward (measured on 2 CPU cores: the M step of ``scripts/bench_train.py`` 4-10%
    faster, docs/benchmarks.md).
    """
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    cos_BT1H = jnp.concatenate([cos_BTh, cos_BTh], axis=-1)[:, :, None, :]
    sin_BT1H = jnp.concatenate([-sin_BTh, sin_BTh], axis=-1)[:, :, None, :]
    return x_BTNH * cos_BT1H + jnp.concatenate([x2, x1], axis=-1) * sin_BT1H


# --------------------------------------------------------------------------- attention

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "pallas_gpu", "cpu_flash")


def resolve_attention_impl(choice: str, dtype: Any, head_dim: int, *,
                           softcap: bool = False) -> str:
    """Pick the attention kernel: ``auto`` takes splash on TPU; on GPU cuDNN flash where it
    applies, else the Pallas Triton kernel (``pallas_gpu``: float32 compute, head dims above
    128), else XLA with a one-line note; on CPU the fused C++ kernel (``cpu_flash``) in
    float32 without a soft-cap, else XLA.

    The platform is the one being compiled for (``jaxtune.kernels.target_platform``).
    ``softcap``: the model soft-caps attention logits, which neither GPU kernel can do;
    ``auto`` then takes XLA (with a one-line note) and an explicit ``cudnn`` is an error.
    An explicit ``pallas_gpu`` (like ``splash``) is taken on any platform: off GPU it runs in
    Pallas' interpret mode, and a case it cannot take falls back to XLA with a note."""
    if choice not in ATTENTION_IMPLS:
        raise JaxtuneError(f"attention='{choice}' is not one of {', '.join(ATTENTION_IMPLS)}.")
    platform = target_platform()
    if choice == "auto" and platform == "tpu":
        return "splash"
    on_gpu = platform == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim % 8 == 0 and head_dim <= 128
    if choice == "cudnn" and not (on_gpu and half and fits):
        # Fail at build time with the reason, not deep inside XLA lowering.
        why = ("it needs an NVIDIA GPU, this run is on " + jax.default_backend()) if not on_gpu \
            else (f"it needs bfloat16/float16 compute, not {jnp.dtype(dtype).name}") if not half \
            else f"it needs a head dim that is a multiple of 8 and <= 128, not {head_dim}"
        raise JaxtuneError(f"model.attention: cudnn cannot be used: {why}. Use attention: auto "
                           "(cuDNN where it applies, then the Pallas GPU kernel, XLA elsewhere).")
    if choice == "cudnn" and softcap:
        raise JaxtuneError("model.attention: cudnn cannot be used: this model soft-caps its "
                           "attention logits, which cuDNN's fused kernel cannot do. Use "
                           "attention: auto or xla.")
    if choice == "cpu_flash" and platform != "cpu":
        raise JaxtuneError(f"model.attention: cpu_flash is the CPU kernel, and this program is "
                           f"compiled for {platform}. Use attention: auto.")
    if choice != "auto":
        return choice
    if platform == "cpu":
        # The kernel is float32 and cannot soft-cap; where it cannot be built or sharded it
        # falls back to XLA itself, with a note (jaxtune.kernels.cpu_attention).
        f32 = jnp.dtype(dtype) == jnp.dtype(jnp.float32)
        return "cpu_flash" if f32 and not softcap else "xla"
    if not on_gpu:
        return "xla"
    if softcap:
        _softcap_note()
        return "xla"
    if half and fits:
        return "cudnn"
    from jaxtune.kernels.pallas_gpu import static_reason

    reason = static_reason(dtype, head_dim)
    if reason is None:
        return "pallas_gpu"
    _auto_note(reason)
    return "xla"


@functools.lru_cache(maxsize=1)
def _softcap_note() -> None:
    import logging

    logging.getLogger(__name__).warning(
        "attention: auto uses XLA attention: cuDNN and the Pallas GPU kernel cannot soft-cap "
        "attention logits.")


@functools.lru_cache(maxsize=8)
def _auto_note(reason: str) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "attention: auto uses XLA attention: cuDNN does not apply and the Pallas GPU kernel "
        "cannot run: %s.", reason)


@struct.dataclass
class AttentionMask:
    """Which keys each query may see, built from positions and segment ids.

    A query at position ``p`` sees a key at position ``q <= p`` of the same segment (and, in a
    layer with a sliding window ``w``, only ``p - q < w``). Segment 0 is padding: it sees only
    padding, so no row is empty. The same mask serves training (queries are the keys), prefill
    and decoding against a cache (keys are the cache's slots, with their own positions and
    segment ids: an empty slot has segment 0, which no real query sees).

    ``aligned`` (static) says the queries are the keys, in order: then a key after its query
    (by index) is never seen, which lets attention skip the blocks above the diagonal.
    """

    q_positions_BT: jax.Array
    k_positions_BS: jax.Array
    q_segment_ids_BT: jax.Array | None = None
    k_segment_ids_BS: jax.Array | None = None
    aligned: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def causal(cls, positions_BT: jax.Array, segment_ids_BT: jax.Array | None = None
               ) -> AttentionMask:
        """Self-attention over one (possibly packed) sequence: training and prefill."""
        return cls(positions_BT, positions_BT, segment_ids_BT, segment_ids_BT, aligned=True)

    def allowed(self, window: int | jax.Array | None, q_slice: slice = slice(None),
                k_slice: slice = slice(None)) -> jax.Array:
        """Boolean ``[B, 1, t, s]``: may query ``t`` (of ``q_slice``) see key ``s``?"""
        q_pos = self.q_positions_BT[:, q_slice][:, :, None]
        k_pos = self.k_positions_BS[:, k_slice][:, None, :]
        ok_BTS = k_pos <= q_pos
        if window is not None:
            ok_BTS = ok_BTS & (q_pos - k_pos < window)
        if self.q_segment_ids_BT is not None:
            seg_q = self.q_segment_ids_BT[:, q_slice][:, :, None]
            seg_k = self.k_segment_ids_BS[:, k_slice][:, None, :]
            ok_BTS = ok_BTS & (seg_q == seg_k)
        if self.aligned:  # by index too, so any positions give a causal mask
            t = self.q_positions_BT.shape[1]
            q_idx = jnp.arange(t)[q_slice][:, None]
            k_idx = jnp.arange(t)[k_slice][None, :]
            ok_BTS = ok_BTS & (k_idx <= q_idx)[None]
        return ok_BTS[:, None]


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    mask: AttentionMask,
    window: int | jax.Array | None,
    implementation: str,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention of queries ``T`` over keys ``S`` as ``mask`` allows.

    ``window``: a query attends to keys less than ``window`` positions before it (itself
    included), as transformers' sliding window does; a Python int is static (and reaches
    cuDNN's sliding window), an array (a per-layer window under scan) is applied in the mask.
    ``scale`` multiplies the logits (default ``1/sqrt(H)``); ``softcap`` then maps them to
    ``softcap * tanh(logits / softcap)`` before the mask (Gemma 2), on every path.
    """
    def xla(q, k, v, *, segment_ids_BT, window):
        # What a kernel falls back to where it cannot run: the same function (window, soft-cap
        # and scale included) in XLA ops.
        return dot_product_attention(q, k, v, mask=mask, window=window, implementation="xla",
                                     softcap=softcap, scale=scale)

    # The kernels read the mask as index-causal with segment ids, which is this mask when the
    # queries are the keys; each falls back to XLA where it cannot run.
    if implementation == "splash" and mask.aligned:  # Pallas TPU kernel (soft-caps itself)
        from jaxtune.kernels.splash import splash_attention

        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=mask.q_segment_ids_BT,
                                window=window, fallback=xla, attn_logits_soft_cap=softcap,
                                scale=scale)
    if implementation == "pallas_gpu" and mask.aligned:  # Pallas Triton kernel
        from jaxtune.kernels.pallas_gpu import pallas_gpu_attention

        return pallas_gpu_attention(q_BTNH, k_BSKH, v_BSKH,
                                    segment_ids_BT=mask.q_segment_ids_BT, window=window,
                                    softcap=softcap, fallback=xla, scale=scale)
    if implementation == "cpu_flash" and mask.aligned:  # the C++ kernel behind XLA's FFI
        from jaxtune.kernels.cpu_attention import cpu_attention

        return cpu_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=mask.q_segment_ids_BT,
                             window=window, softcap=softcap, fallback=xla, scale=scale)
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    if implementation == "xla" and mask.aligned and t == s and t >= 2 * _CAUSAL_BLOCK:
        return _blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH, mask, window, softcap, scale)
    if implementation == "cudnn" and softcap is not None:
        raise JaxtuneError("cuDNN attention cannot soft-cap attention logits; use attention: "
                           "auto or xla.")
    if implementation == "cudnn" and mask.aligned:
        # cuDNN's fused causal kernel: index-causal with a static window, segments as a mask.
        seg = mask.q_segment_ids_BT
        seg_mask = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]
        local_window = (window - 1, 0) if isinstance(window, int) else None
        if window is not None and local_window is None:
            seg_mask = mask.allowed(window) if seg_mask is None else seg_mask & mask.allowed(
                window)
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=seg_mask, is_causal=True,
            local_window_size=local_window, implementation="cudnn", scale=scale)
    # Everything else (decoding against a cache, short sequences) is XLA's, masked.
    return _masked_attention(q_BTNH, k_BSKH, v_BSKH, mask.allowed(window), softcap, scale)


def _masked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_B1TS, softcap, scale):
    """XLA attention under a boolean mask; soft-capped logits are computed by einsum, since
    ``jax.nn.dot_product_attention`` cannot soft-cap."""
    if softcap is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=allowed_B1TS,
                                            scale=scale, implementation="xla")
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    scale = h ** -0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    # As transformers' eager attention: q.k in the compute dtype, scaled, capped, masked,
    # softmax in float32, probabilities back in the compute dtype.
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH) * jnp.asarray(
        scale, q_BTNH.dtype)
    logits_BKGTS = logits_BKGTS.astype(jnp.float32)
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
    logits_BKGTS = jnp.where(allowed_B1TS[:, :, None], logits_BKGTS,
                             jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


#: Query block of the XLA path. Causal attention over T tokens needs only the keys up to each
#: query block's end, so splitting the queries skips the blocks above the diagonal (measured on
#: CPU at T=512, 8 heads of 64: forward + backward 0.25 s -> 0.13 s). At most 8 blocks keep the
#: unrolled graph small.
_CAUSAL_BLOCK = 128


def _blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, window,
                              softcap=None, scale=None):
    """Causal attention computed per query block against the keys that block can see.

    q, k and v are put head-major (``[B, K, G, T, H]``, ``[B, K, S, H]``) once, before the
    blocks, so every block's matmuls batch over contiguous heads and slice the sequence axis
    in place; slicing ``[B, T, N, H]`` per block made XLA copy (transpose) each block's q, k and
    v again, forward and backward (measured on 2 CPU cores, forward + backward: 8x512, 8 heads
    of 64, 157 -> 146 ms; 8x256, 9 heads over 3 KV heads, 42 -> 35 ms).
    """
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    scale = h ** -0.5 if scale is None else scale
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    block = max(_CAUSAL_BLOCK, -(-t // 8))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = 0
        if isinstance(window, int):  # keys before the window of the block's first query
            first = max(0, (start - window + 1) // block * block)
        allowed = mask.allowed(window, slice(start, end), slice(first, end))
        outs.append(_grouped_attention(q_BKGTH[:, :, :, start:end], k_BKSH[:, :, first:end],
                                       v_BKSH[:, :, first:end], allowed, softcap, scale))
    out_BKGTH = jnp.concatenate(outs, axis=3)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _grouped_attention(q_BKGTH, k_BKSH, v_BKSH, allowed_B1TS, softcap, scale):
    """Head-major attention of one query block, with the numerics of :func:`_masked_attention`
    (``jax.nn.dot_product_attention``'s without a soft-cap: float32 logits, scaled after the
    matmul; with one: transformers' eager order)."""
    if softcap is None:
        logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH,
                                  preferred_element_type=jnp.float32) * jnp.float32(scale)
    else:
        logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH) * jnp.asarray(
            scale, q_BKGTH.dtype)
        logits_BKGTS = logits_BKGTS.astype(jnp.float32)
        logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
    logits_BKGTS = jnp.where(allowed_B1TS[:, :, None], logits_BKGTS,
                             jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    return jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)


@struct.dataclass
class LayerKV:
    """One layer's slice of a generation KV cache (``jaxtune.generate.cache.KVCache``).

    ``k_BSKH`` / ``v_BSKH`` hold ``S`` slots in the cache dtype; ``index`` is the slot the
    current call's first new token goes to (the same for every row: prompts are left-padded).
    Under a scanned stack every leaf has a leading ``[L]`` axis, ``index`` included.

    A sliding-window layer's cache may be a **ring** of ``W`` slots (its window): it then
    keeps each slot's own position and segment id (``positions_BS`` / ``segment_ids_BS``;
    ``None`` for a cache of every slot, whose positions are the :class:`KVCache`'s) and token
    ``index + j`` lives in slot ``(index + j) % W``, as transformers' sliding-window cache
    keeps only the window.
    """

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    index: jax.Array
    positions_BS: jax.Array | None = None  # int32, ring only
    segment_ids_BS: jax.Array | None = None  # int32, ring only; 0 = empty slot or padding

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array) -> LayerKV:
        """The cache with ``T`` new keys / values at slots ``index .. index + T - 1``."""
        names = ("batch", "seq", "kv_heads", "head_dim")
        at = (0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k_BSKH, k_BTKH.astype(self.k_BSKH.dtype), at)
        v = jax.lax.dynamic_update_slice(self.v_BSKH, v_BTKH.astype(self.v_BSKH.dtype), at)
        return self.replace(k_BSKH=constrain(k, names), v_BSKH=constrain(v, names))

    def write_and_read(self, k_BTKH: jax.Array, v_BTKH: jax.Array, mask: AttentionMask
                       ) -> tuple[LayerKV, jax.Array, jax.Array, AttentionMask]:
        """``(updated cache, keys, values, mask)``: what the ``T`` new tokens' queries attend
        over, in the cache dtype, and their mask (``mask``'s queries over those keys).

        A cache of every slot writes the new keys and values, then the queries attend over
        all its slots with ``mask`` (the :class:`KVCache`'s slots). A ring attends as the
        window needs: one token (decoding) is written over the slot of the token ``W``
        positions before it, which its window no longer sees, then it attends over the ring;
        several tokens (a prompt, possibly longer than ``W``) attend over the ring's slots
        followed by themselves, then the last ``min(T, W)`` of them are kept."""
        if self.positions_BS is None:
            cache = self.write(k_BTKH, v_BTKH)
            return cache, cache.k_BSKH, cache.v_BSKH, mask
        names = ("batch", "seq", "kv_heads", "head_dim")
        b, t = k_BTKH.shape[:2]
        w = self.k_BSKH.shape[1]
        k_BTKH, v_BTKH = k_BTKH.astype(self.k_BSKH.dtype), v_BTKH.astype(self.v_BSKH.dtype)
        q_pos_BT = mask.q_positions_BT.astype(jnp.int32)
        q_seg_BT = (jnp.ones((b, t), jnp.int32) if mask.q_segment_ids_BT is None
                    else mask.q_segment_ids_BT.astype(jnp.int32))
        if t == 1:
            slot = self.index % w
            k = jax.lax.dynamic_update_slice(self.k_BSKH, k_BTKH, (0, slot, 0, 0))
            v = jax.lax.dynamic_update_slice(self.v_BSKH, v_BTKH, (0, slot, 0, 0))
            pos = jax.lax.dynamic_update_slice(self.positions_BS, q_pos_BT, (0, slot))
            seg = jax.lax.dynamic_update_slice(self.segment_ids_BS, q_seg_BT, (0, slot))
            cache = self.replace(k_BSKH=constrain(k, names), v_BSKH=constrain(v, names),
                                 positions_BS=pos, segment_ids_BS=seg)
            return cache, cache.k_BSKH, cache.v_BSKH, AttentionMask(q_pos_BT, pos, q_seg_BT,
                                                                     seg)
        keys = jnp.concatenate([self.k_BSKH, k_BTKH], axis=1)
        values = jnp.concatenate([self.v_BSKH, v_BTKH], axis=1)
        read = AttentionMask(q_pos_BT, jnp.concatenate([self.positions_BS, q_pos_BT], axis=1),
                             q_seg_BT, jnp.concatenate([self.segment_ids_BS, q_seg_BT], axis=1))
        n = min(t, w)  # the new tokens the ring keeps: the last n, at their slots mod W
        slots_N = (self.index + jnp.arange(t - n, t)) % w
        cache = self.replace(
            k_BSKH=constrain(self.k_BSKH.at[:, slots_N].set(k_BTKH[:, t - n:]), names),
            v_BSKH=constrain(self.v_BSKH.at[:, slots_N].set(v_BTKH[:, t - n:]), names),
            positions_BS=self.positions_BS.at[:, slots_N].set(q_pos_BT[:, t - n:]),
            segment_ids_BS=self.segment_ids_BS.at[:, slots_N].set(q_seg_BT[:, t - n:]))
        return cache, keys, values, read


class Attention(nnx.Module):
    """Self-attention with grouped KV heads, RoPE, optional q/k/v/o biases and q/k RMSNorm.

    ``qk_norm_plus_one`` makes the q/k norms Gemma's ``(1 + w)`` RMSNorm; ``scale`` and
    ``softcap`` are passed to :func:`dot_product_attention` (defaults: ``1/sqrt(H)``, none).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        qk_norm_plus_one: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
        implementation: str = "xla",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        def proj(heads: int, axis: str, bias: bool) -> Linear:
            return Linear((dim,), (heads, head_dim), in_axes=("embed",),
                          out_axes=(axis, "head_dim"), use_bias=bias, param_dtype=param_dtype,
                          rngs=rngs)

        self.q_proj = proj(num_heads, "heads", qkv_bias)
        self.k_proj = proj(num_kv_heads, "kv_heads", qkv_bias)
        self.v_proj = proj(num_kv_heads, "kv_heads", qkv_bias)
        self.o_proj = Linear((num_heads, head_dim), (dim,), in_axes=("heads", "head_dim"),
                             out_axes=("embed",), use_bias=out_bias, param_dtype=param_dtype,
                             rngs=rngs)
        if qk_norm_eps is not None:  # Qwen3, Gemma 3: RMSNorm over each head before RoPE
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, axis_name="head_dim",
                                  param_dtype=param_dtype, plus_one=qk_norm_plus_one)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, axis_name="head_dim",
                                  param_dtype=param_dtype, plus_one=qk_norm_plus_one)
        else:
            self.q_norm = self.k_norm = None
        self.implementation = implementation
        self.scale = scale
        self.softcap = softcap

    def __call__(self, x_BTD: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array,
                 mask: AttentionMask, window: int | jax.Array | None,
                 cache: LayerKV | None = None) -> jax.Array | tuple[jax.Array, LayerKV]:
        """Attention output ``[B, T, D]``; with a ``cache`` (generation), ``(output, cache)``:
        the new keys and values are written at ``cache.index`` and the queries attend over
        the cache's slots, as ``mask`` (keys = cache slots) allows (a ring cache: over its
        window, ``LayerKV.write_and_read``)."""
        q_BTNH = self.q_proj(x_BTD)
        k_BTKH = self.k_proj(x_BTD)
        v_BTKH = self.v_proj(x_BTD)
        if self.q_norm is not None:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BTNH = constrain(apply_rope(q_BTNH, cos_BTh, sin_BTh),
                           ("batch", "seq", "heads", "head_dim"))
        k_BTKH = constrain(apply_rope(k_BTKH, cos_BTh, sin_BTh),
                           ("batch", "seq", "kv_heads", "head_dim"))
        if cache is not None:
            cache, k_BSKH, v_BSKH, mask = cache.write_and_read(k_BTKH, v_BTKH, mask)
            out_BTNH = dot_product_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype),
                                             v_BSKH.astype(q_BTNH.dtype), mask=mask,
                                             window=window, implementation="xla",
                                             softcap=self.softcap, scale=self.scale)
            return self.o_proj(out_BTNH), cache
        out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask, window=window,
                                         implementation=self.implementation,
                                         softcap=self.softcap, scale=self.scale)
        return self.o_proj(out_BTNH)


# --------------------------------------------------------------------------- MLP

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class GatedMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))``: the SwiGLU feed-forward block."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "silu", use_bias: bool = False,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        def lin(n_in: int, n_out: int, a_in: str, a_out: str) -> Linear:
            return Linear((n_in,), (n_out,), in_axes=(a_in,), out_axes=(a_out,),
                          use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)

        self.gate_proj = lin(dim, hidden, "embed", "mlp")
        self.up_proj = lin(dim, hidden, "embed", "mlp")
        self.down_proj = lin(hidden, dim, "mlp", "embed")
        self.activation = activation

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h_BTF = act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(constrain(h_BTF, ("batch", "seq", "mlp")))

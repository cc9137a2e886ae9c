"""Weight-only quantisation of frozen Linear kernels (the base of a QLoRA run).

A :class:`QuantizedKernel` replaces a frozen ``Linear.kernel``. ``kernel[...]`` returns the
dequantised float32 kernel, and ``Linear`` calls :meth:`QuantizedKernel.dot` for its matmul:
a ``dot_general`` with the kernel dequantised on the fly whose backward pass dequantises it
again instead of keeping a float copy of every layer's kernel for the gradient (which plain
autodiff would do without remat, undoing the savings). The kernel itself gets no gradient.
Kernels are ``[*in_shape, *out_shape]`` (plus a leading ``layers`` axis when stacked); the
input dims are the contracted ones.

Two formats:

- ``int8``: symmetric per-output-channel absmax. ``scale = max|W| / 127`` over the input dims,
  ``codes = round(W / scale)`` in ``[-127, 127]``; each weight is off by at most ``scale / 2``.
  1 byte per weight (plus one float32 per output channel).
- ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023) with blockwise absmax: the input
  dims are flattened and cut into blocks of :data:`NF4_BLOCK` weights per output channel (a
  smaller divisor of the input size when 64 does not divide it); each weight becomes the index
  of the nearest of the 16 :data:`NF4_CODEBOOK` values after dividing by its block's absmax.
  Two codes are packed per byte, so 0.5 byte per weight plus one float32 per block (no double
  quantisation of the scales).

The stored variables are :class:`QuantizedParam` (an ``nnx.Param`` subclass, so parameter
counts include them and a strict HF export refuses them until the model is merged) with
logical axes derived from the kernel's, so they shard like the kernel they replace.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import JaxtuneError

FORMATS = ("int8", "nf4")

#: The 16 NF4 values (bitsandbytes' ``NF4`` table, QLoRA appendix E): quantiles of N(0, 1)
#: rescaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
#: Midpoints between neighbouring codes: a value's code is how many midpoints lie below it.
_NF4_MIDPOINTS = ((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2).astype(np.float32)
NF4_BLOCK = 64  # weights per absmax block (QLoRA's block size)


class QuantizedParam(nnx.Param):
    """Frozen quantised storage (codes or scales) of a kernel; never trained."""


def nf4_block_size(in_size: int, block: int = NF4_BLOCK) -> int:
    """The largest even block size ``<= block`` that divides ``in_size``."""
    for b in range(min(block, in_size), 1, -1):
        if in_size % b == 0 and b % 2 == 0:
            return b
    raise JaxtuneError(f"NF4 needs an even input size to pack two codes per byte; a kernel has "
                       f"{in_size} inputs. Use lora.quantize_base: int8 for this model.")


class QuantizedKernel(nnx.Module):
    """A frozen kernel held quantised; ``kernel[...]`` gives it back dequantised (float32).

    Build with :func:`quantize_kernel`. ``in_shape`` is the kernel's input shape (without the
    ``layers`` axis), ``out_ndim`` the number of output dims.
    """

    def __init__(self, fmt: str, codes: QuantizedParam, scale: QuantizedParam,
                 in_shape: tuple[int, ...], out_ndim: int, dtype: Any,
                 logical_axes: tuple[str | None, ...] | None):
        self.format = fmt
        self.codes = codes
        self.scale = scale
        self.in_shape = tuple(in_shape)
        self.out_ndim = out_ndim
        self.dtype = jnp.dtype(dtype)  # the dtype the kernel had before quantisation
        self.logical_axes = logical_axes  # the kernel's, for when it is dequantised again

    def __getitem__(self, index: Any) -> jax.Array:
        return self.dequantize()[index]

    def dequantize(self) -> jax.Array:
        """The float32 kernel ``[*lead, *in_shape, *out_shape]`` these codes stand for."""
        return self._dequantize(self.codes[...], self.scale[...])

    def _dequantize(self, codes: jax.Array, scale: jax.Array) -> jax.Array:
        if self.format == "int8":
            return codes.astype(jnp.float32) * scale
        # nf4: codes [*lead, blocks, block/2, *out] uint8, scale [*lead, blocks, 1, *out]
        values = _unpack_nf4(codes, codes.ndim - self.out_ndim - 2)
        lead = codes.shape[: codes.ndim - self.out_ndim - 2]
        out = codes.shape[codes.ndim - self.out_ndim:]
        return (values * scale).reshape(*lead, *self.in_shape, *out)

    def dot(self, x: jax.Array, dims: Any, out_dtype: Any = None) -> jax.Array:
        """``dot_general(x, kernel, dims)`` in ``x``'s dtype; the backward recomputes the
        kernel from the codes (residuals: the codes and scales, which are held anyway)."""
        dequantize, x_shape = self._dequantize, jax.ShapeDtypeStruct(x.shape, x.dtype)

        def forward(x, codes, scale):
            kernel = dequantize(codes, scale).astype(x.dtype)
            return jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_dtype)

        @jax.custom_vjp
        def frozen_dot(x, codes, scale):
            return forward(x, codes, scale)

        def fwd(x, codes, scale):
            return forward(x, codes, scale), (codes, scale)

        def bwd(residuals, g):
            codes, scale = residuals
            (dx,) = jax.linear_transpose(lambda x: forward(x, codes, scale), x_shape)(g)
            return dx, None, None  # frozen: no gradient for the codes or scales

        frozen_dot.defvjp(fwd, bwd)
        return frozen_dot(x, self.codes[...], self.scale[...])


def quantize_kernel(kernel: jax.Array, fmt: str, *, num_in: int, lead: int,
                    logical_axes: tuple[str | None, ...] | None, dtype: Any = None
                    ) -> QuantizedKernel:
    """Quantise ``kernel`` ``[*lead, *in, *out]`` (``num_in`` input dims after ``lead``)."""
    if fmt not in FORMATS:
        raise JaxtuneError(f"Quantisation format '{fmt}' is not one of {', '.join(FORMATS)}.")
    w = kernel.astype(jnp.float32)
    in_shape = w.shape[lead: lead + num_in]
    out_ndim = w.ndim - lead - num_in
    axes = tuple(logical_axes) if logical_axes is not None else (None,) * w.ndim
    if fmt == "int8":
        codes, scale = _quantize_int8(w, lead, num_in)
        code_axes = scale_axes = axes
    else:
        codes, scale = _quantize_nf4(w, lead, num_in)
        # [*lead, blocks, block/2, *out]: blocks follow the first input dim's sharding.
        code_axes = scale_axes = axes[:lead] + (axes[lead], None) + axes[lead + num_in:]
    return QuantizedKernel(fmt, QuantizedParam(codes, logical_axes=code_axes),
                           QuantizedParam(scale, logical_axes=scale_axes), in_shape, out_ndim,
                           dtype or kernel.dtype, logical_axes)


def _quantize_int8(w: jax.Array, lead: int, num_in: int) -> tuple[jax.Array, jax.Array]:
    absmax = jnp.max(jnp.abs(w), axis=tuple(range(lead, lead + num_in)), keepdims=True)
    scale = absmax / 127.0
    codes = jnp.round(w / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def _quantize_nf4(w: jax.Array, lead: int, num_in: int) -> tuple[jax.Array, jax.Array]:
    shape = w.shape
    in_size = math.prod(shape[lead: lead + num_in])
    block = nf4_block_size(in_size)
    blocks = w.reshape(*shape[:lead], in_size // block, block, *shape[lead + num_in:])
    absmax = jnp.max(jnp.abs(blocks), axis=lead + 1, keepdims=True)
    normalised = blocks / jnp.where(absmax > 0, absmax, 1.0)
    # side='left' counts the midpoints strictly below each value: the nearest code (a tie goes
    # to the lower one). The default scan method never builds a [..., 15] comparison.
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normalised, side="left")
    codes = codes.astype(jnp.uint8)
    # Pack neighbours within a block: even index in the high nibble, odd in the low one.
    even = jax.lax.slice_in_dim(codes, 0, block, 2, axis=lead + 1)
    odd = jax.lax.slice_in_dim(codes, 1, block, 2, axis=lead + 1)
    return (even << 4) | odd, absmax


def _unpack_nf4(packed: jax.Array, axis: int) -> jax.Array:
    """Float32 codebook values ``[..., blocks, block, ...]`` from packed codes."""
    table = jnp.asarray(NF4_CODEBOOK)
    high = jnp.take(table, (packed >> 4).astype(jnp.int32))
    low = jnp.take(table, (packed & 15).astype(jnp.int32))
    pairs = jnp.stack([high, low], axis=axis + 2)  # [..., blocks, block/2, 2, ...]
    shape = list(packed.shape)
    shape[axis + 1] *= 2
    return pairs.reshape(shape)

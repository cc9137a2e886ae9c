"""The one dtype table: the float dtypes jaxtune loads, trains in and exports, and their
safetensors codes (every other module reads these instead of keeping its own spelling)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

#: Float dtypes of parameters, checkpoints and exports.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")

#: numpy dtype name -> safetensors dtype code (floats first; the rest for writing any array).
SAFETENSORS_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                     "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                     "uint8": "U8", "bool": "BOOL"}

#: safetensors code -> dtype name, for the float codes a model checkpoint may hold.
LOADABLE_CODES = {SAFETENSORS_CODES[name]: name for name in FLOAT_DTYPES}


def numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype (bfloat16 included, via ml_dtypes) from a name, a safetensors code or a
    dtype."""
    if isinstance(dtype, str) and dtype in LOADABLE_CODES:
        dtype = LOADABLE_CODES[dtype]
    return np.dtype(jnp.dtype(dtype))

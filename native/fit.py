"""Block fits in C (native/fit.c): the bytes our numpy codecs write (convert/codecs), without Python per group.

    raw = quantize(w, qtype, importance)   # (rows, n) float32 -> (rows, row bytes) uint8, as codec(qtype).quantize

The call holds no Python state and cffi releases the GIL around it, so threads may encode disjoint rows at once
(`out` lets them share one result array).  `isa`: "scalar" (the portable build: SSE2 or NEON vectors), "avx2", or
"best"; every build writes the same bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from . import _isa
from ._kernels import ffi, lib

NEEDS_IMPORTANCE = (GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ1_S)  # as the codecs' needs_importance


def supports(qtype: GGMLQuantizationType) -> bool:
    return bool(lib.eq_fit_supported(int(qtype)))


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    return n // lib.eq_block_size(int(qtype)) * lib.eq_type_size(int(qtype))


def quantize(w: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None = None,
             out: np.ndarray | None = None, isa: str = "best") -> np.ndarray:
    """(rows, n) float32 -> (rows, row_bytes) uint8, into `out` if given (C-contiguous, that shape)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    if out is None:
        out = np.empty((rows, row_bytes(qtype, n)), dtype=np.uint8)
    if out.shape != (rows, row_bytes(qtype, n)) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"{qtype.name}: out must be C-contiguous uint8 {(rows, row_bytes(qtype, n))}")
    if importance is None and qtype in NEEDS_IMPORTANCE:
        raise ValueError(f"{qtype.name}: ggml quantizes this type only with an importance vector")
    imp = ffi.NULL
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n,):
            raise ValueError(f"importance has shape {importance.shape}, expected ({n},)")
        imp = ffi.cast("float *", importance.ctypes.data)
    status = lib.eq_fit_rows(_isa(isa), int(qtype), ffi.cast("float *", w.ctypes.data), ffi.cast("void *", out.ctypes.data),
                             rows, n, imp)
    if status != 0:
        raise ValueError(f"no native fit for {qtype.name} rows of {n}")
    return out

"""bf16 -> float32 in C (native/widen.c), counting NaN/Inf in the same pass; the GIL is released while it runs."""

from __future__ import annotations

import numpy as np

from ._kernels import ffi, lib


def bf16_to_float32(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """(n,) uint16 bf16 bit patterns -> ((n,) float32, number of NaN or Inf values)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint16)
    out = np.empty(raw.shape, dtype=np.float32)
    bad = lib.eq_bf16_to_f32(ffi.cast("uint16_t *", raw.ctypes.data), ffi.cast("float *", out.ctypes.data), raw.size)
    return out, int(bad)

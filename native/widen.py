"""bf16 -> float32 in C (native/widen.c), counting NaN/Inf in the same pass; the GIL is released while it runs."""

from __future__ import annotations

import numpy as np

from ._kernels import ffi, lib


def bf16_to_float32(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """(n,) uint16 bf16 bit patterns -> ((n,) float32, number of NaN or Inf values)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint16)
    out = np.empty(raw.shape, dtype=np.float32)
    return out, _widen(raw, out)


def bf16_buffer(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 (n,) buffer and the bytes to read n bf16 values into (its upper half), for widen_in_place."""
    out = np.empty(n, dtype=np.float32)
    return out, out.view(np.uint8)[2 * n:]


def widen_in_place(out: np.ndarray) -> int:
    """Widen the bf16 values read into bf16_buffer's upper half to float32 over the whole buffer; NaN/Inf count."""
    return _widen(out.view(np.uint16)[out.size:], out)


def _widen(raw: np.ndarray, out: np.ndarray) -> int:
    return int(lib.eq_bf16_to_f32(ffi.cast("uint16_t *", raw.ctypes.data), ffi.cast("float *", out.ctypes.data),
                                  raw.size))

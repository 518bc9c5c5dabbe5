"""What codecs read and write the same way: a block's byte fields, fp16 scales, and int8 codes."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .base import IntegerScales

if TYPE_CHECKING:
    from .base import Codec


def block_fields(raw: np.ndarray, type_size: int, *widths: int) -> list[np.ndarray]:
    """(rows, n_blocks*type_size) bytes -> each block's fields, (rows, n_blocks, width) uint8 each."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, type_size)
    return np.split(blocks, np.cumsum(widths)[:-1], axis=-1)


def fp16_field(field: np.ndarray) -> np.ndarray:
    """A 2-byte field (rows, n_blocks, 2) as float16 (rows, n_blocks)."""
    return np.ascontiguousarray(field).view("<f2")[..., 0]


def fp16_bytes(d: np.ndarray) -> np.ndarray:
    """float16 (rows, n_blocks) -> its little-endian bytes (rows, n_blocks, 2)."""
    return d.astype("<f2")[..., None].view(np.uint8)


FP16_STEPS = 2047  # an fp16 value is k steps of its binade's ulp, k <= 2047 (11 significant bits)


def fp16_steps(h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """fp16 values as (step, k): h == step * k exactly, step = ±ulp of h's binade (its sign, -0.0 included), k an
    integer in [0, FP16_STEPS].  Every k in that range times the same step is again an fp16 value (below the binade
    a coarser ulp is still a multiple of the finer one; 2048 steps would leave it), so a refit may treat an fp16
    scale as an integer scale of step, as it treats a K-quant's 6-bit scales.  None if any value is not finite."""
    a = np.abs(h.astype(np.float32))
    if not np.isfinite(a).all():
        return None
    _, e = np.frexp(a)  # a = m * 2**e, m in [0.5, 1): the binade's ulp is 2**(e - 11), at least 2**-24
    step = np.copysign(np.ldexp(np.float32(1), np.maximum(e - 11, -24)).astype(np.float32), h.astype(np.float32))
    return step, (a / np.abs(step)).astype(np.int32)


def from_fp16_steps(step: np.ndarray, k: np.ndarray) -> np.ndarray:
    """fp16_steps' inverse for new integers k (checked to lie in [0, FP16_STEPS]): the fp16 values step * k."""
    k = np.asarray(k)
    if np.any(k < 0) or np.any(k > FP16_STEPS):
        raise ValueError(f"fp16 scale steps outside [0, {FP16_STEPS}]")
    return (step * k.astype(np.float32)).astype(np.float16)


class Fp16ScaleSteps:
    """Codec methods for blocks with one fp16 scale `d` per group and no min (Q4_0, Q5_0, Q8_0, IQ4_NL): d as k
    steps of its ulp (fp16_steps), so that a refit moves it over fp16 values as it moves a K-quant's 6-bit scales."""

    def integer_scales(self, blocks) -> IntegerScales | None:
        steps = fp16_steps(blocks.d)
        return None if steps is None else IntegerScales(*steps, None, None, 0, FP16_STEPS)

    def with_integer_scales(self, blocks, scale: np.ndarray, min: np.ndarray | None = None):
        step, _ = fp16_steps(blocks.d)
        return dataclasses.replace(blocks, d=from_fp16_steps(step, np.asarray(scale).reshape(blocks.d.shape)))


def checked_levels(codec: Codec, q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """New codes for `with_codes`: checked against the codec's grid range, as int8 of the blocks' shape."""
    q = np.asarray(q)
    if q.size and (q.min() < codec.qmin or q.max() > codec.qmax):
        raise ValueError(f"{codec.name}: codes outside [{codec.qmin}, {codec.qmax}]")
    return q.reshape(shape).astype(np.int8)


def c_to_int8(v: np.ndarray) -> np.ndarray:
    """C's `(int8_t)float` as compiled for x86: truncate to int32 (NaN/out of range -> INT_MIN), keep the low byte."""
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32).astype(np.int8)

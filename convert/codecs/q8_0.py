"""Q8_0: blocks of 32 weights, one fp16 scale, int8 codes (w = d * q).  Also the parts Q4_0/Q5_0 share.

Q8_0 block, 34 bytes:

    byte   0..1    2..33
           d       qs[0..31]
           fp16    int8 code q_j of weight j

ggml's only Q8_0 encoder is the reference one (it ignores an importance vector):
d = max|w| / 127, q = roundf(w * (1/d)).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType

from .base import AffineGrid, Codec

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class ScaledBlocks:
    """Blocks of 32 weights sharing one scale: w = d * q.

    d: (rows, n_blocks) float16; q: (rows, n_blocks, 32) int8 signed grid levels.
    """

    d: np.ndarray
    q: np.ndarray


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


class ScaledCodec(Codec):
    """The 32-weight types with one fp16 scale per block and no offset (Q4_0, Q5_0, Q8_0)."""

    block_size: ClassVar[int] = 32
    qmin: ClassVar[int]
    qmax: ClassVar[int]

    def blocks_of(self, w: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(w, dtype=F32)
        self.check_shape(w.shape[1])
        return w.reshape(w.shape[0], -1, 32)

    def grid(self, blocks: ScaledBlocks) -> AffineGrid:
        scale = blocks.d.astype(F32)
        # -0.0 is the exact additive identity (also -0.0 + -0.0 = -0.0), so scale*q + offset is ggml's d*q bit for bit.
        return AffineGrid(scale, np.full_like(scale, -0.0), 32, self.qmin, self.qmax)

    def codes(self, blocks: ScaledBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def with_codes(self, blocks: ScaledBlocks, q: np.ndarray) -> ScaledBlocks:
        return ScaledBlocks(blocks.d, checked_levels(self, q, blocks.q.shape))



def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) as trunc(v + copysign(0.5 - 2**-25, v)): exact for every float32."""
    return np.trunc(v + np.copysign(np.nextafter(F32(0.5), F32(0.0)), v))


class Q8_0(ScaledCodec):
    qtype = GGMLQuantizationType.Q8_0
    type_size = 34
    uses_importance = False
    qmin, qmax = -128, 127

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> ScaledBlocks:
        x = self.blocks_of(w)
        d = np.abs(x).max(axis=-1) / F32(127)
        with np.errstate(invalid="ignore", over="ignore"):  # subnormal d: 1/d = inf, as in ggml
            inv = np.divide(F32(1.0), d, out=np.zeros_like(d), where=d != 0)
            q = c_to_int8(_roundf(x * inv[..., None]))
        return ScaledBlocks(d.astype(np.float16), q)

    def pack(self, blocks: ScaledBlocks) -> np.ndarray:
        return np.concatenate([fp16_bytes(blocks.d), blocks.q.view(np.uint8)], axis=-1).reshape(blocks.d.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> ScaledBlocks:
        d, qs = block_fields(raw, self.type_size, 2, 32)
        return ScaledBlocks(fp16_field(d), qs.view(np.int8))

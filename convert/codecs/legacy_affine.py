"""Q4_1 and Q5_1: one fp16 scale d and one fp16 min m per 32 weights, w = d * q + m, q in [0, nmax].

`LegacyMinCodec` is ggml's encoders for both (they differ only in code width) and the block plumbing; the
layout of the codes is the subclass's.  Both keep the low 4 bits of the codes as `pack_half_nibbles` writes them.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import ClassVar

import numpy as np

from .base import AffineGrid, Codec, IntegerScales
from .fields import FP16_STEPS, c_to_int8, from_fp16_steps, fp16_steps
from .search_affine import F32, group_min_max, in_order_sum, make_qkx3_quants


@dataclasses.dataclass(frozen=True)
class MinBlocks:
    """Logical Q4_1/Q5_1 blocks: d, m (rows, nb) float16; q (rows, nb, 32) uint8."""

    d: np.ndarray
    m: np.ndarray
    q: np.ndarray


class LegacyMinCodec(Codec):
    """Q4_1 and Q5_1: one fp16 scale and min per 32 weights."""

    block_size = 32
    nmax: ClassVar[int]

    @np.errstate(all="ignore")  # degenerate blocks overflow or divide by zero, in ggml too
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> MinBlocks:
        w = np.asarray(w, dtype=F32)
        rows, n = w.shape
        self.check_shape(n)
        x = np.ascontiguousarray(w.reshape(-1, 32).T)  # element-major (32, blocks)
        if importance is None:
            # quantize_row_q*_1_ref: plain min/max grid, codes by (int)(v + 0.5).
            lo, hi = group_min_max(x)
            d = (hi - lo) / F32(self.nmax)
            inv = np.where(d != 0, F32(1) / d, F32(0))
            q = self.ref_codes(c_to_int8((x - lo) * inv + F32(0.5)))
            m = lo
        else:
            # quantize_row_q*_1_impl: weights importance * sqrt(sigma2 + x^2), sigma2 = mean(x^2) of the row.
            sigma2 = in_order_sum(np.ascontiguousarray(w.T * w.T)) / F32(n)
            qw = np.tile(np.asarray(importance, dtype=F32).reshape(-1, 32), (rows, 1)).T
            weights = qw * np.sqrt(np.repeat(sigma2, n // 32) + x * x)
            d, the_min, q = make_qkx3_quants(x, weights, self.nmax, -0.9, 0.05, 36, use_mad=False)
            m = -the_min
        shape = (rows, n // 32)
        q = q.T.reshape(*shape, 32).astype(np.uint8)
        return MinBlocks(d.astype(np.float16).reshape(shape), m.astype(np.float16).reshape(shape), q)

    @abstractmethod
    def ref_codes(self, low_byte: np.ndarray) -> np.ndarray:
        """What ggml's reference quantizer keeps of the (int8) cast of v + 0.5: its clamp or bit mask."""

    @abstractmethod
    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        """(blocks, 32) codes -> (blocks, code bytes)."""

    @abstractmethod
    def unpack_codes(self, raw: np.ndarray) -> np.ndarray:
        """(blocks, code bytes) -> (blocks, 32) codes."""

    def pack(self, blocks: MinBlocks) -> np.ndarray:
        rows, nb = blocks.d.shape
        out = np.concatenate([
            blocks.d.reshape(-1, 1).view(np.uint8),
            blocks.m.reshape(-1, 1).view(np.uint8),
            self.pack_codes(blocks.q.reshape(-1, 32).astype(np.uint8)),
        ], axis=-1)
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, raw: np.ndarray) -> MinBlocks:
        rows = raw.shape[0]
        b = np.ascontiguousarray(raw).reshape(rows, -1, self.type_size)
        nb = b.shape[1]
        d = b[..., 0:2].copy().view(np.float16).reshape(rows, nb)
        m = b[..., 2:4].copy().view(np.float16).reshape(rows, nb)
        q = self.unpack_codes(b[..., 4:].reshape(rows * nb, -1)).reshape(rows, nb, 32)
        return MinBlocks(d, m, q)

    def grid(self, blocks: MinBlocks) -> AffineGrid:
        rows = blocks.d.shape[0]
        return AffineGrid(blocks.d.astype(F32).reshape(rows, -1), blocks.m.astype(F32).reshape(rows, -1),
                          32, 0, self.nmax)

    def codes(self, blocks: MinBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def integer_scales(self, blocks: MinBlocks) -> IntegerScales | None:
        """d and m as k steps of their ulps (fields.fp16_steps): w = (step_d * k_d) * q - (-step_m) * k_m, the
        K-quants' form with dmin = -step_m, so a refit moves both over fp16 values."""
        d, m = fp16_steps(blocks.d), fp16_steps(blocks.m)
        return None if d is None or m is None else IntegerScales(d[0], d[1], -m[0], m[1], 0, FP16_STEPS)

    def with_integer_scales(self, blocks: MinBlocks, scale: np.ndarray, min: np.ndarray | None = None) -> MinBlocks:
        shape = blocks.d.shape
        d = from_fp16_steps(fp16_steps(blocks.d)[0], np.asarray(scale).reshape(shape))
        m = from_fp16_steps(fp16_steps(blocks.m)[0], np.asarray(min).reshape(shape))
        return dataclasses.replace(blocks, d=d, m=m)

    def with_codes(self, blocks: MinBlocks, q: np.ndarray) -> MinBlocks:
        q = np.asarray(q)
        if q.size and (q.min() < 0 or q.max() > self.nmax):
            raise ValueError(f"{self.name}: codes outside [0, {self.nmax}]")
        return dataclasses.replace(blocks, q=q.reshape(blocks.q.shape).astype(np.uint8))


def pack_half_nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) -> (blocks, 16): byte j = lo4(q[j]) | lo4(q[j + 16]) << 4."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def unpack_half_nibbles(raw: np.ndarray) -> np.ndarray:
    return np.concatenate([raw & 0x0F, raw >> 4], axis=-1)

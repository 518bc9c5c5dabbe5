"""What the symmetric K-quants share (Q3_K, Q6_K): super-blocks of 256 weights in 16 groups of 16, one fp16 d and
one integer scale sc[g] per group, w = d * sc[g] * q; and `requantize`, the second pass both encoders end with."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from .base import AffineGrid, Codec, IntegerScales
from .fields import checked_levels
from .search_symmetric import nearest_int

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class SuperBlocks:
    """Super-blocks of 256 weights in 16 groups of 16: w = d * sc[g] * q.

    d: (rows, n_blocks) float16; scales: (rows, n_blocks, 16) int8 signed group scales sc;
    q: (rows, n_blocks, 256) int8 signed grid levels.
    """

    d: np.ndarray
    scales: np.ndarray
    q: np.ndarray


class SuperBlockCodec(Codec):
    """The symmetric K-quants: one fp16 d per 256 weights, one small integer scale per group of 16."""

    block_size: ClassVar[int] = 256
    qmin: ClassVar[int]
    qmax: ClassVar[int]
    scale_range: ClassVar[tuple[int, int]]  # stored group scales sc

    def groups_of(self, w: np.ndarray) -> np.ndarray:
        """(rows, n) float32 -> (rows, n_blocks, 16 groups, 16 weights)."""
        w = np.ascontiguousarray(w, dtype=F32)
        self.check_shape(w.shape[1])
        return w.reshape(w.shape[0], -1, 16, 16)

    def grid(self, blocks: SuperBlocks) -> AffineGrid:
        scale = (blocks.d.astype(F32)[..., None] * blocks.scales.astype(F32)).reshape(blocks.d.shape[0], -1)
        # -0.0 is the exact additive identity, so scale*q + offset is ggml's (d*sc)*q bit for bit.
        return AffineGrid(scale, np.full_like(scale, -0.0), 16, self.qmin, self.qmax)

    def codes(self, blocks: SuperBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def with_codes(self, blocks: SuperBlocks, q: np.ndarray) -> SuperBlocks:
        return SuperBlocks(blocks.d, blocks.scales, checked_levels(self, q, blocks.q.shape))

    def integer_scales(self, blocks: SuperBlocks) -> IntegerScales:
        rows = blocks.d.shape[0]
        return IntegerScales(np.repeat(blocks.d.astype(F32), 16, axis=1), blocks.scales.reshape(rows, -1).astype(np.int32),
                             None, None, *self.scale_range)

    def with_integer_scales(self, blocks: SuperBlocks, scale: np.ndarray, min: np.ndarray | None = None) -> SuperBlocks:
        lo, hi = self.scale_range
        if np.any(scale < lo) or np.any(scale > hi):
            raise ValueError(f"{self.name}: group scales outside [{lo}, {hi}]")
        return SuperBlocks(blocks.d, np.asarray(scale).reshape(blocks.scales.shape).astype(np.int8), blocks.q)


def requantize(x: np.ndarray, d: np.ndarray, sc: np.ndarray, codes: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's second K-quant pass: codes of x (rows, nb, 16, 16) on the stored group scales fp32(d) * sc.

    Returns uint8 codes = clip(nearest_int(x / (d*sc)), -nmax, nmax-1) + nmax; a group whose stored
    scale is zero keeps its `codes` from the scale search.
    """
    step = d.astype(F32)[..., None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        fresh = np.clip(nearest_int(x / step[..., None]), -nmax, nmax - 1) + nmax
    return np.where((step != 0)[..., None], fresh, codes).astype(np.uint8)


# Shifts of 4 two-bit fields in a byte (Q6_K's high bits, Q3_K's low bits and scale high bits).
PAIR_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]

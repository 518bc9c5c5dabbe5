"""Q8_K: the activation format of the K-quant dot products: 256 values, fp32 scale, int8 codes, w = d * q.

Block, 292 bytes:

    byte      0..3    4..259        260..291
              d       qs[0..255]    bsums[0..15]
              fp32    int8 q_j      int16 little endian, bsums[g] = q[16g] + ... + q[16g+15]

ggml (`quantize_row_q8_K_ref`, no importance): q = min(127, nearest_int(-127/peak * x)), d = 1 / (-127/peak),
where peak is the signed value of largest magnitude; an all-zero block gets d = 0 and q = 0.  The bsums
are a function of q, so the logical blocks do not store them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType

from .base import AffineGrid, Codec
from .fields import block_fields, checked_levels
from .search_symmetric import nearest_int, signed_peak

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Q8_KBlocks:
    """d: (rows, n_blocks) float32; q: (rows, n_blocks, 256) int8."""

    d: np.ndarray
    q: np.ndarray

    @property
    def bsums(self) -> np.ndarray:
        """(rows, n_blocks, 16) int16: sums of the codes of each group of 16 (the dot products use them)."""
        return self.q.reshape(*self.d.shape, 16, 16).sum(axis=-1, dtype=np.int16)


class Q8_K(Codec):
    qtype = GGMLQuantizationType.Q8_K
    block_size = 256
    type_size = 292
    uses_importance = False
    qmin, qmax = -128, 127

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Q8_KBlocks:
        w = np.ascontiguousarray(w, dtype=F32)
        self.check_shape(w.shape[1])
        x = w.reshape(w.shape[0], -1, 256)
        amax, peak = signed_peak(x)
        with np.errstate(all="ignore"):  # all-zero blocks are reset below
            iscale = F32(-127.0) / peak
            q = np.minimum(127, nearest_int(iscale[..., None] * x)).astype(np.int8)
            d = F32(1.0) / iscale
        zero = amax == 0
        d[zero], q[zero] = 0, 0
        return Q8_KBlocks(d, q)

    def pack(self, blocks: Q8_KBlocks) -> np.ndarray:
        d = blocks.d.astype("<f4")[..., None].view(np.uint8)
        bsums = blocks.bsums.astype("<i2").view(np.uint8)
        return np.concatenate([d, blocks.q.view(np.uint8), bsums], axis=-1).reshape(d.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> Q8_KBlocks:
        d, qs, _ = block_fields(raw, self.type_size, 4, 256, 32)
        return Q8_KBlocks(np.ascontiguousarray(d).view("<f4")[..., 0], qs.view(np.int8))

    def grid(self, blocks: Q8_KBlocks) -> AffineGrid:
        # -0.0 is the exact additive identity, so scale*q + offset is ggml's d*q bit for bit.
        return AffineGrid(blocks.d, np.full_like(blocks.d, -0.0), 256, self.qmin, self.qmax)

    def codes(self, blocks: Q8_KBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def with_codes(self, blocks: Q8_KBlocks, q: np.ndarray) -> Q8_KBlocks:
        return Q8_KBlocks(blocks.d, checked_levels(self, q, blocks.q.shape))

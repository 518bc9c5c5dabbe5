"""Q4_0: blocks of 32 weights, one fp16 scale, 4-bit codes (w = d * q, q in [-8, 7]).  Also Q5_0's encoder.

Q4_0 block, 18 bytes (u_j = q_j + 8 is the stored 4-bit code of weight j):

    byte   0..1    2 + j, j = 0..15
           d       u_j | u_(j+16) << 4
           fp16    (low nibble: first half of the block, high nibble: second half)

ggml has two encoders.  Without importance (`quantize_row_q4_0_ref`): d = peak / -8, where peak is the
signed weight of largest magnitude, and u = min(15, (int8)(w/d + 8.5)).  With importance
(`quantize_row_q4_0_impl`): per row sigma2 = mean(w^2), weights imp * sqrt(sigma2 + w^2), and the scale
and codes of `make_qx_quants` (no requantization: d is the search's scale rounded to fp16).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType

from .q8_0 import F32, ScaledBlocks, ScaledCodec, block_fields, c_to_int8, fp16_bytes, fp16_field
from .search_symmetric import make_qx_quants, sequential_sum, signed_peak


class SymmetricLegacy(ScaledCodec):
    """ggml's encoders for the symmetric 32-weight types with 2*nmax levels (Q4_0: nmax 8, Q5_0: nmax 16)."""

    nmax: ClassVar[int]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.qmin, cls.qmax = -cls.nmax, cls.nmax - 1

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> ScaledBlocks:
        x = self.blocks_of(w)
        if importance is None:
            d, codes = self._fit_plain(x)
        else:
            d, codes = self._fit_weighted(x, np.asarray(importance, dtype=F32))
        return ScaledBlocks(d.astype(np.float16), codes.astype(np.int8) - self.nmax)

    def _fit_plain(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, peak = signed_peak(x)
        d = peak / F32(-self.nmax)
        with np.errstate(invalid="ignore", over="ignore"):  # subnormal d: 1/d = inf, as in ggml
            inv = np.divide(F32(1.0), d, out=np.zeros_like(d), where=d != 0)
            u = c_to_int8(x * inv[..., None] + F32(self.nmax + 0.5))
        return d, np.minimum(2 * self.nmax - 1, u)

    def _fit_weighted(self, x: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, nb, _ = x.shape
        x2 = x * x
        sigma2 = sequential_sum(x2.reshape(rows, -1), axis=1) / F32(nb * 32)
        weights = importance.reshape(nb, 32) * np.sqrt(sigma2[:, None, None] + x2)
        return make_qx_quants(x, self.nmax, weights)


class Q4_0(SymmetricLegacy):
    qtype = GGMLQuantizationType.Q4_0
    type_size = 18
    nmax = 8

    def pack(self, blocks: ScaledBlocks) -> np.ndarray:
        u = (blocks.q + 8).view(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << 4)
        return np.concatenate([fp16_bytes(blocks.d), qs], axis=-1).reshape(u.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> ScaledBlocks:
        d, qs = block_fields(raw, self.type_size, 2, 16)
        u = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
        return ScaledBlocks(fp16_field(d), u.astype(np.int8) - 8)

"""The 32-weight types with one fp16 scale per block and no offset (Q4_0, Q5_0, Q8_0), w = d * q, and ggml's
encoders of Q4_0 and Q5_0 (`SymmetricLegacy`, 2*nmax levels: nmax 8 and 16).

ggml has two encoders.  Without importance (`quantize_row_q4_0_ref`): d = peak / -nmax, where peak is the
signed weight of largest magnitude, and u = min(2*nmax - 1, (int8)(w/d + nmax + 0.5)).  With importance
(`quantize_row_q4_0_impl`): per row sigma2 = mean(w^2), weights imp * sqrt(sigma2 + w^2), and the scale
and codes of `make_qx_quants` (no requantization: d is the search's scale rounded to fp16).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from .base import AffineGrid, Codec
from .fields import Fp16ScaleSteps, c_to_int8, checked_levels
from .search_symmetric import make_qx_quants, sequential_sum, signed_peak

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class ScaledBlocks:
    """Blocks of 32 weights sharing one scale: w = d * q.

    d: (rows, n_blocks) float16; q: (rows, n_blocks, 32) int8 signed grid levels.
    """

    d: np.ndarray
    q: np.ndarray


class ScaledCodec(Fp16ScaleSteps, Codec):
    """The 32-weight types with one fp16 scale per block and no offset (Q4_0, Q5_0, Q8_0); a refit moves the scale
    in steps of its ulp (Fp16ScaleSteps)."""

    block_size: ClassVar[int] = 32
    qmin: ClassVar[int]
    qmax: ClassVar[int]

    def grid(self, blocks: ScaledBlocks) -> AffineGrid:
        scale = blocks.d.astype(F32)
        # -0.0 is the exact additive identity (also -0.0 + -0.0 = -0.0), so scale*q + offset is ggml's d*q bit for bit.
        return AffineGrid(scale, np.full_like(scale, -0.0), 32, self.qmin, self.qmax)

    def codes(self, blocks: ScaledBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def with_codes(self, blocks: ScaledBlocks, q: np.ndarray) -> ScaledBlocks:
        return ScaledBlocks(blocks.d, checked_levels(self, q, blocks.q.shape))


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

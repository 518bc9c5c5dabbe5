"""What IQ4_NL and IQ4_XS share: ggml's 16 non-uniform values, the nearest-value lookup, the per-32 scale search
of `quantize_row_iq4_nl_impl`, and the codec plumbing of a table type (a grid whose levels are the table).

A weight is w = scale * kvalues[i], i a 4-bit index, kvalues = (-127, ..., 113) taken from gguf-py (`IQ4_NL.kvalues`).
The scale search, per sub-block of 32 weights with weights `wt` (imatrix * sqrt(sigma2 + x^2), or x^2 without one):

    peak  = the signed x of largest |x| (first one);  amax < 1e-15: scale 0
    d     = -peak / -127, indices by nearest value to x/d, d = sum(wt*q*x) / sum(wt*q*q)  (q the table values)
    then 15 trial grids id = (t - 127) / peak, t = -7..7: the least-squares d of the grid with the largest
    sum(wt*q*x)^2 / sum(wt*q*q) wins (strictly larger than the best so far)

every float32 operation in ggml's order (sums sequential over the 32 elements, `wt*q*x` as `(wt*q)*x`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL

from .base import AffineGrid, Codec, nearest_index
from .search_symmetric import GROUP_MAX_EPS, signed_peak, sequential_sum

F32 = np.float32

KVALUES = np.array(_GGUF_IQ4_NL.kvalues, dtype=np.int8)  # ggml's kvalues_iq4nl, ascending
VALUES = KVALUES.astype(F32)
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs search t = -7..7


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml's `best_index_int8(16, kvalues, x)` elementwise (uint8): the nearest table value, a tie going up
    (base.nearest_index on the table)."""
    return nearest_index(VALUES, x).astype(np.uint8)


def importance_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per-weight search weights for super-blocks x[..., n] (n = 32 or 256): x^2 without importance, else
    imatrix * sqrt(sigma2 + x^2), sigma2 = 2 * sum(x^2) / n over the super-block (sum in ggml's order)."""
    with np.errstate(over="ignore", invalid="ignore"):  # |x| > 1.8e19 squares to inf, then 0 * inf = NaN, as in ggml
        x2 = x * x
        if importance is None:
            return x2
        n = x.shape[-1]
        sigma2 = sequential_sum(x2, axis=-1) * F32(2.0 / n)  # 2.f/n is exact for n = 32, 256
        return np.asarray(importance, dtype=F32).reshape(-1, n) * np.sqrt(sigma2[..., None] + x2)


def sub_block_scales(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """The scale search (module docstring) for sub-blocks x[..., 32], weights wt alike: float32 scales (...)."""
    shape = x.shape[:-1]
    x = np.ascontiguousarray(x.reshape(-1, 32).T, dtype=F32)  # element-major: element j of every sub-block
    wt = np.ascontiguousarray(wt.reshape(-1, 32).T, dtype=F32)
    amax, peak = signed_peak(x, axis=0)

    def sums(iscale):
        q = VALUES[best_index(iscale * x)]
        wq = wt * q
        return sequential_sum(wq * x), sequential_sum(wq * q)

    with np.errstate(all="ignore"):  # zero sub-blocks divide by a zero peak; they are reset below
        d = -peak / F32(-127)
        sumqx, sumq2 = sums(F32(1.0) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0.0))
        best = d * sumqx
        for t in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = sums(F32(t - 127) / peak)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, F32(0.0), d).astype(F32).reshape(shape)


def indices(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Indices of the nearest table values to x[..., 32] / scale[...] as ggml takes them: x * (1/scale), 1/0 -> 0."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(scale != 0, F32(1.0) / scale, F32(0.0)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        return best_index(inv[..., None] * x)


def pack_halves(q: np.ndarray) -> np.ndarray:
    """Indices (rows, nb, 32k) -> bytes (rows, nb, 16k): per 32 weights, byte j = q[j] | q[j + 16] << 4."""
    g = q.reshape(*q.shape[:-1], -1, 2, 16)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*q.shape[:-1], -1)


def unpack_halves(raw: np.ndarray) -> np.ndarray:
    """pack_halves' inverse."""
    g = raw.reshape(*raw.shape[:-1], -1, 1, 16)
    return np.concatenate([g & 0xF, g >> 4], axis=-2).reshape(*raw.shape[:-1], -1)


class TableCodec(Codec):
    """A type whose codes index the fixed non-uniform table: `codes` are indices 0..15, their grid's levels the
    table's values, so w_hat = scale * VALUES[q] + (-0.0) per group of 32 (-0.0: the exact additive identity)."""

    qmin: ClassVar[int] = 0
    qmax: ClassVar[int] = 15

    def grid(self, blocks) -> AffineGrid:
        scale = self.group_scales(blocks)
        return AffineGrid(scale, np.full_like(scale, -0.0), 32, 0, 15, VALUES)

    @abstractmethod
    def group_scales(self, blocks) -> np.ndarray:
        """The float32 scale of each group of 32 weights, (rows, n_per_row // 32), as ggml dequantizes it."""

    def codes(self, blocks) -> np.ndarray:
        """Table indices (rows, n_per_row) int32."""
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def checked_indices(self, q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """New codes for `with_codes`: table indices in [0, 15], as uint8 of the blocks' shape."""
        q = np.asarray(q)
        if q.size and (q.min() < 0 or q.max() > 15):
            raise ValueError(f"{self.name}: table indices outside [0, 15]")
        return q.reshape(shape).astype(np.uint8)

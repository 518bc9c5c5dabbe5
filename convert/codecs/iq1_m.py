"""IQ1_M: super-blocks of 256 = 16 sub-blocks of 16, per sub-block a 3-bit scale, per 8 weights one point of IQ1_S's
2048-point codebook of levels -1/0/1 (gguf-py's `IQ1_M.grid`, the same as IQ1_S's) and the sign of its own shift;
the super-block's fp16 d has no field of its own but is split into the top nibbles of the four scale words.

w = (d * (2 * ls + 1)) * (grid[index][j] + delta), delta = +0.125 or -0.125 per group of 8, float32 in this order
(ggml's and gguf-py's dequantization).

IQ1_M block, 56 bytes:

    offset  size  field
    0       32    qs       low 8 bits of the codebook index of weights 8j..8j+7, j = 0..31
    32      16    qh       byte g per sub-block g (groups j = 2g, 2g+1): bits 0..2 = bits 8..10 of index 2g,
                           bit 3: group 2g's delta is -0.125, bits 4..6 = bits 8..10 of index 2g+1, bit 7: group
                           2g+1's delta is -0.125
    48      8     scales   4 uint16 LE words sc[k], k = 0..3: bits 3m..3m+2 = ls[4k + m] (m = 0..3),
                           bits 12..15 = bits 4k..4k+3 of d's fp16 bit pattern

`fit` is ggml's `quantize_iq1_m`.  ggml does not require an importance here (its assert is commented out): without
one the weights are x^2, with one imatrix * sqrt(sigma2 + x^2), sigma2 = 2*sum(x^2)/256.  Per sub-block of 16
(max |x| < 1e-7: skipped, scale 0, index 0, both shifts +): the weights sorted ascending (stable, as IQ1_S), and
every split i1 <= i2 of the sorted weights into the values -1, 0, 1 scored for the four shift pairs of its two
groups of 8 (k = 0: +/+, 1: +/-, 2: -/+, 3: -/-) from prefix sums kept per half, in ggml's algebra:

    sumqx_h = T_h * v2 - (P_h[i1] + P_h[i2]),  sumq2_h = (W_h * v2) * v2 + Q_h[i1] * c1 + Q_h[i2] * c2

(P, Q the half's prefix sums of wt*x and wt over the sorted order, T, W their totals, v the half's shifted values,
c1 = v0^2 - v1^2, c2 = v1^2 - v2^2), sumqx = sumqx_0 + sumqx_1, likewise sumq2; the largest sumqx^2 / sumq2
winning strictly in the order (i1, i2, k).  No split accepted: skipped.  A negative scale flips the levels and both
shifts (k -> 3 - k).  Groups of 8 off the codebook take the neighbour (IQ1_S's, nwant 3) of least weighted distance
under their own shift; then, if any was off, scale = sumqx / sumq2 (both > 0).  Super-block: max_scale = 0 leaves
d and every ls and shift bit 0; else d = max_scale / 15, ls = clamp(nearest_int(0.5 * (scale/d - 1)), 0, 7), and
d is refitted over the whole super-block with the chosen points and ls (skipped sub-blocks included, as index 0,
shift +, ls 0): d = sum((wt*q)*x) / sum((wt*q)*q), q = v * (2*ls + 1), where that sum of squares is > 0; stored
as fp16(d * 1.1125).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ1_M as _GGUF_IQ1_M

from .fields import fp16_field, block_fields
from .iq1_s import SHIFTED, neighbours, split_levels
from .lattice import LatticeCodec
from .lattice_search import F32, FLT_MAX, codebook, search_weights, sequential_max
from .search_symmetric import nearest_int, sequential_sum

EPS = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
CHUNK = 8192  # sub-blocks per chunk of the split search
# ggml's c1 = v0^2 - v1^2, c2 = v1^2 - v2^2 of the + and - shifted values (exact in float32)
C1 = {1: SHIFTED[1][0] * SHIFTED[1][0] - SHIFTED[1][1] * SHIFTED[1][1],
      -1: SHIFTED[-1][0] * SHIFTED[-1][0] - SHIFTED[-1][1] * SHIFTED[-1][1]}
C2 = {1: SHIFTED[1][1] * SHIFTED[1][1] - SHIFTED[1][2] * SHIFTED[1][2],
      -1: SHIFTED[-1][1] * SHIFTED[-1][1] - SHIFTED[-1][2] * SHIFTED[-1][2]}


@dataclasses.dataclass(frozen=True)
class M1Blocks:
    """d: (rows, nb) float16; index: (rows, nb, 32) uint16 11-bit codebook indices; scales: (rows, nb, 16) uint8
    3-bit ls; negative: (rows, nb, 32) bool, the group's delta is -0.125."""

    d: np.ndarray
    index: np.ndarray
    scales: np.ndarray
    negative: np.ndarray


def best_splits(xb: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exhaustive split search of sub-blocks xb/weight (S, 16) (module docstring): (scale (S,), levels (S, 16)
    int8 in [0, 2], k (S,) in 0..3, -1 where no split was accepted), before the negative-scale flip."""
    S, n = xb.shape
    order = np.argsort(xb, axis=1, kind="stable")
    wx = np.take_along_axis(weight * xb, order, axis=1)
    ws = np.take_along_axis(weight, order, axis=1)
    second = order >= n // 2
    px, pw = np.zeros((2, n + 1, S), F32), np.zeros((2, n + 1, S), F32)
    for j in range(n):  # each half's prefix sums advance only on its own weights (a copy, not + 0, elsewhere)
        for h, mine in ((0, ~second[:, j]), (1, second[:, j])):
            px[h, j + 1] = np.where(mine, px[h, j] + wx[:, j], px[h, j])
            pw[h, j + 1] = np.where(mine, pw[h, j] + ws[:, j], pw[h, j])
    v2 = {1: SHIFTED[1][2], -1: SHIFTED[-1][2]}
    tx = {(h, s): px[h, n] * v2[s] for h in (0, 1) for s in (1, -1)}
    tw = {(h, s): pw[h, n] * v2[s] * v2[s] for h in (0, 1) for s in (1, -1)}
    combos = ((1, 1), (1, -1), (-1, 1), (-1, -1))  # ggml's k = 0..3: the shifts of the first and second half
    best = np.full(S, -FLT_MAX, F32)
    scale = sequential_max(np.abs(xb), axis=1)  # ggml's initial `scale = max`
    i1s, i2s, ks = np.full(S, -1), np.full(S, -1), np.full(S, -1)
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            qx, q2 = {}, {}
            for h in (0, 1):
                sx = px[h, i1] + px[h, i2]
                for s in (1, -1):
                    qx[h, s] = tx[h, s] - sx
                    q2[h, s] = tw[h, s] + pw[h, i1] * C1[s] + pw[h, i2] * C2[s]
            for k, (s0, s1) in enumerate(combos):
                sumqx, sumq2 = qx[0, s0] + qx[1, s1], q2[0, s0] + q2[1, s1]
                take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                scale = np.where(take, sumqx / sumq2, scale)
                best = np.where(take, scale * sumqx, best)
                i1s, i2s, ks = np.where(take, i1, i1s), np.where(take, i2, i2s), np.where(take, k, ks)
    return scale, split_levels(order, i1s, i2s), ks


def group_negative(k: np.ndarray) -> np.ndarray:
    """ggml's shift pair k (S,) -> (S, 2) bool, each group of 8's delta is -0.125: k >= 2 for the first, k odd for
    the second (k = -1, skipped: both +)."""
    k = np.maximum(k, 0)
    return np.stack([k >= 2, k % 2 == 1], axis=1)


def shifted_values(book, index: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The values v[level] of points `index` (..., G) under per-group shifts `negative` (..., G): (..., G * 8)."""
    table = np.where(negative[..., None], SHIFTED[-1], SHIFTED[1])  # (..., G, 3)
    q = np.take_along_axis(table, book.points[index].astype(np.int64), axis=-1)
    return q.reshape(*index.shape[:-1], -1)


class IQ1_M(LatticeCodec):
    qtype = GGMLQuantizationType.IQ1_M
    block_size = 256
    type_size = 56

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> M1Blocks:
        x = self.blocks_of(w)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance)
        xb, wb = x.reshape(-1, 16), weight.reshape(-1, 16)
        S = len(xb)
        scale, index, k = np.zeros(S, F32), np.zeros((S, 2), np.int64), np.zeros(S, np.int64)
        with np.errstate(all="ignore"):
            zero = sequential_max(np.abs(xb), axis=1) < EPS
            for c in range(0, S, CHUNK):
                cut = slice(c, c + CHUNK)
                scale[cut], index[cut], k[cut] = self._fit_chunk(xb[cut], wb[cut])
        skipped = zero | (k < 0)
        scale = np.where(skipped, F32(0), scale).reshape(rows, nb, 16)
        index = np.where(skipped[:, None], 0, index).reshape(rows, nb, 32)
        negative = group_negative(np.where(skipped, 0, k)).reshape(rows, nb, 32)
        max_scale = np.zeros((rows, nb), F32)
        for g in range(16):
            max_scale = np.where(max_scale > scale[..., g], max_scale, scale[..., g])
        with np.errstate(all="ignore"):
            d = max_scale / F32(15)
            ls = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[..., None] * scale - F32(1))), 0, 7)
            # the refit of d over the super-block: q = v * (2*ls + 1), sums sequential over the 256 weights
            q = shifted_values(codebook("IQ1_S"), index, negative).reshape(rows, nb, 16, 16)
            q = (q * (F32(2) * ls.astype(F32) + F32(1))[..., None]).reshape(rows, nb, 256)
            wq = weight * q
            sumqx = sequential_sum(np.moveaxis(wq * x, -1, 0))
            sumq2 = sequential_sum(np.moveaxis(wq * q, -1, 0))
            d = np.where(sumq2 > 0, sumqx / sumq2, d)
            dh = (d * F32(1.1125)).astype(np.float16)
        unset = max_scale == 0  # ggml's `if (!max_scale) continue;`: d, the scales and the shift bits stay 0
        return M1Blocks(np.where(unset, np.float16(0), dh), index.astype(np.uint16),
                        np.where(unset[..., None], 0, ls).astype(np.uint8), negative & ~unset[..., None])

    @staticmethod
    def _fit_chunk(xb: np.ndarray, weight: np.ndarray):
        scale, levels, k = best_splits(xb, weight)
        flip = scale < 0
        levels = np.where(flip[:, None], 2 - levels, levels)
        scale, k = np.where(flip, -scale, scale), np.where(flip & (k >= 0), 3 - k, k)
        negative = group_negative(k)
        S = len(xb)
        index, on = neighbours(levels.reshape(-1, 8), xb.reshape(-1, 8), weight.reshape(-1, 8), np.repeat(scale, 2),
                               negative.reshape(-1))
        index, on = index.reshape(S, 2), on.reshape(S, 2).all(1)
        q = shifted_values(codebook("IQ1_S"), index, negative)
        sumqx, sumq2 = np.zeros(S, F32), np.zeros(S, F32)
        for i in range(16):  # `w*q*xb` as (w*q)*xb, as IQ1_S
            wq = weight[:, i] * q[:, i]
            sumqx += wq * xb[:, i]
            sumq2 += wq * q[:, i]
        again = ~on & (sumqx > 0) & (sumq2 > 0)
        return np.where(again, sumqx / sumq2, scale).astype(F32), index, k

    def pack(self, blocks: M1Blocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        nib = ((blocks.index >> 8) & 7).astype(np.uint8) | (blocks.negative.astype(np.uint8) << 3)  # (rows, nb, 32)
        qh = nib[..., 0::2] | (nib[..., 1::2] << 4)
        ls = blocks.scales.astype(np.uint16).reshape(rows, nb, 4, 4)
        sc = (ls << (3 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        bits = blocks.d.astype("<f2").view(np.uint16)[..., None]
        sc = (sc | (((bits >> (4 * np.arange(4, dtype=np.uint16))) & 15) << 12)).astype("<u2")
        fields = [(blocks.index & 255).astype(np.uint8), qh, sc.view(np.uint8).reshape(rows, nb, 8)]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> M1Blocks:
        qs, qh, sc = block_fields(raw, self.type_size, 32, 16, 8)
        sc = np.ascontiguousarray(sc).view("<u2")  # (rows, nb, 4)
        nib = np.stack([qh & 15, qh >> 4], axis=-1).reshape(qs.shape)  # (rows, nb, 32)
        index = qs.astype(np.uint16) | ((nib & 7).astype(np.uint16) << 8)
        ls = ((sc[..., None] >> (3 * np.arange(4, dtype=np.uint16))) & 7).reshape(*sc.shape[:-1], 16)
        bits = ((sc >> 12) << (4 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        return M1Blocks(fp16_field(bits.astype("<u2")[..., None].view(np.uint8)), index, ls.astype(np.uint8),
                        (nib >> 3).astype(bool))

    def dequantize(self, blocks: M1Blocks) -> np.ndarray:
        _GGUF_IQ1_M.init_grid()
        rows, nb, _ = blocks.index.shape
        dl = blocks.d.astype(F32)[..., None] * (F32(2) * blocks.scales.astype(F32) + F32(1))  # (rows, nb, 16)
        delta = np.where(blocks.negative, -SHIFTED[1][1], SHIFTED[1][1])  # (rows, nb, 32)
        grid = _GGUF_IQ1_M.grid.reshape(2048, 8)[blocks.index]  # (rows, nb, 32, 8)
        return (np.repeat(dl, 2, axis=-1)[..., None] * (grid + delta[..., None])).reshape(rows, -1)

"""IQ1_S: super-blocks of 256 = 8 sub-blocks of 32, fp16 d, per sub-block a 3-bit scale and the sign of a shift, per
8 weights one point of a 2048-point codebook of levels -1/0/1 (gguf-py's `IQ1_S.grid`; lattice_search: level l in
[0, 2] is the value l - 1).

w = (d * (2 * ls + 1)) * (grid[index][j] + delta), delta = +0.125 or -0.125 (bit 15 of qh), float32 in this order
(ggml's and gguf-py's dequantization).

IQ1_S block, 50 bytes:

    offset  size  field
    0       2     d        fp16
    2       32    qs       low 8 bits of the codebook index of weights 8j..8j+7, j = 0..31
    34      16    qh       8 uint16 LE, one per sub-block g: bits 3k..3k+2 = bits 8..10 of index 4g + k (k = 0..3),
                           bits 12..14 = ls[g], bit 15: delta is -0.125

`fit` is ggml's `quantize_iq1_s`, importance required (ggml asserts it); weights imatrix * sqrt(sigma2 + x^2),
sigma2 = 2*sum(x^2)/256.  Per sub-block (max |x| < 1e-12: skipped, scale 0): the weights sorted ascending (glibc's
qsort in ggml's build is a stable merge sort, so equal values keep their order), prefix sums of wt*x and wt, and
every split i1 <= i2 of the sorted weights into the values -1, 0, 1 shifted by +delta and by -delta is scored in
ggml's order (i1, then i2, the + shift before the -), the largest sumqx^2 / sumq2 winning strictly as in the other
searches.  A negative scale flips the levels and the shift.  Groups of 8 off the codebook take the neighbour (nwant
3) of least sum(wt * (scale*q - x)^2), q the shifted values; then, if any was off, scale = sumqx / sumq2 (when both
are > 0).  d = max_scale / 15 stored as fp16(d * 1.125), ls = clamp(nearest_int(0.5 * (scale/d - 1)), 0, 7).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ1_S as _GGUF_IQ1_S

from .fields import block_fields, fp16_bytes, fp16_field
from .lattice import LatticeCodec
from .lattice_search import F32, FLT_MAX, codebook, level_vector, search_weights, sequential_max
from .search_symmetric import nearest_int

EPS = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
DELTA = F32(0.125)  # IQ1S_DELTA
SHIFTED = {1: np.array([-1 + DELTA, DELTA, 1 + DELTA], F32), -1: np.array([-1 - DELTA, -DELTA, 1 - DELTA], F32)}
CHUNK = 4096  # sub-blocks per chunk of the split search


@dataclasses.dataclass(frozen=True)
class S1Blocks:
    """d: (rows, nb) float16; index: (rows, nb, 32) uint16 11-bit codebook indices; scales: (rows, nb, 8) uint8
    3-bit ls; negative: (rows, nb, 8) bool, delta is -0.125."""

    d: np.ndarray
    index: np.ndarray
    scales: np.ndarray
    negative: np.ndarray


def best_splits(xb: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exhaustive split search of sub-blocks xb/weight (S, 32): (scale (S,), levels (S, 32) int8 in [0, 2],
    shift (S,) in {1, -1}, 0 where no split was accepted), before the negative-scale flip."""
    S, n = xb.shape
    order = np.argsort(xb, axis=1, kind="stable")
    wx = np.take_along_axis(weight * xb, order, axis=1)
    ws = np.take_along_axis(weight, order, axis=1)
    sumx, sumw = np.zeros((S, n + 1), F32), np.zeros((S, n + 1), F32)
    for j in range(n):
        sumx[:, j + 1] = sumx[:, j] + wx[:, j]
        sumw[:, j + 1] = sumw[:, j] + ws[:, j]
    best = np.full(S, -FLT_MAX, F32)
    scale = sequential_max(np.abs(xb), axis=1)  # ggml's initial `scale = max`
    i1s, i2s, shift = np.full(S, -1), np.full(S, -1), np.zeros(S, np.int64)
    for i1 in range(n + 1):
        a, aw = sumx[:, i1] - sumx[:, 0], sumw[:, i1] - sumw[:, 0]
        for i2 in range(i1, n + 1):
            b, bw = sumx[:, i2] - sumx[:, i1], sumw[:, i2] - sumw[:, i1]
            c, cw = sumx[:, n] - sumx[:, i2], sumw[:, n] - sumw[:, i2]
            for sign in (1, -1):
                p = SHIFTED[sign]
                sumqx = a * p[0] + b * p[1] + c * p[2]
                sumq2 = aw * p[0] * p[0] + bw * p[1] * p[1] + cw * p[2] * p[2]
                take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                scale = np.where(take, sumqx / sumq2, scale)
                best = np.where(take, scale * sumqx, best)
                i1s, i2s, shift = np.where(take, i1, i1s), np.where(take, i2, i2s), np.where(take, sign, shift)
    return scale, split_levels(order, i1s, i2s), shift


def split_levels(order: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Each weight's level 0/1/2 from the two split points of its group's weights in ascending order (`order`):
    below i1, from i1, from i2, back in the weights' own order."""
    rank = np.arange(order.shape[1])
    ascending = (rank >= i1[:, None]).astype(np.int8) + (rank >= i2[:, None])
    levels = np.empty_like(ascending)
    np.put_along_axis(levels, order, ascending, axis=1)
    return levels


def neighbours(levels: np.ndarray, xg: np.ndarray, wg: np.ndarray, scale: np.ndarray, negative: np.ndarray):
    """Each group of 8's point (IQ1_S and IQ1_M): the kmap lookup of its levels, else ggml's
    `iq1_find_best_neighbour2` (least sum((wt*diff)*diff), diff = scale*q - x, q the shifted value of the point's
    level; first on a tie; where no distance is below FLT_MAX, ggml reads past its arrays: the first neighbour
    here).  levels/xg/wg (G, 8), scale (G,) and negative (G,) (the shift is -delta) of the group's sub-block.
    Returns (indices (G,), on the codebook (G,))."""
    book = codebook("IQ1_S")
    index = book.kmap[level_vector(levels, book.bits)]
    on = index >= 0
    off = np.flatnonzero(~on)
    if len(off):
        u = level_vector(levels[off], book.bits)
        count = book.count[u]
        pairs = int(count.sum())
        group = np.repeat(np.arange(len(off)), count)
        first = np.cumsum(count) - count
        candidate = book.flat.take(np.repeat(book.start[u] - first, count) + np.arange(pairs))
        at = off.take(group)
        table = np.where(negative[at][:, None], SHIFTED[-1], SHIFTED[1])  # (pairs, 3)
        q = np.take_along_axis(table, book.points[candidate].astype(np.int64), axis=1)  # (pairs, 8)
        xo, wo = xg[at], wg[at]
        sc = scale[at]
        d2 = np.zeros(pairs, F32)
        for i in range(8):
            diff = sc * q[:, i] - xo[:, i]
            d2 += (wo[:, i] * diff) * diff
        d2[np.isnan(d2)] = np.inf
        best = np.minimum.reduceat(d2, first)
        wins = (d2 == best.take(group)) & (best.take(group) < FLT_MAX)
        pick = np.minimum.reduceat(np.where(wins, np.arange(pairs), pairs), first)
        index[off] = candidate.take(np.where(pick < pairs, pick, first))
    return index, on


class IQ1_S(LatticeCodec):
    qtype = GGMLQuantizationType.IQ1_S
    block_size = 256
    type_size = 50
    needs_importance = True

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> S1Blocks:
        x = self.blocks_of(w)
        self.check_importance(importance)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance).reshape(-1, 32)
        xb = x.reshape(-1, 32)
        S = len(xb)
        scale, index, shift = np.zeros(S, F32), np.zeros((S, 4), np.int64), np.ones(S, np.int64)
        with np.errstate(all="ignore"):
            zero = sequential_max(np.abs(xb), axis=1) < EPS
            for c in range(0, S, CHUNK):
                cut = slice(c, c + CHUNK)
                scale[cut], index[cut], shift[cut] = self._fit_chunk(xb[cut], weight[cut])
        skipped = zero | (shift == 0)  # ggml: no split accepted: skipped as a zero sub-block
        scale = np.where(skipped, F32(0), scale).reshape(rows, nb, 8)
        index = np.where(skipped[:, None], 0, index).reshape(rows, nb, 32)
        negative = (np.where(skipped, 1, shift) == -1).reshape(rows, nb, 8)
        max_scale = np.zeros((rows, nb), F32)
        for g in range(8):
            max_scale = np.where(max_scale > scale[..., g], max_scale, scale[..., g])
        with np.errstate(all="ignore"):
            d = max_scale / F32(15)
            dh = (d * F32(1.125)).astype(np.float16)
            ls = np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[..., None] * scale - F32(1))), 0, 7)
        unset = max_scale == 0  # ggml's `if (!max_scale) continue;`: d, the scales and the shifts stay unset
        return S1Blocks(np.where(unset, np.float16(0), dh), index.astype(np.uint16),
                        np.where(unset[..., None], 0, ls).astype(np.uint8), negative & ~unset[..., None])

    @staticmethod
    def _fit_chunk(xb: np.ndarray, weight: np.ndarray):
        scale, levels, shift = best_splits(xb, weight)
        flip = scale < 0
        levels = np.where(flip[:, None], 2 - levels, levels)
        scale, shift = np.where(flip, -scale, scale), np.where(flip, -shift, shift)
        index, on = neighbours(levels.reshape(-1, 8), xb.reshape(-1, 8), weight.reshape(-1, 8), np.repeat(scale, 4),
                               np.repeat(shift == -1, 4))
        index, on = index.reshape(len(xb), 4), on.reshape(len(xb), 4).all(1)
        book = codebook("IQ1_S")
        table = np.where((shift == -1)[:, None], SHIFTED[-1], SHIFTED[1])  # (S, 3)
        q = np.take_along_axis(table, book.points[index].reshape(len(xb), 32).astype(np.int64), axis=1)
        sumqx, sumq2 = np.zeros(len(xb), F32), np.zeros(len(xb), F32)
        for i in range(32):  # `w*q*xb` as (w*q)*xb: another order than the IQ2/IQ3 sums
            wq = weight[:, i] * q[:, i]
            sumqx += wq * xb[:, i]
            sumq2 += wq * q[:, i]
        again = ~on & (sumqx > 0) & (sumq2 > 0)
        return np.where(again, sumqx / sumq2, scale).astype(F32), index, shift

    def pack(self, blocks: S1Blocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        high = (blocks.index >> 8).astype(np.uint16).reshape(rows, nb, 8, 4)
        qh = (high << (3 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        qh = (qh | (blocks.scales.astype(np.uint16) << 12) | (blocks.negative.astype(np.uint16) << 15)).astype("<u2")
        fields = [fp16_bytes(blocks.d), (blocks.index & 255).astype(np.uint8), qh.view(np.uint8).reshape(rows, nb, 16)]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> S1Blocks:
        d, qs, qh = block_fields(raw, self.type_size, 2, 32, 16)
        qh = np.ascontiguousarray(qh).view("<u2")  # (rows, nb, 8)
        high = (qh[..., None] >> (3 * np.arange(4, dtype=np.uint16))) & 7
        index = qs.astype(np.uint16) | (high.reshape(*qs.shape).astype(np.uint16) << 8)
        return S1Blocks(fp16_field(d), index, ((qh >> 12) & 7).astype(np.uint8), (qh >> 15).astype(bool))

    def dequantize(self, blocks: S1Blocks) -> np.ndarray:
        _GGUF_IQ1_S.init_grid()
        rows, nb, _ = blocks.index.shape
        dl = blocks.d.astype(F32)[..., None] * (F32(2) * blocks.scales.astype(F32) + F32(1))  # (rows, nb, 8)
        delta = np.where(blocks.negative, -DELTA, DELTA)
        grid = _GGUF_IQ1_S.grid.reshape(2048, 8)[blocks.index].reshape(rows, nb, 8, 32)
        return (dl[..., None] * (grid + delta[..., None])).reshape(rows, -1)

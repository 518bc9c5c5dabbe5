"""What IQ3_XXS and IQ3_S share: their 4-weight codebooks (points of the D4 lattice), the neighbour lists ggml derives
from them, and the per-32 search of ggml's `quantize_row_iq3_xxs_impl` / `quantize_row_iq3_s_impl`.

A codebook point is 4 odd levels 2l+1, l in [0, 7] (IQ3_XXS: 256 points, IQ3_S: 512).  The points are gguf-py's
grids (`gguf.quants.IQ3_XXS.grid`, `IQ3_S.grid`): the level of a coordinate is its position in the type's
`grid_map` (IQ3_XXS dequantizes level 7 to 62, not 60, which the quantizer never sees).  ggml's `iq3xs_init_impl`
derives, for every one of the 8^4 level vectors u that is not a point, its neighbour list: the points at the
`nwant` smallest distinct squared distances from (2u+1) (nwant = 2 for 256 points, 3 for 512), ordered by
(distance, index).  `codebook` derives the same, once per process.

The search, per sub-block of 32 weights x with weights wt (imatrix * sqrt(sigma2 + x^2), sigma2 = 2*sum(x^2)/256
over the super-block; x^2 without importance) and xval = |x| (IQ3_XXS: one more sign flip where needed to make
the number of negatives per 8 even, on the weight of least wt*x*x, so that 7 sign bits suffice):

    max = the largest xval (sequential MAX); max below the type's epsilon: scale 0, indices 0, signs unset
    for each trial t (IQ3_XXS t = -15..15, IQ3_S -9..9):  id = (15 + 0.2 t) / max
        each group of 4: l = clamp(nearest_int(0.5 * (id * xval - 1)), 0, 7); off the codebook, the neighbour
        with the least sum(sqrt(wt) * (scale*q - xval)^2), scale = 1/id (first one on a tie)
        the grid with the largest sumqx^2 / sumq2 (strictly) gives scale = sumqx / sumq2, q = 2l+1
    if any group of the best grid was off the codebook and scale > 0: those groups (IQ3_S: every group) again
    at id = 1/scale (neighbours by `scale`), then scale = sumqx / sumq2 of the result
    a negative scale flips to positive with every sign bit

every float32 operation in ggml's order (sums sequential over the 32 elements, `wt*x*q` as `(wt*x)*q`).  The
super-block's d and the 4-bit sub-block scales are the codecs' (iq3_xxs.py, iq3_s.py).  Sub-blocks are
independent, so everything is vectorized across them, element-major and in cache-sized chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from gguf.quants import IQ3_S as _GGUF_IQ3_S
from gguf.quants import IQ3_XXS as _GGUF_IQ3_XXS

from .search_symmetric import nearest_int, sequential_sum

F32 = np.float32
FLT_MAX = F32(np.finfo(F32).max)
KMAX = 8  # levels per coordinate
CHUNK_SUB_BLOCKS = 4096  # sub-blocks per chunk of the search: its (32, chunk) float32 temporaries stay in cache


@dataclasses.dataclass(frozen=True)
class Codebook:
    """points: (size, 4) int levels l; odd: the points 2l+1 as float32, odd_t its transpose; kmap: (4096,) the point index of each level vector u =
    l0 | l1 << 3 | l2 << 6 | l3 << 9, -1 off the codebook; neighbours of an off-codebook u: the point indices
    flat[start[u]:start[u] + count[u]]."""

    points: np.ndarray
    odd: np.ndarray
    odd_t: np.ndarray
    kmap: np.ndarray
    start: np.ndarray
    count: np.ndarray
    flat: np.ndarray


def gguf_points(size: int) -> np.ndarray:
    """gguf-py's grid of the 256- or 512-point codebook as levels (size, 4) int64."""
    cls = _GGUF_IQ3_XXS if size == 256 else _GGUF_IQ3_S
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=F32), grid)
    assert (np.asarray(cls.grid_map, dtype=F32)[levels] == grid).all()
    return levels


@functools.lru_cache(maxsize=None)
def codebook(size: int) -> Codebook:
    """The codebook of `size` points and ggml's neighbour lists (module docstring)."""
    points = gguf_points(size)
    kmap = np.full(KMAX**4, -1, dtype=np.int64)
    kmap[level_vector(points)] = np.arange(size)
    nwant = 2 if size == 256 else 3
    every = (np.arange(KMAX**4)[:, None] >> (3 * np.arange(4))) & 7
    d2 = (((2 * every[:, None, :] + 1) - (2 * points[None] + 1)) ** 2).sum(-1)  # (4096, size)
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then index: ggml's qsort comparator
    ranked = np.take_along_axis(d2, order, axis=1)
    # the nwant-th distinct distance of each row: distances rise along `ranked`, so count the rises
    distinct = np.cumsum(np.concatenate([np.ones((len(ranked), 1), bool), ranked[:, 1:] > ranked[:, :-1]], 1), 1)
    keep = (distinct <= nwant) & (kmap < 0)[:, None]
    count = keep.sum(1)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    odd = (2 * points + 1).astype(F32)
    return Codebook(points, odd, np.ascontiguousarray(odd.T), kmap, start, count, order[keep])


def level_vector(levels: np.ndarray) -> np.ndarray:
    """Levels (..., 4) -> u = l0 | l1 << 3 | l2 << 6 | l3 << 9."""
    levels = levels.astype(np.int64)
    return levels[..., 0] | levels[..., 1] << 3 | levels[..., 2] << 6 | levels[..., 3] << 9


def nearest_points(book: Codebook, levels: np.ndarray, xval_t: np.ndarray, waux_t: np.ndarray, scale: np.ndarray):
    """The point of each group of 4: ggml's kmap lookup of the rounded levels, else `iq3_find_best_neighbour`.

    levels: (G, 4) int, xval_t/waux_t (4, G) float32 (coordinate-major), scale (G,) float32 (the group's sub-block's).  Returns (point
    indices (G,) int64, on_codebook (G,) bool).  Where no neighbour's distance is below FLT_MAX (ggml aborts:
    weights whose squares overflow) the first neighbour is taken."""
    index = book.kmap[level_vector(levels)]
    on = index >= 0
    off = np.flatnonzero(~on)
    if len(off):
        u = level_vector(levels[off])
        count = book.count[u]
        pairs = int(count.sum())
        group = np.repeat(np.arange(len(off)), count)
        first = np.cumsum(count) - count
        candidate = book.flat.take(np.repeat(book.start[u] - first, count) + np.arange(pairs))
        at = off.take(group)  # the group of each (group, neighbour) pair
        sc = scale.take(at)
        d2 = np.zeros(pairs, F32)
        for i in range(4):  # coordinate-major gathers: contiguous rows of xval.T, waux.T, odd.T
            diff = sc * book.odd_t[i].take(candidate) - xval_t[i].take(at)
            d2 += (waux_t[i].take(at) * diff) * diff
        d2[np.isnan(d2)] = np.inf
        best = np.minimum.reduceat(d2, first)
        wins = (d2 == best.take(group)) & (best.take(group) < FLT_MAX)
        pick = np.minimum.reduceat(np.where(wins, np.arange(pairs), pairs), first)
        index[off] = candidate.take(np.where(pick < pairs, pick, first))
    return index, on


def group_levels(xval: np.ndarray, iscale: np.ndarray) -> np.ndarray:
    """l = clamp(nearest_int(0.5 * (iscale * xval - 1)), 0, 7) for xval (S, 32), iscale (S,): (S * 8, 4) int."""
    with np.errstate(over="ignore", invalid="ignore"):
        l = nearest_int(F32(0.5) * (iscale[:, None] * xval - F32(1)))
    return np.clip(l, 0, KMAX - 1).reshape(-1, 4)


def sums(weight: np.ndarray, xval: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = sum((wt*xval)*q), sumq2 = sum((wt*q)*q) over each sub-block (S, 32), sequential over the 32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return sequential_sum(weight * xval * q, axis=1), sequential_sum(weight * q * q, axis=1)


def sequential_max(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """ggml's `max = x[0]; max = MAX(max, x[i])` along `axis`, MAX(a, b) = a > b ? a : b (a NaN x[i] wins)."""
    x = np.moveaxis(x, axis, 0)
    m = x[0]
    for row in x[1:]:
        m = np.where(m > row, m, row)
    return m


def search(xval: np.ndarray, weight: np.ndarray, size: int, trials: range, zero: np.ndarray,
           refine_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """The search of the module docstring for sub-blocks xval/weight (S, 32) float32 (signs already taken out):
    (scale (S,) float32 before the final sign flip, point indices (S, 8) int64).  `zero`: the sub-blocks ggml skips
    (scale 0, levels 0); refine_all: IQ3_S's final pass over every group, not only the off-codebook ones."""
    book = codebook(size)
    S = xval.shape[0]
    scale = np.empty(S, F32)
    index = np.empty((S, 8), np.int64)
    for c in range(0, S, CHUNK_SUB_BLOCKS):
        cut = slice(c, c + CHUNK_SUB_BLOCKS)
        scale[cut], index[cut] = _search_chunk(book, xval[cut], weight[cut], trials, refine_all)
    scale = np.where(zero, F32(0), scale)
    index = np.where(zero[:, None], book.kmap[0], index)
    return scale, index


def _search_chunk(book: Codebook, xval: np.ndarray, weight: np.ndarray, trials: range, refine_all: bool):
    S = xval.shape[0]
    with np.errstate(all="ignore"):
        waux = np.sqrt(weight)
        mx = sequential_max(xval, axis=1)
        xg, wg = np.ascontiguousarray(xval.reshape(-1, 4).T), np.ascontiguousarray(waux.reshape(-1, 4).T)
        best = np.zeros(S, F32)
        scale = mx / F32(2 * KMAX - 1)
        index = np.full((S, 8), book.kmap[0])  # levels 0, ggml's memset
        on = np.full((S, 8), not refine_all)  # IQ3_XXS starts "on the codebook", IQ3_S not
        for t in trials:
            iscale = (F32(2 * KMAX - 1) + F32(t) * F32(0.2)) / mx
            this_scale = np.repeat(F32(1) / iscale, 8)
            idx, on_t = nearest_points(book, group_levels(xval, iscale), xg, wg, this_scale)
            sumqx, sumq2 = sums(weight, xval, book.odd[idx].reshape(S, 32))
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(take, sumqx / sumq2, scale)
            best = np.where(take, scale * sumqx, best)
            index[take] = idx.reshape(S, 8)[take]
            on[take] = on_t.reshape(S, 8)[take]
        again = (~on).any(1) & (scale > 0)
        if again.any():
            idx, _ = nearest_points(book, group_levels(xval, F32(1) / scale), xg, wg, np.repeat(scale, 8))
            redo = again[:, None] if refine_all else again[:, None] & ~on
            index = np.where(redo, idx.reshape(S, 8), index)
            sumqx, sumq2 = sums(weight, xval, book.odd[index].reshape(S, 32))
            scale = np.where(again & (sumq2 > 0), sumqx / sumq2, scale)
    return scale.astype(F32), index


def search_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Per-weight search weights for super-blocks x (rows, nb, 256): x*x without importance, else
    imatrix * sqrt(sigma2 + x*x) with sigma2 = 2*sumx2/256 (sumx2 sequential over the super-block)."""
    with np.errstate(over="ignore", invalid="ignore"):
        x2 = x * x
        if importance is None:
            return x2
        sumx2 = sequential_sum(np.moveaxis(x2, -1, 0))
        sigma2 = (F32(2) * sumx2) / F32(256)
        return np.asarray(importance, dtype=F32).reshape(-1, 256) * np.sqrt(sigma2[..., None] + x2)


def super_block_scales(scales: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's last step for sub-block scales (rows, nb, 8): max_scale (sequential MAX from 0), the stored
    d = fp16(max_scale/31 * fudge) and the 4-bit l = clamp(nearest_int(0.5 * (scale/d - 1)), 0, 15), d unrounded.
    Returns (max_scale, d float16, l uint8)."""
    max_scale = np.zeros(scales.shape[:-1], F32)
    for g in range(scales.shape[-1]):
        max_scale = np.where(max_scale > scales[..., g], max_scale, scales[..., g])
    with np.errstate(all="ignore"):
        d = max_scale / F32(31)
        dh = (d * F32(fudge)).astype(np.float16)
        l = nearest_int(F32(0.5) * ((F32(1) / d)[..., None] * scales - F32(1)))
    return max_scale, dh, np.clip(l, 0, 15).astype(np.uint8)

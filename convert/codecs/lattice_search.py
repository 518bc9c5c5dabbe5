"""What the lattice i-quants' quantizers share: their codebooks, the neighbour lists ggml derives from them, and the
search of ggml's `quantize_row_iq3_xxs_impl`, `quantize_row_iq3_s_impl`, `quantize_row_iq2_xxs_impl`,
`quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`.

A codebook point is `dim` odd levels 2l+1 (IQ3_*: dim 4, l in [0, 7], the D4 lattice; IQ2_*: dim 8, l in [0, 2],
the E8 lattice), taken from gguf-py's grids (`gguf.quants.IQ3_XXS.grid`, ...): the level of a coordinate is its
position in the type's `grid_map` (IQ3_XXS dequantizes level 7 to 62, not 60, which the quantizer never sees).
ggml's `iq3xs_init_impl` / `iq2xs_init_impl` derive, for every level vector u that is not a point, its neighbour
list: the points at the `nwant` smallest distinct squared distances from (2u+1), ordered by (distance, index).
`codebook` derives the same, once per process.

The search, per sub-block of n weights (32; IQ2_XS, IQ2_S 16) x with weights wt (search_weights) and xval = |x|
(IQ3_XXS, IQ2_XXS, IQ2_XS: one more sign flip where needed to make the number of negatives per 8 even, on the
weight of least wt*x*x, so that 7 sign bits suffice: even_signs):

    max = the largest xval (sequential MAX); max below the type's epsilon: scale 0, indices 0, signs unset
    peak = max (IQ2_XXS: 3 * make_qp_quants' scale, <= 0 skips the sub-block too)
    for each trial t (IQ3_XXS -15..15, IQ2_XXS -6..6, others -9..9):  id = (2*kmax - 1 + step * t) / peak
        (step 0.2 for IQ3_*, 0.1 for IQ2_*)
        each group of dim weights: l = clamp(nearest_int(0.5 * (id * xval - 1)), 0, kmax - 1); off the codebook,
        the neighbour with the least sum(sqrt(wt) * (scale*q - xval)^2), scale = 1/id (first one on a tie)
        the grid with the largest sumqx^2 / sumq2 (strictly) gives scale = sumqx / sumq2, q = 2l+1
    a final pass at id = 1/scale (neighbours by `scale`) where scale > 0: over the best grid's off-codebook groups
    if any (IQ3_XXS, IQ2_XS, IQ2_S), over every group if any is off (IQ3_S), over every group always (IQ2_XXS);
    then scale = sumqx / sumq2 of the result
    a negative scale flips to positive with every sign bit

every float32 operation in ggml's order (sums sequential over the sub-block, `wt*x*q` as `(wt*x)*q`).  The
super-block's d and the 4-bit sub-block scales are the codecs'.  Sub-blocks are independent, so everything is
vectorized across them, in cache-sized chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from gguf import quants as _gguf_quants

from .search_symmetric import nearest_int, sequential_sum

F32 = np.float32
FLT_MAX = F32(np.finfo(F32).max)
CHUNK_WEIGHTS = 1 << 17  # weights per chunk of the search: its float32 temporaries stay in cache


@dataclasses.dataclass(frozen=True)
class Codebook:
    """points: (size, dim) int levels l; odd: the points 2l+1 as float32, odd_t its transpose; kmax: levels per
    coordinate, bits: bits per coordinate in a level vector u = l0 | l1 << bits | ...; kmap: the point index of
    each u, -1 off the codebook; neighbours of an off-codebook u: the point indices flat[start[u]:start[u] +
    count[u]]."""

    points: np.ndarray
    odd: np.ndarray
    odd_t: np.ndarray
    kmax: int
    bits: int
    kmap: np.ndarray
    start: np.ndarray
    count: np.ndarray
    flat: np.ndarray

    @property
    def dim(self) -> int:
        return self.points.shape[1]


# type -> (levels per coordinate, bits per coordinate in u, nwant): ggml's iq3xs_init_impl / iq2xs_init_impl
CODEBOOKS = {"IQ3_XXS": (8, 3, 2), "IQ3_S": (8, 3, 3), "IQ2_XXS": (3, 2, 2), "IQ2_XS": (3, 2, 2), "IQ2_S": (3, 2, 1),
             "IQ1_S": (3, 2, 3)}


def gguf_points(name: str) -> np.ndarray:
    """gguf-py's grid of type `name` as levels (size, dim) int64."""
    cls = getattr(_gguf_quants, name)
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=F32)
    levels = np.searchsorted(grid_map, grid)
    assert (grid_map[levels] == grid).all()
    return levels


@functools.lru_cache(maxsize=None)
def codebook(name: str) -> Codebook:
    """The codebook of type `name` and ggml's neighbour lists (module docstring)."""
    kmax, bits, nwant = CODEBOOKS[name]
    points = gguf_points(name)
    size, dim = points.shape
    kmap = np.full(1 << (bits * dim), -1, dtype=np.int64)
    kmap[level_vector(points, bits)] = np.arange(size)
    # every level vector the rounding can produce (levels in [0, kmax)), and its squared distance to each point
    every = (np.arange(kmax**dim)[:, None] // kmax ** np.arange(dim)) % kmax
    every = every[kmap[level_vector(every, bits)] < 0]
    d2 = np.zeros((len(every), size), np.int64)
    for k in range(dim):
        d2 += ((2 * every[:, k:k + 1] + 1) - (2 * points[None, :, k] + 1)) ** 2
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then index: ggml's qsort comparator
    ranked = np.take_along_axis(d2, order, axis=1)
    # the nwant-th distinct distance of each row: distances rise along `ranked`, so count the rises
    distinct = np.cumsum(np.concatenate([np.ones((len(ranked), 1), bool), ranked[:, 1:] > ranked[:, :-1]], 1), 1)
    keep = distinct <= nwant
    count = np.zeros(len(kmap), np.int64)
    start = np.zeros(len(kmap), np.int64)
    count[level_vector(every, bits)] = keep.sum(1)
    start[level_vector(every, bits)] = np.cumsum(keep.sum(1)) - keep.sum(1)
    odd = (2 * points + 1).astype(F32)
    return Codebook(points, odd, np.ascontiguousarray(odd.T), kmax, bits, kmap, start, count, order[keep])


def level_vector(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels (..., dim) -> u = l0 | l1 << bits | l2 << 2*bits | ..."""
    levels = levels.astype(np.int64)
    u = levels[..., 0].copy()
    for k in range(1, levels.shape[-1]):
        u |= levels[..., k] << (bits * k)
    return u


def nearest_points(book: Codebook, levels: np.ndarray, xval_t: np.ndarray, waux_t: np.ndarray, scale: np.ndarray):
    """The point of each group of 4: ggml's kmap lookup of the rounded levels, else `iq3_find_best_neighbour`.

    levels: (G, dim) int, xval_t/waux_t (dim, G) float32 (coordinate-major), scale (G,) float32 (the group's
    sub-block's).  Returns (point
    indices (G,) int64, on_codebook (G,) bool).  Where no neighbour's distance is below FLT_MAX (ggml aborts:
    weights whose squares overflow) the first neighbour is taken."""
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
        at = off.take(group)  # the group of each (group, neighbour) pair
        sc = scale.take(at)
        d2 = np.zeros(pairs, F32)
        for i in range(book.dim):  # coordinate-major gathers: contiguous rows of xval.T, waux.T, odd.T
            diff = sc * book.odd_t[i].take(candidate) - xval_t[i].take(at)
            d2 += (waux_t[i].take(at) * diff) * diff
        d2[np.isnan(d2)] = np.inf
        best = np.minimum.reduceat(d2, first)
        wins = (d2 == best.take(group)) & (best.take(group) < FLT_MAX)
        pick = np.minimum.reduceat(np.where(wins, np.arange(pairs), pairs), first)
        index[off] = candidate.take(np.where(pick < pairs, pick, first))
    return index, on


def group_levels(book: Codebook, xval: np.ndarray, iscale: np.ndarray) -> np.ndarray:
    """l = clamp(nearest_int(0.5 * (iscale * xval - 1)), 0, kmax - 1) for xval (S, n), iscale (S,): (S * n / dim,
    dim) int."""
    with np.errstate(over="ignore", invalid="ignore"):
        l = nearest_int(F32(0.5) * (iscale[:, None] * xval - F32(1)))
    return np.clip(l, 0, book.kmax - 1).reshape(-1, book.dim)


def sums(weight: np.ndarray, xval: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = sum((wt*xval)*q), sumq2 = sum((wt*q)*q) over each sub-block (S, n), sequential over the n."""
    with np.errstate(over="ignore", invalid="ignore"):
        return sequential_sum(weight * xval * q, axis=1), sequential_sum(weight * q * q, axis=1)


def sequential_max(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """ggml's `max = x[0]; max = MAX(max, x[i])` along `axis`, MAX(a, b) = a > b ? a : b (a NaN x[i] wins)."""
    x = np.moveaxis(x, axis, 0)
    m = x[0]
    for row in x[1:]:
        m = np.where(m > row, m, row)
    return m


def search(xval: np.ndarray, weight: np.ndarray, name: str, trials: range, step: float, zero: np.ndarray,
           refine: str, peak: np.ndarray | None = None,
           scale0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The search of the module docstring on type `name`'s codebook for sub-blocks xval/weight (S, n) float32
    (signs already taken out), trial id = (2*kmax - 1 + step * t) / peak: (scale (S,) float32 before the final sign
    flip, point indices (S, n / dim) int64).  `zero`: the sub-blocks ggml skips (scale 0, levels 0).  refine: the
    final pass, "off" over the off-codebook groups of the best trial when there are any (IQ3_XXS, IQ2_XS, IQ2_S),
    "all_if_off" over every group then (IQ3_S), "all" over every group always (IQ2_XXS); each only where the scale
    is > 0.  peak: what the trials scale from (default the sub-block's max xval), scale0: the scale if no trial
    wins (default max / (2*kmax - 1))."""
    book = codebook(name)
    S, n = xval.shape
    scale = np.empty(S, F32)
    index = np.empty((S, n // book.dim), np.int64)
    chunk = max(1, CHUNK_WEIGHTS // n)
    for c in range(0, S, chunk):
        cut = slice(c, c + chunk)
        part = (None if a is None else a[cut] for a in (peak, scale0))
        scale[cut], index[cut] = _search_chunk(book, xval[cut], weight[cut], trials, F32(step), refine, *part)
    scale = np.where(zero, F32(0), scale)
    index = np.where(zero[:, None], book.kmap[0], index)
    return scale, index


def _search_chunk(book: Codebook, xval: np.ndarray, weight: np.ndarray, trials: range, step: np.float32,
                  refine: str, peak: np.ndarray | None, scale0: np.ndarray | None):
    S, n = xval.shape
    groups = n // book.dim
    top = F32(2 * book.kmax - 1)
    with np.errstate(all="ignore"):
        waux = np.sqrt(weight)
        mx = sequential_max(xval, axis=1)
        peak = mx if peak is None else peak
        xg = np.ascontiguousarray(xval.reshape(-1, book.dim).T)
        wg = np.ascontiguousarray(waux.reshape(-1, book.dim).T)
        best = np.zeros(S, F32)
        scale = mx / top if scale0 is None else scale0
        index = np.full((S, groups), book.kmap[0])  # levels 0, ggml's memset
        on = np.full((S, groups), refine == "off")  # IQ3_XXS/IQ2_* start "on the codebook", IQ3_S not
        for t in trials:
            iscale = (top + F32(t) * step) / peak
            this_scale = np.repeat(F32(1) / iscale, groups)
            idx, on_t = nearest_points(book, group_levels(book, xval, iscale), xg, wg, this_scale)
            sumqx, sumq2 = sums(weight, xval, book.odd[idx].reshape(S, n))
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            scale = np.where(take, sumqx / sumq2, scale)
            best = np.where(take, scale * sumqx, best)
            index[take] = idx.reshape(S, groups)[take]
            on[take] = on_t.reshape(S, groups)[take]
        again = (scale > 0) if refine == "all" else (~on).any(1) & (scale > 0)
        if again.any():
            idx, _ = nearest_points(book, group_levels(book, xval, F32(1) / scale), xg, wg, np.repeat(scale, groups))
            redo = again[:, None] & ~on if refine == "off" else again[:, None]
            index = np.where(redo, idx.reshape(S, groups), index)
            sumqx, sumq2 = sums(weight, xval, book.odd[index].reshape(S, n))
            scale = np.where(again & (sumq2 > 0), sumqx / sumq2, scale)
    return scale.astype(F32), index


def search_weights(x: np.ndarray, importance: np.ndarray | None, plain_sigma: bool = False,
                   doubled: bool = True) -> np.ndarray:
    """Per-weight search weights for super-blocks x (rows, nb, 256): imatrix * sqrt(sigma2 + x*x) with sigma2 =
    2*sumx2/256 (IQ2_XXS, IQ2_XS: not doubled, sumx2/256; sumx2 sequential over the super-block); without
    importance x*x, or with plain_sigma (IQ2_S) 0.25*sigma2 + x*x."""
    with np.errstate(over="ignore", invalid="ignore"):
        x2 = x * x
        if importance is None and not plain_sigma:
            return x2
        sumx2 = sequential_sum(np.moveaxis(x2, -1, 0))
        sigma2 = ((F32(2) * sumx2) if doubled else sumx2) / F32(256)
        if importance is None:
            return F32(0.25) * sigma2[..., None] + x2
        return np.asarray(importance, dtype=F32).reshape(-1, 256) * np.sqrt(sigma2[..., None] + x2)


def even_signs(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xval and the 7-bit sign indices (IQ3_XXS, IQ2_XXS, IQ2_XS) for groups of 8, x/weight (8, G) element-major:
    xval = x where x >= 0, -x elsewhere (NaN counts as negative, as `x >= 0` is false); with an odd count of
    negatives the first element of least (wt*x)*x is flipped back (its xval negated) and its sign bit toggled, so
    the 8th sign is the parity of the other 7."""
    neg = ~(x >= 0)
    xval = np.where(neg, -x, x)
    bits = (neg.astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]).sum(0, dtype=np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        wx2 = weight * x * x
    least, imin = wx2[0], np.zeros(x.shape[1], np.int64)
    for i in range(1, 8):
        better = wx2[i] < least
        least, imin = np.where(better, wx2[i], least), np.where(better, i, imin)
    odd = neg.sum(0) % 2 == 1
    flip = odd & (np.arange(8)[:, None] == imin)
    xval = np.where(flip, -xval, xval)
    bits = bits ^ np.where(odd, np.left_shift(1, imin), 0).astype(np.uint8)
    return xval, bits & 127


def even_sign_sub_blocks(x: np.ndarray, weight: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """even_signs over super-blocks x/weight (rows, nb, 256): (xval (sub-blocks, n), sign indices (sub-blocks,
    n // 8))."""
    xval, signs = even_signs(np.ascontiguousarray(x.reshape(-1, 8).T), np.ascontiguousarray(weight.reshape(-1, 8).T))
    return np.ascontiguousarray(xval.T).reshape(-1, n), signs.reshape(-1, n // 8)


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

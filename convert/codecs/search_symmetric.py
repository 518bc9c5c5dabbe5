"""Scale searches of the symmetric GGML types (w ~ d * q, no min), vectorized over many groups at once.

These are ggml's `make_qx_quants` (weighted least-squares scale from 19 trial grids) and `make_q3_quants`
(coordinate descent on the codes), re-derived so that every float32 operation happens in the order
ggml performs it: per-group sums are sequential over the group's elements, products are evaluated
left to right (`w*x*l` is `(w*x)*l`), and rounding is ggml's `nearest_int`.  Groups are independent,
so all arithmetic is vectorized across groups; only the loops whose order matters (elements inside a
sum, descent steps) are Python loops.

Internally groups are laid out element-major, (n, groups), so that element i of every group is one
contiguous vector, and processed in chunks that stay in cache.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

# ggml treats a group whose largest magnitude is below this as all zeros.
GROUP_MAX_EPS = F32(1e-15)

_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(v) in the low mantissa bits
_CHUNK_VALUES = 1 << 17  # values per chunk: its float32 temporaries (512 KiB each) stay in cache


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: round half to even through the 1.5*2**23 trick (int32).

    Reproduced literally rather than with np.rint because ggml never guards its argument: for
    |v| > 2**22, inf or NaN the trick yields particular garbage that later clamps turn into codes.
    """
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def sequential_sum(t: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum along `axis` in ggml's order, `s = 0.0f; for i: s += t[i]` (float32; numpy's sum is pairwise)."""
    t = np.moveaxis(t, axis, 0)
    s = t[0] + F32(0.0)
    for row in t[1:]:
        s += row
    return s


def signed_peak(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(amax, peak) along `axis`: the largest |x| and the signed value where it first occurs.

    This is ggml's `if (ax > amax) { amax = ax; max = x[i]; }` scan, starting from amax = max = +0,
    so an all-zero group (even of -0.0) has peak +0.
    """
    ax = np.abs(x)
    i = np.expand_dims(np.argmax(ax, axis=axis), axis)
    amax = np.take_along_axis(ax, i, axis).squeeze(axis)
    peak = np.take_along_axis(x, i, axis).squeeze(axis)
    return amax, np.where(amax > 0, peak, F32(0.0))


def _by_chunks(search, nmax: int, *arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run search(*element_major_arrays, nmax) over groups arrays[k][..., n], a cache-sized chunk at a time.

    Returns (scale (...), codes (..., n)) in the caller's group-major layout."""
    shape = arrays[0].shape
    n = shape[-1]
    arrays = [np.ascontiguousarray(a.reshape(-1, n).T, dtype=F32) for a in arrays]
    scale = np.empty(arrays[0].shape[1], F32)
    codes = np.empty(arrays[0].shape, np.uint8)
    chunk = _CHUNK_VALUES // n
    for start in range(0, scale.size, chunk):
        cut = slice(start, start + chunk)
        scale[cut], codes[:, cut] = search(*(a[:, cut] for a in arrays), nmax)
    return scale.reshape(shape[:-1]), np.ascontiguousarray(codes.T).reshape(shape)


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted symmetric scale search (ggml `make_qx_quants`, rmse_type 1) for groups x[..., n].

    Codes are levels l in [-nmax, nmax-1] offset by nmax.  The first grid puts the group's peak on
    level -nmax; 18 more grids stretch it by +-0.1..0.9 levels.  For each grid, the least-squares
    scale sum(w*x*l)/sum(w*l*l) is computed and the grid with the largest sum(w*x*l)^2/sum(w*l*l)
    wins (the first of equals).  `weights` are the importance per element (ggml uses x*x without an
    imatrix).  Returns (scale (...), codes (..., n) uint8); all-zero groups give scale 0 and codes 0.
    """
    return _by_chunks(_qx_search, nmax, x, weights)


def _qx_search(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants on element-major groups x[n, groups]."""
    amax, peak = signed_peak(x, axis=0)
    wx = w * x
    lv, term = np.empty_like(x), np.empty_like(x)
    lo, hi = F32(-nmax), F32(nmax - 1)

    def levels(iscale):
        # |iscale*x| <= nmax + 1 here, where np.rint is exactly nearest_int; work in place, in float32
        np.multiply(x, iscale, out=lv)
        np.rint(lv, out=lv)
        np.maximum(lv, lo, out=lv)
        return np.minimum(lv, hi, out=lv)

    def sums(iscale):
        levels(iscale)
        np.multiply(wx, lv, out=term)
        sumlx = sequential_sum(term)
        np.multiply(w, lv, out=term)
        np.multiply(term, lv, out=term)
        return sumlx, sequential_sum(term)

    with np.errstate(all="ignore"):  # all-zero groups divide by a zero peak; they are reset below
        best_iscale = F32(-nmax) / peak
        sumlx, suml2 = sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_iscale = np.where(better, iscale, best_iscale)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
        codes = levels(best_iscale) + F32(nmax)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0.0), scale), np.where(zero, 0, codes).astype(np.uint8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search by coordinate descent (ggml `make_q3_quants`, do_rmse) for groups x[..., n].

    Starts from the grid that puts the peak on level -nmax, then up to 5 passes over the elements:
    each element's level is moved to its least-squares optimum given the others, if that raises
    sum(w*x*l)^2/sum(w*l*l) with w = x*x.  A pass is sequential inside a group (each step sees the
    sums the previous one left), so passes loop over elements and vectorize over groups.  Returns
    (scale (...), codes (..., n) uint8 = level + nmax); all-zero groups give scale 0 and codes 0.
    """
    return _by_chunks(_q3_descent, nmax, x)


def _q3_descent(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants on element-major groups x[n, groups]."""
    amax, peak = signed_peak(x, axis=0)
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):  # all-zero groups divide by a zero peak; they are reset below
        lv = np.clip(nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1).astype(F32)
        sumlx = sequential_sum(wx * lv)
        suml2 = sequential_sum(w * lv * lv)
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                li = lv[i]
                slx_rest = sumlx - wx[i] * li  # the sums without element i
                sl2_rest = suml2 - w[i] * li * li
                new = np.clip(nearest_int(x[i] * sl2_rest / slx_rest), -nmax, nmax - 1).astype(F32)
                slx = slx_rest + wx[i] * new
                sl2 = sl2_rest + w[i] * new * new
                take = (slx_rest > 0) & (new != li) & (sl2 > 0)
                take &= slx * slx * suml2 > sumlx * sumlx * sl2
                if take.any():
                    changed = True
                    lv[i] = np.where(take, new, li)
                    sumlx = np.where(take, slx, sumlx)
                    suml2 = np.where(take, sl2, suml2)
            if not changed:  # a pass without change would repeat itself: every group has converged
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    zero = amax < GROUP_MAX_EPS
    codes = np.where(zero, 0, lv + F32(nmax)).astype(np.uint8)
    return np.where(zero, F32(0.0), scale), codes

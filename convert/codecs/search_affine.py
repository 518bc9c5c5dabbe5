"""ggml's scale searches for grids with a min (w ~ scale*q - min, q in [0, nmax]), vectorized over groups.

Every function here works on many independent groups at once and reproduces ggml's float32 results bit
for bit.  Arrays are *element-major*: `x[i, b]` is element i of group b, so a step of ggml's per-element
loop is one contiguous numpy operation over all groups.  What makes the results bit-exact:

* sums are accumulated one element after another (`in_order_sum`), never with numpy's pairwise sum;
* every expression is evaluated in float32 with ggml's association, e.g. `w*l*x` is `(w*l)*x`;
* `nearest_int` (shared with search_symmetric) reproduces ggml's rounding, also out of range;
* integer codes that ggml keeps in `uint8_t` wrap modulo 256 exactly where ggml's would;
* per-group branches become masks, evaluated with the same comparisons (NaN compares false).
"""

from __future__ import annotations

import numpy as np

from .search_symmetric import F32, GROUP_MAX_EPS, nearest_int

_CHUNK = 1 << 17  # elements per chunk of groups: a step's 512 KiB float32 arrays stay in cache


def in_order_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum over axis 0 term after term, as ggml's loops do (numpy's own sum is pairwise).

    from_zero: `s = 0; s += t[0]; ...` (search_symmetric.sequential_sum, minus its axis handling, which
    costs more than the additions in these hot loops); otherwise `s = t[0]; s += t[1]; ...`, which keeps
    an all -0.0 sum at -0.0.
    """
    acc = terms[0] + F32(0) if from_zero else terms[0].copy()
    for t in terms[1:]:
        acc += t
    return acc


def _chunked(search):
    """Run a search on chunks of groups (axis 1 of every array argument) and join the results."""

    def run(x: np.ndarray, weights: np.ndarray, *args, **kw):
        x = np.asarray(x, dtype=F32)
        weights = np.asarray(weights, dtype=F32)
        step = max(1, _CHUNK // x.shape[0])
        parts = [search(np.ascontiguousarray(x[:, s:s + step]), np.ascontiguousarray(weights[:, s:s + step]),
                        *args, **kw) for s in range(0, x.shape[1], step)]
        return tuple(np.concatenate(p, axis=-1) for p in zip(*parts))

    run.__name__, run.__doc__ = search.__name__, search.__doc__
    return run


def group_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group min and max over axis 0 by ggml's `if (x[i] < min) min = x[i]` scan (keeps the first of equal
    values, so the sign of a zero is ggml's)."""
    lo, hi = x[0].copy(), x[0].copy()
    for xi in x[1:]:
        np.copyto(lo, xi, where=xi < lo)
        np.copyto(hi, xi, where=xi > hi)
    return lo, hi


def _weighted_error(scale, offset, levels, x, weights, use_mad: bool, tmp: np.ndarray) -> np.ndarray:
    """sum_i w_i * |scale*l_i + offset - x_i|  (or squared), accumulated in element order; tmp is scratch."""
    np.multiply(scale, levels, out=tmp)
    tmp += offset
    tmp -= x
    if use_mad:
        np.abs(tmp, out=tmp)
    else:
        tmp *= tmp
    tmp *= weights
    return in_order_sum(tmp)


def _levels(iscale, x, lo, nmax: int, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Codes clip(nearest_int(iscale * (x - lo)), 0, nmax) as float32 into `out` (tmp is scratch)."""
    np.subtract(x, lo, out=tmp)
    tmp *= iscale
    np.clip(nearest_int(tmp), 0, nmax, out=out, casting="unsafe")
    return out


@_chunked
def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted search for (scale, min) of a grid `scale*q - min`, q in [0, nmax]; ggml's make_qkx2_quants.

    x, weights: (n, groups) float32.  Start from the min/max grid; then try nstep+1 candidate grids of
    (nmax + rmin + rdelta*step) levels over the current [min, max], fit scale and min to each rounding by
    weighted least squares (min clamped to <= 0), and keep the one with the lowest weighted error
    (absolute with use_mad, else squared).  Returns scale (groups,), the_min (groups,) = -min >= 0,
    codes L (n, groups) uint8.  ggml's make_qkx3_quants is the same search (it only differs when called
    without weights, which no block type does), hence the alias below.
    """
    lo, hi = group_min_max(x)
    sum_w = in_order_sum(weights, from_zero=False)
    sum_x = in_order_sum(weights * x, from_zero=False)
    lo = np.where(lo > 0, F32(0), lo)
    flat = ~(hi > lo)  # max <= min: all codes 0, scale 0, the_min = -min
    flat_min = lo
    codes, cand, wl, tmp = (np.empty_like(x) for _ in range(4))

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1) / iscale
        _levels(iscale, x, lo, nmax, codes, tmp)
        best = _weighted_error(scale, lo, codes, x, weights, use_mad, tmp)
        for step in range(nstep + 1 if nstep >= 1 else 0):
            # ggml rescales from the *current* best min, which may have moved on an earlier step.
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
            _levels(iscale, x, lo, nmax, cand, tmp)
            np.multiply(weights, cand, out=wl)
            sum_l = in_order_sum(wl)
            sum_l2 = in_order_sum(np.multiply(wl, cand, out=tmp))
            sum_xl = in_order_sum(np.multiply(wl, x, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            err = _weighted_error(this_scale, this_min, cand, x, weights, use_mad, tmp)
            better = (det > 0) & (err < best)
            np.copyto(codes, cand, where=better)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)

    scale = np.where(flat, F32(0), scale)
    lo = np.where(flat, flat_min, lo)
    codes[:, flat] = 0
    return scale, -lo, codes.astype(np.uint8)


make_qkx3_quants = make_qkx2_quants


def make_qp_quants(x: np.ndarray, weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative values x to scale*L, L in [0, nmax] (no min); ggml's make_qp_quants.

    Used for the super-block scales/mins of the K-quants with an importance matrix.  x, weights:
    (n, groups) float32.  Try 9 scales around nmax/max, keep the lowest weighted squared error, then
    refine codes one element at a time (5 passes) while that raises the least-squares fit quality.
    Returns scale (groups,) and codes L (n, groups) uint8 (negative inputs wrap, as ggml's uint8_t does).
    """
    x = np.asarray(x, dtype=F32)
    weights = np.asarray(weights, dtype=F32)
    top = np.zeros_like(x[0])
    for xi in x:
        top = np.where(top > xi, top, xi)
    zero = top < GROUP_MAX_EPS

    with np.errstate(all="ignore"):
        iscale = F32(nmax) / top
        first = (nearest_int(iscale * x) & 0xFF).astype(F32)  # ggml stores this unclamped in uint8_t
        diff = x - (F32(1) / iscale) * first
        best = in_order_sum(weights * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_s = (F32(0.1) * F32(step) + F32(nmax)) / top
            levels = np.minimum(nmax, nearest_int(iscale_s * x)).astype(F32)
            diff = x - (F32(1) / iscale_s) * levels
            mse = in_order_sum(weights * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_s, iscale)

        levels = np.minimum(nmax, nearest_int(iscale * x)).astype(F32)
        wx = weights * x
        sumlx = in_order_sum(wx * levels)
        suml2 = in_order_sum(weights * levels * levels)
        codes = levels.astype(np.int32) & 0xFF
        for _ in range(5):  # a pass that changes nothing leaves the state as is, so extra passes are no-ops
            n_changed = 0
            for i in range(x.shape[0]):  # sequential: each accepted change moves the sums the next one sees
                old = codes[i].astype(F32)
                slx = sumlx - wx[i] * old
                sl2 = suml2 - weights[i] * old * old
                new = np.minimum(nmax, nearest_int(x[i] * sl2 / slx))
                new_f = new.astype(F32)
                slx_new = slx + wx[i] * new_f
                sl2_new = sl2 + weights[i] * new_f * new_f
                take = ((slx > 0) & (sl2 > 0) & (new != codes[i])
                        & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                codes[i] = np.where(take, new & 0xFF, codes[i])
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
                n_changed += int(take.any())
            if not n_changed:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))

    scale = np.where(zero, F32(0), scale).astype(F32)
    codes = np.where(zero, 0, codes)
    return scale, codes.astype(np.uint8)

"""The searches and in-order sums of edgequant.gptq.device_fit as Triton kernels: its path on CUDA.

In torch each step of ggml's per-element loops is one tensor operation over all groups, so a Q4_K fit is thousands
of tiny kernels (make_qkx3_quants' 37 trial grids alone, each three sums and an error sum of 31 adds).  Here one
program owns BLOCK_G groups, one lane per group, and walks ggml's loops itself:

      x, weights element-major (n, groups):        per lane (one group), in registers: the running sums, the
              g0 .......... g0+BLOCK_G             best error, the best grid (scale, min, and the iscale and min
      el 0    [ one contiguous load ]              its codes came from); the codes are recomputed from that grid
      el 1    [        ...          ]  ◄─ re-read  at the end instead of being carried.  make_qp_quants' refinement,
      ...                               each pass  which rewrites codes one element at a time, keeps them as an
      el n-1  [                     ]              (n, BLOCK_G) register tile.

so that the elements of a group are summed one after the other (ggml's order) and the trial grids run one after
the other, all in one kernel per search.  The element loops are unrolled (by 4; the in-order sums' by 8) so that
loads go out ahead of the arithmetic that waits for them; the arithmetic's order is unchanged.  Each kernel mirrors
its torch function in device_fit operation for operation; tests/test_device_fit.py checks them against the numpy
codecs bit for bit.

What keeps them bit-exact is the float32 instructions they compile to, launched with enable_fp_fusion=False:

      + - *        add.rn / sub.rn / mul.rn .f32: rounded once each, never contracted into an fma (LLVM, and ptxas
                   with --fmad=false)
      division     tl.math.div_rn -> div.rn.f32 (never `/`: Triton lowers it to the approximate div.full.f32)
      no .ftz      subnormals kept, as torch's CUDA kernels keep them
      the rest     abs, compares, selects, integer ops and int<->float conversions of small integers: exact

and ggml's `nearest_int` as the 1.5*2**23 trick on the bits (NaN -> 0 first, as device_fit.nearest_int).  The
interpreter (TRITON_INTERPRET=1) computes in numpy, which rounds the same way but cannot show an approximate
division or a contraction: tests/test_device_fit.py also compiles every kernel to sm_90 PTX and checks that it
holds no other float32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Groups per program and warps per program: one lane per group (BLOCK_G = 32 x NUM_WARPS), so that each lane's loop
# is one group's and nothing is replicated across threads (scripts/bench_device_fit.py --tiles tries others).  The
# interpreter tests raise BLOCK_G (fewer programs, the same arithmetic).
BLOCK_G = 32
NUM_WARPS = 1
REFINE_PASSES = 5  # make_qp_quants' refinement, as device_fit's


@triton.jit
def _nearest_int(v):
    """device_fit.nearest_int: NaN -> 0, then round half to even through the bits of v + 1.5 * 2**23 (int32)."""
    v = tl.where(v == v, v, 0.0)
    return ((v + 12582912.0).to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000


# --- in-order sums -------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "m"])
def _sum_kernel(T, OUT, n, m, FROM_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = c < m
    acc = tl.load(T + c, mask=inside, other=0.0)
    if FROM_ZERO:
        acc = acc + 0.0  # -0.0 becomes +0.0, as ggml's `sum = 0; sum += t[0]`
    for i in tl.range(1, n, loop_unroll_factor=8):
        acc += tl.load(T + i * m + c, mask=inside, other=0.0)
    tl.store(OUT + c, acc, mask=inside)


def in_order_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """device_fit.in_order_sum: t summed over dim 0, one term after the other (t[0] + 0.0 first when from_zero)."""
    n = t.shape[0]
    flat = t.reshape(n, -1).contiguous()
    m = flat.shape[1]
    assert flat.dtype == torch.float32 and flat.numel() < 2**31
    out = torch.empty(m, dtype=torch.float32, device=t.device)
    block = 32 * NUM_WARPS
    if m:
        _sum_kernel[(triton.cdiv(m, block),)](flat, out, n, m, FROM_ZERO=from_zero, BLOCK=block,
                                              num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out.reshape(t.shape[1:])


# --- make_qkx3_quants ----------------------------------------------------------------------------------------


@triton.jit
def _levels(x, lo, iscale, nmax):
    """clip(nearest_int((x - lo) * iscale), 0, nmax) (int32)."""
    return tl.minimum(tl.maximum(_nearest_int((x - lo) * iscale), 0), nmax)


@triton.jit
def _squared_error(X, W, G, g, inside, scale, offset, lo, iscale, nmax, N: tl.constexpr):
    """sum_i w_i * (scale*l_i + offset - x_i)^2 in element order, l the levels of the grid (iscale, lo)."""
    err = tl.zeros_like(scale)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        d = scale * _levels(x, lo, iscale, nmax).to(tl.float32)
        d = d + offset
        d = d - x
        d = d * d
        err += d * w
    return err


@triton.jit(do_not_specialize=["G", "nstep"])
def _qkx3_kernel(X, W, NUMERATORS, SCALE, MIN, CODES, G, nmax, nstep, N: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    inside = g < G
    x = tl.load(X + g, mask=inside, other=0.0)
    w = tl.load(W + g, mask=inside, other=0.0)
    lo, hi, sum_w, sum_x = x, x, w, w * x  # ggml's scans start from element 0, its sums too (no + 0.0)
    for i in tl.range(1, N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        lo = tl.where(x < lo, x, lo)
        hi = tl.where(x > hi, x, hi)
        sum_w += w
        sum_x += w * x
    lo = tl.where(lo > 0, 0.0, lo)
    flat = (hi > lo) == 0
    flat_min = lo
    iscale = tl.math.div_rn(nmax.to(tl.float32), hi - lo)
    scale = tl.math.div_rn(1.0, iscale)
    best = _squared_error(X, W, G, g, inside, scale, lo, lo, iscale, nmax, N)
    code_lo, code_iscale = lo, iscale  # the grid the best codes are the levels of
    for step in range(nstep + 1):
        iscale = tl.math.div_rn(tl.load(NUMERATORS + step), hi - lo)
        sum_l = tl.zeros_like(lo)
        sum_l2 = tl.zeros_like(lo)
        sum_xl = tl.zeros_like(lo)
        for i in tl.range(N, loop_unroll_factor=4):
            x = tl.load(X + i * G + g, mask=inside, other=0.0)
            w = tl.load(W + i * G + g, mask=inside, other=0.0)
            l = _levels(x, lo, iscale, nmax).to(tl.float32)
            wl = w * l
            sum_l += wl
            sum_l2 += wl * l
            sum_xl += wl * x
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        clamp = this_min > 0
        this_min = tl.where(clamp, 0.0, this_min)
        this_scale = tl.where(clamp, tl.math.div_rn(sum_xl, sum_l2), this_scale)
        err = _squared_error(X, W, G, g, inside, this_scale, this_min, lo, iscale, nmax, N)
        better = (det > 0) & (err < best)
        code_lo = tl.where(better, lo, code_lo)
        code_iscale = tl.where(better, iscale, code_iscale)
        best = tl.where(better, err, best)
        scale = tl.where(better, this_scale, scale)
        lo = tl.where(better, this_min, lo)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        q = tl.where(flat, 0, _levels(x, code_lo, code_iscale, nmax))
        tl.store(CODES + i * G + g, q.to(tl.uint8), mask=inside)
    tl.store(SCALE + g, tl.where(flat, 0.0, scale), mask=inside)
    tl.store(MIN + g, tl.where(flat, flat_min, lo), mask=inside)


def make_qkx3_quants(x: torch.Tensor, weights: torch.Tensor, numerators: torch.Tensor,
                     nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """device_fit.make_qkx3_quants on element-major x, weights (n, groups); numerators: the trial grids'
    rmin + rdelta*step + nmax (float32).  Returns scale, the_min (groups,), codes (n, groups) uint8."""
    x, weights, n, groups = _flat(x, weights)
    scale, lo = (torch.empty(groups, dtype=torch.float32, device=x.device) for _ in range(2))
    codes = torch.empty((n, groups), dtype=torch.uint8, device=x.device)
    _qkx3_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, numerators, scale, lo, codes, groups, nmax, numerators.numel() - 1, N=n, BLOCK_G=BLOCK_G,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return scale, -lo, codes


# --- make_qp_quants ------------------------------------------------------------------------------------------


@triton.jit
def _qp_error(X, W, G, g, inside, iscale, nmax, WRAP: tl.constexpr, N: tl.constexpr):
    """sum_i w_i * (x_i - l_i / iscale)^2 in element order, l = nearest_int(iscale * x) wrapped to uint8 (WRAP) or
    capped at nmax."""
    inverse = tl.math.div_rn(1.0, iscale)
    err = tl.zeros_like(iscale)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        if WRAP:
            l = _nearest_int(iscale * x) & 0xFF
        else:
            l = tl.minimum(_nearest_int(iscale * x), nmax)
        diff = x - inverse * l.to(tl.float32)
        err += w * diff * diff
    return err


@triton.jit(do_not_specialize=["G"])
def _qp_kernel(X, W, STEPS, SCALE, CODES, G, nmax, eps, N: tl.constexpr, ROWS: tl.constexpr, NSTEPS: tl.constexpr,
               PASSES: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    inside = g < G
    row = tl.arange(0, ROWS)[:, None]
    top = tl.zeros((BLOCK_G,), tl.float32)  # ggml's running max from 0
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        top = tl.where(x > top, x, top)
    zero = top < eps
    iscale = tl.math.div_rn(nmax.to(tl.float32), top)
    best = _qp_error(X, W, G, g, inside, iscale, nmax, True, N)
    for k in range(NSTEPS):
        trial = tl.math.div_rn(tl.load(STEPS + k), top)
        err = _qp_error(X, W, G, g, inside, trial, nmax, False, N)
        better = err < best
        best = tl.where(better, err, best)
        iscale = tl.where(better, trial, iscale)
    # the sums of the chosen levels, then the refinement: codes (uint8 in ggml) as a register tile
    sumlx = tl.zeros_like(top)
    suml2 = tl.zeros_like(top)
    codes = tl.zeros((ROWS, BLOCK_G), tl.int32)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        level = tl.minimum(_nearest_int(iscale * x), nmax)
        lf = level.to(tl.float32)
        sumlx += w * x * lf
        suml2 += w * lf * lf
        codes = tl.where(row == i, (level & 0xFF)[None, :], codes)
    for _ in range(PASSES):
        for i in tl.range(N, loop_unroll_factor=4):
            x = tl.load(X + i * G + g, mask=inside, other=0.0)
            w = tl.load(W + i * G + g, mask=inside, other=0.0)
            code = tl.sum(tl.where(row == i, codes, 0), axis=0)
            old = code.to(tl.float32)
            wx = w * x
            slx = sumlx - wx * old  # the sums without element i
            sl2 = suml2 - w * old * old
            new = tl.minimum(_nearest_int(tl.math.div_rn(x * sl2, slx)), nmax)
            nf = new.to(tl.float32)
            mlx = slx + wx * nf  # the sums with element i at its new level
            ml2 = sl2 + w * nf * nf
            take = (slx > 0) & (sl2 > 0) & (new != code) & (mlx * mlx * suml2 > sumlx * sumlx * ml2)
            codes = tl.where((row == i) & take[None, :], (new & 0xFF)[None, :], codes)
            sumlx = tl.where(take, mlx, sumlx)
            suml2 = tl.where(take, ml2, suml2)
    scale = tl.where(suml2 > 0, tl.math.div_rn(sumlx, suml2), 0.0)
    tl.store(SCALE + g, tl.where(zero, 0.0, scale), mask=inside)
    codes = tl.where(zero[None, :], 0, codes)
    tl.store(CODES + row * G + g[None, :], codes.to(tl.uint8), mask=(row < N) & inside[None, :])


def make_qp_quants(x: torch.Tensor, weights: torch.Tensor, steps: torch.Tensor, nmax: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """device_fit.make_qp_quants on element-major x, weights (n, groups); steps: the trial grids' 0.1*s + nmax
    (float32); eps: the largest value below which a group is zero.  Returns scale (groups,), codes (n, groups)
    uint8."""
    x, weights, n, groups = _flat(x, weights)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    codes = torch.empty((n, groups), dtype=torch.uint8, device=x.device)
    _qp_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, steps, scale, codes, groups, nmax, eps, N=n, ROWS=triton.next_power_of_2(n),
        NSTEPS=steps.numel(), PASSES=REFINE_PASSES, BLOCK_G=BLOCK_G, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return scale, codes


# --- make_qx_quants ------------------------------------------------------------------------------------------


@triton.jit
def _qx_levels(x, iscale, nmax):
    """clip(nearest_int(x * iscale), -nmax, nmax - 1) (int32)."""
    return tl.minimum(tl.maximum(_nearest_int(x * iscale), -nmax), nmax - 1)


@triton.jit
def _qx_sums(X, W, G, g, inside, iscale, nmax, N: tl.constexpr):
    """sum_i w_i*x_i*l_i and sum_i w_i*l_i*l_i in element order, l the levels of iscale."""
    sumlx = tl.zeros_like(iscale)
    suml2 = tl.zeros_like(iscale)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        l = _qx_levels(x, iscale, nmax).to(tl.float32)
        sumlx += w * x * l
        suml2 += w * l * l
    return sumlx, suml2


@triton.jit(do_not_specialize=["G"])
def _qx_kernel(X, W, NUMERATORS, SCALE, CODES, G, nmax, eps, N: tl.constexpr, NTRIALS: tl.constexpr,
               BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    inside = g < G
    peak = tl.load(X + g, mask=inside, other=0.0)  # signed_peak: where |x| is largest, first
    amax = tl.abs(peak)
    for i in tl.range(1, N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        up = tl.abs(x) > amax
        amax = tl.where(up, tl.abs(x), amax)
        peak = tl.where(up, x, peak)
    peak = tl.where(amax > 0, peak, 0.0)
    best_iscale = tl.math.div_rn(tl.load(NUMERATORS), peak)
    sumlx, suml2 = _qx_sums(X, W, G, g, inside, best_iscale, nmax, N)
    scale = tl.where(suml2 != 0, tl.math.div_rn(sumlx, suml2), 0.0)
    best = scale * sumlx
    for k in range(1, NTRIALS):
        iscale = tl.math.div_rn(tl.load(NUMERATORS + k), peak)
        sumlx, suml2 = _qx_sums(X, W, G, g, inside, iscale, nmax, N)
        ratio = tl.math.div_rn(sumlx, suml2)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best = tl.where(better, ratio * sumlx, best)
        scale = tl.where(better, ratio, scale)
        best_iscale = tl.where(better, iscale, best_iscale)
    zero = amax < eps
    tl.store(SCALE + g, tl.where(zero, 0.0, scale), mask=inside)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        code = tl.where(zero, 0, _qx_levels(x, best_iscale, nmax) + nmax)
        tl.store(CODES + i * G + g, code.to(tl.uint8), mask=inside)


def make_qx_quants(x: torch.Tensor, weights: torch.Tensor, numerators: torch.Tensor, nmax: int,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """device_fit.make_qx_quants on element-major x, weights (n, groups); numerators: the trial grids' -nmax - 0.1*s
    (float32, the plain -nmax first); eps: the largest |x| below which a group is zero.  Returns scale (groups,),
    codes (n, groups) uint8 = level + nmax."""
    x, weights, n, groups = _flat(x, weights)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    codes = torch.empty((n, groups), dtype=torch.uint8, device=x.device)
    _qx_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, numerators, scale, codes, groups, nmax, eps, N=n, NTRIALS=numerators.numel(), BLOCK_G=BLOCK_G,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return scale, codes


def _flat(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Element-major float32 x, weights contiguous (the kernels index them as flat arrays), and (n, groups)."""
    assert x.shape == weights.shape and x.dtype == weights.dtype == torch.float32 and x.numel() < 2**31
    return x.contiguous(), weights.contiguous(), *x.shape

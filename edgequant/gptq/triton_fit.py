"""The fitter's Triton backend: the K-quants' and IQ4's fits on a CUDA device, results left there.

GPTQ fits a codec block's grid each time its column sweep enters a codec block; a host round trip per fit would
stall the GPU, so the types GPTQ writes on K-quant and table grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K importance-weighted;
IQ4_NL, IQ4_XS with or without importance) are fitted here, on the device, mirroring step for step

    convert/codecs/search_affine.py     make_qkx3_quants, make_qp_quants      (Q2_K, Q4_K, Q5_K)
    convert/codecs/search_symmetric.py  make_qx_quants                        (Q3_K, Q6_K)
    convert/codecs/kquant_scales.py     SixBitScaleMinCodec.fit (importance)  (Q4_K, Q5_K)
    convert/codecs/q2_k.py, q3_k.py, q6_k.py  their fit (importance)
    convert/codecs/iquant_nl.py         sub_block_scales, indices             (IQ4_NL, IQ4_XS)
    convert/codecs/iq4_nl.py, iq4_xs.py their fit

(tests/test_fit_conformance.py checks them bit for bit: any change to those searches must be made here too).

The three searches and the in-order sums are Triton kernels; what is between them (sigma2, the weights, the
super-block scales, requantizing on the stored scales) is elementwise torch glue.  Layout is the numpy code's:
element-major (n, groups).  One program owns BLOCK_G groups, one lane per group, and walks ggml's loops itself:

      x, weights element-major (n, groups):        per lane (one group), in registers: the running sums, the
              g0 .......... g0+BLOCK_G             best error, the best grid (scale, min, and the iscale and min
      el 0    [ one contiguous load ]              its codes came from); the codes are recomputed from that grid
      el 1    [        ...          ]  ◄─ re-read  at the end instead of being carried.  make_qp_quants' refinement,
      ...                               each pass  which rewrites codes one element at a time, keeps them as an
      el n-1  [                     ]              (n, BLOCK_G) register tile.

so that the elements of a group are summed one after the other (ggml's order) and the trial grids run one after
the other, all in one kernel per search.  The element loops are unrolled (by 4; the in-order sums' by 8) so that
loads go out ahead of the arithmetic that waits for them; the arithmetic's order is unchanged.  The refinement
runs all its 5 passes: a pass that changes nothing in a group leaves it as it was, so the passes ggml skips are
no-ops.  A fit is then a few dozen kernels, and on CUDA each codec and shape is captured once into a CUDA graph and
replayed (`_replay`).  Inputs are assumed finite (GPTQ's are).

What keeps the kernels bit-exact is the float32 instructions they compile to, launched with enable_fp_fusion=False:

      + - *        add.rn / sub.rn / mul.rn .f32: rounded once each, never contracted into an fma (LLVM, and ptxas
                   with --fmad=false)
      division     tl.math.div_rn -> div.rn.f32 (never `/`: Triton lowers it to the approximate div.full.f32)
      no .ftz      subnormals kept, as torch's CUDA kernels keep them
      the rest     abs, compares, selects, integer ops and int<->float conversions of small integers: exact

and ggml's `nearest_int` as the 1.5*2**23 trick on the bits, NaN -> 0 first.  The interpreter (TRITON_INTERPRET=1)
computes in numpy, which rounds the same way but cannot show an approximate division or a contraction: the
conformance tests also compile every kernel to sm_90 PTX and check that it holds no other float32 arithmetic.
The torch glue keeps to the same rules: one elementwise operation per tensor op, in ggml's association; no op that
fuses a multiply-add; divisions tensor by tensor (`_div`: torch multiplies by the reciprocal of a Python number);
square roots through float64 (`_sqrt`: torch's float32 sqrt on the CPU is not correctly rounded).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from edgequant.convert.codecs.iq4_nl import IQ4_NL, NLBlocks
from edgequant.convert.codecs.iq4_xs import IQ4_XS, XSBlocks
from edgequant.convert.codecs.iquant_nl import NTRY, VALUES
from edgequant.convert.codecs.kquant_scales import QK_K, ScaleMinBlocks, SixBitScaleMinCodec
from edgequant.convert.codecs.kquant_symmetric import SuperBlocks
from edgequant.convert.codecs.q2_k import Q2_K
from edgequant.convert.codecs.q3_k import Q3_K
from edgequant.convert.codecs.q6_k import Q6_K
from edgequant.convert.codecs.search_symmetric import GROUP_MAX_EPS

from .fitter import Backend, Fit

F32 = np.float32
_EPS = float(GROUP_MAX_EPS)
# Groups per program and warps per program: one lane per group (BLOCK_G = 32 x NUM_WARPS), so that each lane's loop
# is one group's and nothing is replicated across threads (scripts/bench_device_fit.py --tiles tries others).  The
# interpreter tests raise BLOCK_G (fewer programs, the same arithmetic).
BLOCK_G = 32
NUM_WARPS = 1
REFINE_PASSES = 5  # make_qp_quants' refinement
MAX_WEIGHTS = 1 << 22  # one eager fit's slice at most (larger ones go in chunks of rows): ~1.3 GB of Q6_K intermediates
# A captured fit keeps ~80 KB per row of Q6_K/Q3_K intermediates: graphs only for the decoder's matrices, not an
# output head of 128K rows (eager there: ~16 fits of ~70 ms).
GRAPH_ROWS = 16384


class TritonFit(Backend):
    """The importance-weighted fits of Q2_K..Q6_K and both fits of IQ4_NL/IQ4_XS, on w's device (CUDA; the CPU only
    under TRITON_INTERPRET=1)."""

    name = "triton"

    def covers(self, codec, weighted: bool) -> bool:
        kind = _kind(codec)
        return kind is not None and (weighted or kind in _PLAIN)

    @torch.no_grad()
    def fit(self, codec, w: torch.Tensor, importance: torch.Tensor | None) -> Fit:
        w = w.to(torch.float32)
        rows, n = w.shape
        codec.check_shape(n)
        if importance is not None:
            importance = importance.to(device=w.device, dtype=torch.float32)
        fit = _FITS[_kind(codec)]
        if w.device.type == "cuda" and rows <= GRAPH_ROWS:  # the fits are per super-block: one graph per shape
            return Fit.concat([_replay(fit, codec, w[:, j:j + QK_K], None if importance is None else importance[j:j + QK_K])
                               for j in range(0, n, QK_K)])
        step = max(1, MAX_WEIGHTS // n)  # rows are independent: bound the intermediates (~0.3 KB per weight for Q6_K)
        importance = None if importance is None else importance.contiguous()
        parts = [fit(codec, w[r:r + step].contiguous(), importance) for r in range(0, rows, step)]
        return parts[0] if len(parts) == 1 else dataclasses.replace(
            parts[0], **{k: torch.cat([getattr(p, k) for p in parts]) for k in ("scale", "offset")},
            fields={k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields})


def _kind(codec):
    return next((k for k in _FITS if isinstance(codec, k)), None)


# (codec type, shape, device, unweighted) -> (graph, its input w, its input importance or None, its output Fit)
_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor | None, Fit]] = {}


def _replay(fit, codec, w: torch.Tensor, importance: torch.Tensor) -> Fit:
    """fit(codec, w, importance) through a CUDA graph, captured on the first call for this codec, shape and device.

    A fit is dozens of small kernels: launched one by one from Python it is bound by the launches, replayed from a
    graph by the kernels alone.  Each graph keeps its inputs, outputs and intermediates allocated until
    `release_graphs` (scripts/bench_device_fit.py prints how much).
    """
    key = (type(codec), tuple(w.shape), w.device, importance is None)
    if key not in _GRAPHS:
        static_w = w.contiguous().clone()
        static_imp = None if importance is None else importance.contiguous().clone()
        with torch.cuda.device(w.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (makes _table's constants, loads kernels)
                fit(codec, static_w, static_imp)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fit(codec, static_w, static_imp)
        _GRAPHS[key] = graph, static_w, static_imp, out
    graph, static_w, static_imp, out = _GRAPHS[key]
    static_w.copy_(w)
    if importance is not None:
        static_imp.copy_(importance)
    graph.replay()
    return dataclasses.replace(out, fields={k: v.clone() for k, v in out.fields.items()},
                               scale=out.scale.clone(), offset=out.offset.clone())


def release_graphs() -> None:
    """Free the captured fits and the device memory they hold."""
    _GRAPHS.clear()


# --- float32 building blocks of the glue ---------------------------------------------------------------------


def _div(num, den) -> torch.Tensor:
    """num / den rounded once, on any device (a Python number becomes a device tensor first)."""
    like = den if isinstance(den, torch.Tensor) else num
    if not isinstance(num, torch.Tensor):
        num = like.new_full((), num)
    if not isinstance(den, torch.Tensor):
        den = like.new_full((), den)
    return torch.div(num, den)


@functools.lru_cache(maxsize=None)
def _table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Constant float32 values on a device (made once: a host-to-device copy would wait for the device)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """search_symmetric.nearest_int in torch (int32).  NaN gives 0, as the NaNs x86 arithmetic makes (ggml's and
    numpy's) do through the trick; CUDA's have other payload bits, which it would turn into 2**22 - 1."""
    v = torch.nan_to_num(v, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def signed_peak(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_symmetric.signed_peak along `dim`: (largest |x|, the signed value where it first occurs, or +0)."""
    ax = x.abs()
    i = ax.argmax(dim, keepdim=True)
    amax = ax.gather(dim, i).squeeze(dim)
    peak = x.gather(dim, i).squeeze(dim)
    return amax, torch.where(amax > 0, peak, 0.0)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: through float64, which rounds to the same float32."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _element_major(v: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n * k) -> (n, groups): groups of n consecutive values, element i of every group contiguous."""
    return v.reshape(-1, n).T.contiguous()


def _tiled(importance: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """Per-column importance as the element-major weights of every row's groups of n: (n, rows * cols // n)."""
    per_row = importance.reshape(-1, n).T
    return per_row[:, None, :].expand(n, rows, per_row.shape[1]).reshape(n, -1)


# --- kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _nearest_int(v):
    """nearest_int in a kernel (int32)."""
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
    """search_affine.in_order_sum: t summed over dim 0, one term after the other (t[0] + 0.0 first when
    from_zero)."""
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


def make_qkx3_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """search_affine.make_qkx3_quants (squared error) on element-major x, weights (n, groups).  Returns scale,
    the_min (groups,), codes (n, groups) uint8."""
    numerators = _table(tuple(float(F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)) for s in range(nstep + 1)),
                        x.device)
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


def make_qp_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_affine.make_qp_quants on element-major x, weights (n, groups): scale (groups,), codes (n, groups)
    uint8 (negative inputs wrap, as ggml's uint8_t does)."""
    steps = _table(tuple(float(F32(0.1) * F32(s) + F32(nmax)) for s in (-4, -3, -2, -1, 1, 2, 3, 4)), x.device)
    x, weights, n, groups = _flat(x, weights)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    codes = torch.empty((n, groups), dtype=torch.uint8, device=x.device)
    _qp_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, steps, scale, codes, groups, nmax, _EPS, N=n, ROWS=triton.next_power_of_2(n),
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


@triton.jit
def _signed_peak(X, G, g, inside, N: tl.constexpr):
    """search_symmetric.signed_peak over element-major X: (largest |x|, the signed x where it first occurs, or +0)."""
    peak = tl.load(X + g, mask=inside, other=0.0)
    amax = tl.abs(peak)
    for i in tl.range(1, N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        up = tl.abs(x) > amax
        amax = tl.where(up, tl.abs(x), amax)
        peak = tl.where(up, x, peak)
    return amax, tl.where(amax > 0, peak, 0.0)


@triton.jit(do_not_specialize=["G"])
def _qx_kernel(X, W, NUMERATORS, SCALE, CODES, G, nmax, eps, N: tl.constexpr, NTRIALS: tl.constexpr,
               BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    inside = g < G
    amax, peak = _signed_peak(X, G, g, inside, N)
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
        v = x * best_iscale  # NaN where the sums overflowed: numpy's float -> uint8 conversion gives code 0
        code = tl.where(zero | (v != v), 0, _qx_levels(x, best_iscale, nmax) + nmax)
        tl.store(CODES + i * G + g, code.to(tl.uint8), mask=inside)


def make_qx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_symmetric.make_qx_quants on element-major x, weights (n, groups): scale (groups,), codes (n, groups)
    uint8 = level + nmax."""
    numerators = _table((float(F32(-nmax)),) + tuple(float(-(F32(nmax) + F32(0.1) * F32(s)))
                                                     for s in range(-9, 10) if s != 0), x.device)
    x, weights, n, groups = _flat(x, weights)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    codes = torch.empty((n, groups), dtype=torch.uint8, device=x.device)
    _qx_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, numerators, scale, codes, groups, nmax, _EPS, N=n, NTRIALS=numerators.numel(), BLOCK_G=BLOCK_G,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return scale, codes


def _flat(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Element-major float32 x, weights contiguous (the kernels index them as flat arrays), and (n, groups)."""
    assert x.shape == weights.shape and x.dtype == weights.dtype == torch.float32 and x.numel() < 2**31
    return x.contiguous(), weights.contiguous(), *x.shape


# --- block types ---------------------------------------------------------------------------------------------


def _sigma2(w: torch.Tensor) -> torch.Tensor:
    """Per super-block sum of w^2 in element order, (rows * nb,)."""
    sb = _element_major(w, QK_K)
    return in_order_sum(sb * sb)


def _scale_min_fit(codec, w, ls, lm, d, dmin, search_codes) -> Fit:
    """The end every scale+min fit shares: ScaleMinCodec.requantize, blocks and grid."""
    rows, n = w.shape
    nb, group = n // QK_K, codec.group
    ns = QK_K // group
    x = w.reshape(rows, nb, ns, group)
    step = (d.to(torch.float32)[..., None] * ls.to(torch.float32))[..., None]
    shift = (dmin.to(torch.float32)[..., None] * lm.to(torch.float32))[..., None]
    q = nearest_int(_div(x + shift, step)).clamp_(0, codec.nmax)
    q = torch.where(step != 0, q, search_codes.T.reshape(x.shape).to(torch.int32)).to(torch.uint8)
    fields = dict(d=d, dmin=dmin, scales=ls.to(torch.uint8), mins=lm.to(torch.uint8), q=q.reshape(rows, nb, QK_K))
    scale = (d.to(torch.float32)[..., None] * ls.to(torch.float32)).reshape(rows, -1)
    offset = -(dmin.to(torch.float32)[..., None] * lm.to(torch.float32)).reshape(rows, -1)
    return Fit(ScaleMinBlocks, fields, scale, offset, group, 0, codec.nmax)


def _scale_min_search(codec, w, importance, sigma_factor: float, nmax_scales: int):
    """The importance path of Q2_K/Q4_K/Q5_K up to the integer scales and mins: weights importance *
    sqrt(sigma2 + x^2), make_qkx3_quants per sub-block, make_qp_quants on the sub-block scales and mins together
    (same weights, same nmax).  Returns (ls, lm) (rows, nb, ns) int32, d, dmin (rows, nb) float16, search codes."""
    rows, n = w.shape
    nb, group = n // QK_K, codec.group
    ns = QK_K // group
    x = _element_major(w, group)  # (group, rows * nb * ns)
    sigma2 = _div(_sigma2(w) * sigma_factor, float(QK_K))
    weights = _tiled(importance, group, rows) * _sqrt(sigma2[:, None].expand(-1, ns).reshape(-1) + x * x)
    sub_scale, sub_min, search_codes = make_qkx3_quants(x, weights, codec.nmax, -0.9, 0.05, 36)
    sw = in_order_sum(weights).reshape(-1, ns).T
    both = torch.cat([sub_scale.reshape(-1, ns).T, sub_min.reshape(-1, ns).T], 1)  # (ns, 2 * rows * nb)
    d_both, l_both = make_qp_quants(both, torch.cat([sw, sw], 1), nmax_scales)
    d, dmin = d_both.to(torch.float16).reshape(2, rows, nb)
    ls, lm = l_both.to(torch.int32).T.reshape(2, rows, nb, ns)
    return ls, lm, d, dmin, search_codes


def _fit_six_bit(codec: SixBitScaleMinCodec, w, importance) -> Fit:
    """SixBitScaleMinCodec.fit with importance (Q4_K, Q5_K)."""
    ls, lm, d, dmin, search_codes = _scale_min_search(codec, w, importance, 2.0, 63)
    if codec.clamp_imatrix_scales:
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    ls, lm = _six_bit_round_trip(ls, lm)
    return _scale_min_fit(codec, w, ls, lm, d, dmin, search_codes)


def _six_bit_round_trip(ls: torch.Tensor, lm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """unpack_scale_min_6bit(pack_scale_min_6bit(ls, lm)) on int32 codes 0..255 (identity below 64; ggml requantizes
    with what it wrote, so a wrapped code's high bits land where the byte layout puts them)."""
    lo_s = (ls[..., :4] | ((ls[..., 4:] >> 4) << 6)) & 0xFF
    lo_m = (lm[..., :4] | ((lm[..., 4:] >> 4) << 6)) & 0xFF
    hi = (ls[..., 4:] & 0x0F) | ((lm[..., 4:] & 0x0F) << 4)
    scales = torch.cat([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 6) << 4)], -1)
    mins = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], -1)
    return scales, mins


def _fit_q2_k(codec: Q2_K, w, importance) -> Fit:
    """Q2_K.fit with importance."""
    ls, lm, d, dmin, search_codes = _scale_min_search(codec, w, importance, 1.0, 15)
    byte = (ls | (lm << 4)) & 0xFF
    return _scale_min_fit(codec, w, byte & 0x0F, byte >> 4, d, dmin, search_codes)


def _requantize_symmetric(w, d, sc, codes, nmax: int) -> torch.Tensor:
    """kquant_symmetric.requantize: codes (rows, nb, 16, 16) uint8 of w on the stored group scales fp32(d) * sc;
    groups whose stored scale is 0 keep the search's `codes`."""
    x = w.reshape(w.shape[0], -1, 16, 16)
    step = d.to(torch.float32)[..., None] * sc.to(torch.float32)
    fresh = nearest_int(_div(x, step[..., None])).clamp_(-nmax, nmax - 1) + nmax
    return torch.where((step != 0)[..., None], fresh, codes.to(torch.int32)).to(torch.uint8)


def _super_blocks(codec, d, sc, codes, nmax: int) -> Fit:
    """SuperBlocks (Q3_K, Q6_K) from d (rows, nb) float16, sc (rows, nb, 16) int8, codes uint8 = level + nmax."""
    rows = d.shape[0]
    q = codes.reshape(rows, -1, QK_K).to(torch.int8) - nmax
    scale = (d.to(torch.float32)[..., None] * sc.to(torch.float32)).reshape(rows, -1)
    return Fit(SuperBlocks, dict(d=d, scales=sc, q=q), scale, torch.full_like(scale, -0.0), 16,
                     codec.qmin, codec.qmax)


def _fit_q6_k(codec: Q6_K, w, importance) -> Fit:
    """Q6_K.fit with importance."""
    rows, n = w.shape
    nb = n // QK_K
    scales, codes = make_qx_quants(_element_major(w, 16), _tiled(importance, 16, rows), 32)
    scales = scales.reshape(rows, nb, 16)
    max_abs, max_scale = signed_peak(scales, -1)
    iscale = _div(-128.0, max_scale)
    d = _div(1.0, iscale).to(torch.float16)
    sc = nearest_int(iscale[..., None] * scales).clamp_(max=127).to(torch.int8)
    codes = _requantize_symmetric(w, d, sc, codes.T.reshape(rows, nb, 16, 16), 32)
    blank = max_abs < _EPS  # written as zeros
    d = torch.where(blank, 0.0, d).to(torch.float16)
    sc = torch.where(blank[..., None], 0, sc).to(torch.int8)
    codes = torch.where(blank[..., None, None], 0, codes).to(torch.uint8)
    return _super_blocks(codec, d, sc, codes, 32)


def _fit_q3_k(codec: Q3_K, w, importance) -> Fit:
    """Q3_K.fit with importance (Q3_K._scales_weighted)."""
    rows, n = w.shape
    nb = n // QK_K
    x = _element_major(w, 16)
    x2 = x * x
    sigma2 = _div(_sigma2(w) * 2.0, float(QK_K))
    weights = _tiled(importance, 16, rows) * _sqrt(sigma2[:, None].expand(-1, 16).reshape(-1) + x2)
    scales, codes = make_qx_quants(x, weights, 4)
    d, s6 = make_qx_quants(_element_major(scales, 16), _element_major(in_order_sum(weights), 16), 32)
    d = d.to(torch.float16).reshape(rows, nb)
    sc = s6.T.reshape(rows, nb, 16).to(torch.int8) - 32
    return _super_blocks(codec, d, sc, _requantize_symmetric(w, d, sc, codes.T.reshape(rows, nb, 16, 16), 4), 4)


# --- the IQ4 table search (iquant_nl.sub_block_scales) --------------------------------------------------------


@triton.jit
def _best_index(v, VALUES):
    """ggml's best_index_int8 on the 16 ascending table values (int32): ml counts the inner values not above v (its
    binary search's lower end; for NaN every `v < value` is false, so ml = 14), then the nearer of values ml, ml + 1,
    a tie going up; v at or below the first value 0, at or above the last 15."""
    ml = tl.zeros(v.shape, tl.int32)
    for k in tl.static_range(1, 15):
        ml += tl.where(v < tl.load(VALUES + k), 0, 1)
    lower = tl.load(VALUES + ml)
    upper = tl.load(VALUES + ml + 1)
    i = tl.where(v - lower < upper - v, ml, ml + 1)
    i = tl.where(v >= tl.load(VALUES + 15), 15, i)
    return tl.where(v <= tl.load(VALUES), 0, i)


@triton.jit
def _table_sums(X, W, VALUES, G, g, inside, iscale, N: tl.constexpr):
    """sum_i (w_i*q_i)*x_i and sum_i (w_i*q_i)*q_i in element order, q the table value nearest to iscale * x_i."""
    sumqx = tl.zeros_like(iscale)
    sumq2 = tl.zeros_like(iscale)
    for i in tl.range(N, loop_unroll_factor=4):
        x = tl.load(X + i * G + g, mask=inside, other=0.0)
        w = tl.load(W + i * G + g, mask=inside, other=0.0)
        q = tl.load(VALUES + _best_index(iscale * x, VALUES))
        wq = w * q
        sumqx += wq * x
        sumq2 += wq * q
    return sumqx, sumq2


@triton.jit(do_not_specialize=["G"])
def _iq4_scale_kernel(X, W, VALUES, SCALE, G, eps, NTRY: tl.constexpr, N: tl.constexpr, BLOCK_G: tl.constexpr):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    inside = g < G
    amax, peak = _signed_peak(X, G, g, inside, N)
    d = tl.math.div_rn(-peak, -127.0)
    sumqx, sumq2 = _table_sums(X, W, VALUES, G, g, inside, tl.math.div_rn(1.0, d), N)
    d = tl.where(sumq2 > 0, tl.math.div_rn(sumqx, sumq2), 0.0)
    best = d * sumqx
    for t in tl.static_range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _table_sums(X, W, VALUES, G, g, inside, tl.math.div_rn(tl.zeros_like(peak) + (t - 127), peak), N)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = tl.where(better, tl.math.div_rn(sumqx, sumq2), d)
        best = tl.where(better, d * sumqx, best)
    tl.store(SCALE + g, tl.where(amax < eps, 0.0, d), mask=inside)


@triton.jit(do_not_specialize=["M"])
def _iq4_codes_kernel(X, SCALE, VALUES, CODES, M, BLOCK: tl.constexpr):
    """iquant_nl.indices on row-major x, one scale per 32 consecutive weights: x * (1/scale), 1/0 -> 0."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < M
    x = tl.load(X + e, mask=inside, other=0.0)
    scale = tl.load(SCALE + e // 32, mask=inside, other=0.0)
    inverse = tl.where(scale != 0, tl.math.div_rn(1.0, scale), 0.0)
    tl.store(CODES + e, _best_index(inverse * x, VALUES).to(tl.uint8), mask=inside)


def table_scales(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """iquant_nl.sub_block_scales on element-major x, weights (32, groups): the float32 scales (groups,)."""
    x, weights, n, groups = _flat(x, weights)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    _iq4_scale_kernel[(triton.cdiv(groups, BLOCK_G),)](
        x, weights, _values(x.device), scale, groups, _EPS, NTRY=NTRY, N=n, BLOCK_G=BLOCK_G, num_warps=NUM_WARPS,
        enable_fp_fusion=False)
    return scale


def table_indices(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """iquant_nl.indices: the table indices (uint8, w's shape) of w (rows, n) on one scale per 32 weights."""
    w, scale = w.contiguous(), scale.contiguous()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    block = 1024
    if w.numel():
        _iq4_codes_kernel[(triton.cdiv(w.numel(), block),)](w, scale, _values(w.device), codes, w.numel(), BLOCK=block,
                                                            num_warps=4, enable_fp_fusion=False)
    return codes


def _values(device: torch.device) -> torch.Tensor:
    return _table(tuple(float(v) for v in VALUES), device)


def _table_weights(w: torch.Tensor, importance: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """iquant_nl.importance_weights for super-blocks of n (32 or 256) weights, element-major by sub-blocks of 32:
    (x, weights), each (32, rows * cols // 32)."""
    rows = w.shape[0]
    x = _element_major(w, 32)
    x2 = x * x
    if importance is None:
        return x, x2
    sb = _element_major(w, n)
    sigma2 = in_order_sum(sb * sb) * (2.0 / n)  # a power of two: exact in any precision
    per_sub = sigma2[:, None].expand(-1, n // 32).reshape(-1)
    return x, _tiled(importance, 32, rows) * _sqrt(per_sub + x2)


def _table_fit(blocks_type, fields: dict, scale: torch.Tensor) -> Fit:
    return Fit(blocks_type, fields, scale, torch.full_like(scale, -0.0), 32, 0, 15, _values(scale.device))


def _fit_iq4_nl(codec: IQ4_NL, w, importance) -> Fit:
    """IQ4_NL.fit: the scale search per block of 32, d = fp16(scale), indices on the unrounded scale."""
    rows, n = w.shape
    scale = table_scales(*_table_weights(w, importance, 32)).reshape(rows, n // 32)
    d = scale.to(torch.float16)
    q = table_indices(w, scale).reshape(rows, n // 32, 32)
    return _table_fit(NLBlocks, dict(d=d, q=q), d.to(torch.float32))


def _fit_iq4_xs(codec: IQ4_XS, w, importance) -> Fit:
    """IQ4_XS.fit: the scale search per sub-block, d = -s/32 for the signed scale s of largest magnitude (a NaN
    never wins), each sub-block's 6-bit l = clamp(nearest_int(s/d), -32, 31), indices on d*l with d unrounded."""
    rows, n = w.shape
    nb = n // QK_K
    scales = table_scales(*_table_weights(w, importance, QK_K)).reshape(rows, nb, 8)
    amax = torch.zeros_like(scales[..., 0])
    peak = torch.zeros_like(amax)
    for g in range(8):
        s = scales[..., g]
        take = s.abs() > amax
        amax, peak = torch.where(take, s.abs(), amax), torch.where(take, s, peak)
    d = _div(-peak, 32.0)
    inverse = torch.where(d != 0, _div(1.0, d), 0.0)
    l = nearest_int(inverse[..., None] * scales).clamp_(-32, 31)
    q = table_indices(w, (d[..., None] * l.to(torch.float32)).reshape(rows, -1))
    d16, ls = d.to(torch.float16), (l + 32).to(torch.uint8)
    group_scale = d16.to(torch.float32)[..., None] * (ls.to(torch.float32) - 32.0)
    return _table_fit(XSBlocks, dict(d=d16, scales=ls, q=q.reshape(rows, nb, QK_K)), group_scale.reshape(rows, -1))


_FITS = {SixBitScaleMinCodec: _fit_six_bit, Q2_K: _fit_q2_k, Q3_K: _fit_q3_k, Q6_K: _fit_q6_k,
         IQ4_NL: _fit_iq4_nl, IQ4_XS: _fit_iq4_xs}
_PLAIN = (IQ4_NL, IQ4_XS)  # the types fitted here without importance too (their plain weights are x^2)

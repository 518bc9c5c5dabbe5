"""The K-quant grid fits of `codec.fit(w, importance)` in torch, on the solver's device (CPU or CUDA).

GPTQ fits a codec block's grid each time its column sweep enters a 256-column super-block.  The codecs' numpy
`fit` runs on the host; this module is the same computation on the tensor's device, for the importance path of
the K-quants GPTQ writes (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).  It mirrors, step for step:

    convert/codecs/search_affine.py     make_qkx3_quants, make_qp_quants      (Q2_K, Q4_K, Q5_K)
    convert/codecs/search_symmetric.py  make_qx_quants                        (Q3_K, Q6_K)
    convert/codecs/kquant_scales.py     SixBitScaleMinCodec.fit (importance)  (Q4_K, Q5_K)
    convert/codecs/q2_k.py, q3_k.py, q6_k.py  their fit (importance)

and tests/test_device_fit.py checks it against them bit for bit (every Blocks field, and the packed bytes), on the
CPU and, where there is one, on a CUDA device.  Any change to those searches must be made here too.

Layout is the numpy code's: element-major (n, groups), so that one step of ggml's per-element loop is one tensor
operation over all groups at once.  What keeps torch bit-exact with ggml's float32, on every device:

* one elementwise operation per tensor op, in ggml's association (`w*l*x` is `(w*l)*x`); no op that fuses a
  multiply-add (addcmul, lerp, ...), no torch.sum/cumsum where the order of a sum matters (`in_order_sum`);
* never a division by a Python number (on CUDA torch multiplies by its reciprocal) nor `number / tensor`
  (torch computes `tensor.reciprocal() * number`): divisions go through `_div`, tensor by tensor;
* ggml's `nearest_int` (the 1.5*2**23 trick, garbage included) and uint8 wraps as explicit `& 0xFF`;
* square roots through float64 (`_sqrt`): torch's float32 sqrt on the CPU is not correctly rounded.

Fast on a GPU means few kernels and no host round trips: each search stacks what is independent (make_qx_quants'
19 trial grids, make_qp_quants' 8, the three sums of a trial, the scales and the mins of a block) into one tensor
op, and nothing goes back to the host (no `.item()`, no branch on a tensor value) until `blocks()`.  Two loops stay
sequential because ggml's are: make_qkx3_quants' 37 trial grids (each rescales from the min of the best grid so
far) and make_qp_quants' refinement (each element sees the sums the previous one left).  The refinement runs all
its 5 passes: a pass that changes nothing in a group leaves the group as it was, so the passes ggml skips are
no-ops.  Even so a Q4_K fit is about 5,400 small kernels in torch, most of them the element-by-element sums.  So on
CUDA the three searches and the in-order sums run as Triton kernels instead (edgequant.gptq.triton_fit: one kernel
per search, each program walking ggml's loops for a tile of groups, with the same float32 operations in the same
order; `KERNELS` picks), which leaves a fit a few dozen kernels, and `device_fit` captures each codec and shape
once into a CUDA graph and replays it (`_replay`).  Inputs are assumed finite (GPTQ's are).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import numpy as np
import torch

from edgequant.convert.codecs.kquant_scales import QK_K, ScaleMinBlocks, SixBitScaleMinCodec
from edgequant.convert.codecs.kquant_symmetric import SuperBlocks
from edgequant.convert.codecs.q2_k import Q2_K
from edgequant.convert.codecs.q3_k import Q3_K
from edgequant.convert.codecs.q6_k import Q6_K
from edgequant.convert.codecs.search_symmetric import GROUP_MAX_EPS

F32 = np.float32
MAX_WEIGHTS = 1 << 22  # one fit's slice at most (larger ones go in chunks of rows): ~1.3 GB of Q6_K intermediates
_MAGIC = 12582912.0  # 1.5 * 2**23, as search_symmetric.nearest_int
_EPS = float(GROUP_MAX_EPS)
# What runs the searches and the in-order sums: "auto" (edgequant.gptq.triton_fit on a CUDA device when triton
# imports, torch otherwise), "torch" (everywhere: the reference; bench_device_fit.py --kernels torch), "triton"
# (everywhere: the tests run it on the CPU under TRITON_INTERPRET=1).
KERNELS = "auto"


@dataclasses.dataclass(frozen=True)
class DeviceFit:
    """A codec's fitted blocks, still on the device.

    fields: the Blocks dataclass's fields as tensors (same names, dtypes and shapes as the numpy ones);
    scale, offset: the grid, (rows, n // group) float32, equal to codec.grid(blocks).scale / .offset.
    """

    blocks_type: type
    fields: dict[str, torch.Tensor]
    scale: torch.Tensor
    offset: torch.Tensor
    group: int
    qmin: int
    qmax: int

    def blocks(self):
        """The codec's numpy Blocks (one host transfer per field)."""
        return self.blocks_type(**{k: v.cpu().numpy() for k, v in self.fields.items()})

    def dequantize(self) -> torch.Tensor:
        """codec.dequantize(self.blocks()) on the device: the K-quant blocks keep their grid levels in `q`."""
        from .refine import dequantized

        q = self.fields["q"]
        return dequantized(q.reshape(q.shape[0], -1).float(), self.scale, self.offset)

    @staticmethod
    def concat(parts: list[DeviceFit]) -> DeviceFit:
        """Fits of consecutive column ranges of the same rows -> one fit (along the block axis, on the device)."""
        first = parts[0]
        return dataclasses.replace(
            first, fields={k: torch.cat([p.fields[k] for p in parts], 1) for k in first.fields},
            scale=torch.cat([p.scale for p in parts], 1), offset=torch.cat([p.offset for p in parts], 1))


def fit_on_device(codec, w: torch.Tensor, importance: torch.Tensor):
    """codec.fit(w, importance) computed on w's device: the codec's numpy Blocks, or None for a codec (or a
    missing importance) this module does not cover."""
    fit = device_fit(codec, w, importance)
    return None if fit is None else fit.blocks()


@torch.no_grad()
def device_fit(codec, w: torch.Tensor, importance: torch.Tensor | None, graph: bool = True) -> DeviceFit | None:
    """codec.fit(w, importance) on w's device, results left there; None where not covered.

    w: (rows, n) with n a multiple of 256; importance: (n,) (moved to w's device).  On CUDA with `graph`, the fit
    is replayed from a CUDA graph captured at the first call for the codec and shape (see `_replay`).
    """
    if importance is None:
        return None
    kind = next((k for k in _FITS if isinstance(codec, k)), None)
    if kind is None:
        return None
    w = w.to(torch.float32)
    codec.check_shape(w.shape[1])
    importance = importance.to(device=w.device, dtype=torch.float32)
    if w.numel() > MAX_WEIGHTS:  # rows are independent: bound the intermediates (~0.3 KB per weight for Q6_K)
        step = max(1, MAX_WEIGHTS // w.shape[1])
        parts = [device_fit(codec, w[r:r + step], importance, graph=False) for r in range(0, w.shape[0], step)]
        return dataclasses.replace(parts[0], **{k: torch.cat([getattr(p, k) for p in parts]) for k in ("scale", "offset")},
                                   fields={k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields})
    if graph and w.device.type == "cuda":
        return _replay(_FITS[kind], codec, w, importance)
    return _FITS[kind](codec, w.contiguous(), importance.contiguous())


# (codec type, shape, device, whether Triton runs the searches) -> (graph, its input w, its input importance, its
# output DeviceFit)
_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, DeviceFit]] = {}


def _replay(fit, codec, w: torch.Tensor, importance: torch.Tensor) -> DeviceFit:
    """fit(codec, w, importance) through a CUDA graph, captured on the first call for this codec, shape and device.

    A fit is thousands of small kernels (the sequential sums): launched one by one from Python it is bound by the
    launches, replayed from a graph by the kernels alone (2-4x faster for Q4_K on an H200).  Each graph keeps its
    inputs, outputs and intermediates allocated until `release_graphs` (scripts/bench_device_fit.py prints how much).
    """
    key = (type(codec), tuple(w.shape), w.device, _triton_fit(w) is not None)
    if key not in _GRAPHS:
        static_w, static_imp = w.contiguous().clone(), importance.contiguous().clone()
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
    static_imp.copy_(importance)
    graph.replay()
    return dataclasses.replace(out, fields={k: v.clone() for k, v in out.fields.items()},
                               scale=out.scale.clone(), offset=out.offset.clone())


def release_graphs() -> None:
    """Free the captured fits and the device memory they hold."""
    _GRAPHS.clear()


# --- float32 building blocks ---------------------------------------------------------------------------------


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


def _triton_fit(t: torch.Tensor):
    """edgequant.gptq.triton_fit where it runs t's searches and sums (see KERNELS), else None."""
    if KERNELS == "torch" or (KERNELS == "auto" and t.device.type != "cuda"):
        return None
    return _import_triton_fit(KERNELS == "triton")


@functools.lru_cache(maxsize=None)
def _import_triton_fit(required: bool):
    try:
        return importlib.import_module("edgequant.gptq.triton_fit")
    except ImportError:
        if required:
            raise
        return None


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """search_symmetric.nearest_int in torch (int32).  NaN gives 0, as the NaNs x86 arithmetic makes (ggml's and
    numpy's) do through the trick; CUDA's have other payload bits, which it would turn into 2**22 - 1."""
    v = torch.nan_to_num(v, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return ((v + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def in_order_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0, one term after the other (search_affine.in_order_sum)."""
    if (kernels := _triton_fit(t)) is not None:
        return kernels.in_order_sum(t, from_zero)
    terms = t.unbind(0)
    acc = terms[0] + 0.0 if from_zero else terms[0].clone()
    for term in terms[1:]:
        acc += term
    return acc


def _scan_extreme(x: torch.Tensor, amin: bool) -> torch.Tensor:
    """ggml's `if (x[i] < min) min = x[i]` scan over dim 0 (or `>` max): the first element equal to the extreme,
    so a zero keeps the sign ggml's would."""
    value = x.amin(0) if amin else x.amax(0)
    first = (x == value).to(torch.uint8).argmax(0, keepdim=True)
    return x.gather(0, first).squeeze(0)


def signed_peak(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_symmetric.signed_peak along `dim`: (largest |x|, the signed value where it first occurs, or +0)."""
    ax = x.abs()
    i = ax.argmax(dim, keepdim=True)
    amax = ax.gather(dim, i).squeeze(dim)
    peak = x.gather(dim, i).squeeze(dim)
    return amax, torch.where(amax > 0, peak, 0.0)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: through float64, which rounds to the same float32 (torch's own float32 sqrt on
    the CPU is off by one ulp for about a sixth of inputs)."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _element_major(v: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n * k) -> (n, groups): groups of n consecutive values, element i of every group contiguous."""
    return v.reshape(-1, n).T.contiguous()


def _tiled(importance: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """Per-column importance as the element-major weights of every row's groups of n: (n, rows * cols // n)."""
    per_row = importance.reshape(-1, n).T
    return per_row[:, None, :].expand(n, rows, per_row.shape[1]).reshape(n, -1)


# --- searches ------------------------------------------------------------------------------------------------


def make_qkx3_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """search_affine.make_qkx3_quants (squared error) on element-major x, weights (n, groups).

    Returns scale (groups,), the_min (groups,), codes (n, groups) uint8.  The trial grids run one after the
    other: trial k rescales from the min of the best grid so far, which trial k-1 may just have moved.
    (Evaluating trial k+1 for both outcomes inside trial k's error sum saves a fifth of the kernels but moves
    more memory: it measured 15-40 % slower on an H200.)
    """
    numerators = _table(tuple(float(F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)) for s in range(nstep + 1)),
                        x.device)
    if (kernels := _triton_fit(x)) is not None:
        return kernels.make_qkx3_quants(x, weights, numerators, nmax)
    n = x.shape[0]
    lo, hi = _scan_extreme(x, amin=True), _scan_extreme(x, amin=False)
    sum_w, sum_x = in_order_sum(torch.stack([weights, weights * x], 1), from_zero=False)
    lo = torch.where(lo > 0, 0.0, lo)
    flat = ~(hi > lo)
    flat_min = lo
    # trial rows of [1, l, x]: weights*l times them gives the terms of sum_l, sum_l2, sum_xl in one tensor
    trial = torch.empty((n, 3) + x.shape[1:], dtype=x.dtype, device=x.device)
    trial[:, 0] = 1.0
    trial[:, 2] = x
    cand = trial[:, 1]

    iscale = _div(float(nmax), hi - lo)
    scale = _div(1.0, iscale)
    codes = _levels(iscale, x, lo, nmax)
    best = _squared_error(scale, lo, codes, x, weights)
    for step in range(nstep + 1):
        iscale = _div(numerators[step], hi - lo)
        cand.copy_(_levels(iscale, x, lo, nmax))
        sum_l, sum_l2, sum_xl = in_order_sum((weights * cand)[:, None] * trial)
        # det = sum_w*sum_l2 - sum_l*sum_l, this_scale = (sum_w*sum_xl - sum_x*sum_l) / det and
        # this_min = (sum_l2*sum_x - sum_l*sum_xl) / det, as three products minus three products
        products = (torch.stack([sum_w, sum_l, sum_w, sum_x, sum_l2, sum_l])
                    * torch.stack([sum_l2, sum_l, sum_xl, sum_l, sum_x, sum_xl]))
        det, scale_num, min_num = products[0::2] - products[1::2]
        this_scale, this_min = _div(torch.stack([scale_num, min_num]), det)
        clamp = this_min > 0
        this_min = torch.where(clamp, 0.0, this_min)
        this_scale = torch.where(clamp, _div(sum_xl, sum_l2), this_scale)
        err = _squared_error(this_scale, this_min, cand, x, weights)
        better = (det > 0) & (err < best)
        codes = torch.where(better, cand, codes)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)

    scale = torch.where(flat, 0.0, scale)
    lo = torch.where(flat, flat_min, lo)
    codes = torch.where(flat, 0.0, codes)
    return scale, -lo, codes.to(torch.uint8)


def _levels(iscale, x, lo, nmax: int) -> torch.Tensor:
    """clip(nearest_int(iscale * (x - lo)), 0, nmax) as float32."""
    return nearest_int((x - lo) * iscale).clamp_(0, nmax).to(torch.float32)


def _squared_error(scale, offset, levels, x, weights) -> torch.Tensor:
    """sum_i w_i * (scale*l_i + offset - x_i)^2 in element order."""
    d = scale * levels
    d += offset
    d -= x
    d *= d
    d *= weights
    return in_order_sum(d)


def make_qp_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_affine.make_qp_quants on element-major x, weights (n, groups): scale (groups,), codes (n, groups)
    uint8 (negative inputs wrap, as ggml's uint8_t does)."""
    steps = _table(tuple(float(F32(0.1) * F32(s) + F32(nmax)) for s in (-4, -3, -2, -1, 1, 2, 3, 4)), x.device)
    if (kernels := _triton_fit(x)) is not None:
        return kernels.make_qp_quants(x, weights, steps, nmax, _EPS)
    n = x.shape[0]
    top = x.amax(0).clamp_(min=0)  # ggml's running max from 0; a group whose top is 0 is reset below
    zero = top < _EPS
    iscale = _div(float(nmax), top)
    first = (nearest_int(iscale * x) & 0xFF).to(torch.float32)
    diff = x - _div(1.0, iscale) * first
    best = in_order_sum(weights * diff * diff)
    trial_iscale = _div(steps[:, None], top)
    levels = nearest_int(trial_iscale * x[:, None]).clamp_(max=nmax).to(torch.float32)  # (n, 8, groups)
    diff = x[:, None] - _div(1.0, trial_iscale) * levels
    mse = in_order_sum(weights[:, None] * diff * diff)
    for k in range(len(steps)):
        better = mse[k] < best
        best = torch.where(better, mse[k], best)
        iscale = torch.where(better, trial_iscale[k], iscale)

    levels = nearest_int(iscale * x).clamp_(max=nmax)
    lf = levels.to(torch.float32)
    wx = weights * x
    wx_w = torch.stack([wx, weights], 1)  # (n, 2, groups): element i's factors of sumlx and suml2
    sums = in_order_sum(torch.stack([wx * lf, weights * lf * lf], 1))  # (2, groups): sumlx, suml2
    codes = levels & 0xFF
    for _ in range(5):
        for i in range(n):
            old = codes[i].to(torch.float32)
            term = wx_w[i] * old
            term[1] *= old
            rest = sums - term  # slx, sl2: the sums without element i
            new = nearest_int(_div(x[i] * rest[1], rest[0])).clamp_(max=nmax)
            new_f = new.to(torch.float32)
            term = wx_w[i] * new_f
            term[1] *= new_f
            moved = rest + term  # the sums with element i at its new level
            take = ((rest > 0).all(0) & (new != codes[i])
                    & (moved[0] * moved[0] * sums[1] > sums[0] * sums[0] * moved[1]))
            codes[i] = torch.where(take, new & 0xFF, codes[i])
            sums = torch.where(take, moved, sums)
    sumlx, suml2 = sums
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, codes).to(torch.uint8)


def make_qx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """search_symmetric.make_qx_quants on element-major x, weights (n, groups): scale (groups,), codes (n, groups)
    uint8 = level + nmax.  The 19 trial grids are independent: they are evaluated together, then picked in order."""
    numerators = _table((float(F32(-nmax)),) + tuple(float(-(F32(nmax) + F32(0.1) * F32(s)))
                                                     for s in range(-9, 10) if s != 0), x.device)
    if (kernels := _triton_fit(x)) is not None:
        return kernels.make_qx_quants(x, weights, numerators, nmax, _EPS)
    amax, peak = signed_peak(x, 0)
    iscales = _div(numerators[:, None], peak)  # (19, groups)
    lv = torch.round(x[:, None] * iscales).clamp_(-nmax, nmax - 1)  # (n, 19, groups)
    terms = torch.stack([weights * x, weights], 1)[:, :, None] * lv[:, None]  # [w*x*l, w*l]
    terms[:, 1] *= lv
    sumlx, suml2 = in_order_sum(terms)  # (19, groups) each
    ratio = _div(sumlx, suml2)
    ratio[0] = torch.where(suml2[0] != 0, ratio[0], 0.0)
    gain = ratio * sumlx  # the `best` of each trial, scale * sumlx
    positive = suml2 > 0
    square = sumlx * sumlx
    best, pick = gain[0], torch.zeros_like(peak, dtype=torch.int64)
    for k in range(1, len(numerators)):
        better = positive[k] & (square[k] > best * suml2[k])
        best = torch.where(better, gain[k], best)
        pick = torch.where(better, k, pick)
    scale = ratio.gather(0, pick[None])[0]
    best_iscale = iscales.gather(0, pick[None])[0]
    codes = torch.round(x * best_iscale).clamp_(-nmax, nmax - 1) + nmax
    zero = amax < _EPS
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, codes).to(torch.uint8)


# --- block types ---------------------------------------------------------------------------------------------


def _sigma2(w: torch.Tensor) -> torch.Tensor:
    """Per super-block sum of w^2 in element order, (rows * nb,)."""
    sb = _element_major(w, QK_K)
    return in_order_sum(sb * sb)


def _scale_min_fit(codec, w, ls, lm, d, dmin, search_codes) -> DeviceFit:
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
    return DeviceFit(ScaleMinBlocks, fields, scale, offset, group, 0, codec.nmax)


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


def _fit_six_bit(codec: SixBitScaleMinCodec, w, importance) -> DeviceFit:
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


def _fit_q2_k(codec: Q2_K, w, importance) -> DeviceFit:
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


def _super_blocks(codec, d, sc, codes, nmax: int) -> DeviceFit:
    """SuperBlocks (Q3_K, Q6_K) from d (rows, nb) float16, sc (rows, nb, 16) int8, codes uint8 = level + nmax."""
    rows = d.shape[0]
    q = codes.reshape(rows, -1, QK_K).to(torch.int8) - nmax
    scale = (d.to(torch.float32)[..., None] * sc.to(torch.float32)).reshape(rows, -1)
    return DeviceFit(SuperBlocks, dict(d=d, scales=sc, q=q), scale, torch.full_like(scale, -0.0), 16,
                     codec.qmin, codec.qmax)


def _fit_q6_k(codec: Q6_K, w, importance) -> DeviceFit:
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


def _fit_q3_k(codec: Q3_K, w, importance) -> DeviceFit:
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


_FITS = {SixBitScaleMinCodec: _fit_six_bit, Q2_K: _fit_q2_k, Q3_K: _fit_q3_k, Q6_K: _fit_q6_k}

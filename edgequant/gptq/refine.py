"""After GPTQ: lower the layer's loss further by coordinate descent on what the GGUF stores.

GPTQ decides each column once, greedily, and each codec block's scales once, before its columns are rounded.
With both fixed, the loss L = tr(E H Eᵀ) (E = Ŵ - W; per row a quadratic in the stored integers) can still go
down by exact coordinate steps on the same grid, alternating:

  refit_scales   each group's integer scale (and min), as codec.integer_scales gives them (the K-quants' and
                 IQ4_XS's stored sub-block scales, an fp16 scale as steps of its ulp): the best integer step of the
                 2x2 (or 1x1) Newton system of that group's parameters, floor/ceil candidates, kept if L drops,
                 in lazy blocks of groups with an in-block loop in torch or Triton (triton_solver.refit);
                 Ŵ is linear in the code's level, so a table type's refit sees levels[q] where others see q;
  polish_codes   each code in turn: q ± 1 (on a table: the neighbouring value) where that lowers L (GPTQ's
                 rounding revisited with every other column's final error known), in lazy blocks of columns like
                 GPTQ's own loop, with an in-block sweep in torch (the reference, the CPU path) or Triton
                 (triton_solver.polish).

Both keep the gradient G = E H current, so every step's change of L is exact: for a change Δ of Ŵ[r, J],
ΔL = 2 Δ·G[r, J] + Δᵀ H[J, J] Δ.  Each step only accepts decreases, so L never goes up (up to float rounding).
H is the caller's (solver.solve passes H + λI with a larger λ than GPTQ's: measured on bench-a, the refinement
otherwise fits the calibration Hessian better than held-out text).  Everything stays on H's device until the
end; the grids are rebuilt from the integers exactly as the codec's `grid` does, so the codec's `dequantize` of
the returned blocks is the Ŵ that was optimized.
"""

from __future__ import annotations

import numpy as np
import torch

from edgequant.convert.codecs import Codec


@torch.no_grad()
def refine(W: torch.Tensor, H: torch.Tensor, codec: Codec, blocks, q: torch.Tensor, scale: torch.Tensor,
           offset: torch.Tensor, iterations: int, block_size: int = 128, polish=None, refit=None):
    """`iterations` rounds of refit_scales then polish_codes, on H's device.  W: float32 (rows, cols); q: the codes
    as float32 (rows, cols), updated in place; scale, offset: the grid of `blocks` (rows, groups) on the device.
    Returns (blocks with the new integer scales, their codes not updated: codec.with_codes(·, q) does that,
    the new scale, the new offset).  polish, refit: the in-block loops (default torch_polish, torch_refit)."""
    grid = codec.grid(blocks)
    levels = None if grid.levels is None else torch.from_numpy(grid.levels).to(H.device)
    ints = codec.integer_scales(blocks)
    if ints is not None:
        on_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(H.device)  # noqa: E731
        d, sc = on_dev(ints.d), on_dev(ints.scale).float()
        dmin, mn = (on_dev(ints.dmin), on_dev(ints.min).float()) if ints.min is not None else (None, None)
    for _ in range(iterations):
        if ints is not None:
            v = q if levels is None else levels[q.long()]
            refit_scales(W, H, v, d, sc, dmin, mn, ints.lo, ints.hi, offset, block_size, refit or torch_refit)
            scale = d * sc  # as codec.grid computes it, in float32
            if dmin is not None:
                offset = -(dmin * mn)
        polish_codes(W, H, q, scale, offset, grid.qmin, grid.qmax, block_size, polish or torch_polish, levels)
    if ints is not None:
        as_int = lambda t: t.to(torch.int32).cpu().numpy()  # noqa: E731
        blocks = codec.with_integer_scales(blocks, as_int(sc), as_int(mn) if mn is not None else None)
    return blocks, scale, offset


def dequantized(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                levels: torch.Tensor | None = None) -> torch.Tensor:
    """AffineGrid.dequantize on the device: scale * level(q) + offset per weight, in that order (per group,
    broadcast); q float codes, level(q) = q, or levels[q] for a table."""
    rows, groups = scale.shape
    if levels is not None:
        q = levels[q.long()]
    w = q.reshape(rows, groups, -1) * scale[..., None]
    return w.add_(offset[..., None]).reshape(q.shape)


def refit_scales(W, H, q, d, sc, dmin, mn, lo: int, hi: int, offset, block_size: int, sweep) -> None:
    """Group by group, the integer scale sc (and min mn) that lowers L most for the levels q (sc, mn in place).
    Ŵ[:, J] = (d·sc)·q[:, J] - dmin·mn for the group's columns J (q: the codes' levels, float); dmin, mn None for
    the types without a min (whose offset is the constant -0.0).  In lazy blocks of whole groups, as polish_codes: `sweep` (torch_refit or
    triton_solver.refit) walks a block's groups, then one GEMM carries the block's changes to later columns."""
    rows, groups = sc.shape
    cols = q.shape[1]
    n = cols // groups
    Gt = H @ (dequantized(q, d * sc, offset if dmin is None else -(dmin * mn)) - W).T  # (E H)ᵀ, H symmetric
    Qt = q.T.contiguous()
    # (groups, rows): one group's parameters are one contiguous row
    dT, scT = d.T.contiguous(), sc.T.contiguous()
    dminT, mnT = (dmin.T.contiguous(), mn.T.contiguous()) if dmin is not None else (None, None)
    step = max(n, block_size // n * n)
    for c1 in range(0, cols, step):
        c2 = min(c1 + step, cols)
        Dt = torch.empty(c2 - c1, rows, device=H.device)
        sweep(Gt[c1:c2], Qt[c1:c2], Dt, H[c1:c2, c1:c2], dT, scT, dminT, mnT, c1 // n, n, lo, hi)
        Gt[c2:].addmm_(H[c2:, c1:c2], Dt)
    sc.copy_(scT.T)
    if mn is not None:
        mn.copy_(mnT.T)


def torch_refit(Gt1, Qt1, Dt1, H1, dT, scT, dminT, mnT, g0: int, n: int, lo: int, hi: int) -> None:
    """The groups of one lazy block (columns of Gt1, Qt1: (cols, rows) views, groups g0.. of n columns): per group
    and row the best integer step of scT[g] (and mnT[g]) from the 2x2 (1x1) Newton system, floor/ceil candidates,
    kept if it lowers L; its change of Ŵ into Dt1 and onto the block's later gradients."""
    rows = Gt1.shape[1]
    zero = torch.zeros(rows, device=Gt1.device)
    for t in range(len(Gt1) // n):
        g, J = g0 + t, slice(t * n, (t + 1) * n)
        HJJ = H1[J, J]
        a = dT[g] * Qt1[J]  # dŴ[:, J] / d sc, transposed
        Ha = HJJ @ a
        gs, hss = (Gt1[J] * a).sum(0), (Ha * a).sum(0)
        if dminT is not None:  # dŴ[:, J] / d mn = -dmin, the same for all the group's columns
            b = -dminT[g]
            gm, hmm, hsm = Gt1[J].sum(0) * b, HJJ.sum() * b * b, Ha.sum(0) * b
            det = hss * hmm - hsm * hsm
            ok = det > 0
            step_s = torch.where(ok, (hsm * gm - hmm * gs) / det, zero)
            step_m = torch.where(ok, (hsm * gs - hss * gm) / det, zero)
            m_options = [(mnT[g] + torch.floor(step_m)).clamp(lo, hi) - mnT[g],
                         (mnT[g] + torch.ceil(step_m)).clamp(lo, hi) - mnT[g]]
        else:
            step_s = torch.where(hss > 0, -gs / hss, zero)
            gm = hmm = hsm = zero
            m_options = [zero]
        best, best_s, best_m = zero, zero, zero
        for ds in (torch.floor(step_s), torch.ceil(step_s)):
            ds = (scT[g] + ds).clamp(lo, hi) - scT[g]
            for dm in m_options:
                change = 2 * (ds * gs + dm * gm) + ds * ds * hss + dm * dm * hmm + 2 * ds * dm * hsm
                better = change < best
                best = torch.where(better, change, best)
                best_s, best_m = torch.where(better, ds, best_s), torch.where(better, dm, best_m)
        scT[g] += best_s
        delta = best_s * a
        if dminT is not None:
            mnT[g] += best_m
            delta = delta + best_m * b
        Dt1[J] = delta
        Gt1[J.stop:].addmm_(H1[J.stop:, J], delta)  # later groups of the block read G; earlier ones are done


def polish_codes(W, H, q, scale, offset, qmin: int, qmax: int, block_size: int, sweep, levels=None) -> None:
    """Every code once, column by column: q ± 1 on the fixed grid (scale, offset per group; levels: a table's
    values, None for q itself) where that lowers L (q updated in place).  Held transposed, (cols, rows), as GPTQ's
    loop holds its columns."""
    rows, cols = q.shape
    group = cols // scale.shape[1]
    Gt = H @ (dequantized(q, scale, offset, levels) - W).T  # (E H)ᵀ, H symmetric
    Qt = q.T.contiguous()
    St = scale.T.contiguous()  # (groups, rows): one column's steps are one contiguous row
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Dt = torch.empty(i2 - i1, rows, device=H.device)  # the block's changes of Ŵ, carried to later columns
        sweep(Gt[i1:i2], Qt[i1:i2], Dt, H[i1:i2, i1:i2], St, group, i1, qmin, qmax, levels)
        Gt[i2:].addmm_(H[i2:, i1:i2], Dt)
    q.copy_(Qt.T)


def torch_polish(Gt1, Qt1, Dt1, H1, St, group: int, first: int, qmin: int, qmax: int, levels=None) -> None:
    """The columns of one lazy block (views Gt1, Qt1 of columns first.. in place): per column, the q ± 1 that
    lowers L, its change of Ŵ into Dt1, and that change's rank-1 update of the block's later gradients."""
    for j in range(len(Gt1)):
        a = St[(first + j) // group]
        if levels is None:
            curv = a * a * H1[j, j]
            up = 2 * a * Gt1[j] + curv  # ΔL of q + 1; q - 1 changes L by 2·curv - up: at most one is < 0
            down = 2 * curv - up
            dq = torch.where((up < 0) & (Qt1[j] < qmax), 1.0, torch.where((down < 0) & (Qt1[j] > qmin), -1.0, 0.0))
            Dt1[j] = dq * a
        else:
            dq, Dt1[j] = table_move(a, Gt1[j], H1[j, j], Qt1[j], levels)
        Qt1[j] += dq
        Gt1[j + 1:].addr_(H1[j, j + 1:], Dt1[j])


def table_move(a, g, h, q, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """polish's move of one column on a table grid (Ŵ = a·levels[q] + offset): q ± 1 changes Ŵ by a times the gap
    to the neighbouring value, and L by 2·step·g + step²·h (g the gradient, h = H_jj).  L is convex in Ŵ, so at
    most one of the two lowers it.  Returns the code change (-1, 0, 1) and the change of Ŵ, float32."""
    i = q.long()
    top = len(levels) - 1
    step_up = a * (levels[(i + 1).clamp(max=top)] - levels[i])  # 0 at the top: no move
    step_down = a * (levels[(i - 1).clamp(min=0)] - levels[i])
    up = 2 * step_up * g + step_up * step_up * h
    down = 2 * step_down * g + step_down * step_down * h
    dq = torch.where(up < 0, 1.0, torch.where(down < 0, -1.0, 0.0))
    return dq, torch.where(up < 0, step_up, torch.where(down < 0, step_down, 0.0))

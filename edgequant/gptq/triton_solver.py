"""GPTQ's in-block sweep as one Triton kernel: the CUDA path of edgequant.gptq.solve (backend "triton"); and
refine's in-block polish (`polish`), the same shape of loop: per column, a decision per row, then a rank-1
update of the block's later columns held in registers; and refine's in-block `refit` of the integer group scales
(per group a 2x2 Newton step per row, then the group's change carried to the block's later groups by small dots).

The torch sweep launches a handful of kernels per column, so on a GPU it is bound by launches, about a hundred
times slower than the GEMM that carries each block's errors onward.  But rows are independent once U (the upper
Cholesky factor of H⁻¹) is known: each program here owns a tile of rows and holds the whole lazy block of
columns in registers, and walks the columns itself:

      Wt block (n columns × rows), as it sits in memory:       per column j of the sweep, per row r of the tile:
                 r0 ........ r0+BLOCK_R                          w    = W[j, r]                (pick row j of the tile)
      col 0    [ tile of one program ]                           q    = nearest level of w on its group's grid
      col 1    [                     ]                           err  = (w - (scale·q + offset)) / U[j, j]
      ...      [  BLOCK_N × BLOCK_R  ]  ◄─ registers             W[k, r] -= err · U[j, k]      for k > j
      col n-1  [                     ]                           codes[j, r] = q, E[j, r] = err

It writes the codes and the error block E; the trailing update of later blocks stays a cuBLAS GEMM in
`quantize_columns`, and the grids are fitted on the GPU too (fitter's Triton backend) when the solver enters a codec block.

The arithmetic is torch's, operation for operation: IEEE division (Triton's `/` is approximate), round-half-to-even
built from floor, no fusion, and the rank-1 update rounded as torch's addr_ rounds it on the same device: once (a
fused multiply-add, as BLAS ger on the CPU) under TRITON_INTERPRET=1, product and sum separately on CUDA (torch's
elementwise addr kernel).  So the kernel reproduces the torch sweep bit for bit on the CPU (the tests) and on a GPU
(scripts/bench_gptq.py's codes column); otherwise a weight near a rounding boundary could round the other way and the
rest of its row follow (1e-5 to 6e-4 of the codes on an H200 before the update was rounded as on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (rows per program, warps per program) by the matrix's rows: the first entry whose minimum the rows reach (read at
# each call).  scripts/bench_gptq.py --tune on an H200, Q4_K, lazy block 128, the loop with its GEMMs: 4096 x 4096
# 8 rows x 1 warp 6.33 ms, 16 x 2 6.37, 16 x 1 6.46, 32 x 2 6.51, 32 x 4 6.96, 64 x 8 9.06; 14336 x 4096 32 x 2 12.01,
# 16 x 1 12.05, 16 x 2 12.26, 8 x 1 14.60, 4 x 1 15.05.  One warp per program needs no barrier in its per-column
# reduction.
TILES = [(8192, (16, 1)), (0, (8, 1))]


def tile(rows: int) -> tuple[int, int]:
    return next(t for least, t in TILES if rows >= least)


def fused_addr(device: torch.device) -> bool:
    """Whether torch's addr_ rounds a + b·c once on this device (BLAS ger on the CPU) or twice (CUDA)."""
    return device.type != "cuda"


@triton.jit(do_not_specialize=["n", "j0", "j1"])
def _sweep_kernel(W, U, ld_u, Q, E, SCALE, OFFSET, GROUP, LEVELS, rows, n, j0, j1, qmin, qmax,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, FMA: tl.constexpr, N_LEVELS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_N)
    in_rows = r < rows
    tile = k[:, None] * rows + r[None, :]
    in_tile = (k[:, None] < n) & in_rows[None, :]
    w = tl.load(W + tile, mask=in_tile, other=0.0)
    for j in range(j0, j1):
        g = tl.load(GROUP + j).to(tl.int64)
        s = tl.load(SCALE + g * rows + r, mask=in_rows, other=1.0)
        o = tl.load(OFFSET + g * rows + r, mask=in_rows, other=0.0)
        u = tl.load(U + j * ld_u + k, mask=(k > j) & (k < n), other=0.0)
        u_jj = tl.load(U + j * ld_u + j)
        wj = tl.sum(tl.where(k[:, None] == j, w, 0.0), axis=0)
        x = tl.math.div_rn(wj - o, s)
        if N_LEVELS == 0:
            # q = rint((w - offset) / scale), half to even, from floor alone (x - floor(x) is exact in float32);
            # inline, as the interpreter pays for every call of a jit function
            f = tl.floor(x)
            odd = f - 2.0 * tl.floor(f * 0.5)
            q = f + tl.where(x - f > 0.5, 1.0, tl.where(x - f == 0.5, odd, 0.0))
            q = tl.where(s == 0, 0.0, q)
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            level = q
        else:
            # a table: solver.nearest_level's rule, searchsorted as a count of the levels <= x
            x = tl.where(s == 0, 0.0, x)
            levels = tl.load(LEVELS + tl.arange(0, N_LEVELS))
            mu = tl.sum((levels[:, None] <= x[None, :]).to(tl.int32), axis=0)
            mu = tl.minimum(tl.maximum(mu, 1), N_LEVELS - 1)
            lo = tl.load(LEVELS + mu - 1)
            hi = tl.load(LEVELS + mu)
            below = x - lo < hi - x
            q = tl.where(below, mu - 1, mu).to(tl.float32)
            level = tl.where(below, lo, hi)
        err = tl.math.div_rn(wj - (s * level + o), u_jj)
        tl.store(Q + j * rows + r, q.to(tl.int32), mask=in_rows)
        tl.store(E + j * rows + r, err, mask=in_rows)
        if FMA:  # rounded as torch's addr_ on this device (fused_addr); inline, as the interpreter pays per call
            w = tl.fma(-u[:, None], err[None, :], w)
        else:
            w = w - u[:, None] * err[None, :]
    # Columns past the sweep go back updated: the next codec block's fit reads them.
    tl.store(W + tile, w, mask=in_tile & (k[:, None] >= j1))


def n_levels(levels: torch.Tensor | None) -> int:
    """The kernels' N_LEVELS: 0 for a uniform grid, else the table's length (a power of 2, for tl.arange)."""
    if levels is None:
        return 0
    assert len(levels) & (len(levels) - 1) == 0 and levels.is_contiguous(), "a table of 2**k levels"
    return len(levels)


def sweep(W1: torch.Tensor, U1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, grids, first: int, j0: int,
          j1: int) -> None:
    """solver.torch_sweep's contract: columns j0..j1 of the lazy block W1 = Wt[first:first + n], in place."""
    n, rows = W1.shape
    assert W1.is_contiguous() and E1.is_contiguous() and Q1.is_contiguous() and U1.stride(1) == 1
    # No fused multiply-adds but the explicit one: scale·q + offset rounds twice, as in torch.
    block_r, warps = tile(rows)
    levels = grids.levels
    _sweep_kernel[(triton.cdiv(rows, block_r),)](
        W1, U1, U1.stride(0), Q1, E1, grids.scale, grids.offset, grids.group_of[first:],
        grids.scale if levels is None else levels, rows, n, j0, j1, float(grids.qmin), float(grids.qmax),
        BLOCK_N=triton.next_power_of_2(n), BLOCK_R=block_r, num_warps=warps, FMA=fused_addr(W1.device),
        N_LEVELS=n_levels(levels), enable_fp_fusion=False)


@triton.jit(do_not_specialize=["n", "first"])
def _polish_kernel(G, Q, D, H, ld_h, STEP, LEVELS, rows, n, first, group, qmin, qmax, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, FMA: tl.constexpr, N_LEVELS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_N)
    in_rows = r < rows
    tile = k[:, None] * rows + r[None, :]
    g = tl.load(G + tile, mask=(k[:, None] < n) & in_rows[None, :], other=0.0)
    for j in range(0, n):
        a = tl.load(STEP + ((first + j) // group).to(tl.int64) * rows + r, mask=in_rows, other=0.0)
        h = tl.load(H + j * ld_h + k, mask=(k > j) & (k < n), other=0.0)
        h_jj = tl.load(H + j * ld_h + j)
        gj = tl.sum(tl.where(k[:, None] == j, g, 0.0), axis=0)
        q = tl.load(Q + j * rows + r, mask=in_rows, other=0.0)
        if N_LEVELS == 0:
            curv = a * a * h_jj
            up = 2.0 * a * gj + curv
            dq = tl.where((up < 0) & (q < qmax), 1.0, tl.where((2.0 * curv - up < 0) & (q > qmin), -1.0, 0.0))
            dw = dq * a
        else:  # refine.table_move
            i = q.to(tl.int32)
            v = tl.load(LEVELS + i)
            step_up = a * (tl.load(LEVELS + tl.minimum(i + 1, N_LEVELS - 1)) - v)
            step_down = a * (tl.load(LEVELS + tl.maximum(i - 1, 0)) - v)
            up = 2.0 * step_up * gj + step_up * step_up * h_jj
            down = 2.0 * step_down * gj + step_down * step_down * h_jj
            dq = tl.where(up < 0, 1.0, tl.where(down < 0, -1.0, 0.0))
            dw = tl.where(up < 0, step_up, tl.where(down < 0, step_down, 0.0))
        tl.store(Q + j * rows + r, q + dq, mask=in_rows)
        tl.store(D + j * rows + r, dw, mask=in_rows)
        if FMA:  # as in the sweep
            g = tl.fma(h[:, None], dw[None, :], g)
        else:
            g = g + h[:, None] * dw[None, :]


def polish(Gt1: torch.Tensor, Qt1: torch.Tensor, Dt1: torch.Tensor, H1: torch.Tensor, St: torch.Tensor, group: int,
           first: int, qmin: int, qmax: int, levels: torch.Tensor | None = None) -> None:
    """refine.torch_polish's contract: the columns of one lazy block, in place, one program per tile of rows."""
    n, rows = Gt1.shape
    assert Gt1.is_contiguous() and Qt1.is_contiguous() and Dt1.is_contiguous() and St.is_contiguous() and H1.stride(1) == 1
    block_r, warps = tile(rows)
    _polish_kernel[(triton.cdiv(rows, block_r),)](
        Gt1, Qt1, Dt1, H1, H1.stride(0), St, St if levels is None else levels, rows, n, first, group, float(qmin),
        float(qmax), BLOCK_N=triton.next_power_of_2(n), BLOCK_R=block_r, num_warps=warps,
        FMA=fused_addr(Gt1.device), N_LEVELS=n_levels(levels), enable_fp_fusion=False)


# refit: rows per program (tl.dot needs at least 16) and warps
REFIT_BLOCK_R = 32
REFIT_WARPS = 4


@triton.jit(do_not_specialize=["n_groups", "g0"])
def _refit_kernel(G, Q, D, H, ld_h, DS, SC, DM, MN, rows, n_groups, g0, lo, hi, N: tl.constexpr,
                  HAS_MIN: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, N)
    in_rows = r < rows
    m = in_rows[None, :] & (k[:, None] < N)
    for t in range(0, n_groups):
        c = t * N
        tile = (c + k)[:, None] * rows + r[None, :]  # the group's N columns of this program's rows
        gJ = tl.load(G + tile, mask=m, other=0.0)
        at = (g0 + t).to(tl.int64) * rows + r  # the group's parameters, per row
        s = tl.load(SC + at, mask=in_rows, other=0.0)
        a = tl.load(DS + at, mask=in_rows, other=0.0)[None, :] * tl.load(Q + tile, mask=m, other=0.0)
        hJJ = tl.load(H + (c + k)[:, None] * ld_h + (c + k)[None, :])
        ha = tl.dot(hJJ, a, input_precision="ieee")
        gs = tl.sum(gJ * a, axis=0)
        hss = tl.sum(ha * a, axis=0)
        if HAS_MIN:
            b = -tl.load(DM + at, mask=in_rows, other=0.0)
            mn = tl.load(MN + at, mask=in_rows, other=0.0)
            gm = tl.sum(gJ, axis=0) * b
            hmm = tl.sum(tl.sum(hJJ, axis=1), axis=0) * b * b
            hsm = tl.sum(ha, axis=0) * b
            det = hss * hmm - hsm * hsm
            ok = det > 0
            safe = tl.where(ok, det, 1.0)
            step_s = tl.where(ok, tl.math.div_rn(hsm * gm - hmm * gs, safe), 0.0)
            step_m = tl.where(ok, tl.math.div_rn(hsm * gs - hss * gm, safe), 0.0)
            m0 = tl.minimum(tl.maximum(mn + tl.floor(step_m), lo), hi) - mn
            m1 = tl.minimum(tl.maximum(mn + tl.ceil(step_m), lo), hi) - mn
        else:
            step_s = tl.where(hss > 0, tl.math.div_rn(-gs, tl.where(hss > 0, hss, 1.0)), 0.0)
            gm = tl.zeros_like(gs)
            hmm = tl.zeros_like(gs)
            hsm = tl.zeros_like(gs)
            m0 = tl.zeros_like(gs)
            m1 = tl.zeros_like(gs)
        best = tl.zeros_like(gs)
        best_s = tl.zeros_like(gs)
        best_m = tl.zeros_like(gs)
        # the candidates in torch_refit's order (floor, ceil) x (floor, ceil); the first strict improvement wins ties
        for i in tl.static_range(2):
            ds = tl.minimum(tl.maximum(s + (tl.floor(step_s) if i == 0 else tl.ceil(step_s)), lo), hi) - s
            for j in tl.static_range(2 if HAS_MIN else 1):
                dm = m0 if j == 0 else m1
                change = 2.0 * (ds * gs + dm * gm) + ds * ds * hss + dm * dm * hmm + 2.0 * ds * dm * hsm
                better = change < best
                best = tl.where(better, change, best)
                best_s = tl.where(better, ds, best_s)
                best_m = tl.where(better, dm, best_m)
        tl.store(SC + at, s + best_s, mask=in_rows)
        delta = best_s[None, :] * a
        if HAS_MIN:
            tl.store(MN + at, mn + best_m, mask=in_rows)
            delta = delta + (best_m * b)[None, :]
        tl.store(D + tile, delta, mask=m)
        for u in range(t + 1, n_groups):  # the block's later groups: G += H[U, J] · delta
            tile_u = (u * N + k)[:, None] * rows + r[None, :]
            h_uj = tl.load(H + (u * N + k)[:, None] * ld_h + (c + k)[None, :])
            g_u = tl.load(G + tile_u, mask=m, other=0.0) + tl.dot(h_uj, delta, input_precision="ieee")
            tl.store(G + tile_u, g_u, mask=m)
        tl.debug_barrier()  # the next group reads what this one stored, possibly from other threads


def refit(Gt1, Qt1, Dt1, H1, dT, scT, dminT, mnT, g0: int, n: int, lo: int, hi: int) -> None:
    """refine.torch_refit's contract: the groups of one lazy block, in place, one program per tile of rows.  The
    same decisions as torch up to the order of the float sums (tl.dot's and the reductions'): a row whose best
    candidate is within rounding of another may pick the other (tests/test_triton_solver.py counts them)."""
    cols, rows = Gt1.shape
    assert Gt1.is_contiguous() and Qt1.is_contiguous() and Dt1.is_contiguous() and H1.stride(1) == 1
    has_min = dminT is not None
    _refit_kernel[(triton.cdiv(rows, REFIT_BLOCK_R),)](
        Gt1, Qt1, Dt1, H1, H1.stride(0), dT, scT, dminT if has_min else dT, mnT if has_min else scT, rows,
        cols // n, g0, float(lo), float(hi), N=n, HAS_MIN=has_min, BLOCK_R=REFIT_BLOCK_R, num_warps=REFIT_WARPS,
        enable_fp_fusion=False)

"""Time edgequant.gptq.solve on a CUDA GPU for Llama-3-8B's linear shapes: the Triton sweep against the torch one.

    python scripts/bench_gptq.py [--types Q4_K Q6_K] [--tune] [--json FILE]
    TRITON_INTERPRET=1 python scripts/bench_gptq.py --device cpu --shapes 64x512 --repeat 1   # smoke test

Inputs are synthetic: W Gaussian, H = 2XᵀX/n with X low-rank plus noise and uneven column magnitudes (as LLM
activations are).  Per shape and type, in one run:

  chol          H⁻¹'s upper Cholesky factor (inverse_cholesky), shared by both backends
  sweep+GEMM    the column loop alone (quantize_columns) on the grids the solve fitted, held fixed on the GPU:
                Triton (median of --repeat) and torch (one run), their ratio; "GEMMs" is the same loop with an
                empty sweep (the trailing updates and the loss, the floor of the loop)
  solve -fit    the whole solve with codec.fit replayed from a recording (instant): what the solve costs
                beyond fitting (chol, the loop, copying each codec block to the CPU for its fit, packing the
                codes and dequantizing Ŵ on the CPU)
  fit           codec.fit's own time (numpy on the CPU) in the recorded solve, and how many calls
  solve         the whole recorded solve, fits included (numpy codec.fit on the CPU)
  GPU fit       the whole solve as `build` runs it on CUDA: backend "triton", fits on the GPU (gptq.triton_fit)
  refine2       the same with --refine 2 (gptq.refine after the solve)
  codes ≠       codes that differ between the Triton and torch loops on the same grids, and their losses' relative
                difference
  canon         the column loop as the paper's reference code writes it (canonical_loop: the issue's "canonical
                lazy-batch reference", several more kernels per column than torch_sweep) on the same grids, and
                its time over the Triton loop's

--tune [ROWSxCOLS] first times the loop on that shape (default: the first, 4096 × 4096) in Q4_K for several tile shapes
(rows per program, warps) and lazy block sizes, and uses the fastest tile at the block size of the solves.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq import solve, triton_solver
from edgequant.gptq.fitter import Fit
from edgequant.gptq.solver import ColumnGrids, concat_blocks, inverse_cholesky, quantize_columns, torch_sweep

# (rows, cols) of Llama-3-8B's linears: q/o, k/v, gate/up, down.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TILES = [(4, 1), (8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8)]


class RecordedCodec:
    """A codec whose fits are timed and remembered, then (after `replay()`) handed back without computing."""

    def __init__(self, codec):
        self.codec, self.blocks, self.fit_seconds, self._next = codec, [], 0.0, None

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def fit(self, w, importance=None):
        if self._next is not None:
            return self.blocks[next(self._next)]
        t0 = time.perf_counter()
        self.blocks.append(self.codec.fit(w, importance))
        self.fit_seconds += time.perf_counter() - t0
        return self.blocks[-1]

    def replay(self) -> "RecordedCodec":
        self._next = iter(range(len(self.blocks)))
        return self


DEVICE = torch.device("cuda")


def hessian(cols: int, n: int = 8192, rank: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    Z = torch.randn(n, rank, device=DEVICE, generator=g)
    A = torch.randn(rank, cols, device=DEVICE, generator=g)
    X = Z @ A / rank**0.5 + 0.5 * torch.randn(n, cols, device=DEVICE, generator=g)
    X *= torch.empty(cols, device=DEVICE).log_normal_(0, 0.5, generator=g)
    return 2 * X.T @ X / n


def weights(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return 0.02 * torch.randn(rows, cols, device=DEVICE, generator=g)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1):
    """Median seconds of `repeat` synchronized runs, and the last result."""
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def loop(Wt, U, grids, sweep, block_size, repeat):
    """Time quantize_columns on fresh copies of Wt (it updates in place)."""
    times, out = [], None
    for _ in range(repeat):
        W = Wt.clone()
        t, out = timed(lambda: quantize_columns(W, U, grids, sweep, block_size))
        times.append(t)
    return statistics.median(times), out


def canonical_loop(W: torch.Tensor, U: torch.Tensor, grids: ColumnGrids, block_size: int) -> torch.Tensor:
    """GPTQ's column loop as the paper's reference code writes it (IST-DASLab/gptq's fasterquant, the "canonical
    lazy-batch reference" the issue timed): W (rows, cols) row-major, each column quantized onto its fixed grid, its
    loss and error recorded, the rank-1 update of the block's later columns as a matmul, one GEMM per block.
    Returns the loss per column; the timing is the point."""
    rows, cols = W.shape
    W, Losses = W.clone(), torch.zeros(rows, cols, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            g = grids.groups[i1 + i]
            q = grids.scale[g] * torch.clamp(torch.round((w - grids.offset[g]) / grids.scale[g]), grids.qmin, grids.qmax) + grids.offset[g]
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
    return Losses.sum(0)


def fixed_grids(rec: RecordedCodec, rows: int, cols: int) -> ColumnGrids:
    grids = ColumnGrids(rows, cols, DEVICE)
    grids.put(0, Fit.of(rec.codec, concat_blocks(rec.blocks), DEVICE))
    return grids


def tune(rows, cols, block_sizes, repeat) -> dict:
    """Loop times on Q4_K per (block size, rows per program, warps)."""
    H, W = hessian(cols), weights(rows, cols)
    rec = RecordedCodec(codec("Q4_K"))
    solve(W, H, rec, backend="triton")
    U = inverse_cholesky(H.clone(), 0.01)[0]
    grids, Wt = fixed_grids(rec, rows, cols), W.T.contiguous()
    out = {}
    print(f"tuning on {rows} x {cols} Q4_K: loop ms per (block size, rows per program, warps)")
    for b in block_sizes:
        for tile in TILES:
            triton_solver.TILES = [(0, tile)]
            loop(Wt, U, grids, triton_solver.sweep, b, 1)  # compile
            out[(b, *tile)] = loop(Wt, U, grids, triton_solver.sweep, b, repeat)[0]
            print(f"  block {b:3}  tile {tile[0]:2} rows x {tile[1]} warps: {1e3 * out[(b, *tile)]:8.2f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tune", nargs="?", const="first", metavar="ROWSxCOLS",
                    help="tune the tile first, on this shape (default: the first of --shapes)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--shapes", nargs="+", default=[f"{r}x{c}" for r, c in SHAPES], help="ROWSxCOLS ...")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import triton

    global DEVICE
    DEVICE = torch.device(args.device)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    torch.backends.cuda.matmul.allow_tf32 = False  # the solver's GEMMs are fp32 (the default; said explicitly)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"CPU {platform.processor() or platform.machine()}, numpy {np.__version__}")
    report = {"device": name, "rows": []}
    if args.tune:
        tuned = tune(*(shapes[0] if args.tune == "first" else map(int, args.tune.split("x"))),
                     sorted({64, args.block_size, 256}), args.repeat)
        best = min((t for t in tuned if t[0] == args.block_size), key=tuned.get)
        triton_solver.TILES = [(0, best[1:])]
        report["tune_ms"] = {f"{b}/{r}/{w}": 1e3 * t for (b, r, w), t in tuned.items()}
    print(f"tiles (from rows: rows per program x warps): {triton_solver.TILES}, lazy block {args.block_size}")

    W, H = weights(64, 512), hessian(512)  # compile outside the timings
    solve(W, H, codec("Q4_K"), backend="triton", block_size=args.block_size)
    head = (f"{'type':5} {'rows x cols':>12} {'chol ms':>8} {'triton ms':>10} {'torch ms':>9} {'ratio':>6} "
            f"{'GEMMs ms':>9} {'solve-fit s':>12} {'fit s':>7} {'fits':>5} {'solve s':>8} {'GPU fit s':>9} {'refine2 s':>9} "
            f"{'codes ≠':>8} {'loss Δ':>8} {'canon ms':>9} {'ratio c':>7}")
    lines = []
    for cols in sorted({c for _, c in shapes}):
        H = hessian(cols)
        chol, (U, _, _) = timed(lambda: inverse_cholesky(H.clone(), 0.01), 3)
        for rows in [r for r, c in shapes if c == cols]:
            W = weights(rows, cols)
            Wt = W.T.contiguous()
            for name in args.types:
                rec = RecordedCodec(codec(name))
                total, _ = timed(lambda: solve(W, H, rec, backend="triton", block_size=args.block_size))
                c = codec(name)
                solve(W, H, c, backend="triton", block_size=args.block_size)  # capture the Triton fit's graphs
                gpu_fit, _ = timed(lambda: solve(W, H, c, backend="triton", block_size=args.block_size), args.repeat)
                refined, _ = timed(lambda: solve(W, H, c, backend="triton", block_size=args.block_size, refine=2))
                no_fit, _ = timed(lambda: solve(W, H, rec.replay(), backend="triton", block_size=args.block_size))
                grids = fixed_grids(rec, rows, cols)
                t_tri, (q_tri, l_tri) = loop(Wt, U, grids, triton_solver.sweep, args.block_size, args.repeat)
                t_ref, (q_ref, l_ref) = loop(Wt, U, grids, torch_sweep, args.block_size, 1)
                t_gemm, _ = loop(Wt, U, grids, lambda *a: None, args.block_size, args.repeat)
                t_canon, l_canon = timed(lambda: canonical_loop(W, U, grids, args.block_size))
                differ = float((q_tri != q_ref).float().mean())
                loss_tri, loss_ref = float(l_tri.double().sum()), float(l_ref.double().sum())
                row = {"type": name, "rows": rows, "cols": cols, "chol_ms": 1e3 * chol, "triton_ms": 1e3 * t_tri,
                       "torch_ms": 1e3 * t_ref, "ratio": t_ref / t_tri, "gemms_ms": 1e3 * t_gemm,
                       "canonical_ms": 1e3 * t_canon, "canonical_ratio": t_canon / t_tri,
                       "canonical_loss_rel_diff": float(l_canon.double().sum()) / loss_ref - 1,
                       "solve_no_fit_s": no_fit, "fit_s": rec.fit_seconds, "fits": len(rec.blocks),
                       "solve_s": total, "solve_device_fit_s": gpu_fit, "solve_refine2_s": refined,
                       "codes_differ": differ, "loss_rel_diff": loss_tri / loss_ref - 1}
                report["rows"].append(row)
                lines.append(f"{name:5} {f'{rows} x {cols}':>12} {row['chol_ms']:8.1f} {row['triton_ms']:10.2f} "
                             f"{row['torch_ms']:9.0f} {row['ratio']:6.0f} {row['gemms_ms']:9.2f} {no_fit:12.3f} "
                             f"{rec.fit_seconds:7.2f} {len(rec.blocks):5} {total:8.2f} {gpu_fit:9.3f} {refined:9.3f} "
                             f"{differ:8.1e} {row['loss_rel_diff']:8.1e} {row['canonical_ms']:9.0f} "
                             f"{row['canonical_ratio']:7.0f}")
                print(lines[-1], flush=True)
            del W, Wt
        del H, U
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + head + "\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Where one GPTQ solve's time goes on a CUDA GPU, as `build` runs it (Triton sweep, fits on the GPU, refine):
torch.profiler's top operators by their own CPU time (launches, host copies, syncs) and by GPU time, and
cProfile's top Python functions.  A developer's tool for finding host-side overhead around the kernels.

    python scripts/profile_solve.py [--shapes 14336x4096 4096x14336] [--type Q4_K] [--refine 2] [--top 25]

Inputs as scripts/bench_gptq.py draws them.  The first solve of each shape is a warm-up (Triton compiles, CUDA graphs
are captured); the profiled solve is the second.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from edgequant.convert.codecs import codec
from edgequant.gptq import solve

DEVICE = torch.device("cuda")


def inputs(rows: int, cols: int, n: int = 8192, rank: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    Z = torch.randn(n, rank, device=DEVICE, generator=g)
    A = torch.randn(rank, cols, device=DEVICE, generator=g)
    X = Z @ A / rank**0.5 + 0.5 * torch.randn(n, cols, device=DEVICE, generator=g)
    X *= torch.empty(cols, device=DEVICE).log_normal_(0, 0.5, generator=g)
    return 0.02 * torch.randn(rows, cols, device=DEVICE, generator=g), 2 * X.T @ X / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["14336x4096", "4096x14336"])
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    c = codec(args.type)
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        W, H = inputs(rows, cols)
        run = lambda: solve(W, H, c, refine=args.refine)  # noqa: E731
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        print(f"\n=== {rows} x {cols} {args.type} refine {args.refine}: {time.perf_counter() - t0:.3f} s per solve", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
        pr = cProfile.Profile()
        pr.enable()
        run()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

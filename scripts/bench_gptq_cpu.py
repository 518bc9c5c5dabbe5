"""Time edgequant.gptq.solve on CPU for bench-a's linear shapes, next to the plain codec fit (RTN) it contains.

    python scripts/bench_gptq_cpu.py [--types Q4_K Q6_K] [--threads N] [--act-order] [--repeat 2]

Inputs are synthetic (random W, H = 2XᵀX of correlated X): the solver's cost does not depend on the values.
The last line adds up one whole bench-a (8 layers × q, k, v, o, gate, up, down, plus the output matrix).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq import solve

# (rows, cols) of bench-a's linears -> how many the model has.
BENCH_A = {(512, 512): 16, (256, 512): 16, (1536, 512): 16, (512, 1536): 8, (4096, 512): 1}


def inputs(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((2048, cols)).astype(np.float32) @ (np.eye(cols) + 0.1 * rng.standard_normal((cols, cols)))
    return (0.02 * rng.standard_normal((rows, cols))).astype(np.float32), (2 * X.T @ X).astype(np.float32)


def seconds(fn, repeat: int) -> float:
    """Best of `repeat` runs (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), act_order={args.act_order}")
    print(f"{'type':6} {'rows x cols':>12} {'fit s':>7} {'solve s':>8} {'gptq-only s':>12}")
    for name in args.types:
        c = codec(name)
        model = 0.0
        for (rows, cols), count in BENCH_A.items():
            W, H = inputs(rows, cols)
            importance = np.diagonal(H).copy()
            fit = seconds(lambda: c.fit(W, importance), args.repeat)
            total = seconds(lambda: solve(W, H, c, act_order=args.act_order), args.repeat)
            model += count * total
            print(f"{name:6} {f'{rows} x {cols}':>12} {fit:7.3f} {total:8.3f} {total - fit:12.3f}")
        print(f"{name:6} {'bench-a':>12} {'':7} {model:8.1f}  (all {sum(BENCH_A.values())} matrices)")


if __name__ == "__main__":
    main()

"""Time the grid fit GPTQ runs at each super-block entry: the codecs' numpy `fit` (CPU) against
edgequant.gptq.device_fit (torch, on --device), on one super-block column of a matrix.

    python scripts/bench_device_fit.py --device cuda                      # the H200: 4096x256 and 14336x256
    python scripts/bench_device_fit.py --device cpu --threads 1 --shapes 512x256 --repeat 3   # CPU smoke run

Inputs are synthetic: W Gaussian with per-row magnitudes and 1 % outliers, importance log-normal.  Per type and
shape: numpy ms (median of --np-repeat); device_fit's ms, eager (kernels launched one by one from Python) and, on
CUDA, replayed from its captured graph (median of --repeat after --warmup calls, each timed between
torch.cuda.synchronize()s, without the transfer of the blocks to the host); numpy over the faster of the two; the ms
of one `blocks()` transfer to the host; the device memory the captured graph holds; whether the device's blocks are
bit-identical to numpy's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq.device_fit import device_fit


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(milliseconds, result) of one call, synchronized on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) * 1e3, out


def inputs(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * np.exp(0.5 * rng.standard_normal((rows, 1)))
    hit = rng.random((rows, cols)) < 0.01
    w[hit] *= 20
    return w.astype(np.float32), np.exp(rng.standard_normal(cols)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("--shapes", nargs="+", default=["4096x256", "14336x256"], help="ROWSxCOLS, COLS a multiple of 256")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="calls before timing (the first captures the graph)")
    ap.add_argument("--np-repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device_fit on {name}, torch {torch.__version__}; numpy fit on the CPU")
    cuda = device.type == "cuda"
    print(f"{'type':6} {'rows x cols':>13} {'numpy ms':>9} {'eager ms':>9} {'graph ms':>9} {'ratio':>6} "
          f"{'to host ms':>10} {'graph MB':>8}  exact")
    for shape in args.shapes:
        rows, cols = map(int, shape.split("x"))
        w, imp = inputs(rows, cols)
        w_d, imp_d = torch.from_numpy(w).to(device), torch.from_numpy(imp).to(device)
        for t in args.types:
            c = codec(t)
            np_ms = []
            for _ in range(args.np_repeat):
                ms, ref = timed(lambda: c.fit(w, imp), torch.device("cpu"))
                np_ms.append(ms)
            ms, graph_mb = {}, 0.0
            for graph in (False, True) if cuda else (False,):
                if graph:
                    torch.cuda.empty_cache()
                    reserved = torch.cuda.memory_reserved(device)
                for _ in range(args.warmup):
                    device_fit(c, w_d, imp_d, graph=graph)
                if graph:
                    graph_mb = (torch.cuda.memory_reserved(device) - reserved) / 2**20
                ms[graph] = statistics.median(
                    timed(lambda: device_fit(c, w_d, imp_d, graph=graph), device)[0] for _ in range(args.repeat))
            fit = device_fit(c, w_d, imp_d)
            host_ms, got = timed(fit.blocks, device)
            exact = all(np.array_equal(getattr(ref, f.name), getattr(got, f.name)) for f in dataclasses.fields(ref))
            np_med = statistics.median(np_ms)
            graph_ms = f"{ms[True]:9.2f}" if cuda else f"{'-':>9}"
            print(f"{t:6} {rows:>6} x {cols:<5} {np_med:9.1f} {ms[False]:9.2f} {graph_ms} "
                  f"{np_med / min(ms.values()):6.1f} {host_ms:10.2f} {graph_mb:8.0f}  {'yes' if exact else 'NO'}", flush=True)


if __name__ == "__main__":
    main()

"""Time the grid fit GPTQ runs at each super-block entry: the codecs' numpy `fit` (CPU) against
edgequant.gptq.device_fit (on --device), on one super-block column of a matrix, with its searches and sums in torch
and in Triton (edgequant.gptq.triton_fit, device_fit's default on CUDA).

    python scripts/bench_device_fit.py --device cuda                      # the H200: 4096x256 and 14336x256
    python scripts/bench_device_fit.py --device cuda --types Q4_K Q5_K Q6_K Q3_K Q2_K --kernels triton
    python scripts/bench_device_fit.py --device cpu --threads 1 --shapes 512x256 --repeat 3   # CPU smoke run

Inputs are synthetic: W Gaussian with per-row magnitudes and 1 % outliers, importance log-normal.  Per type, shape
and --kernels: numpy ms (median of --np-repeat); the first device_fit call's ms (Triton's compilation when its cache
is cold, the graph's capture); device_fit's ms, eager (kernels launched one by one from Python) and, on CUDA,
replayed from its captured graph (median of --repeat after --warmup calls, each timed between
torch.cuda.synchronize()s, without the transfer of the blocks to the host); numpy over the faster of the two; the ms
of one `blocks()` transfer to the host; the device memory the captured graph holds; whether the device's blocks are
bit-identical to numpy's.  (Triton on the CPU needs TRITON_INTERPRET=1, and is slow there.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq import device_fit as df


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
    ap.add_argument("--kernels", nargs="+", choices=["torch", "triton"], default=None,
                    help="device_fit's searches and sums (default: torch and triton on CUDA, torch on the CPU)")
    ap.add_argument("--tiles", nargs="+", default=None, metavar="GROUPSxWARPS",
                    help="Triton's groups and warps per program to try (default: triton_fit's BLOCK_G x NUM_WARPS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    kernels = args.kernels or (["torch", "triton"] if cuda else ["torch"])
    runs = [("torch", "")] if "torch" in kernels else []  # (KERNELS, Triton's tile)
    if "triton" in kernels:
        from edgequant.gptq import triton_fit
        runs += [("triton", tile) for tile in args.tiles or [f"{triton_fit.BLOCK_G}x{triton_fit.NUM_WARPS}"]]
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"device_fit on {name}, torch {torch.__version__}; numpy fit on the CPU")
    print(f"{'type':6} {'rows x cols':>13} {'kernels':>12} {'numpy ms':>9} {'first ms':>9} {'eager ms':>9} "
          f"{'graph ms':>9} {'ratio':>6} {'to host ms':>10} {'graph MB':>8}  exact")
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
            np_med = statistics.median(np_ms)
            for kind, tile in runs:
                df.KERNELS = kind
                if tile:
                    triton_fit.BLOCK_G, triton_fit.NUM_WARPS = map(int, tile.split("x"))
                    df.release_graphs()  # captured with the previous tile
                ms, graph_mb = {}, 0.0
                first_ms = timed(lambda: df.device_fit(c, w_d, imp_d, graph=False), device)[0]
                for graph in (False, True) if cuda else (False,):
                    if graph:
                        torch.cuda.empty_cache()
                        reserved = torch.cuda.memory_reserved(device)
                    for _ in range(args.warmup):
                        df.device_fit(c, w_d, imp_d, graph=graph)
                    if graph:
                        graph_mb = (torch.cuda.memory_reserved(device) - reserved) / 2**20
                    ms[graph] = statistics.median(
                        timed(lambda: df.device_fit(c, w_d, imp_d, graph=graph), device)[0] for _ in range(args.repeat))
                fit = df.device_fit(c, w_d, imp_d)
                host_ms, got = timed(fit.blocks, device)
                exact = all(np.array_equal(getattr(ref, f.name), getattr(got, f.name)) for f in dataclasses.fields(ref))
                graph_ms = f"{ms[True]:9.2f}" if cuda else f"{'-':>9}"
                print(f"{t:6} {rows:>6} x {cols:<5} {kind + ' ' + tile:>12} {np_med:9.1f} {first_ms:9.1f} "
                      f"{ms[False]:9.2f} {graph_ms} {np_med / min(ms.values()):6.1f} {host_ms:10.2f} "
                      f"{graph_mb:8.0f}  {'yes' if exact else 'NO'}", flush=True)
            df.release_graphs()


if __name__ == "__main__":
    main()

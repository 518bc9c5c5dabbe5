"""Time the grid fit GPTQ runs at each super-block entry: the codecs' numpy `fit` (CPU) against each backend of
edgequant.gptq.fitter that runs on --device (Triton on CUDA, C), on one super-block column of a matrix.

    python scripts/bench_device_fit.py --device cuda                      # the H200: 4096x256 and 14336x256
    python scripts/bench_device_fit.py --device cuda --types Q4_K Q5_K Q6_K Q3_K Q2_K --tiles 32x1 64x2
    python scripts/bench_device_fit.py --device cpu --shapes 512x256 --repeat 3   # CPU smoke run (C only)

Inputs are synthetic: W Gaussian with per-row magnitudes and 1 % outliers, importance log-normal.  Per type, shape
and backend: numpy ms (median of --np-repeat); the first call's ms (Triton's compilation when its cache is cold);
the backend's ms, eager and, for Triton on CUDA, replayed from its captured graph (median of --repeat after --warmup
calls, each timed between torch.cuda.synchronize()s, without the transfer of the blocks to the host); numpy over
the faster of the two; the ms of one `blocks()` transfer to the host; the device memory the captured graph holds;
whether the backend's blocks are bit-identical to numpy's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq import fitter


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
    ap.add_argument("--tiles", nargs="+", default=None, metavar="GROUPSxWARPS",
                    help="Triton's groups and warps per program to try (default: triton_fit's BLOCK_G x NUM_WARPS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    backends = fitter.backends(device.type)[:-1]  # all but numpy
    runs = [(b, "") for b in backends if b.name != "triton"]  # (backend, Triton's tile)
    if any(b.name == "triton" for b in backends):
        from edgequant.gptq import triton_fit
        graph_rows = triton_fit.GRAPH_ROWS
        tiles = args.tiles or [f"{triton_fit.BLOCK_G}x{triton_fit.NUM_WARPS}"]
        runs = [(triton_fit.TritonFit(), tile) for tile in tiles] + runs
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"fitter backends on {name}, torch {torch.__version__}; numpy fit on the CPU")
    print(f"{'type':6} {'rows x cols':>13} {'backend':>12} {'numpy ms':>9} {'first ms':>9} {'eager ms':>9} "
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
            for backend, tile in runs:
                if not backend.covers(c, True):
                    continue
                graphs = (False, True) if cuda and tile else (False,)
                if tile:
                    triton_fit.BLOCK_G, triton_fit.NUM_WARPS = map(int, tile.split("x"))
                    triton_fit.release_graphs()  # captured with the previous tile
                ms, graph_mb = {}, 0.0
                for graph in graphs:
                    if tile:  # the backend captures graphs up to GRAPH_ROWS rows
                        triton_fit.GRAPH_ROWS = graph_rows if graph else 0
                    if graph:
                        torch.cuda.empty_cache()
                        reserved = torch.cuda.memory_reserved(device)
                    else:
                        first_ms = timed(lambda: backend.fit(c, w_d, imp_d), device)[0]
                    for _ in range(args.warmup):
                        backend.fit(c, w_d, imp_d)
                    if graph:
                        graph_mb = (torch.cuda.memory_reserved(device) - reserved) / 2**20
                    ms[graph] = statistics.median(
                        timed(lambda: backend.fit(c, w_d, imp_d), device)[0] for _ in range(args.repeat))
                fit = backend.fit(c, w_d, imp_d)
                host_ms, got = timed(fit.blocks, device)
                exact = all(np.array_equal(getattr(ref, f.name), getattr(got, f.name)) for f in dataclasses.fields(ref))
                graph_ms = f"{ms[True]:9.2f}" if True in ms else f"{'-':>9}"
                print(f"{t:6} {rows:>6} x {cols:<5} {backend.name + ' ' + tile:>12} {np_med:9.1f} {first_ms:9.1f} "
                      f"{ms[False]:9.2f} {graph_ms} {np_med / min(ms.values()):6.1f} {host_ms:10.2f} "
                      f"{graph_mb:8.0f}  {'yes' if exact else 'NO'}", flush=True)
            if any(tile for _, tile in runs):
                triton_fit.release_graphs()


if __name__ == "__main__":
    main()

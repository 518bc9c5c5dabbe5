"""Where self-calibration's time goes: seconds per decoding step of `edgequant.self_calibration.generate` against the
batch size, the model's load, and (--profile) the top operators of a few steps by host and device time.

    python scripts/bench_sampling.py MODEL [--device cuda] [--batches 16 64 128] [--steps 32] [--profile]

A per-step time that does not grow with the batch says the loop is bound by the host (Python and kernel launches),
not by the device's arithmetic or memory.  Prints one JSON line per measurement."""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from edgequant import self_calibration as sc
    from edgequant.model import SourceModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--steps", type=int, default=32, help="tokens per window (decoding steps + 1)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one run at the largest batch")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    m = SourceModel(args.model)
    t0 = time.perf_counter()
    model = sc.load_model(m, device, sc.gen_dtype(device))
    sync()
    print(json.dumps({"load_seconds": round(time.perf_counter() - t0, 3), "device": str(device)}), flush=True)
    for batch in [args.batches[0], *args.batches]:  # the first run warms up
        prompts, banned = [[1]] * batch, [[]] * batch
        sync()
        t0 = time.perf_counter()
        sc.generate(model, prompts, banned, args.steps, batch, 0, device)
        sync()
        dt = time.perf_counter() - t0
        print(json.dumps({"batch": batch, "steps": args.steps - 1, "seconds_per_step": round(dt / (args.steps - 1), 5),
                          "tokens_per_second": round(batch * (args.steps - 1) / dt, 1)}), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        batch = args.batches[-1]
        with profile(activities=acts) as prof:
            sc.generate(model, [[1]] * batch, [[]] * batch, args.steps, batch, 0, device)
            sync()
        for key in ("self_cpu_time_total", *(["self_cuda_time_total"] if device.type == "cuda" else [])):
            print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


if __name__ == "__main__":
    main()

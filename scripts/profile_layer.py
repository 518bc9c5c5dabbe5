"""Where one decoder layer's calibration time goes on a CUDA GPU, as `build` runs it (layerwise.Passes.layer):
Llama-3.1-8B's layer with random weights, --windows × --seqlen tokens of random hidden states (two streams with the
asymmetric target), the solver replaced by a stand-in (every weight × (1 − 1e-3)).  Per variant: seconds per layer
(median of --repeat after a warm-up), the share that is forward passes and Hessian sums, torch.profiler's GPU time
by kind of kernel, and the peak memory.

    python scripts/profile_layer.py [--variants defaults:tf32 defaults:bf16 plain:tf32 ...] [--windows 128] [--top 8]

A variant is CALIBRATION:PRECISION[:full]: CALIBRATION `defaults` (the GPU's: sequential + asymmetric) or `plain`
(one pass, one stream), PRECISION one of layerwise.PRECISIONS, `full`: Σxᵀx as one whole GEMM (before the symmetric
blocks).  After the table, each variant's --top kernels by GPU time.  (--device cpu --windows 2 --seqlen 64: a smoke
test of the script; the CPU runs float32 whatever the precision.)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from edgequant import layerwise

# kernel kinds by name, the first match wins (attention kernels' names hold "cutlass" and "sm90_" too)
KINDS = {"attention": ("fmha", "attention", "flash", "sdpa"),
         "GEMM": ("gemm", "cutlass", "xmma", "sm90_", "cublas", "splitk", "nvjet")}


def synthetic_config():
    """The 8B's config from scripts/make_synthetic_model.py, one layer, a small vocabulary (never read here)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_model", Path(__file__).with_name("make_synthetic_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from transformers import LlamaConfig

    return LlamaConfig(**{**mod.CONFIGS["llama-3.1-8b"], "num_hidden_layers": 1, "vocab_size": 512})


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS.items() if any(s in low for s in keys)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["defaults:tf32:full", "defaults:tf32", "defaults:bf16",
                                                      "plain:tf32", "plain:bf16"])
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    config = synthetic_config()
    model = layerwise.skeleton_of(config, device)
    layer = model.model.layers[0]
    layer.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, device=device, generator=g) * 0.02 if p.dim() == 2 else torch.ones_like(p))
    ids = torch.zeros(1, args.seqlen, dtype=torch.long, device=device)
    kwargs = layerwise.layer_kwargs(model, ids)[0]
    batch = max(1, min(8, layerwise.TOKENS_PER_BATCH // args.seqlen))
    gram_rows = layerwise.GRAM_ROWS

    def stand_in(_index, weights):
        return {name: w * (1 - 1e-3) for name, (w, _st) in weights.items()}

    print(f"{config.hidden_size}x{config.intermediate_size} layer, {args.windows} windows x {args.seqlen} tokens, "
          f"batch {batch}; {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}")
    tops = []
    print("| variant | s per layer | forward + sums | stand-in | GPU busy | GEMM | attention | other | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant in args.variants:
        calibration, mode, *full = variant.split(":")
        seq = asym = calibration == "defaults"
        layerwise.GRAM_ROWS = 1 << 30 if full else gram_rows
        shape = (2, args.windows, args.seqlen, config.hidden_size) if asym else (args.windows, args.seqlen, config.hidden_size)
        hidden = torch.randn(shape, device=device, generator=g) * 4
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, seconds = [], {}

        def one(hidden):
            seconds.clear()
            seconds.update({"calibration forward": 0.0, "solve": 0.0})
            passes = layerwise.Passes([kwargs], batch, seconds, mode)
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                passes.layer(layer, "model.layers.0.", hidden, stand_in, 0, True, seq, asym)
            sync()
            return time.perf_counter() - t0

        one(hidden)
        times = [one(hidden) for _ in range(args.repeat)]
        by_kind = defaultdict(float)
        if cuda:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                one(hidden)
            kernels = sorted(((e.self_device_time_total / 1e6, e.key) for e in prof.key_averages()), reverse=True)
            tops.append((variant, kernels[: args.top]))
            for t, name in kernels:
                by_kind[kind(name)] += t
        busy = sum(by_kind.values())
        print(f"| {variant} | {statistics.median(times):.2f} | {seconds['calibration forward']:.2f} | "
              f"{seconds['solve']:.2f} | {busy:.2f} | {by_kind['GEMM']:.2f} | {by_kind['attention']:.2f} | "
              f"{by_kind['other']:.2f} | {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.2f} |", flush=True)
        del hidden
        if cuda:
            torch.cuda.empty_cache()
    layerwise.GRAM_ROWS = gram_rows
    for variant, kernels in tops:
        print(f"\n{variant}: top kernels, GPU seconds per layer")
        for t, name in kernels:
            print(f"  {t:7.3f}  {name[:110]}")


if __name__ == "__main__":
    main()

"""One decoder layer's calibration (layerwise.Passes.layer, as `build` runs it) with edgequant/layerwise.py at a git
revision against the working tree's, interleaved in one process so that other jobs on the machine weigh on both
alike: seconds per layer (least and median of --repeat) per variant, and whether both give the same bits (every
Stats' S and cross, the layer's outputs).  The layer is MODEL's own, its inputs the embeddings of random tokens, the
solver a stand-in (every weight × (1 − 1e-3)).

    python scripts/compare_layer_passes.py ../shared/models/bench-a [--rev HEAD] [--windows 64] [--seqlen 512]
        [--repeat 3] [--variants plain asym seq seq+asym] [--device cpu] [--precision fp32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from edgequant import layerwise
from edgequant.model import SourceModel

VARIANTS = {"plain": (False, False), "asym": (False, True), "seq": (True, False), "seq+asym": (True, True)}


def layerwise_at(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "show",
                             f"{rev}:edgequant/layerwise.py"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"edgequant.layerwise_{rev}")
    module.__package__ = "edgequant"
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    exec(compile(source, f"{rev}:edgequant/layerwise.py", "exec"), module.__dict__)
    return module


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=layerwise.PRECISIONS)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    m = SourceModel(args.model)
    model = layerwise.skeleton(m, device)
    ids = torch.randint(3, m.hp.n_vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    kwargs = layerwise.layer_kwargs(model, ids.to(device), m.arch)
    inputs = layerwise.embed(m, m.checkpoint.load(f"{m.arch.layout.embed}.weight").to(device), ids.to(device))
    layer = model.get_submodule(m.arch.layout.layers)[args.layer]
    layerwise.materialize(layer, layerwise.load_weights(layer, m.arch.layer_prefix(args.layer), m), device)
    batch = max(1, min(8, layerwise.TOKENS_PER_BATCH // args.seqlen))
    impls = {args.rev: layerwise_at(args.rev), "working tree": layerwise}

    def one(impl, sequential, asymmetric):
        sums = {}

        def stand_in(_index, weights):
            sums.update({name: st for name, (_w, st) in weights.items()})
            return {name: w * (1 - 1e-3) for name, (w, _st) in weights.items()}

        hidden = torch.stack([inputs, inputs]) if asymmetric else inputs.clone()
        work = copy.deepcopy(layer)
        seconds = {"calibration forward": 0.0, "solve": 0.0}
        sync()
        t0 = time.perf_counter()
        kw = kwargs[args.layer]  # revisions before the adapters own the model take one layer's dict
        impl.Passes([kw] if hasattr(impl, "embed") else kw, batch, seconds, args.precision).layer(
            work, "", hidden, stand_in, 0, True, sequential, asymmetric)
        sync()
        return time.perf_counter() - t0, hidden, sums

    print(f"{m.dir.name} layer {args.layer}, {args.windows} windows x {args.seqlen} tokens, batch {batch}, "
          f"{args.device} {args.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    times = {(v, name): [] for v in args.variants for name in impls}
    same = {}
    for _ in range(args.repeat):
        for variant in args.variants:
            results = {name: one(impl, *VARIANTS[variant]) for name, impl in impls.items()}
            for name, (t, _h, _s) in results.items():
                times[variant, name].append(t)
            (_, h0, s0), (_, h1, s1) = results.values()
            same[variant] = same.get(variant, True) and torch.equal(h0, h1) and s0.keys() == s1.keys() and all(
                torch.equal(s0[n].s, s1[n].s) and (s0[n].cross is None or torch.equal(s0[n].cross, s1[n].cross))
                for n in s0)
    old, new = impls
    print(f"| variant | {old} s (least, median) | {new} s (least, median) | ratio (least) | same bits |")
    print("| --- | --- | --- | --- | --- |")
    for v in args.variants:
        a, b = times[v, old], times[v, new]
        print(f"| {v} | {min(a):.2f}, {statistics.median(a):.2f} | {min(b):.2f}, {statistics.median(b):.2f} | "
              f"{min(b) / min(a):.2f} | {'yes' if same[v] else 'NO'} |")
    sys.exit(0 if all(same.values()) else 1)


if __name__ == "__main__":
    main()

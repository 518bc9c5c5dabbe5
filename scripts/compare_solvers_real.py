"""The Triton and torch GPTQ solvers on a real model's linears (issue 6, acceptance 1): each linear's Hessian from
calibration text through the unquantized model (layerwise.run, one stream), then solve() with backend "torch" and
"triton" on the same device, for every --types and --refine.  Prints per type and refine: linears, codes that differ
(fraction of all codes), Ŵ bit for bit, the largest relative loss difference.  Exit status 1 if any code differs.

    python scripts/compare_solvers_real.py ../shared/models/bench-a --text ../shared/data/wikitext-2/wiki.train.first1MB.txt
        [--samples 64] [--seqlen 512] [--types Q4_K Q6_K Q3_K] [--refine 0 2] [--device cuda]

On the CPU the Triton backend needs TRITON_INTERPRET=1 (slow: use a small --samples and one type).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

from edgequant import layerwise
from edgequant.calibration import load_text, windows
from edgequant.convert.codecs import codec
from edgequant.gptq import solve
from edgequant.model import SourceModel
from edgequant.tokens import ReferenceTokenizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q3_K"])
    p.add_argument("--refine", nargs="+", type=int, default=[0, 2])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    m = SourceModel(args.model)
    ids = windows(ReferenceTokenizer(m.dir), load_text(args.text), args.samples, args.seqlen)
    totals = defaultdict(lambda: {"linears": 0, "codes": 0, "differ": 0, "w_hat_equal": 0, "loss_rel": 0.0})

    def on_layer(_index, weights):
        for hf_name, (w, stats) in weights.items():
            w = m.to_gguf(hf_name, w.detach().float()).contiguous()
            h = stats.hessian
            for name in args.types:
                c = codec(name)
                if w.shape[1] % c.block_size:
                    continue
                for refine in args.refine:
                    ref, tri = (solve(w, h, c, refine=refine, backend=b) for b in ("torch", "triton"))
                    t = totals[(name, refine)]
                    differ = c.codes(ref.blocks) != c.codes(tri.blocks)
                    t["linears"] += 1
                    t["codes"] += differ.size
                    t["differ"] += int(differ.sum())
                    t["w_hat_equal"] += bool(torch.equal(ref.w_hat, tri.w_hat))
                    t["loss_rel"] = max(t["loss_rel"], abs(tri.loss / ref.loss - 1))
        return {}

    layerwise.run(m, ids, on_layer, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{Path(m.dir).name}: {args.samples} windows x {args.seqlen} tokens, {name}, torch {torch.__version__}")
    print("| type | refine | linears | codes ≠ | Ŵ equal | max loss Δ |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, refine), t in sorted(totals.items()):
        print(f"| {name} | {refine} | {t['linears']} | {t['differ']} of {t['codes']} ({t['differ'] / t['codes']:.1e}) | "
              f"{t['w_hat_equal']}/{t['linears']} | {t['loss_rel']:.1e} |")
    return 1 if any(t["differ"] for t in totals.values()) or not totals else 0


if __name__ == "__main__":
    sys.exit(main())

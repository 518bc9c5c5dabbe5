#!/usr/bin/env python
"""Vector GPTQ's settings judged on a real model's own layers, in and out of sample (docs/BENCHMARKS.md, "Vector GPTQ:
act-order and sign moves").

Each linear of layers --layers (and the head) gets three Hessians from the unquantized model (layerwise.run):
calibration text (what the solver sees), WikiText-2 test and the held-out corpus text (what it must generalize to).
Every setting is solved on the calibration Hessian; its loss ½ tr(E H Eᵀ) on each Hessian is divided by that of the
importance-weighted fit (what llama-quantize --imatrix writes).  Prints per matrix and the geometric mean over the
matrices, per setting: calibration / wiki.test / held-out.

    python scripts/lattice_layer_losses.py ../shared/models/bench-a --types IQ2_S --samples 128
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from edgequant import layerwise
from edgequant.calibration import load_text, windows
from edgequant.convert.codecs import codec
from edgequant.gptq import solve, vector
from edgequant.gptq.fitter import fit
from edgequant.model import SourceModel
from edgequant.tokens import ReferenceTokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
TEXTS = {"calib": SHARED / "data/wikitext-2/wiki.train.first1MB.txt", "wiki.test": SHARED / "data/wikitext-2/wiki.test.raw",
         "heldout": SHARED / "data/corpus/heldout.txt"}


def hessians(model: SourceModel, text: Path, samples: int, layers: set[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    ids = windows(ReferenceTokenizer(model.dir), load_text(text), samples, 512)
    out = {}

    def on_layer(index, weights):
        for hf, (w, stats) in weights.items():
            if index in layers or "lm_head" in hf:
                out[hf] = (model.to_gguf(hf, w.detach().float()).contiguous(), stats.hessian.cpu())
        return {}

    layerwise.run(model, ids, on_layer, torch.device("cpu"))
    return out


def row_losses(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    E = (W - W_hat).double()
    return 0.5 * ((E @ H.double()) * E).sum(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--types", nargs="+", default=["IQ2_S"])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3, 6])
    p.add_argument("--act-order", nargs="+", default=["off", "auto"], choices=["off", "auto"])
    p.add_argument("--sign-moves", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    p.add_argument("--refine", nargs="+", type=int, default=[2, 4])
    p.add_argument("--damp", nargs="+", type=float, default=[0.01])
    args = p.parse_args()
    torch.set_num_threads(1)
    model = SourceModel(args.model)
    hs = {name: hessians(model, text, args.samples, set(args.layers)) for name, text in TEXTS.items()}
    settings = list(itertools.product(args.damp, args.act_order, args.sign_moves, args.refine))
    for t in args.types:
        c = codec(t)
        ratios: dict[tuple, list[dict[str, float]]] = {s: [] for s in settings}
        for name, (W, H) in hs["calib"].items():
            base = torch.from_numpy(c.dequantize(fit(c, W, H.diagonal() + 0.01 * H.diagonal().mean()).blocks()))
            b = {k: float(row_losses(W, base, h[name][1]).sum()) for k, h in hs.items()}
            line = []
            for damp, order, moves, refine in settings:
                vector.SIGN_MOVES = bool(moves)
                sols = [solve(W, H, c, damp=damp, act_order=a, refine=refine).w_hat for a in {"off": (False,), "auto": (False, True)}[order]]
                W_hat = sols[0]
                if len(sols) == 2:  # per row the lower calibration loss, as --act-order auto
                    pick = row_losses(W, sols[1], H) < row_losses(W, sols[0], H)
                    W_hat = torch.where(pick[:, None], sols[1], sols[0])
                r = {k: float(row_losses(W, W_hat, h[name][1]).sum()) / b[k] for k, h in hs.items()}
                ratios[(damp, order, moves, refine)].append(r)
                line.append(" ".join(f"{v:.3f}" for v in r.values()))
            print(f"{t} {name:40s} " + " | ".join(line), flush=True)
        print(f"\n{t}: loss / the importance-weighted fit's, geometric mean over {len(hs['calib'])} matrices")
        print("| damp | act-order | sign moves | refine | " + " | ".join(TEXTS) + " |")
        print("| --- | --- | --- | --- | " + " | ".join("---" for _ in TEXTS) + " |")
        for s, rs in ratios.items():
            g = [np.exp(np.mean([np.log(r[k]) for r in rs])) for k in TEXTS]
            print(f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} | " + " | ".join(f"{v:.4f}" for v in g) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Per-linear output error on held-out activations: GPTQ's GGUF vs another GGUF (e.g. the importance-weighted fit).

For every linear, ‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖² with X the layer inputs of held-out text through the unquantized model and
Ŵ dequantized from each GGUF (gguf-py).  Prints a table and writes an SVG bar chart of the ratio per tensor.

    python scripts/heldout_layer_error.py ../shared/models/bench-a gptq.gguf imatrix.gguf \
        --text ../shared/data/wikitext-2/wiki.test.raw --samples 32 --svg docs/heldout-layer-error.svg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from edgequant import layerwise
from edgequant.calibration import load_text, windows
from edgequant.model import SourceModel
from edgequant.tokens import ReferenceTokenizer


def dequantized(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            for t in r.tensors if len(t.shape) == 2}


def svg_bars(names: list[str], ratios: list[float], path: Path) -> None:
    w, bar, left = 900, 14, 230
    h = 40 + bar * len(names)
    top = max(1.0, max(ratios))
    rows = []
    for i, (n, r) in enumerate(zip(names, ratios)):
        y = 30 + i * bar
        color = "#2e7d32" if r < 1 else "#c62828"
        rows.append(f'<text x="{left - 6}" y="{y + 10}" font-size="10" text-anchor="end">{n}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{(w - left - 60) * r / top:.1f}" height="{bar - 4}" fill="{color}"/>'
                    f'<text x="{left + (w - left - 60) * r / top + 4:.1f}" y="{y + 10}" font-size="9">{r:.2f}</text>')
    x1 = left + (w - left - 60) / top
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
                    f'<text x="10" y="18" font-size="13">held-out output error, GPTQ / importance-weighted fit (below 1: GPTQ better)</text>'
                    + "".join(rows) + f'<line x1="{x1:.1f}" x2="{x1:.1f}" y1="26" y2="{h}" stroke="#555" stroke-dasharray="3"/></svg>')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("gguf_a", type=Path, help="GPTQ build")
    p.add_argument("gguf_b", type=Path, help="reference build (e.g. --method imatrix)")
    p.add_argument("--text", required=True)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--svg", type=Path)
    args = p.parse_args()
    m = SourceModel(args.model)
    a, b = dequantized(args.gguf_a), dequantized(args.gguf_b)
    names = {t.hf_name: t.gguf_name for t in m.tensors.values() if t.hf_name}
    ids = windows(ReferenceTokenizer(m.dir), load_text(args.text), args.samples, args.seqlen)
    rows = []

    def on_layer(_i, weights):
        for hf_name, (w, stats) in weights.items():
            name = names[hf_name]
            if name not in a or name not in b:
                continue
            w = torch.from_numpy(m.to_gguf(hf_name, w.detach().float().numpy()))
            s = stats.s.double()
            err = [float((((w - torch.from_numpy(x)).double() @ s) * (w - torch.from_numpy(x)).double()).sum()) for x in (a[name], b[name])]
            ref = float(((w.double() @ s) * w.double()).sum())
            rows.append((name, err[0] / ref, err[1] / ref))
        return {}

    layerwise.run(m, ids, on_layer, torch.device("cpu"))
    print(f"{'tensor':28} {'rel.err A':>10} {'rel.err B':>10} {'A/B':>6}")
    for name, ea, eb in rows:
        print(f"{name:28} {ea:10.3e} {eb:10.3e} {ea / eb:6.3f}")
    ratios = [ea / eb for _, ea, eb in rows]
    print(f"A better on {sum(r < 1 for r in ratios)}/{len(ratios)} tensors; median A/B {np.median(ratios):.3f}")
    if args.svg:
        svg_bars([n for n, _, _ in rows], ratios, args.svg)
    return 0 if all(r < 1 for r in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())

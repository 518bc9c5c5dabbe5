#!/usr/bin/env python
"""Where a quantized model's KL divergence comes from: the full-precision model with only some of its tensors replaced
by a GGUF's (dequantized exactly as llama.cpp stores them), one group at a time, and the KL divergence of its output
distribution from the full-precision model's, mean over the tokens of the first --windows chunks of --text.

Groups: all quantized tensors together (the whole file), each kind of tensor across all layers (attn_q … ffn_down,
token_embd/output), each layer's linears, and with --per-tensor every tensor alone.  The sum of the single-group KLs
against the whole file's says how additive the errors are (the assumption a per-tensor allocation makes).  With
--compare, a second GGUF of the same model in the same table, and the ratio per group: which tensors one method wins
and which it loses.

A build whose tensors compensate each other's errors (GPTQ with --sequential/--asymmetric aims each linear at the
full-precision output *given the quantized tensors before it*) is not measured fairly by one tensor at a time: alone,
a compensating tensor is off target.  --cumulative measures what such a build optimizes instead: the layers' linears
quantized in forward order, layers 0..i for each i, then the rest of the file; each step's increase is that layer's
share given everything before it quantized.

    python scripts/kld_attribution.py MODEL quant.gguf [--compare other.gguf] \\
        --text ../shared/data/wikitext-2/wiki.test.raw --windows 8 [--per-tensor] [--svg attribution.svg]

Float32 forwards of transformers' model on the CPU: one per group (38 for a 30-layer model) and file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from edgequant.calibration import load_text, windows
from edgequant.model import SourceModel
from edgequant.tokens import ReferenceTokenizer


def hf_weights(path: Path, m: SourceModel) -> dict[str, torch.Tensor]:
    """The GGUF's 2-D tensors dequantized and mapped back onto the checkpoint's names and layout.  The converter's
    transform is learned by sending a matrix of row numbers through it (llama's q/k rows are permuted); a transform
    that is not a row permutation is refused."""
    to_hf = {t.gguf_name: t.hf_name for t in m.tensors.values() if t.hf_name}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) != 2 or t.name not in to_hf:
            continue
        shape = [int(d) for d in reversed(t.shape)]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        rows = np.broadcast_to(np.arange(shape[0], dtype=np.float64)[:, None], shape).copy()
        moved = m.to_gguf(to_hf[t.name], rows)
        order = moved[:, 0].astype(np.int64)
        if not (moved == moved[:, :1]).all() or sorted(order) != list(range(shape[0])):
            sys.exit(f"{t.name}: the converter's transform is not a row permutation; not supported here")
        hf = np.empty_like(w)
        hf[order] = w
        out[to_hf[t.name]] = torch.from_numpy(hf)
    return out


def cumulative(names: list[str]) -> dict[tuple[str, str], list[str]]:
    """{("prefix", "layers 0-i"): the linears of layers 0..i}, then the whole file."""
    layer = {n: int(x[1]) for n in names if (x := re.match(r"model\.layers\.(\d+)\.", n))}
    out = {("prefix", f"layers 0-{i:02d}"): [n for n in layer if layer[n] <= i] for i in sorted(set(layer.values()))}
    out["file", "whole file"] = names
    return out


def groups(names: list[str], per_tensor: bool) -> dict[tuple[str, str], list[str]]:
    """{(category, name): checkpoint names}: the whole file, each kind across layers, each layer, each tensor."""
    def kind(n):
        return re.sub(r"^model\.layers\.\d+\.", "", n).removesuffix(".weight")

    out = {("file", "whole file"): names}
    for k in dict.fromkeys(kind(n) for n in names):
        out["kind", k] = [n for n in names if kind(n) == k]
    for n in names:
        if (layer := re.match(r"model\.layers\.(\d+)\.", n)):
            out.setdefault(("layer", f"layer {int(layer[1]):02d}"), []).append(n)
    if per_tensor:
        out.update({("tensor", n.removesuffix(".weight")): [n] for n in names})
    return out


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("gguf", type=Path)
    p.add_argument("--compare", type=Path, help="a second GGUF of the same model, in the same table")
    p.add_argument("--text", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--cumulative", action="store_true", help="layers 0..i quantized, for each i (see above)")
    p.add_argument("--json", type=Path, help="write the table here")
    p.add_argument("--svg", type=Path, help="bar chart of the per-layer and per-kind KLs")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    m = SourceModel(args.model)
    ids = windows(ReferenceTokenizer(m.dir), load_text(args.text), args.windows, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(m.dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    files = {"A": hf_weights(args.gguf, m)} | ({"B": hf_weights(args.compare, m)} if args.compare else {})
    names = [n for n in files["A"] if n in params]
    reference = [torch.log_softmax(model(ids[i : i + 1]).logits[0].float(), -1) for i in range(len(ids))]

    def kld() -> float:
        total = 0.0
        for i, ref in enumerate(reference):
            q = torch.log_softmax(model(ids[i : i + 1]).logits[0].float(), -1)
            total += float((ref.exp() * (ref - q)).sum(-1).mean())
        return total / len(reference)

    table, category = {}, {}
    chosen = cumulative(names) if args.cumulative else groups(names, args.per_tensor)
    for (cat, group), members in chosen.items():
        category[group] = cat
        row = {}
        for tag, weights in files.items():
            kept = {n: params[n].detach().clone() for n in members}
            for n in members:
                params[n].copy_(weights[n])
            t0 = time.perf_counter()
            row[tag] = kld()
            for n in members:
                params[n].copy_(kept[n])
            print(f"# {group} {tag}: {row[tag]:.6f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        table[group] = row
    print(f"\n{m.name}: KLD vs the full-precision model, {args.windows} x {args.seqlen} tokens of {Path(args.text).name}; "
          f"A = {args.gguf.name}" + (f", B = {args.compare.name}" if args.compare else ""))
    if args.cumulative:
        print("| quantized | KLD A | step A |" + (" KLD B | step B | A / B |" if args.compare else ""))
        print("| --- | --- | --- |" + (" --- | --- | --- |" if args.compare else ""))
        before = dict.fromkeys(files, 0.0)
        for group, row in table.items():
            cells = [f"{row[t]:.6f} | {row[t] - before[t]:+.6f}" for t in files]
            print(f"| {group} | " + " | ".join(cells) + (f" | {row['A'] / row['B']:.2f} |" if args.compare else " |"))
            before = row
    else:
        singles = [g for g in table if category[g] == "kind"]
        print("| tensors | KLD A | share of A's sum |" + (" KLD B | A / B |" if args.compare else ""))
        print("| --- | --- | --- |" + (" --- | --- |" if args.compare else ""))
        kinds_sum = {tag: sum(table[g][tag] for g in singles) for tag in files}
        for group, row in table.items():
            share = "" if group == "whole file" else f"{row['A'] / kinds_sum['A']:.1%}"  # of the kinds' sum
            extra = f" {row['B']:.6f} | {row['A'] / row['B']:.2f} |" if args.compare else ""
            print(f"| {group} | {row['A']:.6f} | {share} |" + extra)
        for tag in files:
            print(f"{tag}: sum over kinds {kinds_sum[tag]:.6f} = {kinds_sum[tag] / table['whole file'][tag]:.2f} x "
                  "the whole file's (1: additive)")
    if args.json:
        args.json.write_text(json.dumps({"model": m.name, "text": args.text, "windows": args.windows,
                                         "seqlen": args.seqlen, "files": {k: str(v) for k, v in
                                         zip(files, [args.gguf, args.compare])}, "kld": table, "category": category}, indent=1))
    if args.svg:
        svg({g: r for g, r in table.items() if category[g] in ("kind", "layer", "prefix")}, list(files), args.svg,
            f"{m.name}: output KLD with only these tensors quantized")
    return 0


def svg(table: dict[str, dict[str, float]], tags: list[str], path: Path, title: str) -> None:
    rows = list(table)
    w, bar, left = 900, 8 * len(tags) + 6, 150
    top = max(table[g][t] for g in rows for t in tags)
    colors = {"A": "#1565c0", "B": "#ef6c00"}
    out = [f'<text x="10" y="18" font-size="13">{title} (blue A, orange B)</text>']
    for i, g in enumerate(rows):
        y = 30 + i * bar
        out.append(f'<text x="{left - 6}" y="{y + bar - 6}" font-size="10" text-anchor="end">{g}</text>')
        for j, t in enumerate(tags):
            v = table[g][t]
            out.append(f'<rect x="{left}" y="{y + 8 * j}" width="{(w - left - 70) * v / top:.1f}" height="7" '
                       f'fill="{colors[t]}"/><text x="{left + (w - left - 70) * v / top + 3:.1f}" y="{y + 8 * j + 7}" '
                       f'font-size="8">{v:.4f}</text>')
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{40 + bar * len(rows)}" '
                    f'font-family="sans-serif">' + "".join(out) + "</svg>")


if __name__ == "__main__":
    sys.exit(main())

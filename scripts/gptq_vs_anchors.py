#!/usr/bin/env python
"""GPTQ builds of bench-a vs llama.cpp's own pipeline (../shared/anchors/bench-a.tsv), with edgequant's own commands.

For each ftype: `edgequant build --method gptq` (calibration: WikiText-2 train, 256 windows of 512 — the tokens
llama-imatrix saw), then `edgequant eval --ctx 512 --chunks 300` on wiki.test.raw against the F16 GGUF's stored base,
and a table against the anchor row with the imatrix (same ftype; sizes must agree within 1 %).

    python scripts/gptq_vs_anchors.py --out /tmp/gptq-bench [--ftypes Q4_K_M ...] [--device cuda] [--text heldout.txt]

GGUFs already in --out are reused (built elsewhere, e.g. on a GPU, with the same command line).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
EDGEQUANT = [sys.executable, "-m", "edgequant.cli"]


def sh(cmd: list[str], capture: bool = False) -> str:
    r = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return r.stdout if capture else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/bench-a"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ftypes", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
    p.add_argument("--calib", default=str(SHARED / "data/wikitext-2/wiki.train.first1MB.txt"))
    p.add_argument("--text", default=str(SHARED / "data/wikitext-2/wiki.test.raw"))
    p.add_argument("--chunks", type=int, default=300)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / "a-F16.gguf"
    base = args.out / f"base-{Path(args.text).stem}.bin"
    if not f16.exists():
        sh(EDGEQUANT + ["build", args.model, "--target", "F16", "-o", str(f16), "--quiet"])
    if not base.exists():
        sh(EDGEQUANT + ["eval", str(f16), "--text", args.text, "--ctx", "512", "--chunks", str(args.chunks), "--save-base", str(base), "--json"])
    anchors = {(r["type"], r["imatrix"]): r for r in csv.DictReader(open(SHARED / "anchors/bench-a.tsv"), delimiter="\t")}
    print(f"{'ftype':7} {'bytes':>9} {'PPL':>8} {'KLD':>9} {'same top':>8} | {'imatrix: bytes':>14} {'PPL':>8} {'KLD':>9} | KLD ratio")
    for ftype in args.ftypes:
        gguf = args.out / f"a-{ftype}.gguf"
        if not gguf.exists():
            sh(EDGEQUANT + ["build", args.model, "--target", ftype, "--calib", args.calib, "--calib-samples", "256",
                            "--calib-seqlen", "512", "--device", args.device, "--verify", "-o", str(gguf), "--quiet"])
        r = json.loads(sh(EDGEQUANT + ["eval", str(gguf), "--text", args.text, "--base", str(base), "--json"], capture=True))
        a = anchors[(ftype, "yes")]
        size = gguf.stat().st_size
        print(f"{ftype:7} {size:9d} {r['ppl']:8.4f} {r['kld']['mean']:9.6f} {r['same_top_pct']:7.3f}% | {int(a['bytes']):14d} "
              f"{float(a['ppl']):8.4f} {float(a['kld']):9.6f} | {r['kld']['mean'] / float(a['kld']):.3f}"
              + ("" if abs(size / int(a["bytes"]) - 1) <= 0.01 else "  (size differs > 1%)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

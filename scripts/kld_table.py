#!/usr/bin/env python
"""Build variants of one model side by side and score each with the anchors' method: KLD vs the F16 GGUF (ctx 512,
300 chunks) on wiki.test.raw and on the held-out corpus text, through `edgequant eval` (llama.cpp; reproduces
llama-perplexity, docs/BENCHMARKS.md); with --llama-tools, llama.cpp's own pipeline in the same measurement
(llama-imatrix on the F16, then llama-quantize with it, and without it if --llama-plain) as the rows "llama.cpp+imatrix"
and "llama.cpp".

    python scripts/kld_table.py --out /tmp/calib --ftypes Q4_K_M Q3_K_M \\
        --variant "wiki=--calib ../shared/data/wikitext-2/wiki.train.first1MB.txt" --variant "default=" \\
        --variant "imatrix-wiki=--method imatrix --calib ../shared/data/wikitext-2/wiki.train.first1MB.txt"
    python scripts/kld_table.py --model /work/smollm2 --anchors ../shared/anchors/smollm2.tsv --out /tmp/smol \\
        --chunks 100 --llama-tools .cache/llama-tools/bin --imatrix-chunks 128 --variant "default="

In a variant's options "{ftype}" stands for the ftype (e.g. "--target auto:{ftype}": a size-budgeted build of that
ftype's bytes).  Every variant is built with `--json` (its summary, sampling seconds included, lands next to the GGUF) and evaluated on
every text; GGUFs already in --out are reused, and so are their evaluations (TAG-FTYPE.TEXT.eval.json).  Prints one JSON line per (variant, ftype, text) and, at the end, a
Markdown table: KLD per text, and the ratio to llama.cpp+imatrix's (this run's, else the --anchors file's on wiki.test).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
EDGEQUANT = [sys.executable, "-m", "edgequant.cli"]
TEXTS = {"wiki.test": SHARED / "data/wikitext-2/wiki.test.raw", "heldout": SHARED / "data/corpus/heldout.txt"}


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/bench-a"))
    p.add_argument("--anchors", default=str(SHARED / "anchors/bench-a.tsv"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ftypes", nargs="+", default=["Q4_K_M", "Q3_K_M"])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=OPTIONS")
    p.add_argument("--chunks", type=int, default=300)
    p.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    p.add_argument("--llama-tools", type=Path, help="folder with llama-imatrix and llama-quantize (scripts/build_llama_tools.sh)")
    p.add_argument("--imatrix-text", default=str(SHARED / "data/wikitext-2/wiki.train.first1MB.txt"))
    p.add_argument("--imatrix-chunks", type=int, default=256, help="llama-imatrix chunks of 512 (the anchors': 256 bench-a, 128 SmolLM2)")
    p.add_argument("--llama-plain", action="store_true", help="also llama-quantize without the imatrix")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / "F16.gguf"
    if not f16.exists():
        run(EDGEQUANT + ["build", args.model, "--target", "F16", "-o", str(f16), "--quiet"])
    bases = {}
    for name in args.texts:
        bases[name] = args.out / f"base-{name}.bin"
        if not bases[name].exists():
            run(EDGEQUANT + ["eval", str(f16), "--text", str(TEXTS[name]), "--ctx", "512", "--chunks", str(args.chunks),
                             "--save-base", str(bases[name]), "--json"])
    rows = []
    variants = list(args.variant)
    if args.llama_tools:
        imatrix = args.out / "llama-imatrix.gguf"
        if not imatrix.exists():
            run([str(args.llama_tools / "llama-imatrix"), "-m", str(f16), "-f", args.imatrix_text, "-c", "512",
                 "--chunks", str(args.imatrix_chunks), "-o", str(imatrix)])
        for ftype in args.ftypes:
            for tag, extra in (("llama.cpp", []), ("llama.cpp+imatrix", ["--imatrix", str(imatrix)]))[not args.llama_plain:]:
                gguf = args.out / f"{tag}-{ftype}.gguf"
                if not gguf.exists():
                    run([str(args.llama_tools / "llama-quantize"), *extra, str(f16), str(gguf), ftype])
        variants = ["llama.cpp=", "llama.cpp+imatrix=", *variants][not args.llama_plain:]
    for ftype in args.ftypes:
        for spec in variants:
            tag, _, options = spec.partition("=")
            gguf = args.out / f"{tag}-{ftype}.gguf"
            summary = args.out / f"{tag}-{ftype}.json"
            if not gguf.exists():
                t0 = time.perf_counter()
                summary.write_text(run(EDGEQUANT + ["build", args.model, "--target", ftype, *shlex.split(options.replace("{ftype}", ftype)),
                                                    "--json", "-o", str(gguf)]))
                print(f"# built {gguf.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            s = json.loads(summary.read_text()) if summary.exists() else {}
            for name in args.texts:
                cached = args.out / f"{tag}-{ftype}.{name}.eval.json"  # kept while newer than the GGUF
                if not cached.exists() or cached.stat().st_mtime < gguf.stat().st_mtime:
                    cached.write_text(run(EDGEQUANT + ["eval", str(gguf), "--text", str(TEXTS[name]), "--base",
                                                       str(bases[name]), "--json"]))
                r = json.loads(cached.read_text())
                row = {"variant": tag, "options": options, "ftype": ftype, "text": name, "bytes": gguf.stat().st_size,
                       "ppl": r["ppl"], "kld": r["kld"]["mean"], "same_top": r["same_top_pct"],
                       "seconds": s.get("seconds"), "calibration": s.get("calibration")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    anchors = {(r["type"], r["imatrix"]): r for r in csv.DictReader(open(args.anchors), delimiter="\t")} if Path(args.anchors).exists() else {}
    print("\n| ftype | variant | bytes | " + " | ".join(f"KLD {t} (PPL) | × imatrix" for t in args.texts) + " |")
    print("| --- " * (3 + 2 * len(args.texts)) + "|")
    for ftype in args.ftypes:
        for spec in variants:
            tag = spec.partition("=")[0]
            got = {r["text"]: r for r in rows if r["variant"] == tag and r["ftype"] == ftype}
            cells = []
            for t in args.texts:
                ref = next((r["kld"] for r in rows if r["variant"] == "llama.cpp+imatrix" and r["ftype"] == ftype
                            and r["text"] == t), None)
                if ref is None and t == "wiki.test" and (ftype, "yes") in anchors:
                    ref = float(anchors[ftype, "yes"]["kld"])  # measured elsewhere: the anchors file's
                cells.append(f"{got[t]['kld']:.6f} ({got[t]['ppl']:.3f}) | " + (f"{got[t]['kld'] / ref:.2f}×" if ref else "—"))
            print(f"| {ftype} | {tag} | {next(iter(got.values()))['bytes']:,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

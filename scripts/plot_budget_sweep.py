"""The size/quality frontier of a budget sweep, measured: KLD vs F16 against bits per weight, as a table and an SVG.

Reads the results folder of `scripts/gpu_bench_a_kld.sh` (its `res/`: build-NAME.json from `edgequant build --json`,
kld-NAME-TEXT.log from `llama-perplexity --kl-divergence`) where the builds are named as in docs/BENCHMARKS.md, "Any
file size": i-FTYPE (llama.cpp + imatrix), im-FTYPE / ia-FTYPE (our imatrix method, recipe / `--target auto:FTYPE`),
g-FTYPE / ga-FTYPE (GPTQ, recipe / auto), and the sweep's b<BPW> (GPTQ, `--bpw BPW`).

    python scripts/plot_budget_sweep.py RES_DIR --text wiki.test.raw --svg docs/budget-sweep-bench-a.svg \
        --tsv docs/budget-sweep-bench-a.tsv

`--with TSV` adds the points of an earlier run's --tsv (e.g. the K-quant frontier beside an i-quant run's; the
points of each run are what that run measured: llama.cpp's imatrix is recomputed per run), `--only g i` keeps the
listed series (the frontier: GPTQ and llama.cpp + imatrix fixed recipes).

Bits per weight are the file's: 8 × file bytes / parameters (llama.cpp's files are ours ± 256 bytes of metadata, so
the i- builds are placed at the im- builds' size).  The predicted KLD is the allocation's own (after GPTQ for GPTQ
builds): the sweep's line shows how well the allocator's estimate tracks what llama.cpp measures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

SERIES = (  # prefix, label, colour, marker
    ("i", "llama.cpp + imatrix, fixed recipe", "#888888", "square"),
    ("im", "edgequant imatrix method, fixed recipe", "#b3b3e6", "square"),
    ("ia", "edgequant imatrix method, --target auto:FTYPE", "#6b6bd6", "circle"),
    ("g", "edgequant GPTQ, fixed recipe", "#f2a07b", "square"),
    ("ga", "edgequant GPTQ, --target auto:FTYPE", "#e4572e", "circle"),
    ("b", "edgequant GPTQ, --bpw (the sweep)", "#1f5fbf", "line"),
)


def kld(res: Path, name: str, text: str) -> float | None:
    log = res / f"kld-{name}-{text}.log"
    if not log.exists():
        return None
    m = re.search(r"Mean\s+KLD:\s+([\d.]+)", log.read_text(errors="replace"))
    return float(m[1]) if m else None


def rows(res: Path, text: str) -> list[dict]:
    builds = {p.name[len("build-"):-len(".json")]: json.loads(p.read_text()) for p in res.glob("build-*.json")}
    out = []
    names = set(builds) | {p.name[len("kld-"):-len(f"-{text}.log")] for p in res.glob(f"kld-*-{text}.log")}
    for name in sorted(names):
        prefix, _, ftype = name.partition("-")
        if not ftype and name.startswith("b"):
            prefix, ftype = "b", ""
        build = builds.get(name) or builds.get(f"im-{ftype}") or builds.get(f"g-{ftype}")  # llama.cpp's: ours
        value = kld(res, name, text)
        if build is None or value is None:
            continue
        a = builds.get(name, {}).get("allocation") or {}
        predicted = a.get("predicted_kld_after_gptq", a.get("predicted_kld"))
        out.append({"name": name, "series": prefix, "ftype": ftype, "file_bytes": build["file_bytes"],
                    "bpw": 8 * build["file_bytes"] / build["params"], "kld": value, "predicted": predicted})
    return out


def read_tsv(path: Path) -> list[dict]:
    """The points of an earlier --tsv."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        name, size, bpw, value, predicted = (line.split("\t") + [""])[:5]
        prefix, _, ftype = name.partition("-")
        if not ftype and name.startswith("b"):
            prefix = "b"
        out.append({"name": name, "series": prefix, "ftype": ftype, "file_bytes": int(size), "bpw": float(bpw),
                    "kld": float(value), "predicted": float(predicted) if predicted else None})
    return out


def svg(points: list[dict], title: str) -> str:
    left, top, w, h = 70, 30, 720, 380
    x0 = math.floor(min(p["bpw"] for p in points) * 2) / 2
    x1 = math.ceil(max(p["bpw"] for p in points) * 2) / 2
    lo = math.floor(math.log10(min(min(p["kld"], p["predicted"] or 1) for p in points)))
    hi = math.ceil(math.log10(max(p["kld"] for p in points)))

    def x(v: float) -> float:
        return left + w * (v - x0) / (x1 - x0)

    def y(v: float) -> float:
        return top + h * (hi - math.log10(v)) / (hi - lo)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{left + w + 330}' height='{top + h + 50}' "
           f"font-family='system-ui, sans-serif' font-size='11'>",
           f"<text x='{left}' y='16' font-size='13'>{title}</text>"]
    for e in range(lo, hi + 1):
        for m in (1, 2, 5):
            if 10.0**e * m <= 10.0**hi:
                out.append(f"<line x1='{left}' x2='{left + w}' y1='{y(m * 10.0**e):.1f}' y2='{y(m * 10.0**e):.1f}' "
                           f"stroke='{'#ddd' if m == 1 else '#f2f2f2'}'/>")
        out.append(f"<text x='{left - 6}' y='{y(10.0**e) + 4:.1f}' text-anchor='end'>1e{e}</text>")
    b = x0
    while b <= x1:
        out.append(f"<line x1='{x(b):.1f}' x2='{x(b):.1f}' y1='{top}' y2='{top + h}' stroke='#f2f2f2'/>"
                   f"<text x='{x(b):.1f}' y='{top + h + 16}' text-anchor='middle'>{b:g}</text>")
        b += 0.5
    out.append(f"<text x='{left + w / 2}' y='{top + h + 36}' text-anchor='middle'>bits per weight (file bytes)</text>"
               f"<text x='16' y='{top + h / 2}' transform='rotate(-90 16 {top + h / 2})' text-anchor='middle'>"
               f"KLD vs F16 (log)</text>")
    sweep = sorted((p for p in points if p["series"] == "b"), key=lambda p: p["bpw"])
    if sweep:
        out.append("<polyline fill='none' stroke='#1f5fbf' stroke-width='2' points='"
                   + " ".join(f"{x(p['bpw']):.1f},{y(p['kld']):.1f}" for p in sweep) + "'/>")
        out.append("<polyline fill='none' stroke='#1f5fbf' stroke-dasharray='4 3' points='"
                   + " ".join(f"{x(p['bpw']):.1f},{y(p['predicted']):.1f}" for p in sweep if p["predicted"]) + "'/>")
    for prefix, _label, colour, marker in SERIES:
        for p in points:
            if p["series"] != prefix:
                continue
            cx, cy = x(p["bpw"]), y(p["kld"])
            tip = f"<title>{p['name']}: {p['bpw']:.3f} bits/weight, KLD {p['kld']:.6f}</title>"
            if marker == "square":
                out.append(f"<g>{tip}<rect x='{cx - 4:.1f}' y='{cy - 4:.1f}' width='8' height='8' fill='{colour}'/></g>")
            else:
                out.append(f"<g>{tip}<circle cx='{cx:.1f}' cy='{cy:.1f}' r='{4 if marker == 'line' else 5}' "
                           f"fill='{colour}'/></g>")
            if prefix == "i":
                out.append(f"<text x='{cx:.1f}' y='{cy - 8:.1f}' text-anchor='middle' fill='#555'>{p['ftype']}</text>")
    lx = left + w + 20
    shown = [s for s in SERIES if any(p["series"] == s[0] for p in points)]
    for i, (prefix, label, colour, marker) in enumerate(shown):
        ly = top + 10 + 18 * i
        shape = (f"<rect x='{lx}' y='{ly - 8}' width='8' height='8' fill='{colour}'/>" if marker == "square" else
                 f"<circle cx='{lx + 4}' cy='{ly - 4}' r='4' fill='{colour}'/>")
        out.append(f"{shape}<text x='{lx + 14}' y='{ly}'>{label}</text>")
    ly = top + 10 + 18 * len(shown)
    if sweep:
        out.append(f"<line x1='{lx}' x2='{lx + 10}' y1='{ly - 4}' y2='{ly - 4}' stroke='#1f5fbf' stroke-dasharray='4 3'/>"
                   f"<text x='{lx + 14}' y='{ly}'>the sweep, as the allocator predicted it</text>")
    out.append("</svg>")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("res", type=Path, help="the res/ folder of scripts/gpu_bench_a_kld.sh")
    ap.add_argument("--text", default="wiki.test.raw", help="which evaluation text (its name in the logs)")
    ap.add_argument("--svg", type=Path)
    ap.add_argument("--tsv", type=Path)
    ap.add_argument("--title", default="bench-a: KLD vs F16 against file size (wiki.test.raw, 300 × 512)")
    ap.add_argument("--with", dest="earlier", type=Path, nargs="*", default=[], help="earlier runs' --tsv files")
    ap.add_argument("--only", nargs="*", help="the series to keep (name prefixes: i im ia g ga b)")
    args = ap.parse_args()
    points = rows(args.res, args.text) + [p for t in args.earlier for p in read_tsv(t)]
    if args.only:
        points = [p for p in points if p["series"] in args.only]
    if not points:
        print(f"plot_budget_sweep: no builds with a KLD on {args.text} in {args.res}", file=sys.stderr)
        return 2
    lines = ["name\tfile_bytes\tbpw\tkld\tpredicted"] + [
        f"{p['name']}\t{p['file_bytes']}\t{p['bpw']:.4f}\t{p['kld']:.6f}\t"
        f"{'' if p['predicted'] is None else format(p['predicted'], '.6f')}" for p in sorted(points, key=lambda p: p["bpw"])]
    print("\n".join(lines))
    if args.tsv:
        args.tsv.write_text("\n".join(lines) + "\n")
    if args.svg:
        args.svg.write_text(svg(points, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())

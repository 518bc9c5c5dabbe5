"""`edgequant parity MODEL GGUF --text FILE`: llama.cpp against torch on the GGUF's own weights, with a verdict.

Perplexity and KL divergence (against MODEL in torch fp32) of the GGUF's weights in torch, of the GGUF in llama.cpp,
and of an F16 GGUF of MODEL in llama.cpp; the llama.cpp-vs-torch gap on the GGUF must stay within twice the noise
floor of llama.cpp's arithmetic.  The definitions are in edgequant.runners.parity.  Exit 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "parity", help="does llama.cpp compute what the GGUF's weights say? (vs torch, with a noise floor)",
        description="Perplexity and KL divergence vs MODEL (torch fp32) of: the GGUF's dequantized weights in torch, "
                    "the GGUF in llama.cpp (CPU), an F16 GGUF of MODEL in llama.cpp, and the GGUF's weights in torch "
                    "with llama.cpp's activation rounding. Passes when the llama.cpp-vs-torch gap on the GGUF is "
                    "within twice the noise floor and every tensor is close to MODEL's. Exit 0 pass, 1 fail.")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory (or hub id) the GGUF was built from")
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("--text", required=True, metavar="FILE", help="text to score (e.g. wikitext-2 wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=512, help="window size in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score only the first N windows")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads (default: all available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgequant.commands.eval import _read_text
    from edgequant.settings import CalibOptions
    from edgequant.progress import Progress
    from edgequant.runners.parity import parity

    text = _read_text(args.text)
    device = CalibOptions(device=args.device).torch_device()
    t0 = time.perf_counter()
    with Progress(quiet=args.json) as progress:
        report = parity(args.model, args.gguf, text, n_ctx=args.ctx, n_chunks=args.chunks, device=device,
                        n_threads=args.threads, progress=progress)
    out = {"model": str(args.model), "gguf": str(args.gguf), "text": str(args.text), "device": str(device),
           **report.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        _print_table(out)
    if not out["pass"]:
        failed = [f"{k} {c['value']:.3g} > {c['limit']:.3g}" for k, c in out["checks"].items() if not c["ok"]]
        print(f"edgequant parity: FAIL: {'; '.join(failed)}", file=sys.stderr)
    return 0 if out["pass"] else 1


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(r["comparisons"].values()))
    labels = {"source": "(a)", "torch": "(b)"}
    t = Table(title=f"{r['gguf']} vs {r['model']}", title_justify="left",
              caption=f"{r['text']}: {first['n_chunks']} chunks × {first['ctx']} ctx, {first['n_tokens']} tokens "
                      f"scored; torch on {r['device']}; {r['seconds']:.0f} s")
    for col in ("", "PPL", "vs", "mean KLD", "KLD p99", "same top %"):
        t.add_column(col, justify="left" if col in ("", "vs") else "right")
    for c in r["comparisons"].values():
        t.add_row(c["label"], f"{c['ppl']:.4f} ± {c['ppl_err']:.4f}", labels[c["base"]], f"{c['kld']['mean']:.3g}",
                  f"{c['kld']['p99']:.3g}", f"{c['same_top_pct']:.2f}")
    Console().print(t)

    v = Table(title="verdict", title_justify="left")
    for col in ("check", "value", "limit", ""):
        v.add_column(col, justify="left" if col in ("check", "") else "right")
    what = {"ppl": "|PPL(c) − PPL(b)| / PPL(b)", "kld": "KL((b) ‖ (c))",
            "source": f"worst ‖Ŵ − W‖/‖W‖ ({r['worst_tensor']})"}
    for k, c in r["checks"].items():
        verdict = "[green]ok[/green]" if c["ok"] else "[red]FAIL[/red]"
        v.add_row(what[k], f"{c['value']:.3g}", f"{c['limit']:.3g}", verdict)
    v.caption = (f"noise floor: PPL {r['noise_floor']['ppl']:.3g}, KLD {r['noise_floor']['kld']:.3g} "
                 "((a)↔(d) + (b)↔(e)); limits: 2× floor, at least the minimum")
    Console().print(v)

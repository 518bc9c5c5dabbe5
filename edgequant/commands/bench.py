"""`edgequant bench`: prompt-processing and generation tokens/s of a GGUF, like llama-bench, plus peak memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgequant.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="prompt and generation speed of a GGUF (like llama-bench)",
        description="Tokens/s for processing a prompt of -p tokens and generating -n tokens, mean ± std over -r "
                    "reps, and peak RSS. With --vs, both GGUFs are measured rep by rep in alternation and compared.")
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("--vs", metavar="OTHER", help="a second GGUF to measure alongside and compare with")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0: skip; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0: skip; default 128)")
    p.add_argument("-r", "--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--gpu-layers", type=int, default=-1, help="layers to offload when the build supports it "
                                                              "(default -1: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        raise UserError("-p and -n must be >= 0, and not both 0")
    if args.reps < 1:
        raise UserError("-r must be >= 1")
    from edgequant.runners import bench, llama

    paths = [args.gguf] + ([args.vs] if args.vs else [])
    for path in paths:  # fail fast, with a clear message, before starting workers
        llama.open_gguf_header(path)
    threads = args.threads or llama.default_threads()
    results = bench.bench(paths, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps,
                          n_threads=threads, n_gpu_layers=args.gpu_layers)
    ratios = None
    if args.vs:
        a, b = results
        ratios = {
            "pp": a.pp and a.pp.mean / b.pp.mean, "tg": a.tg and a.tg.mean / b.tg.mean,
            "peak_rss": a.peak_rss_bytes / b.peak_rss_bytes,
            "file_bytes": a.model["file_bytes"] / b.model["file_bytes"],
        }
    report = {"models": [r.as_dict() for r in results], "ratios": ratios, "reps": args.reps, "threads": threads,
              "gpu_layers": args.gpu_layers, "backend": str(llama.backend())}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report, args)
    return 0


def _print_table(report: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 1 << 20
    t = Table(title=f"{report['reps']} reps, {report['threads']} threads, {report['backend']}", title_justify="left")
    for col in ("model", "type", "size MiB", f"pp{args.n_prompt} t/s", f"tg{args.n_gen} t/s", "peak RSS MiB"):
        t.add_column(col, justify="left" if col in ("model", "type") else "right")
    rate = lambda r: "-" if r is None else f"{r['mean']:.2f} ± {r['std']:.2f}"  # noqa: E731
    for m in report["models"]:
        info = m["model"]
        t.add_row(Path(info["path"]).name, info["desc"], f"{info['file_bytes'] / mib:.1f}", rate(m["pp"]), rate(m["tg"]),
                  f"{m['peak_rss_bytes'] / mib:.0f}")
    if (r := report["ratios"]) is not None:
        ratio = lambda x: "-" if x is None else f"{x:.3f}×"  # noqa: E731
        t.add_row("ratio (first / --vs)", "", ratio(r["file_bytes"]), ratio(r["pp"]), ratio(r["tg"]),
                  ratio(r["peak_rss"]), style="bold")
    Console().print(t)

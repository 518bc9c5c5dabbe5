"""`edgequant eval`: perplexity of a GGUF on a text, and KL divergence against a base, exactly as llama-perplexity."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from contextlib import ExitStack

from edgequant.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity (and KL divergence vs a base) of a GGUF, as llama-perplexity",
        description="Perplexity of GGUF on a text with llama-perplexity's protocol (windows of --ctx tokens, second "
                    "half scored). With --base: KL divergence, same-top-token rate and PPL ratio against a base "
                    "GGUF (evaluated in the same run) or a base file from --save-base / llama-perplexity "
                    "--kl-divergence-base.")
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("--text", required=True, metavar="FILE", help="text to score (e.g. wikitext-2 wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=None, help="window size in tokens (default: the base file's, else 512)")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score only the first N windows")
    p.add_argument("--base", metavar="BASE", help="base GGUF (e.g. the F16) or stored base log-prob file")
    p.add_argument("--save-base", metavar="FILE", help="store this model's log-probs as a base for later evals")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--gpu-layers", type=int, default=-1, help="layers to offload when the build supports it "
                                                              "(default -1: all)")
    p.set_defaults(func=run)


def _read_text(path: str) -> bytes:
    try:
        text = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return text[:-1] if text.endswith(b"\n") else text  # llama.cpp's -f drops one trailing newline


def _base_kind(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise UserError(f"cannot read base {path}: {e.strerror}") from None
    if magic.startswith(b"GGUF"):
        return "gguf"
    from edgequant.runners.basefile import MAGIC
    if magic == MAGIC:
        return "file"
    raise UserError(f"{path}: --base must be a GGUF or a base file from --save-base")


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=not enabled)
    return progress, progress.add_task("chunks", total=total)


def run(args: argparse.Namespace) -> int:
    from edgequant.runners import basefile, llama, perplexity

    if args.base and args.save_base and pathlib.Path(args.save_base).resolve() == pathlib.Path(args.base).resolve():
        raise UserError("--save-base would overwrite --base")
    text = _read_text(args.text)
    base_kind = _base_kind(args.base) if args.base else None
    with ExitStack() as stack:
        stored = basefile.StoredBase(args.base) if base_kind == "file" else None
        n_ctx = args.ctx or (stored.n_ctx if stored else 512)
        opts = dict(n_ctx=n_ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
        model = stack.enter_context(llama.LlamaCppModel(args.gguf, **opts))
        tokens = model.tokenize(text)
        n_chunks = args.chunks or (stored.n_chunk if stored else None)
        windows = perplexity.make_windows(tokens, n_ctx, n_chunks, model.bos if model.add_bos else None)
        base = stored
        if stored:
            stored.check(windows, model.n_vocab)
        elif base_kind == "gguf":
            base_model = stack.enter_context(llama.LlamaCppModel(args.base, **opts))
            if base_model.n_vocab != model.n_vocab or (base_model.tokenize(text) != tokens).any():
                raise UserError(f"{args.base} tokenizes the text differently from {args.gguf}: not a base for it")
            base = perplexity.ModelBase(base_model.window_logits, windows)
        writer = basefile.BaseWriter(args.save_base, windows, model.n_vocab) if args.save_base else None
        if writer:
            stack.callback(writer.close)

        progress, task = _progress(sys.stderr.isatty() and not args.json, windows.n_chunk)

        def on_chunk(i, logp):
            if writer:
                writer(i, logp)
            progress.advance(task)

        t0 = time.perf_counter()
        with progress:
            result = perplexity.evaluate(model.window_logits, windows, base=base, on_chunk=on_chunk)
        seconds = time.perf_counter() - t0
        report = {"model": str(args.gguf), "text": str(args.text), **result.as_dict(), "base": args.base,
                  "model_info": model.describe(), "threads": model.n_threads, "gpu_layers": args.gpu_layers,
                  "backend": str(llama.backend()), "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return 0


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{r['model']}  ({r['model_info']['desc']}, {r['model_info']['bits_per_weight']:.2f} bpw)",
              show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("text", f"{r['text']}: {r['n_chunks']} chunks × {r['ctx']} ctx, {r['n_tokens']} tokens scored")
    t.add_row("PPL", f"{r['ppl']:.4f} ± {r['ppl_err']:.4f}")
    if r["base"]:
        kld = r["kld"]
        t.add_row("base", r["base"])
        t.add_row("PPL(base)", f"{r['base_ppl']:.4f} ± {r['base_ppl_err']:.4f}")
        t.add_row("ln(PPL/PPL(base))", f"{r['ln_ppl_ratio']:.5f} ± {r['ln_ppl_ratio_err']:.5f}")
        t.add_row("PPL/PPL(base)", f"{r['ppl_ratio']:.5f} ± {r['ppl_ratio_err']:.5f}")
        t.add_row("mean KLD", f"{kld['mean']:.6f} ± {kld['err']:.6f}")
        t.add_row("KLD 99.9% / 99% / 95%", f"{kld['p99.9']:.5f} / {kld['p99']:.5f} / {kld['p95']:.5f}")
        t.add_row("KLD median / max", f"{kld['median']:.6f} / {kld['max']:.5f}")
        t.add_row("same top token", f"{r['same_top_pct']:.3f} ± {r['same_top_pct_err']:.3f} %")
        t.add_row("RMS Δp", f"{r['rms_dp_pct']:.3f} ± {r['rms_dp_pct_err']:.3f} %")
    t.add_row("time", f"{r['seconds']:.1f} s, {r['threads']} threads, {r['backend']}")
    Console().print(t)

"""`edgequant inspect FILE.gguf`: per-tensor name, shape, type, bytes; totals, bits per weight; metadata."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..convert.gguf_in import open_gguf, scalar_fields

CELL_CHARS = 200  # a table cell shows this much of a value (chat templates run to kilobytes; --json has them whole)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list a GGUF's tensors, types and metadata")
    p.add_argument("gguf", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reader = open_gguf(args.gguf)
    tensors = [
        {"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name, "bytes": int(t.n_bytes)}
        for t in reader.tensors
    ]
    n_params = sum(math.prod(t["shape"]) for t in tensors)
    n_bytes = sum(t["bytes"] for t in tensors)
    info = {"file": str(args.gguf), "file_bytes": args.gguf.stat().st_size, "tensors": tensors, "params": n_params,
            "tensor_bytes": n_bytes, "bits_per_weight": 8 * n_bytes / max(n_params, 1), "metadata": scalar_fields(reader)}
    if args.json:
        print(json.dumps(info))
        return 0
    out = Console()
    meta = Table("key", "value", title="metadata")
    for k, v in info["metadata"].items():
        meta.add_row(_cell(k), _cell(v))
    out.print(meta)
    table = Table("name", "shape (ne)", "type", "bytes", title="tensors")
    for t in tensors:
        table.add_row(_cell(t["name"]), "×".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}")
    table.caption = f"{len(tensors)} tensors, {n_params:,} params, {n_bytes / 2**20:.2f} MiB, {info['bits_per_weight']:.3f} bits/weight"
    out.print(table)
    return 0


def _cell(value) -> Text:
    """`value` as literal text (rich would read '[/INST]' in a chat template as markup, and fail on it), clipped,
    control characters other than newline and tab escaped: a file must not send escape sequences to the terminal."""
    s = str(value)
    shown = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in s[:CELL_CHARS])
    return Text(shown if len(s) <= CELL_CHARS else f"{shown}… ({len(s):,} characters)")

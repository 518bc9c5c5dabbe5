"""`edgequant inspect FILE.gguf`: per-tensor name, shape, type, bytes; totals, bits per weight; metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..convert.gguf_in import open_gguf, scalar_fields


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
    n_params = sum(int(np.prod(t["shape"])) for t in tensors)
    n_bytes = sum(t["bytes"] for t in tensors)
    info = {"file": str(args.gguf), "file_bytes": args.gguf.stat().st_size, "tensors": tensors, "params": n_params,
            "tensor_bytes": n_bytes, "bits_per_weight": 8 * n_bytes / max(n_params, 1), "metadata": scalar_fields(reader)}
    if args.json:
        print(json.dumps(info))
        return 0
    out = Console()
    meta = Table("key", "value", title="metadata")
    for k, v in info["metadata"].items():
        meta.add_row(k, str(v))
    out.print(meta)
    table = Table("name", "shape (ne)", "type", "bytes", title="tensors")
    for t in tensors:
        table.add_row(t["name"], "×".join(map(str, t["shape"])), t["type"], f"{t['bytes']:,}")
    table.caption = f"{len(tensors)} tensors, {n_params:,} params, {n_bytes / 2**20:.2f} MiB, {info['bits_per_weight']:.3f} bits/weight"
    out.print(table)
    return 0

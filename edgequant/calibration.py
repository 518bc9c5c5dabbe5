"""Calibration text -> fixed-length token windows, deterministic.

Sources: a local text file, a JSONL file (a "text" field per line), or a dataset through `datasets` for users with
internet: `wikitext2`, `c4`, or `DATASET[:CONFIG]:SPLIT:COLUMN`.  The text is tokenized once with BOS, as
llama-imatrix does, and cut into consecutive windows of `seqlen` tokens whose first token is BOS; with more windows
available than asked for, `seed` picks which (seed 0: the first ones, exactly the chunks llama-imatrix sees).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .tokens import ReferenceTokenizer

DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}


def load_text(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.suffix == ".jsonl":
            try:
                return "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{spec}: each JSONL line needs a \"text\" field") from None
        return raw
    if path.exists():
        raise UserError(f"{spec}: not a file")
    return load_dataset_text(spec)


def load_dataset_text(spec: str) -> str:
    parts = DATASETS.get(spec) or tuple(spec.split(":"))
    if len(parts) == 3:
        parts = (parts[0], None, parts[1], parts[2])
    if len(parts) != 4:
        raise UserError(f"--calib {spec!r}: no such file, and not a dataset spec (wikitext2, c4, or DATASET[:CONFIG]:SPLIT:COLUMN)")
    name, config, split, column = parts
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        texts = []
        size = 0
        for row in ds:  # streaming: stop once there is plenty of text (~8 MB)
            texts.append(row[column])
            size += len(row[column])
            if size > 8_000_000:
                break
        return "\n\n".join(texts)
    except Exception as e:  # network, missing dataset or column: one line for the user
        raise UserError(f"--calib {spec}: could not load dataset ({type(e).__name__}: {e})") from None


def windows(tok: ReferenceTokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seqlen) int64 token ids."""
    if not text.strip():
        raise UserError("calibration text is empty")
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"need at least 1 calibration window of at least 2 tokens (got {n_samples} x {seqlen})")
    ids = np.asarray(tok.encode(text, add_bos=True), dtype=np.int64)
    available = len(ids) // seqlen
    if available < n_samples:
        raise UserError(f"calibration text too short: {len(ids)} tokens make {available} windows of {seqlen}, need {n_samples}")
    chosen = np.arange(n_samples) if seed == 0 else np.sort(np.random.default_rng(seed).choice(available, n_samples, replace=False))
    out = ids[: available * seqlen].reshape(available, seqlen)[chosen].copy()
    if tok.bos_id is not None and tok.add_bos:
        out[:, 0] = tok.bos_id
    return torch.from_numpy(out)

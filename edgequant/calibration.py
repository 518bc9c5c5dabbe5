"""Calibration sources -> fixed-length token windows, deterministic.

A source (`--calib`, repeatable; the windows are split evenly across sources, in order) is one of:
  self      windows sampled from the model itself (edgequant.self_calibration)
  builtin   the mixed-domain text shipped with edgequant (edgequant/data/calibration.txt: prose, fiction, chat,
            code, math, other languages; written for the project, MIT)
  a file    text, or JSONL: one record per line with a "text" field, or a "messages" conversation
            ([{"role", "content"}, ...]) rendered through the model's chat template
  a dataset through `datasets`, for users with internet: `wikitext2`, `c4`, or `DATASET[:CONFIG]:SPLIT:COLUMN`.
Text is tokenized once with BOS, as llama-imatrix does, and cut into consecutive windows of `seqlen` tokens whose
first token is BOS; with more windows available than asked for, `seed` picks which (seed 0: the first ones, exactly
the chunks llama-imatrix sees).

With no source given, a build calibrates on DEFAULT, half sampled from the model and half the built-in text
(docs/BENCHMARKS.md, "Calibration" shows why): offline, and for any model; where the model cannot be sampled from on
the device, `builtin` alone.  A text that holds fewer windows than its share (the built-in text: 97-242 windows of
512, by tokenizer) gives what it has, and `self`, when among the sources, samples the rest.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .settings import CalibOptions
from .tokens import ReferenceTokenizer

DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
SELF, BUILTIN = "self", "builtin"
BUILTIN_TEXT = Path(__file__).with_name("data") / "calibration.txt"
DEFAULT = (SELF, BUILTIN)


@dataclass
class Text:
    text: str
    special: bool = False  # holds rendered chat templates: their special-token strings are tokens


def load_text(spec: str, tok: ReferenceTokenizer | None = None) -> Text:
    if spec == BUILTIN:
        return Text(BUILTIN_TEXT.read_text(encoding="utf-8"))
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return jsonl_text(spec, raw, tok) if path.suffix == ".jsonl" else Text(raw)
    if path.exists():
        raise UserError(f"{spec}: not a file")
    return Text(load_dataset_text(spec))


def jsonl_text(spec: str, raw: str, tok: ReferenceTokenizer | None) -> Text:
    """Records joined by blank lines: "text" as it is, "messages" through the chat template."""
    docs, chat = [], False
    for k, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "messages" in record:
                messages = record["messages"]
                if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                           and isinstance(m.get("role"), str) for m in messages)):
                    raise TypeError
                rendered = tok.render_chat(messages) if tok is not None else None
                if rendered is None:
                    raise UserError(f"{spec}:{k}: a \"messages\" record needs a model with a chat template")
                docs.append(rendered)
                chat = True
            else:
                docs.append(record["text"])
                if not isinstance(docs[-1], str):
                    raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{spec}:{k}: each JSONL line needs a \"text\" string or a \"messages\" list of "
                            f"{{\"role\", \"content\"}}") from None
    return Text("\n\n".join(docs), chat)


def load_dataset_text(spec: str) -> str:
    parts = DATASETS.get(spec) or tuple(spec.split(":"))
    if len(parts) == 3:
        parts = (parts[0], None, parts[1], parts[2])
    if len(parts) != 4:
        raise UserError(f"--calib {spec!r}: no such file, and not self, builtin or a dataset spec (wikitext2, c4, "
                        f"or DATASET[:CONFIG]:SPLIT:COLUMN)")
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


def windows(tok: ReferenceTokenizer, text: str | Text, n_samples: int, seqlen: int, seed: int = 0,
            at_most: bool = False) -> torch.Tensor:
    """(n_samples, seqlen) int64 token ids (at_most: fewer where the text holds fewer)."""
    text = text if isinstance(text, Text) else Text(text)
    if not text.text.strip():
        raise UserError("calibration text is empty")
    if n_samples < 1 or seqlen < 2:
        raise UserError(f"need at least 1 calibration window of at least 2 tokens (got {n_samples} x {seqlen})")
    ids = np.asarray(tok.encode(text.text, add_bos=True, special=text.special), dtype=np.int64)
    available = len(ids) // seqlen
    if at_most:
        n_samples = min(n_samples, available)
    if available < max(n_samples, 1):
        raise UserError(f"calibration text too short: {len(ids)} tokens make {available} windows of {seqlen}, need {n_samples}")
    chosen = np.arange(n_samples) if seed == 0 else np.sort(np.random.default_rng(seed).choice(available, n_samples, replace=False))
    out = ids[: available * seqlen].reshape(available, seqlen)[chosen].copy()
    if tok.bos_id is not None and tok.add_bos:
        out[:, 0] = tok.bos_id
    return torch.from_numpy(out)


def split(n: int, k: int) -> list[int]:
    """n windows over k sources, the first ones taking the remainder."""
    return [n // k + (i < n % k) for i in range(k)]


@dataclass
class Calibration:
    """The windows, and what they are, for the build's summary."""

    ids: torch.Tensor
    parts: list[dict] = field(default_factory=list)  # per source: {"source", "windows", ...}

    def describe(self) -> str:
        return " + ".join(f"{p['source']} ({p['windows']})" for p in self.parts) + f" windows of {self.ids.shape[1]} tokens"


def calibrate(m, sources: list[str], n: int, seqlen: int, seed: int, device: torch.device, progress=None) -> Calibration:
    """The calibration windows from `sources` (none: DEFAULT), n split across them."""
    from . import self_calibration

    seqlen = min(seqlen, m.hp.n_ctx)
    if n < 1 or seqlen < 2:
        raise UserError(f"need at least 1 calibration window of at least 2 tokens (got {n} x {seqlen})")
    if not sources:
        sources = list(DEFAULT)
        ok, why = self_calibration.fits(m, n, seqlen, device) if SELF in sources else (True, "")
        if not ok:
            sources = [s for s in sources if s != SELF] or [BUILTIN]
            print(f"edgequant: calibrating on the built-in text ({why})", file=sys.stderr)
    if len(sources) > n:
        raise UserError(f"{len(sources)} calibration sources for {n} windows: give at least one window per source")
    tok = ReferenceTokenizer(m.dir)
    shares = split(n, len(sources))
    parts: list = [None] * len(sources)
    for i, spec in enumerate(sources):  # texts first: what they lack, self samples
        if spec != SELF:
            ids = windows(tok, load_text(spec, tok), shares[i], seqlen, seed, at_most=spec == BUILTIN)
            parts[i] = ids, {"source": spec, "windows": len(ids)}
    n_self = sources.count(SELF)
    left = n - sum(len(p[0]) for p in parts if p is not None)
    for i, k in zip([i for i, s in enumerate(sources) if s == SELF], split(left, n_self) if n_self else []):
        parts[i] = self_calibration.self_windows(m, k, seqlen, seed + i, device, progress)
    return Calibration(torch.cat([p[0] for p in parts]), [p[1] for p in parts])


def draw(calib: CalibOptions, m, progress=None) -> Calibration:
    """calibrate() for a build's options, with a progress line while it runs."""
    task = progress.add_task(f"calibration: {calib.samples} windows", total=None) if progress is not None else None
    windows = calibrate(m, calib.sources, calib.samples, calib.seqlen, calib.seed, calib.torch_device(), progress)
    if task is not None:
        progress.remove_task(task)
    return windows

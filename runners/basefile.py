"""Stored base log-probabilities for KL divergence, in llama-perplexity's `--kl-divergence-base` layout.

Keeping llama-perplexity's layout means a file written by `edgequant eval --save-base` works as
`llama-perplexity --kl-divergence-base`, and the other way round. All integers little-endian:

    offset              field
    0                   b"_logits_"                       magic
    8                   int32 n_ctx
    12                  int32 n_vocab
    16                  int32 n_chunk
    20                  int32 tokens[n_chunk * n_ctx]     the text's tokens, before the BOS substitution
    20 + 4*n_chunk*n_ctx  records, chunk by chunk, n_ctx - 1 - n_ctx/2 per chunk (one per scored position):

    record (nv = 2*ceil(n_vocab/2) + 4 uint16 words):
    +--------------+----------------+--------------------------+---------------------+
    | float32 scale| float32 low    | uint16 q[n_vocab]        | uint16 pad (0 or 1) |
    +--------------+----------------+--------------------------+---------------------+
    log p[v] = low + scale * q[v],  scale = (max log p - low) / 65535,  q = 0 for everything at or below `low`.
    llama-perplexity sets low = max(min log p, max log p - 16): the KL sum ignores log-probs <= -16 anyway, but a
    target token further down is clamped, which makes PPL(base) read from its files optimistic (0.25% on 4 chunks
    of wikitext-2 with the bench-a F16). We lower `low` to the target's log-prob in those rows, so our files give
    the exact PPL(base), and llama-perplexity reads them unchanged.
"""

from __future__ import annotations

import os
import pathlib
from typing import BinaryIO

import numpy as np

from edgequant.errors import UserError

from .perplexity import KL_LOG_FLOOR, Windows

MAGIC = b"_logits_"
_HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<i4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])
_RANGE = -KL_LOG_FLOOR  # log-probs kept within this distance of the top one


def record_words(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def encode(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 log-probs [m, V] with the m tokens they predict -> records uint16 [m, nv]."""
    m, n_vocab = logp.shape
    top = logp.max(axis=1)
    low = np.minimum(np.maximum(logp.min(axis=1), top - _RANGE), logp[np.arange(m), targets])
    scale = ((top - low) / 65535).astype(np.float32)
    out = np.zeros((m, record_words(n_vocab)), dtype=np.uint16)
    out[:, :4] = np.stack([scale, low.astype(np.float32)], axis=1).view(np.uint16)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)[:, None]
    q = np.rint((logp - low[:, None]) * inv)
    out[:, 4:4 + n_vocab] = np.where(logp > low[:, None], q, 0)
    return out


def decode(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """records uint16 [m, nv] -> float64 log-probs [m, V]."""
    scale_low = np.ascontiguousarray(records[:, :4]).view(np.float32).astype(np.float64)
    return scale_low[:, 1:2] + scale_low[:, 0:1] * records[:, 4:4 + n_vocab]


class BaseWriter:
    """Streams the log-probs of an eval into a base file, chunk by chunk (use as evaluate's on_chunk)."""

    def __init__(self, path: str | os.PathLike, windows: Windows, n_vocab: int):
        self.path = pathlib.Path(path)
        self.windows = windows
        try:
            self._f: BinaryIO = self.path.open("wb")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}") from None
        np.array([(MAGIC, windows.n_ctx, n_vocab, windows.n_chunk)], dtype=_HEADER).tofile(self._f)
        windows.tokens[:windows.n_chunk * windows.n_ctx].astype("<i4").tofile(self._f)

    def __call__(self, i: int, logp: np.ndarray) -> None:
        encode(logp, self.windows.targets(i)).astype("<u2").tofile(self._f)

    def close(self) -> None:
        self._f.close()


class StoredBase:
    """A base file, memory-mapped, checked against the windows of the current eval."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        header = np.fromfile(self.path, dtype=_HEADER, count=1)
        if len(header) == 0 or header["magic"][0] != MAGIC:
            raise UserError(f"{self.path}: not a base log-prob file (no {MAGIC!r} magic)")
        self.n_ctx, self.n_vocab, self.n_chunk = (int(header[k][0]) for k in ("n_ctx", "n_vocab", "n_chunk"))
        n_scored = self.n_ctx - 1 - self.n_ctx // 2
        tokens_at = _HEADER.itemsize
        records_at = tokens_at + 4 * self.n_chunk * self.n_ctx
        need = records_at + 2 * self.n_chunk * n_scored * record_words(self.n_vocab)
        if self.n_ctx < 4 or self.n_chunk < 1 or size < need:
            raise UserError(f"{self.path}: truncated or damaged base file ({size} bytes, header says {need})")
        self.tokens = np.memmap(self.path, dtype="<i4", mode="r", offset=tokens_at, shape=(self.n_chunk * self.n_ctx,))
        self._records = np.memmap(self.path, dtype="<u2", mode="r", offset=records_at,
                                  shape=(self.n_chunk, n_scored, record_words(self.n_vocab)))

    def check(self, windows: Windows, n_vocab: int) -> None:
        """The eval must use this file's context, vocabulary and, token for token, its text."""
        if windows.n_ctx != self.n_ctx:
            raise UserError(f"{self.path} was computed with ctx {self.n_ctx}, not {windows.n_ctx}")
        if n_vocab != self.n_vocab:
            raise UserError(f"{self.path} has a vocabulary of {self.n_vocab} tokens, the model {n_vocab}")
        if windows.n_chunk > self.n_chunk:
            raise UserError(f"{self.path} holds {self.n_chunk} chunks, {windows.n_chunk} requested")
        n = windows.n_chunk * windows.n_ctx
        mismatch = np.flatnonzero(self.tokens[:n] != windows.tokens[:n])
        if len(mismatch):
            raise UserError(f"{self.path} was computed on other tokens (first difference at token {mismatch[0]}): "
                            "different text or tokenizer")

    def chunk(self, i: int) -> np.ndarray:
        return decode(self._records[i], self.n_vocab)

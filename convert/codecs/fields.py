"""What codecs read and write the same way: a block's byte fields, fp16 scales, and int8 codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .base import Codec


def block_fields(raw: np.ndarray, type_size: int, *widths: int) -> list[np.ndarray]:
    """(rows, n_blocks*type_size) bytes -> each block's fields, (rows, n_blocks, width) uint8 each."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, type_size)
    return np.split(blocks, np.cumsum(widths)[:-1], axis=-1)


def fp16_field(field: np.ndarray) -> np.ndarray:
    """A 2-byte field (rows, n_blocks, 2) as float16 (rows, n_blocks)."""
    return np.ascontiguousarray(field).view("<f2")[..., 0]


def fp16_bytes(d: np.ndarray) -> np.ndarray:
    """float16 (rows, n_blocks) -> its little-endian bytes (rows, n_blocks, 2)."""
    return d.astype("<f2")[..., None].view(np.uint8)


def checked_levels(codec: Codec, q: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """New codes for `with_codes`: checked against the codec's grid range, as int8 of the blocks' shape."""
    q = np.asarray(q)
    if q.size and (q.min() < codec.qmin or q.max() > codec.qmax):
        raise ValueError(f"{codec.name}: codes outside [{codec.qmin}, {codec.qmax}]")
    return q.reshape(shape).astype(np.int8)


def c_to_int8(v: np.ndarray) -> np.ndarray:
    """C's `(int8_t)float` as compiled for x86: truncate to int32 (NaN/out of range -> INT_MIN), keep the low byte."""
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32).astype(np.int8)

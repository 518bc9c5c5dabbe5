"""Reading GGUF files with gguf-py's GGUFReader, turning any failure on a malformed file into one clear error."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError

MAX_ARRAY_SHOWN = 8


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError, IndexError, struct errors, ... on malformed input
        raise UserError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def scalar_fields(reader: gguf.GGUFReader) -> dict:
    """Metadata as plain values; long arrays (token lists) summarised by their length."""
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            out[name] = f"[{len(f.data)} items]" if len(f.data) > MAX_ARRAY_SHOWN else [_value(f, i) for i in f.data]
        else:
            out[name] = _value(f, f.data[0]) if f.data else None
    return out


def _value(f: gguf.ReaderField, idx: int):
    part = f.parts[idx]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    v = part[0] if isinstance(part, np.ndarray) and part.size == 1 else part
    return v.item() if hasattr(v, "item") else v

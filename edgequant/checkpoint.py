"""A Hugging Face checkpoint on disk: its config, and its weights streamed one tensor at a time from safetensors.

Safetensors headers are parsed and checked against the file sizes up front, so a truncated or corrupt shard is a clear
error before any output is written, and no tensor is read twice or held beyond its use.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UserError

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(model: str) -> Path:
    """A local model directory, or a Hugging Face hub id downloaded into the local cache (needs internet)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{model} is not a directory (expected a Hugging Face model directory)")
    if not HUB_ID.match(model):
        raise UserError(f"{model}: no such directory (nor a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"]))
    except Exception as e:  # network, auth, missing repo: all reach the user as one line
        raise UserError(f"{model}: not a local directory and the hub download failed: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in `file`
    end: int


class Checkpoint:
    """config.json plus an index of every tensor in the model's safetensors files (single or sharded)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.config = read_config(directory)
        self.tensors = index_tensors(directory)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise UserError(f"{self.dir / 'config.json'} has no 'architectures' entry")
        return archs[0]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str) -> torch.Tensor:
        """One tensor as float32 (a fresh copy; the file is not kept open)."""
        e = self.tensors[name]
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            data = f.read(e.end - e.begin)
        t = torch.frombuffer(bytearray(data), dtype=SAFETENSORS_DTYPES[e.dtype]).reshape(e.shape)
        return t.float()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.load(name)


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config ({e})") from None


def index_tensors(directory: Path) -> dict[str, TensorEntry]:
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index}: unreadable shard index ({e})") from None
        files = [directory / n for n in dict.fromkeys(names)]
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} names {f.name}, which is missing")
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise UserError(f"{directory}: only pickle checkpoints (.bin/.pt) found; edgequant reads safetensors")
        raise UserError(f"{directory}: no *.safetensors weights")
    tensors: dict[str, TensorEntry] = {}
    for f in files:
        for e in read_header(f):
            tensors[e.name] = e
    return tensors


def read_header(file: Path) -> list[TensorEntry]:
    """Parse a safetensors header and check every tensor's extent against the file: corrupt -> UserError."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise UserError(f"{file}: corrupt safetensors header (length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{file}: corrupt safetensors header (not JSON)") from None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file}: corrupt safetensors entry for {name}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{file}: tensor {name} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        nbytes = int(np.prod(shape)) * SAFETENSORS_DTYPES[dtype].itemsize
        if e - b != nbytes or b < 0:
            raise UserError(f"{file}: corrupt safetensors entry for {name} ({e - b} bytes for shape {list(shape)})")
        if 8 + n + e > size:
            raise UserError(f"{file}: truncated safetensors file ({name} ends at byte {8 + n + e}, file has {size})")
        entries.append(TensorEntry(name, file, dtype, shape, 8 + n + b, 8 + n + e))
    return entries

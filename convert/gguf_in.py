"""Reading GGUF files safely: a bounds-checked scan of the header first, then gguf-py's GGUFReader.

GGUFReader memory-maps the file and trusts every count and length in it: an array count past the end of the file
makes it loop almost forever, each array item costs it a Python object or two (a 1 MB array of uint8: 13 s, 700 MB),
and bad dims, types or offsets surface as assorted numpy errors.  `open_gguf` walks the same header first, checks
every count and length against the bytes left before using it, bounds the number of items, and applies the checks
llama.cpp's loader applies (ggml/src/gguf.cpp).  A file that passes is one GGUFReader reads without surprises; any
other is one UserError naming what is wrong and where.  Keys and tensor names must be UTF-8 (GGUFReader decodes
them); string values stay bytes, as GGUFReader leaves them.

Header (integers little-endian, or all big-endian: a version whose low 16 bits are 0 is read byte-swapped, as
GGUFReader does):

    | "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv × KV | n_tensors × tensor info | pad to alignment | data
    KV           | key: string | value type u32 | value                       |
    string       | length u64 | UTF-8 bytes |
    array value  | item type u32 | count u64 | count × item (no nested arrays) |
    tensor info  | name: string | n_dims u32 | n_dims × ne u64 | ggml type u32 | offset u64 from data start |
"""

from __future__ import annotations

import math
import mmap
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from .errors import UserError

MAX_ARRAY_SHOWN = 8

# Limits well above real models, which bound GGUFReader's time and memory on a hostile file.  It costs ~17 µs and
# ~1 KB per metadata item: gemma-4's tokenizer (3 × 262,144 + 514,906 merges = 1.3M items) takes it 22 s and 1.4 GB.
MAX_METADATA_ITEMS = 1 << 22  # KV pairs + array items: 3× gemma-4
MAX_TENSORS = 1 << 16  # a few thousand in the largest models; GGUFReader spends ~50 µs on each
GGML_MAX_DIMS = 4  # ggml.h
GGML_MAX_NAME = 64  # ggml.h: tensor names are at most 63 bytes

_MAGIC = struct.pack("<I", gguf.GGUF_MAGIC)
_READER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # GGUFReader adds these itself
_SCALAR_BYTES = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}


class _Malformed(Exception):
    pass


class _HeaderScan:
    """A cursor over the mapped file: each read first checks that its bytes exist."""

    def __init__(self, data: mmap.mmap):
        self.data, self.pos, self.order = data, 0, sys.byteorder

    def need(self, n: int, what: str) -> None:
        left = len(self.data) - self.pos
        if n > left:
            raise _Malformed(f"{what} at byte {self.pos} needs {n:,} bytes, the file has {left:,} left")

    def skip(self, n: int, what: str) -> int:
        """Step over n bytes, returning where they start."""
        self.need(n, what)
        self.pos += n
        return self.pos - n

    def uint(self, n_bytes: int, what: str) -> int:
        start = self.skip(n_bytes, what)
        return int.from_bytes(self.data[start:self.pos], self.order)

    def string(self, what: str) -> int:
        """Step over a string, returning where its bytes start."""
        return self.skip(self.uint(8, f"length of {what}"), what)

    def text(self, what: str) -> str:
        """A string GGUFReader decodes (keys, tensor names), so it must be UTF-8."""
        start = self.string(what)
        try:
            return self.data[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} at byte {start} is not UTF-8") from None

    def strings(self, count: int, what: str) -> None:
        """Step over `count` strings (tokens: up to ~10^6, hence the tight loop; values stay undecoded bytes)."""
        length = struct.Struct("<Q" if self.order == "little" else ">Q").unpack_from
        data, pos, end = self.data, self.pos, len(self.data)
        for j in range(count):
            if end - pos < 8 or end - pos - 8 < (n := length(data, pos)[0]):
                self.pos = pos
                self.string(f"item {j} of {what}")  # raises, naming the item
            pos += 8 + n
        self.pos = pos

    def enum(self, kind: type, what: str):
        at, raw = self.pos, self.uint(4, what)
        try:
            return kind(raw)
        except ValueError:
            raise _Malformed(f"{what} at byte {at} is {raw}, not a known {kind.__name__}") from None


def _scan_header(data: mmap.mmap) -> None:
    """Raise _Malformed unless GGUFReader can read `data` in time and memory proportional to real headers."""
    if data[:4] != _MAGIC:
        raise _Malformed(f"it starts with {data[:4]!r}, not {_MAGIC!r}")
    h = _HeaderScan(data)
    h.skip(4, "magic")
    version = h.uint(4, "version")
    if version & 0xFFFF == 0:
        h.order = "big" if sys.byteorder == "little" else "little"
        version = int.from_bytes(data[4:8], h.order)
    if version not in READER_SUPPORTED_VERSIONS:
        raise _Malformed(f"GGUF version {version} is not supported (only {READER_SUPPORTED_VERSIONS})")
    n_tensors, n_kv = h.uint(8, "tensor count"), h.uint(8, "metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_METADATA_ITEMS:
        raise _Malformed(f"{n_tensors:,} tensors and {n_kv:,} metadata entries "
                         f"(at most {MAX_TENSORS:,} and {MAX_METADATA_ITEMS:,} are accepted)")
    alignment = _scan_metadata(h, n_kv)
    tensors = [_scan_tensor_info(h, i) for i in range(n_tensors)]
    if len({name for name, *_ in tensors}) < n_tensors:
        raise _Malformed("two tensors have the same name")
    _check_tensor_data(tensors, data_start=_padded(h.pos, alignment), alignment=alignment, file_bytes=len(data))


def _scan_metadata(h: _HeaderScan, n_kv: int) -> int:
    """Walk the KV pairs; return the alignment of the data section."""
    items, keys, alignment = n_kv, set(_READER_FIELDS), gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = h.text(f"key of metadata entry {i}")
        label = _shown(key)
        if key in keys or not key:
            raise _Malformed(f"metadata key {label} is empty, repeated or reserved")
        keys.add(key)
        vtype = h.enum(gguf.GGUFValueType, f"type of {label}")
        if vtype == gguf.GGUFValueType.ARRAY:
            itype = h.enum(gguf.GGUFValueType, f"item type of {label}")
            if itype == gguf.GGUFValueType.ARRAY:
                raise _Malformed(f"{label} is an array of arrays, which llama.cpp does not read either")
            count = h.uint(8, f"item count of {label}")
            min_item = 8 if itype == gguf.GGUFValueType.STRING else _SCALAR_BYTES[itype]
            h.need(count * min_item, f"{count:,} items of {label}")
            items += count
            if items > MAX_METADATA_ITEMS:
                raise _Malformed(f"more than {MAX_METADATA_ITEMS:,} metadata items (at {label}), "
                                 "edgequant's limit (real tokenizers hold up to ~1.3M)")
            if itype == gguf.GGUFValueType.STRING:
                h.strings(count, label)
            else:
                h.skip(count * min_item, f"items of {label}")
        elif vtype == gguf.GGUFValueType.STRING:
            h.string(f"value of {label}")
        elif key == gguf.Keys.General.ALIGNMENT:
            if vtype != gguf.GGUFValueType.UINT32:
                raise _Malformed(f"{label} is {vtype.name}, not UINT32")
            alignment = h.uint(4, label)
            if alignment == 0 or alignment & (alignment - 1):
                raise _Malformed(f"{label} is {alignment}, not a power of two")
        else:
            h.skip(_SCALAR_BYTES[vtype], f"value of {label}")
    return alignment


def _scan_tensor_info(h: _HeaderScan, i: int) -> tuple[str, int, int, int]:
    """Return (name, offset, bytes of data, bytes numpy needs for the shape with empty dims counted as 1)."""
    name = h.text(f"name of tensor {i}")
    label = _shown(name)
    if len(name.encode()) >= GGML_MAX_NAME:
        raise _Malformed(f"tensor name {label} is longer than {GGML_MAX_NAME - 1} bytes")
    n_dims = h.uint(4, f"dimension count of {label}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:  # ggml writes at least one; GGUFReader needs one to reshape BF16, Q*, ...
        raise _Malformed(f"tensor {label} has {n_dims:,} dimensions (1 to {GGML_MAX_DIMS} are valid)")
    ne = [h.uint(8, f"dimension {d} of {label}") for d in range(n_dims)]
    qtype = h.enum(gguf.GGMLQuantizationType, f"ggml type of {label}")
    offset = h.uint(8, f"data offset of {label}")
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise _Malformed(f"tensor {label}: rows of {ne[0]:,} are not a whole number of {qtype.name} blocks of {block}")
    return name, offset, math.prod(ne) // block * type_bytes, math.prod(max(d, 1) for d in ne) // block * type_bytes


def _check_tensor_data(tensors: list, data_start: int, alignment: int, file_bytes: int) -> None:
    """Tensors lie in order, each padded to the alignment (as llama.cpp requires), and inside the file."""
    expected = 0
    for name, offset, n_bytes, extent in tensors:
        if offset != expected:
            raise _Malformed(f"tensor {_shown(name)} data at offset {offset:,}, expected {expected:,}")
        if data_start + offset + extent > file_bytes:
            raise _Malformed(f"tensor {_shown(name)} needs bytes up to {data_start + offset + extent:,}, "
                             f"the file has {file_bytes:,} (truncated?)")
        expected += _padded(n_bytes, alignment)


def _shown(name: str, limit: int = 60) -> str:
    """A key or tensor name for a one-line message: quoted, control characters escaped, clipped."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "…"


def _padded(n: int, alignment: int) -> int:
    return n + -n % alignment


def open_gguf(path: Path) -> gguf.GGUFReader:
    """GGUFReader on `path` after `_scan_header` passed; a missing, unreadable or malformed file is one UserError."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                raise _Malformed("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _scan_header(data)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except _Malformed as e:
        raise UserError(f"{path}: not a valid GGUF file: {e}") from None
    return gguf.GGUFReader(path)


def field_value(reader: gguf.GGUFReader, key: str):
    """A metadata value as plain Python (a list for arrays), None when absent.  Unlike ReaderField.contents(), strings
    that are not UTF-8 (the header scan lets them through, as llama.cpp does) come back with U+FFFD, not an exception."""
    f = reader.get_field(key)
    if f is None:
        return None
    values = [_value(f, i) for i in f.data]
    return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def scalar_fields(reader: gguf.GGUFReader) -> dict:
    """Metadata as plain values; long arrays (token lists) summarised by their length."""
    return {name: f"[{len(f.data)} items]" if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > MAX_ARRAY_SHOWN
            else field_value(reader, name)
            for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _value(f: gguf.ReaderField, idx: int):
    part = f.parts[idx]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    v = part[0] if isinstance(part, np.ndarray) and part.size == 1 else part
    return v.item() if hasattr(v, "item") else v

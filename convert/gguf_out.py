"""Writing a GGUF with gguf-py's GGUFWriter, streamed tensor by tensor and atomically.

The tensor directory (names, shapes, types) is declared first, then each tensor's bytes are written in that order as
they are produced, so only one tensor is in memory at a time.  Everything goes to a temporary file next to the target,
renamed over it only once complete: a failure or Ctrl-C never leaves a half-written .gguf behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, n_per_row); GGUF's ne is the reverse
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF file costs besides its tensors' bytes: gguf-py's GGUFWriter writes the header (magic, metadata,
    tensor directory), pads it to `alignment`, then each tensor's bytes padded to `alignment` (the last one too).
    A tensor's type is a fixed-size field of the directory, so for given tensors the header is the same whatever
    their types."""

    header: int  # bytes before the padding that precedes the first tensor
    alignment: int

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment

    def file_bytes(self, plan: list[TensorPlan]) -> int:
        """The exact size of the file holding `plan`'s tensors (at least one) after this header."""
        return self.padded(self.header) + sum(self.padded(t.nbytes) for t in plan)


def check_output_path(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")
    if path.is_dir():
        raise UserError(f"output {path} is a directory")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path next to `path`; renamed to `path` if the block completes, removed otherwise."""
    check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result should look like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class StreamingGGUF:
    """Declare the metadata and the tensor plan on `writer`, then `write(name, raw_bytes)` each tensor in plan order."""

    def __init__(self, writer: gguf.GGUFWriter, plan: list[TensorPlan]):
        self.writer, self.plan, self.next = writer, plan, 0
        for t in plan:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

    def write(self, name: str, raw: np.ndarray) -> None:
        t = self.plan[self.next]
        if name != t.name or raw.dtype != np.uint8 or raw.nbytes != t.nbytes:
            raise AssertionError(f"tensor {name} ({raw.nbytes} bytes) written out of plan: expected {t.name} ({t.nbytes} bytes)")
        self.writer.write_tensor_data(raw.reshape(t.byte_shape))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.plan):
            raise AssertionError(f"only {self.next} of {len(self.plan)} tensors written")
        self.writer.close()

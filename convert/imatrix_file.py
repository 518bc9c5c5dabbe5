"""Importance-matrix files as llama-imatrix writes them and llama-quantize reads them.

An importance matrix holds, per weight tensor, the mean of the squared input activations of each input
column (GGUF ne[0]); llama-quantize hands that vector to ggml_quantize_chunk as the per-column weights of
its error. Two file formats exist (llama.cpp tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):

GGUF (current): general.type = "imatrix"; imatrix.datasets [str], imatrix.chunk_count u32,
imatrix.chunk_size u32 (tokens per chunk); per tensor NAME two F32 tensors:

    NAME.in_sum2   ne = [n_cols, n_mat]   sum over tokens of x**2, per column (n_mat > 1: MoE experts)
    NAME.counts    ne = [1, n_mat]        tokens summed, per matrix

    importance = in_sum2 / round(counts), per matrix; a matrix that saw no token gets all ones.

Legacy .dat (little-endian, no header):

    int32 n_entries
    n_entries times:  int32 len | char name[len] | int32 ncall | int32 nval | f32 value[nval]
    optional:         int32 chunk_count | int32 len | char dataset[len]

    value = mean(x**2) * ncall, so importance = value / ncall (the values as stored if ncall <= 0).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import UserError
from .gguf_in import open_gguf

_KEYS = gguf.Keys.IMatrix
_SUM2, _COUNTS = ".in_sum2", ".counts"


@dataclass(frozen=True)
class Imatrix:
    """What llama-quantize takes from an imatrix file."""

    importance: dict[str, np.ndarray]  # GGUF tensor name -> float32 per-column importance (experts concatenated)
    datasets: tuple[str, ...]
    chunk_count: int


def read_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the float32 importance vector llama-quantize passes to ggml_quantize_chunk."""
    return load_imatrix(path).importance


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read either format (told apart by the GGUF magic); UserError when the file is not a usable imatrix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read importance matrix {path}: {e.strerror}") from None
    imatrix = _load_gguf(path) if data[:4] == gguf.GGUF_MAGIC.to_bytes(4, "little") else _load_legacy(path, data)
    for name, values in imatrix.importance.items():
        if not np.isfinite(values).all():  # llama-quantize refuses these too
            raise UserError(f"{path}: importance of {name} has non-finite values")
    return imatrix


def write_imatrix_gguf(
    path: str | os.PathLike[str],
    stats: Mapping[str, tuple[np.ndarray, np.ndarray | int]],
    *,
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write {name: (sum2, count)} in llama-imatrix's GGUF format (llama-quantize --imatrix accepts it).

    sum2: per-column sums of squared inputs, shape (n_cols,) or (n_mat, n_cols); count: tokens summed,
    a number or one per matrix. datasets: names of the calibration texts, at least one (llama-quantize
    needs the key and gguf-py cannot write an empty array); chunk_count/chunk_size: how many chunks of
    how many tokens were seen.
    """
    if not datasets:
        raise ValueError("name at least one calibration dataset")
    writer = gguf.GGUFWriter(path, arch="")  # empty: no general.architecture, as llama-imatrix writes none
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_key_value(_KEYS.DATASETS, list(datasets), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    writer.add_uint32(_KEYS.CHUNK_COUNT, chunk_count)
    writer.add_uint32(_KEYS.CHUNK_SIZE, chunk_size)
    for name in sorted(stats):
        sum2, count = stats[name]
        sum2 = np.atleast_2d(np.asarray(sum2, dtype=np.float32))
        counts = np.asarray(count, dtype=np.float32).reshape(-1, 1)
        if sum2.ndim != 2 or counts.shape[0] != sum2.shape[0]:
            raise ValueError(f"{name}: sum2 {sum2.shape} and count {counts.shape} disagree on the number of matrices")
        writer.add_tensor(name + _SUM2, sum2)
        writer.add_tensor(name + _COUNTS, counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_gguf(path: Path) -> Imatrix:
    reader = open_gguf(path)
    missing = [k for k in (_KEYS.DATASETS, _KEYS.CHUNK_COUNT, _KEYS.CHUNK_SIZE) if k not in reader.fields]
    if missing:
        raise UserError(f"{path}: not an imatrix GGUF (missing {', '.join(missing)})")
    pairs: dict[str, dict[str, gguf.ReaderTensor]] = {}
    for tensor in reader.tensors:
        if tensor.data.size != tensor.n_elements:
            raise UserError(f"{path}: truncated GGUF file ({tensor.name} is incomplete)")
        for suffix in (_SUM2, _COUNTS):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor
    if not pairs:
        raise UserError(f"{path}: imatrix GGUF holds no importance data")
    importance = {name: _importance_from_sums(path, name, pair) for name, pair in sorted(pairs.items())}
    datasets = reader.fields[_KEYS.DATASETS].contents()
    return Imatrix(importance, tuple(datasets) if isinstance(datasets, list) else (),
                   int(reader.fields[_KEYS.CHUNK_COUNT].contents()))


def _importance_from_sums(path: Path, name: str, pair: dict[str, gguf.ReaderTensor]) -> np.ndarray:
    if len(pair) != 2:
        raise UserError(f"{path}: {name} has {next(iter(pair))} without its partner")
    if any(t.tensor_type != gguf.GGMLQuantizationType.F32 for t in pair.values()):
        raise UserError(f"{path}: {name} sums and counts must be F32")
    sums = np.array(pair[_SUM2].data, dtype=np.float32).reshape(-1)
    counts = np.array(pair[_COUNTS].data, dtype=np.float32).reshape(-1)
    if counts.size == 0 or sums.size % counts.size:
        raise UserError(f"{path}: {name} has {sums.size} sums for {counts.size} matrices")
    counts = (np.sign(counts) * np.floor(np.abs(counts) + 0.5)).astype(np.float32)  # C lround
    per_matrix = sums.reshape(counts.size, -1)
    seen = counts[:, None] > 0
    return np.divide(per_matrix, counts[:, None], out=np.ones_like(per_matrix), where=seen).reshape(-1)


def _load_legacy(path: Path, data: bytes) -> Imatrix:
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise UserError(f"{path}: not an importance matrix (GGUF or llama-imatrix .dat): bad {what}")
        pos += n
        return data[pos - n:pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = int32("entry count")
    if n_entries < 1:
        raise UserError(f"{path}: not an importance matrix: no entries")
    importance = {}
    for _ in range(n_entries):
        raw_name = take(int32("name length"), "name")
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not an importance matrix: undecodable tensor name") from None
        ncall = int32("call count")
        nval = int32("value count")
        if nval < 1:
            raise UserError(f"{path}: not an importance matrix: {name} has no values")
        values = np.frombuffer(take(4 * nval, "values"), dtype="<f4").astype(np.float32)
        importance[name] = values / np.float32(ncall) if ncall > 0 else values
    chunk_count, datasets = 0, ()
    if pos < len(data):
        chunk_count = int32("chunk count")
    if pos < len(data):
        dataset = take(int32("dataset length"), "dataset name").decode(errors="replace")
        datasets = (dataset,) if dataset else ()
    if pos != len(data):
        raise UserError(f"{path}: not an importance matrix: {len(data) - pos} unexpected trailing bytes")
    return Imatrix(dict(sorted(importance.items())), datasets, chunk_count)

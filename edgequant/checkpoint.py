"""A Hugging Face checkpoint on disk: its config, and its weights streamed one tensor at a time from safetensors.

Safetensors headers are parsed and checked against the file sizes up front, so a truncated or corrupt shard is a clear
error before any output is written, and no tensor is read twice or held beyond its use.  Every tensor is checked
for NaN/Inf as it is loaded.

Nothing from the model directory runs as code unless asked: pickle checkpoints (pytorch_model*.bin) are read only
with allow_pickle (--allow-pickle), and then with torch.load(weights_only=True), which unpickles tensors and plain
containers only; a config with `auto_map` (the model's own Python classes, which transformers would import) is
refused unless trust_remote_code (--trust-remote-code).
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import torch

try:
    from .native import widen
except ImportError:  # the C extension is not built: numpy widens bf16
    widen = None

SAFETENSORS_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}  # the dtypes read; torch is imported only where needed
PICKLE_WEIGHTS = "pytorch_model*.bin"
LAYER = re.compile(r"\.layers\.(\d+)\.")
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
    """config.json plus an index of every tensor in the model's safetensors files (single or sharded), or the
    tensors of its pickle files when allowed."""

    def __init__(self, directory: Path, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.dir = directory
        self.config = read_config(directory)
        if self.config.get("auto_map") and not trust_remote_code:
            raise UserError(f"{directory / 'config.json'} has auto_map: the model comes with its own Python code; "
                            f"edgequant runs it only with --trust-remote-code")
        self.trust_remote_code = trust_remote_code
        self.pickled: dict[str, torch.Tensor] = {}  # name -> memory-mapped tensor, for pickle checkpoints
        self.tensors = index_tensors(directory, allow_pickle, self.pickled)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise UserError(f"{self.dir / 'config.json'} has no 'architectures' entry")
        return archs[0]

    def rename(self, name_of) -> None:
        """Index the tensors by name_of(name), leaving out those it maps to None (a vision-language checkpoint's
        tensors by their text model's names, the rest dropped)."""
        self.tensors = {new: e for name, e in self.tensors.items() if (new := name_of(name)) is not None}
        self.pickled = {new: t for name, t in self.pickled.items() if (new := name_of(name)) is not None}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str) -> torch.Tensor:
        """One tensor as a float32 torch tensor (load_array's, shared)."""
        import torch

        return torch.from_numpy(self.load_array(name))

    def load_array(self, name: str) -> np.ndarray:
        """One tensor as float32 (a fresh copy; the file is not kept open); NaN/Inf -> UserError.

        Safetensors are read into a numpy buffer and widened there (bf16 in C, in place, where the extension is
        built), without torch (which only pickle checkpoints need): the reads and the widening run without the GIL,
        so another thread may load while this one's caller encodes, and no torch thread pool wakes up per tensor."""
        e = self.tensors[name]
        if name in self.pickled:
            import torch

            w = self.pickled[name].to(torch.float32, copy=True).numpy()
            bad = count_nonfinite(w)
        elif e.dtype == "BF16" and widen is not None:  # read into the float32 buffer's upper half, widen in place
            w, space = widen.bf16_buffer((e.end - e.begin) // 2)
            read_into(e, space)
            bad = widen.widen_in_place(w)
        else:
            data = np.empty(e.end - e.begin, dtype=np.uint8)
            read_into(e, data)
            w, bad = to_float32(data, e.dtype)
        if bad:
            layer = LAYER.search(name)
            where = f" (layer {layer.group(1)})" if layer else ""
            raise UserError(f"{name}{where} in {e.file.name}: {bad} of {w.size} values are NaN or Inf")
        return w.reshape(e.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.load(name)


def read_into(e: TensorEntry, buffer: np.ndarray) -> None:
    """The tensor's bytes from its file into `buffer` (uint8, exactly their size)."""
    with open(e.file, "rb") as f:
        f.seek(e.begin)
        if f.readinto(memoryview(buffer)) != buffer.size:  # the file shrank since its header was checked
            raise UserError(f"{e.file}: truncated while reading {e.name}")


def to_float32(data: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """Raw safetensors bytes of `dtype` -> (float32 values, how many are NaN or Inf), in numpy."""
    if dtype == "BF16":
        w = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        w = data.view(np.float16).astype(np.float32) if dtype == "F16" else data.view(np.float32)
    return w, count_nonfinite(w)


def count_nonfinite(w: np.ndarray) -> int:
    """NaN and Inf reach the sum (one fast reduction); only then count them (a finite sum can also overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return 0 if np.isfinite(w.sum(dtype=np.float32)) else int(w.size - np.count_nonzero(np.isfinite(w)))


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config ({e})") from None


def index_tensors(directory: Path, allow_pickle: bool = False, pickled: dict | None = None) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors files; with none, of the pickle files when allowed (their tensors go into
    `pickled`)."""
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
    if not files and allow_pickle and any(directory.glob(PICKLE_WEIGHTS)):
        return load_pickles(directory, pickled)
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise UserError(f"{directory}: only pickle checkpoints (.bin/.pt) found; edgequant reads safetensors, and "
                            f"{PICKLE_WEIGHTS} only with --allow-pickle (loading pickles can run code)")
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
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise UserError(f"{file}: tensor {name} has dtype {dtype}; supported: {', '.join(SAFETENSORS_ITEMSIZE)}")
        nbytes = int(np.prod(shape)) * SAFETENSORS_ITEMSIZE[dtype]
        if e - b != nbytes or b < 0:
            raise UserError(f"{file}: corrupt safetensors entry for {name} ({e - b} bytes for shape {list(shape)})")
        if 8 + n + e > size:
            raise UserError(f"{file}: truncated safetensors file ({name} ends at byte {8 + n + e}, file has {size})")
        entries.append(TensorEntry(name, file, dtype, shape, 8 + n + b, 8 + n + e))
    return entries


def load_pickles(directory: Path, out: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    """pytorch_model*.bin through torch.load(weights_only=True): tensors and plain containers only, anything else
    (the classes and functions a malicious pickle would call) refused by torch's restricted unpickler."""
    import torch

    dtype_names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    entries = {}
    for file in sorted(directory.glob(PICKLE_WEIGHTS)):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:  # torch names the refused global after "WeightsUnpickler error: "
            detail = re.search(r"WeightsUnpickler error: ([^.]*)", str(e))
            raise UserError(f"{file}: refused: the pickle calls code, which weights_only loading does not allow"
                            f" ({detail.group(1) if detail else 'see torch.load'})") from None
        except Exception as e:  # not a zip-format checkpoint, truncated: one line for the user
            raise UserError(f"{file}: unreadable pickle checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
        if not isinstance(state, dict):
            raise UserError(f"{file}: not a state dict of tensors")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor) or t.dtype not in dtype_names:
                raise UserError(f"{file}: {name} is not a tensor of {', '.join(SAFETENSORS_ITEMSIZE)}")
            out[name] = t
            entries[name] = TensorEntry(name, file, dtype_names[t.dtype], tuple(t.shape), 0, 0)
    return entries

"""The last stage of a build: metadata, then every tensor in its planned type, into one GGUF, atomically.

A tensor is written as the solve stage hands it over (edgequant.solve.Solved): already packed (GPTQ's layers) or
encoded here from the checkpoint's weights by the stage's Encoder (round to nearest, importance-weighted or not).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping

import gguf
import numpy as np

from .convert.encode import encode, worker_count
from .convert.gguf_out import GGUFLayout, StreamingGGUF, TensorPlan, atomic_output
from .convert.recipes import FTYPES, requires_imatrix
from .errors import UserError
from .metadata import write_metadata
from .model import SourceModel

# Encoder for one tensor: (GGUF name, float32 weights, planned type) -> bytes.
Encoder = Callable[[str, np.ndarray, gguf.GGMLQuantizationType], np.ndarray]
# Tensors encoded already (GPTQ's), GGUF name -> a reader of their bytes: written without loading their weights.
Packed = Mapping[str, Callable[[], np.ndarray]]


def rtn_encoder(importance: dict[str, np.ndarray] | None = None) -> Encoder:
    """Round-to-nearest fitting as llama-quantize does it, importance-weighted when an importance is given.  As
    llama-quantize, a tensor of a type that needs an importance (recipes.requires_imatrix) but has none in it is
    refused."""

    def enc(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        imp = None if importance is None else importance.get(name)
        if importance is not None and imp is None and requires_imatrix(name, qtype, ""):
            raise UserError(f"{name}: the importance matrix has no entry for it, and llama.cpp writes {qtype.name} "
                            f"only with one (llama-quantize refuses it too)")
        return encode_experts(w, qtype, imp)

    return enc


def encode_experts(w: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None) -> np.ndarray:
    """encode(), where a 3-D expert stack (n_expert, rows, cols) may come with one importance per expert (n_expert ·
    cols values, as llama-imatrix collects them): each expert's rows are fitted with its own, as llama-quantize
    does (llama_tensor_quantize_impl: the importance of row r is expert r // rows')."""
    if importance is None or w.ndim != 3 or importance.size == w.shape[-1]:
        return encode(w, qtype, importance)
    if importance.size != w.shape[0] * w.shape[-1]:
        raise UserError(f"the importance has {importance.size} values for a tensor of {w.shape[0]} experts of "
                        f"{w.shape[-1]} columns")
    per_expert = importance.reshape(w.shape[0], w.shape[-1])
    return np.concatenate([encode(w[e], qtype, per_expert[e]) for e in range(w.shape[0])])


def digest(w_hat: np.ndarray) -> str:
    """What --verify compares: the solver's Ŵ against what the written file dequantizes to."""
    return hashlib.sha256(np.ascontiguousarray(w_hat, dtype=np.float32).tobytes()).hexdigest()


def write_gguf(out: Path, m: SourceModel, ftype: str, plan: list[TensorPlan], encoder: Encoder, progress,
               digests: dict[str, str] | None = None, packed: Packed | None = None, mixed: bool = False) -> None:
    """Metadata, then each planned tensor as `encoder` makes it (or as `packed` has it, without loading its
    weights), into `out` atomically; then, given the solver's digests, check that the file dequantizes to them.

    With more than one worker (convert.encode.worker_count) this is a pipeline: a reader thread loads up to
    LOAD_AHEAD tensors ahead (the first ones while the metadata is written) and a writer thread writes the previous
    tensor's bytes, while this thread encodes (the C fits, the reads and the widening run without the GIL).  With
    one worker every step runs in turn on this thread."""
    packed = packed or {}
    load = lambda name: packed[name]() if name in packed else m.load(name)  # noqa: E731
    with atomic_output(out) as tmp, pipeline_threads(worker_count() > 1) as (reader, writer):
        loads = deque(reader.submit(load, t.name) for t in plan[:LOAD_AHEAD])
        stream = start_gguf(tmp, m, ftype, plan, mixed)
        task = progress.add_task(f"writing {out.name}", total=len(plan))
        written = None
        for i, t in enumerate(plan):
            w = loads.popleft().result()
            if i + LOAD_AHEAD < len(plan):
                loads.append(reader.submit(load, plan[i + LOAD_AHEAD].name))
            progress.update(task, description=f"writing {t.name} → {t.qtype.name}")
            raw = w if t.name in packed else encoder(t.name, w, t.qtype)
            del w
            if written is not None:
                written.result()  # one tensor's bytes in flight: writes stay in plan order, errors surface here
            written = writer.submit(stream.write, t.name, raw)
            progress.advance(task)
        if written is not None:
            written.result()
        stream.close()
        if digests is not None:
            verify_digests(tmp, digests)


def start_gguf(path: Path, m: SourceModel, ftype: str, plan: list[TensorPlan], mixed: bool = False) -> StreamingGGUF:
    """`path` with everything before the tensor data written: the metadata and `plan`'s tensor directory.  mixed:
    the types are not `ftype`'s recipe (a size budget chose them), so general.file_type carries llama.cpp's
    "guessed" flag: llama.cpp then names the file "<ftype> (guessed)"."""
    writer = gguf.GGUFWriter(path, m.arch.name)
    write_metadata(writer, m, FTYPES[ftype] | (gguf.LlamaFileType.GUESSED if mixed else 0))
    return StreamingGGUF(writer, plan)


def gguf_layout(m: SourceModel, ftype: str, plan: list[TensorPlan]) -> GGUFLayout:
    """The header size and alignment of the GGUF `write_gguf` writes for `m` and `plan`'s tensors (in any types):
    the header is written once by the same code, without tensor data, to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="edgequant-header-") as d:
        path = Path(d) / "header.gguf"
        writer = start_gguf(path, m, ftype, plan).writer
        writer.close()
        return GGUFLayout(path.stat().st_size, writer.data_alignment)


LOAD_AHEAD = 2  # tensors loaded ahead of the one encoding: a large one (the output head) after small ones is ready


@contextlib.contextmanager
def pipeline_threads(threaded: bool) -> Iterator[tuple[Executor, Executor]]:
    """(reader, writer): one thread each, or both running every call at once on the caller's thread."""
    if not threaded:
        yield InCallerThread(), InCallerThread()
        return
    with ThreadPoolExecutor(1, "edgequant-load") as reader, ThreadPoolExecutor(1, "edgequant-write") as writer:
        try:
            yield reader, writer
        except BaseException:
            reader.shutdown(cancel_futures=True)  # a failed build does not wait for loads it will not use
            raise


class InCallerThread(Executor):
    """An executor that runs each call at once, in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


def verify_digests(path: Path, digests: dict[str, str]) -> None:
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name in digests:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            if digest(w) != digests[t.name]:
                raise UserError(f"--verify: {t.name} in the written file does not dequantize to the solver's weights")

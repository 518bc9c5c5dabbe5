"""float32 tensor -> the exact bytes of one GGUF tensor of a given type (float types via gguf-py, blocks via codecs).

Every block codec fits a row from that row alone (plus the per-column importance), so a large tensor is encoded in
chunks of whole rows by several workers, and the bytes are those of one call.

Block fits run in C (edgequant.native.fit: the numpy codecs' arithmetic, same bytes) when the extension is built:
the call releases the GIL, so the chunks go to threads that write straight into one result array.  Without the
extension the numpy codecs fit, and the kind of worker depends on the fit (1024x4096 random weights, 2 cores, best
of 5; speedup of 2 workers over one call):

    | numpy fit                                    | ns/weight | 2 threads | 2 processes |
    |----------------------------------------------|-----------|-----------|-------------|
    | scale searches: K-quants, legacy + imatrix   | 60-220    | 0.9-1.5x  | 1.4-2.1x    |
    | direct: Q8_0, Q4_0/Q4_1/Q5_0/Q5_1 no imatrix | 6-13      | 1.4-2.6x  | 0.8-1.1x    |

The numpy searches run many short numpy calls on cache-sized arrays, which the GIL serialises across threads, so
they go to processes (rows pickled to them: a few ns per weight); the direct fits are a few long ufunc loops that run
outside the GIL, on the caller's rows, so they go to threads.

Workers: EDGEQUANT_THREADS if set (1: everything in the calling thread), else the CPUs this process may run on.
The pools start with the first large tensor and serve the whole process.  Processes are spawned (not forked from a
process that may hold torch's threads) and import only the codecs, plus the caller's main module, as spawned
processes do: a script that encodes without the extension must keep its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import gguf
import numpy as np

from .codecs import codec
from .errors import UserError

try:
    from ..native import fit as native_fit
except ImportError:  # the C extension is not built: the numpy codecs fit everything
    native_fit = None

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
DIRECT_FITS = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # without importance (Q8_0 ignores it): no scale search
PARALLEL_MIN_WEIGHTS = 1 << 17  # below this (~20 ms of numpy K-quant fitting, ~1.5 ms in C) one call beats the pool
# Rows per task: two tasks per worker to even out the load, but at least TASK_MIN_WEIGHTS weights (~10 ms of numpy
# K-quant fitting, ~0.7 ms in C) and at most TASK_MAX_WEIGHTS (a numpy K-quant fit needs ~3.6x its input in
# temporaries: ~230 MiB per worker).
TASKS_PER_WORKER = 2
TASK_MIN_WEIGHTS = 1 << 16
TASK_MAX_WEIGHTS = 1 << 24

_pools: dict[bool, tuple[int, Executor]] = {}  # processes? -> (workers, pool)


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None = None,
           workers: int | None = None) -> np.ndarray:
    """(rows, n_per_row) or 1-D float32 -> uint8 bytes, as llama-quantize (or convert_hf_to_gguf for floats) writes.

    workers: for block types (default: worker_count()); tensors under PARALLEL_MIN_WEIGHTS stay in this thread."""
    if qtype in FLOAT_TYPES:
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(-1)
    w2 = w.reshape(-1, w.shape[-1])
    workers = worker_count() if workers is None else workers
    rows = min(max(math.ceil(w2.shape[0] / (TASKS_PER_WORKER * workers)), math.ceil(TASK_MIN_WEIGHTS / w2.shape[1])),
               max(1, TASK_MAX_WEIGHTS // w2.shape[1]))
    one_call = workers <= 1 or w2.size < PARALLEL_MIN_WEIGHTS or rows >= w2.shape[0]
    if native_fit is not None and native_fit.supports(qtype):
        return _encode_native(w2, qtype, importance, workers, None if one_call else rows)
    if one_call:
        return codec(qtype).quantize(w2, importance).reshape(-1)
    chunks = [w2[r:r + rows] for r in range(0, w2.shape[0], rows)]
    searches = not (qtype in DIRECT_FITS and (importance is None or qtype == Q.Q8_0))
    parts = pool(workers, processes=searches).map(_encode_rows, [qtype] * len(chunks), chunks, [importance] * len(chunks))
    return np.concatenate([p.reshape(-1) for p in parts])


def _encode_native(w: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None, workers: int,
                   rows: int | None) -> np.ndarray:
    """The C fits, in chunks of `rows` rows on the thread pool (None: one call here), into one array."""
    codec(qtype).check_shape(w.shape[1])
    codec(qtype).check_importance(importance)  # IQ2_XXS/IQ2_XS/IQ1_S: refused without one, as the numpy fit refuses
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.empty((w.shape[0], native_fit.row_bytes(qtype, w.shape[1])), dtype=np.uint8)
    if rows is None:
        native_fit.quantize(w, qtype, importance, out)
    else:
        starts = range(0, w.shape[0], rows)
        list(pool(workers, processes=False).map(
            lambda r: native_fit.quantize(w[r:r + rows], qtype, importance, out[r:r + rows]), starts))
    return out.reshape(-1)


def _encode_rows(qtype: gguf.GGMLQuantizationType, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """In a worker: one chunk of rows."""
    return codec(qtype).quantize(w, importance)


def _start_process() -> None:
    """Free one large array first: glibc then serves later allocations up to its size from the heap, which it keeps.
    A fresh process would otherwise map and unmap every chunk-sized temporary: measured 280K page faults and +30 %
    CPU over bench-a's tensors (the parent process has freed large arrays before it gets here)."""
    np.empty(1 << 22, np.float32)


def worker_count() -> int:
    env = os.environ.get("EDGEQUANT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise UserError(f"EDGEQUANT_THREADS={env!r} is not a whole number") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool(workers: int, processes: bool) -> Executor:
    """The process-wide pool of `workers` processes or threads (replaced when another size is asked for)."""
    size, executor = _pools.get(processes, (0, None))
    if size != workers:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        executor = (ProcessPoolExecutor(workers, get_context("spawn"), _start_process) if processes
                    else ThreadPoolExecutor(workers, "edgequant-encode"))
        _pools[processes] = workers, executor
    return executor

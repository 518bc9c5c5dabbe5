"""convert.encode's row-chunked encoding, C fits on threads or numpy fits on worker processes and threads: the same
bytes as one call and as libggml, and the same GGUF either way."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.cli import main
from edgequant.convert import encode as enc
from edgequant.convert.codecs import CODECS
from edgequant.errors import UserError

ROWS, N = 37, 512  # an odd row count: chunks of unequal size


@pytest.fixture(params=["native", "numpy"])
def fits(request, monkeypatch):
    """Both encoders: the C fits (where built) and the numpy codecs, the fallback without the extension."""
    if request.param == "numpy":
        monkeypatch.setattr(enc, "native_fit", None)
    elif enc.native_fit is None:
        pytest.skip("the native extension is not built")
    return request.param


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunk even this small tensor, a few rows per task."""
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 1)


@pytest.mark.parametrize("qtype", sorted(CODECS, key=lambda t: t.name), ids=lambda t: t.name)
def test_chunked_equals_one_call_and_ggml(tiny_chunks, fits, qtype):
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((ROWS, N)) * np.exp(rng.standard_normal((ROWS, 1)))).astype(np.float32)
    w[3, :40] = 0  # a degenerate block
    importance = (rng.random(N) * 10).astype(np.float32) + 1e-3
    for importance in (importance,) if CODECS[qtype].needs_importance else (None, importance):  # ggml asserts one
        whole = enc.encode(w, qtype, importance, workers=1)
        chunked = enc.encode(w, qtype, importance, workers=3)  # ceil(37 / 6) = 7 rows per task: 6 tasks
        assert chunked.dtype == np.uint8 and np.array_equal(chunked, whole)
        assert np.array_equal(chunked, ggml_oracle.ggml_bytes(qtype, w, importance).reshape(-1))


def test_small_tensors_stay_in_process(monkeypatch, fits):
    def no_pool(workers, processes):
        raise AssertionError("pool started for a small tensor")

    monkeypatch.setattr(enc, "pool", no_pool)
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    q4 = gguf.GGMLQuantizationType.Q4_K
    assert np.array_equal(enc.encode(w, q4, workers=8), ggml_oracle.quantize_chunk(q4, w).reshape(-1))


def test_task_rows(monkeypatch, fits):
    """Tasks of whole rows: two per worker, but at least TASK_MIN_WEIGHTS and at most TASK_MAX_WEIGHTS each."""
    seen = []

    class Recorder:
        def map(self, fn, *args):
            results = list(map(fn, *args))
            seen.extend(r.shape[0] for r in results)  # both encoders return the bytes of their chunk's rows
            return results

    monkeypatch.setattr(enc, "pool", lambda workers, processes: Recorder())
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    w = np.zeros((1000, 256), np.float32)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 256 * 10)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # 1000 rows / (2 * 5) tasks
    assert seen == [100] * 10
    seen.clear()
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 256 * 400)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # at least 400 rows per task
    assert seen == [400, 400, 200]
    seen.clear()
    monkeypatch.setattr(enc, "TASK_MAX_WEIGHTS", 256 * 300)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # at most 300 rows per task
    assert seen == [300] * 3 + [100]
    seen.clear()
    monkeypatch.setattr(enc, "TASK_MAX_WEIGHTS", 1 << 30)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 256 * 1000)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # one task: encoded in this process
    assert seen == []


def test_worker_count(monkeypatch):
    monkeypatch.setenv("EDGEQUANT_THREADS", "3")
    assert enc.worker_count() == 3
    monkeypatch.setenv("EDGEQUANT_THREADS", "0")
    assert enc.worker_count() == 1
    monkeypatch.setenv("EDGEQUANT_THREADS", "many")
    with pytest.raises(UserError, match="EDGEQUANT_THREADS"):
        enc.worker_count()
    monkeypatch.delenv("EDGEQUANT_THREADS")
    assert enc.worker_count() >= 1


@pytest.mark.parametrize("qtype, with_importance, numpy_processes", [
    ("Q4_K", False, True), ("Q6_K", True, True), ("Q4_0", True, True),  # numpy scale searches: processes
    ("Q4_0", False, False), ("Q5_1", False, False), ("Q8_0", True, False),  # direct fits (Q8_0 ignores importance)
    ("IQ4_NL", False, True), ("IQ4_XS", True, True),  # numpy table searches: processes
])
def test_pool_kind(monkeypatch, fits, qtype, with_importance, numpy_processes):
    """C fits always on threads; numpy fits on processes when they search scales."""
    kinds = []

    class Recorder:
        def map(self, fn, *args):
            return list(map(fn, *args))

    def record(workers, processes):
        kinds.append(processes)
        return Recorder()

    monkeypatch.setattr(enc, "pool", record)
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 1)
    w = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    enc.encode(w, gguf.GGMLQuantizationType[qtype], np.ones(256, np.float32) if with_importance else None, workers=2)
    assert kinds == [numpy_processes and fits == "numpy"]


def test_numpy_fallback_for_types_without_a_c_fit(monkeypatch):
    """Q8_K has no C fit: its chunks still go to processes, with the extension built or not."""
    kinds = []

    class Recorder:
        def map(self, fn, *args):
            return list(map(fn, *args))

    monkeypatch.setattr(enc, "pool", lambda workers, processes: kinds.append(processes) or Recorder())
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 1)
    w = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    q8k = gguf.GGMLQuantizationType.Q8_K
    assert np.array_equal(enc.encode(w, q8k, workers=2), ggml_oracle.ggml_bytes(q8k, w).reshape(-1))
    assert kinds == [True]


@pytest.mark.parametrize("target", ["Q4_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS"])
def test_gguf_identical_with_c_and_numpy_fits(tiny_llama, tmp_path, monkeypatch, target):
    """A whole RTN build writes the same file through the C fits (2 threads, small chunks) and the numpy codecs."""
    if enc.native_fit is None:
        pytest.skip("the native extension is not built")
    monkeypatch.setenv("EDGEQUANT_THREADS", "2")
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 1)
    files = {}
    for backend in ("native", "numpy"):
        if backend == "numpy":
            monkeypatch.setattr(enc, "native_fit", None)
            monkeypatch.setenv("EDGEQUANT_THREADS", "1")  # no worker processes for a tiny model
        files[backend] = tmp_path / f"{backend}.gguf"
        assert main(["build", str(tiny_llama), "--target", target, "--method", "rtn", "-o", str(files[backend]),
                     "--quiet"]) == 0
    assert files["native"].read_bytes() == files["numpy"].read_bytes()

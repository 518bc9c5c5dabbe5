"""convert.encode's row-chunked encoding on worker processes and threads: the same bytes as one call and as libggml."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.convert import encode as enc
from edgequant.convert.codecs import CODECS
from edgequant.errors import UserError

ROWS, N = 37, 512  # an odd row count: chunks of unequal size


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunk even this small tensor, a few rows per task."""
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 1)


@pytest.mark.parametrize("qtype", sorted(CODECS, key=lambda t: t.name), ids=lambda t: t.name)
def test_chunked_equals_one_call_and_ggml(tiny_chunks, qtype):
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((ROWS, N)) * np.exp(rng.standard_normal((ROWS, 1)))).astype(np.float32)
    w[3, :40] = 0  # a degenerate block
    for importance in (None, (rng.random(N) * 10).astype(np.float32) + 1e-3):
        whole = enc.encode(w, qtype, importance, workers=1)
        chunked = enc.encode(w, qtype, importance, workers=3)  # ceil(37 / 6) = 7 rows per task: 6 tasks
        assert chunked.dtype == np.uint8 and np.array_equal(chunked, whole)
        assert np.array_equal(chunked, ggml_oracle.ggml_bytes(qtype, w, importance).reshape(-1))


def test_small_tensors_stay_in_process(monkeypatch):
    def no_pool(workers, processes):
        raise AssertionError("pool started for a small tensor")

    monkeypatch.setattr(enc, "pool", no_pool)
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    q4 = gguf.GGMLQuantizationType.Q4_K
    assert np.array_equal(enc.encode(w, q4, workers=8), ggml_oracle.quantize_chunk(q4, w).reshape(-1))


def test_task_rows(monkeypatch):
    """Tasks of whole rows: two per worker, but at least TASK_MIN_WEIGHTS and at most TASK_MAX_WEIGHTS each."""
    seen = []

    class Recorder:
        def map(self, fn, qtypes, chunks, importances):
            seen.extend(c.shape for c in chunks)
            return [fn(q, c, i) for q, c, i in zip(qtypes, chunks, importances)]

    monkeypatch.setattr(enc, "pool", lambda workers, processes: Recorder())
    monkeypatch.setattr(enc, "PARALLEL_MIN_WEIGHTS", 0)
    w = np.zeros((1000, 256), np.float32)
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 256 * 10)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # 1000 rows / (2 * 5) tasks
    assert seen == [(100, 256)] * 10
    seen.clear()
    monkeypatch.setattr(enc, "TASK_MIN_WEIGHTS", 256 * 400)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # at least 400 rows per task
    assert seen == [(400, 256), (400, 256), (200, 256)]
    seen.clear()
    monkeypatch.setattr(enc, "TASK_MAX_WEIGHTS", 256 * 300)
    enc.encode(w, gguf.GGMLQuantizationType.Q8_0, workers=5)  # at most 300 rows per task
    assert seen == [(300, 256)] * 3 + [(100, 256)]
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


@pytest.mark.parametrize("qtype, with_importance, processes", [
    ("Q4_K", False, True), ("Q6_K", True, True), ("Q4_0", True, True),  # scale searches: processes
    ("Q4_0", False, False), ("Q5_1", False, False), ("Q8_0", True, False),  # direct fits (Q8_0 ignores importance)
])
def test_pool_kind(monkeypatch, qtype, with_importance, processes):
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
    assert kinds == [processes]

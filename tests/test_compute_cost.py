"""Each ggml type's compute cost in llama.cpp's CPU backend (edgequant.compute_cost), measured through libggml."""

from __future__ import annotations

import json
import math

import gguf
import pytest

from edgequant import compute_cost as cc
from edgequant.convert.type_menu import menu

Q = gguf.GGMLQuantizationType
# every type on a menu, with a row length each menu allows: rows of 256 and of 32 (SmolLM2's 576)
CASES = sorted({(q, 512) for q in menu("blk.0.ffn_up.weight", (1536, 512))}
               | {(q, 576) for q in menu("blk.0.ffn_up.weight", (1536, 576))})
QUICK = {"generation": 0.1, "prompt": 0.2}


@pytest.fixture(scope="module")
def measured():
    pytest.importorskip("llama_cpp")
    return cc.measure(CASES, seconds=QUICK)


def test_every_menu_type_has_a_positive_finite_cost(measured):
    for regime in (measured.generation, measured.prompt):
        assert set(regime) == set(CASES)
        assert all(math.isfinite(v) and 0 < v < 1e-6 for v in regime.values()), regime  # under a µs per weight
    assert measured.source.startswith("measured")


def test_fallback_without_libggml(monkeypatch, tmp_path):
    def unavailable():
        raise cc.GgmlUnavailable("no llama_cpp here")

    monkeypatch.setattr(cc, "_library_dir", unavailable)
    cc._cached.cache_clear()
    try:
        cost = cc.compute_cost(CASES)
    finally:
        cc._cached.cache_clear()
    assert cost.source.startswith("fallback")
    assert set(cost.generation) == set(CASES)
    assert cost.generation[Q.Q4_K, 512] == cc.FALLBACK_PS[Q.Q4_K][0] * 1e-12


def test_measured_once_then_read_from_disk(monkeypatch, tmp_path):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(cc, "cache_dir", lambda: tmp_path)
    calls = []
    real = cc.measure
    monkeypatch.setattr(cc, "measure", lambda cases: calls.append(cases) or real(cases, seconds=QUICK))
    cc._cached.cache_clear()
    try:
        first = cc.compute_cost([(Q.Q4_K, 512), (Q.Q5_K, 512)])
        cc._cached.cache_clear()  # a new process: the disk's numbers, not a new measurement
        again = cc.compute_cost([(Q.Q4_K, 512)])
        more = cc.compute_cost([(Q.Q4_K, 512), (Q.Q6_K, 1024)])  # only the new case is measured, the rest kept
    finally:
        cc._cached.cache_clear()
    assert len(calls) == 2 and calls[1] == [(Q.Q6_K, 1024)]
    assert again.generation[Q.Q4_K, 512] == first.generation[Q.Q4_K, 512]
    assert more.prompt[Q.Q4_K, 512] == first.prompt[Q.Q4_K, 512]
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(stored["ps_per_weight"]) == {"Q4_K:512", "Q5_K:512", "Q6_K:1024"}

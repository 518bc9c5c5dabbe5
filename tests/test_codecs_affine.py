"""Q2_K, Q4_K, Q5_K, Q4_1, Q5_1 against libggml (bytes) and gguf-py (dequantization), bit for bit."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.convert.codecs import codec

TYPES = ["Q2_K", "Q4_K", "Q5_K", "Q4_1", "Q5_1"]
N = 512  # two K-quant super-blocks per row
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def adversarial_rows(rng: np.random.Generator) -> np.ndarray:
    """One row per hard case: degenerate blocks, extreme magnitudes, rounding ties, mixed sub-block scales."""
    g = rng.standard_normal((1, N)).astype(np.float32)
    outliers = rng.standard_normal(N).astype(np.float32)
    outliers[rng.choice(N, 6, replace=False)] = [1e4, -3e4, 6e4, -6e4, 2e3, 5e2]
    mixed = rng.standard_normal(N).astype(np.float32) * np.repeat(np.float32(10.0) ** rng.integers(-6, 4, N // 16), 16)
    sparse = np.where(rng.random(N) < 0.05, rng.standard_normal(N), 0).astype(np.float32)
    cases = [
        np.zeros(N),
        np.full(N, -0.0),
        np.full(N, 0.5),
        np.full(N, -3.0),
        np.full(N, 1e-3).astype(np.float32) * (np.arange(N) % 32 == 5),  # one nonzero per block
        outliers,
        g[0] * 1e-30,  # tiny but normal
        g[0] * 1e-41,  # subnormal
        np.full(N, 1e-45),  # the smallest subnormal
        rng.uniform(-65000, 65000, N),  # near the fp16 maximum
        np.full(N, 65504.0),
        rng.uniform(60000, 65504, N),
        np.abs(g[0]),  # all positive: min clamps to 0
        -np.abs(g[0]) - 5,  # all negative
        rng.integers(-8, 8, N) / 2,  # exact halves: rounding ties
        mixed,
        sparse,
    ]
    return np.stack([np.asarray(c, dtype=np.float32) for c in cases])


def importances(rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    holes = rng.random(N).astype(np.float32) + 0.01
    holes[rng.random(N) < 0.2] = 0
    holes[32:64] = 0  # a whole block without importance
    return {
        "none": None,
        "random": (rng.random(N) * 10).astype(np.float32) + 1e-3,
        "zeros": holes,
        "skewed": np.exp(3 * rng.standard_normal(N)).astype(np.float32),
    }


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool((a.view(np.uint8) == b.view(np.uint8)).all())


def check_against_ggml(c, w: np.ndarray, importance: np.ndarray | None) -> None:
    raw = ggml_oracle.quantize_chunk(c.qtype, w, importance)
    blocks = c.fit(w, importance)
    ours = c.pack(blocks)
    bad = ~(ours.reshape(-1, c.type_size) == raw.reshape(-1, c.type_size)).all(axis=1)
    assert not bad.any(), f"{c.name}: {bad.sum()} of {bad.size} blocks differ from ggml, first {np.flatnonzero(bad)[:5]}"

    back = c.unpack(raw)
    for field in dataclasses.fields(blocks):
        assert same_bits(getattr(back, field.name), getattr(blocks, field.name)), field.name

    w_hat = c.dequantize(blocks)
    assert w_hat.dtype == np.float32
    assert same_bits(w_hat, gguf.quants.dequantize(raw, c.qtype))

    grid = c.grid(blocks)
    codes = c.codes(blocks)
    # ggml can store an infinite fp16 min or scale (inputs near the fp16 limit); such groups have no finite grid.
    live = np.repeat((grid.scale != 0) & np.isfinite(grid.scale) & np.isfinite(grid.offset), grid.group, axis=1)
    with np.errstate(invalid="ignore"):
        assert (grid.quantize(w_hat) == codes)[live].all()
    assert same_bits(c.dequantize(c.with_codes(blocks, codes)), w_hat)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["none", "random", "zeros", "skewed"])
def test_gaussian_rows_match_ggml(name, kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, N)).astype(np.float32) * np.float32(0.02)
    check_against_ggml(codec(name), w, importances(rng)[kind])


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["none", "random", "zeros", "skewed"])
def test_adversarial_rows_match_ggml(name, kind):
    rng = np.random.default_rng(2)
    w = adversarial_rows(rng)
    check_against_ggml(codec(name), w, importances(rng)[kind])


@pytest.mark.parametrize("name", TYPES)
def test_with_codes_changes_only_codes(name):
    c = codec(name)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, N)).astype(np.float32)
    blocks = c.fit(w)
    grid = c.grid(blocks)
    q = rng.integers(grid.qmin, grid.qmax + 1, w.shape)
    changed = c.with_codes(blocks, q)
    assert (c.codes(changed) == q).all()
    assert same_bits(c.dequantize(changed), grid.dequantize(q))
    assert same_bits(c.unpack(c.pack(changed)).q, changed.q)
    with pytest.raises(ValueError):
        c.with_codes(blocks, q + grid.qmax + 1)


@pytest.mark.parametrize("name", TYPES)
def test_rejects_partial_blocks(name):
    c = codec(name)
    with pytest.raises(ValueError):
        c.fit(np.zeros((2, c.block_size + 16), dtype=np.float32))


@functools.cache
def bench_a_rows() -> list[tuple[str, np.ndarray]]:
    """32 rows spread over each of bench-a's weight matrices (float32)."""
    from edgequant.checkpoint import Checkpoint

    ckpt = Checkpoint(SHARED / "models" / "bench-a")
    return [(name, np.ascontiguousarray(t.numpy()[:: t.shape[0] // 32])) for name, t in ckpt.items() if t.ndim == 2]


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared (benchmark data)")
@pytest.mark.parametrize("name", TYPES)
def test_bench_a_sample_matches_ggml(name):
    """32 rows of every bench-a weight matrix; scripts/check_codecs_bench_a.py checks every row."""
    c = codec(name)
    rng = np.random.default_rng(4)
    for tensor, w in bench_a_rows():
        for importance in (None, rng.random(w.shape[1]).astype(np.float32)):
            raw = ggml_oracle.quantize_chunk(c.qtype, w, importance)
            assert same_bits(c.quantize(w, importance), raw), (tensor, importance is not None)

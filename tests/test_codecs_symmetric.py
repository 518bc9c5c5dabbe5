"""The symmetric codecs (Q3_K, Q4_0, Q5_0, Q6_K, Q8_0, Q8_K) against libggml and gguf-py, bit for bit."""

from __future__ import annotations

import pathlib
import zlib

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.convert.codecs import codec
from edgequant.convert.codecs.search_symmetric import nearest_int, sequential_sum

TYPES = ["Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0", "Q8_K"]
N = 512  # two super-blocks per row
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def reference_dequantize(c, raw):
    if c.qtype == gguf.GGMLQuantizationType.Q8_K:  # gguf-py has no Q8_K
        return ggml_oracle.dequantize_row(c.qtype, raw)
    return gguf.quants.dequantize(raw, c.qtype)


def adversarial_rows(rng) -> np.ndarray:
    """Rows that hit ggml's edge cases; each is a whole row because Q4_0/Q5_0 weight by row statistics."""
    g = rng.standard_normal((4, N)).astype(np.float32)
    spikes = g[0].copy()
    spikes[rng.choice(N, 12, replace=False)] *= 1e4
    one_hot = np.zeros(N, np.float32)
    one_hot[::32] = rng.standard_normal(N // 32)
    halves = rng.integers(-254, 255, N) / 2
    halves[::32] = 127  # Q8_0: d = 1 exactly, so every half-integer is a rounding tie
    half_zero = g[1].copy()
    half_zero[: N // 2] = 0
    rows = [
        np.zeros(N),
        np.full(N, -0.0),
        np.full(N, 1.0),
        np.full(N, -3.5),
        spikes,
        one_hot,
        half_zero,
        g[2] * 1e-20,
        g[2] * 1e-36,  # the 1/scale of ggml's legacy encoders overflows to inf
        g[3] * 1e-42,  # subnormal
        np.concatenate([g[3, : N // 2] * 1e-17, g[3, N // 2 :]]),  # groups around GROUP_MAX_EPS
        np.clip(g[0] * 3e4, -65504, 65504),
        np.full(N, 65504.0) * np.sign(g[1]),
        rng.integers(-8, 8, N),  # exact grid points: rounding ties everywhere
        rng.integers(-64, 64, N) / 2,
        halves,
        np.tile(np.arange(-16, 16), N // 32) * 1.5,
        g[1] ** 3,  # heavy tails
    ]
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(1234)
    gaussian = rng.standard_normal((48, N)).astype(np.float32) * rng.uniform(0.01, 3, (48, 1)).astype(np.float32)
    return np.concatenate([gaussian, adversarial_rows(rng)])


IMPORTANCE = ["none", "random", "with_zeros"]


def importance_vector(kind: str) -> np.ndarray | None:
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    imp = rng.gamma(0.5, 2.0, N).astype(np.float32)
    if kind == "with_zeros":
        imp[rng.random(N) < 0.3] = 0
        imp[32:64] = 0  # a block, and in the K-quants two groups, with no importance at all
    return imp


@pytest.mark.parametrize("kind", IMPORTANCE)
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_ggml(name, kind, matrix):
    ggml_oracle.assert_codec_bytes_match(codec(name), matrix, importance_vector(kind))


@pytest.mark.parametrize("kind", ["none", "with_zeros"])
@pytest.mark.parametrize("name", TYPES)
def test_unpack_pack_dequantize(name, kind, matrix):
    c = codec(name)
    ggml_oracle.assert_round_trip(c, c.fit(matrix, importance_vector(kind)), reference_dequantize)


@pytest.mark.parametrize("name", TYPES)
def test_grid_requantizes_to_codes(name, matrix):
    c = codec(name)
    blocks = c.fit(matrix, importance_vector("random"))
    grid = c.grid(blocks)
    q = c.codes(blocks)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    scale = grid.columns(None, matrix.shape[1])[0]
    live = (scale != 0) & np.isfinite(scale)
    assert live.mean() > 0.5
    np.testing.assert_array_equal(grid.quantize(c.dequantize(blocks))[live], q[live])


@pytest.mark.parametrize("name", TYPES)
def test_with_codes(name, matrix):
    c = codec(name)
    blocks = c.fit(matrix)
    q = c.codes(blocks)
    assert c.pack(c.with_codes(blocks, q)).tobytes() == c.pack(blocks).tobytes()
    flipped = c.with_codes(blocks, c.grid(blocks).qmax + c.grid(blocks).qmin - q)  # mirror every code
    np.testing.assert_array_equal(c.codes(flipped), c.grid(blocks).qmax + c.grid(blocks).qmin - q)
    with pytest.raises(ValueError):
        c.with_codes(blocks, q + (c.grid(blocks).qmax - c.grid(blocks).qmin + 1))


def test_q8_k_bsums_are_group_sums(matrix):
    c = codec("Q8_K")
    blocks = c.fit(matrix)
    raw = c.pack(blocks).reshape(len(matrix), -1, c.type_size)
    bsums = np.ascontiguousarray(raw[..., 260:]).view("<i2")
    np.testing.assert_array_equal(bsums, blocks.q.reshape(*blocks.d.shape, 16, 16).astype(np.int32).sum(-1))


def test_nearest_int_is_round_half_even_in_range():
    v = np.concatenate([np.arange(-600, 600) / 4, np.random.default_rng(0).uniform(-4e6, 4e6, 10000)])
    v = v.astype(np.float32)
    np.testing.assert_array_equal(nearest_int(v), np.rint(v).astype(np.int32))


def test_sequential_sum_order():
    # pairwise summation gives 1e8 + 1 + ... differently from a left-to-right float32 accumulation
    t = np.array([1e8] + [1.0] * 15 + [-1e8], np.float32)[:, None]
    acc = np.float32(0)
    for v in t[:, 0]:
        acc = np.float32(acc + v)
    assert sequential_sum(t)[0] == acc == 0


def bench_a_matrices(every: int):
    """bench-a's 2-D weights as float32, every `every`-th row of each (to keep the test short)."""
    from edgequant.checkpoint import Checkpoint

    for key, t in Checkpoint(SHARED / "models/bench-a").items():
        if t.ndim == 2:
            yield key, np.ascontiguousarray(t.numpy()[::every])


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "models/bench-a/model.safetensors").exists(), reason="needs ../shared")
@pytest.mark.parametrize("name", TYPES)
def test_bench_a_matches_ggml(name):
    """Every 2-D tensor of bench-a, every 4th row (1/4 of the weights), with and without importance.

    scripts/check_codecs_bench_a.py checks every row."""
    c = codec(name)
    for key, w in bench_a_matrices(every=4):
        imp = np.random.default_rng(zlib.crc32(key.encode())).gamma(0.5, 2.0, w.shape[1]).astype(np.float32)
        for importance in (None, imp) if c.uses_importance else (None,):
            ours = c.quantize(w, importance)
            assert np.array_equal(ours, ggml_oracle.ggml_bytes(c.qtype, w, importance)), (key, importance is None)

"""The non-uniform table codecs (IQ4_NL, IQ4_XS) against libggml and gguf-py, bit for bit."""

from __future__ import annotations

import dataclasses
import zlib

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.convert.codecs import codec
from edgequant.convert.codecs.iquant_nl import KVALUES, VALUES, best_index
from test_codecs_affine import adversarial_rows as affine_rows
from test_codecs_symmetric import SHARED, bench_a_matrices
from test_codecs_symmetric import adversarial_rows as symmetric_rows

TYPES = ["IQ4_NL", "IQ4_XS"]
N = 512  # two super-blocks per row
F32 = np.float32


def table_rows(rng) -> np.ndarray:
    """Rows on and between the table's values: the first search grid (d = peak / 127) lands x / d exactly on a
    value or on the midpoint of two, where best_index_int8's tie rule decides."""
    mids = (VALUES[:-1] + VALUES[1:]) / 2
    on = np.tile(VALUES, N // 16)
    between = np.tile(np.concatenate([[-127], mids, [-127] * 16]), N // 32)
    shuffled = rng.permutation(between.reshape(-1, 32).T).T.reshape(-1)  # -127 not always first
    return np.stack([on, on * 0.25, between, between * 3.0, shuffled]).astype(F32)


def overflow_rows(rng) -> np.ndarray:
    """Magnitudes whose squares overflow float32 (inf and NaN inside the search), and random finite bit patterns."""
    g = rng.standard_normal((3, N)).astype(F32)
    bits = rng.integers(0, 2**32, (2, N), dtype=np.uint64).astype(np.uint32).view(F32)
    return np.stack([g[0] * 1e20, g[1] * 1e37, np.full(N, 3e38), *np.where(np.isfinite(bits), bits, 0)]).astype(F32)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(4321)
    gaussian = rng.standard_normal((32, N)).astype(F32) * rng.uniform(0.01, 3, (32, 1)).astype(F32)
    gaussian[rng.random(gaussian.shape) < 0.01] *= 40  # outliers
    return np.concatenate([gaussian, symmetric_rows(rng), affine_rows(rng), table_rows(rng), overflow_rows(rng)])


IMPORTANCE = ["none", "random", "with_zeros"]


def importance_vector(kind: str) -> np.ndarray | None:
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    imp = rng.gamma(0.5, 2.0, N).astype(F32)
    if kind == "with_zeros":
        imp[rng.random(N) < 0.3] = 0
        imp[32:64] = 0  # a whole block / sub-block without importance
        imp[256 + 64 : 256 + 96] = 0
    return imp


@pytest.mark.parametrize("kind", IMPORTANCE)
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_ggml(name, kind, matrix):
    ggml_oracle.assert_codec_bytes_match(codec(name), matrix, importance_vector(kind))


@pytest.mark.parametrize("kind", ["none", "with_zeros"])
@pytest.mark.parametrize("name", TYPES)
def test_unpack_pack_dequantize(name, kind, matrix):
    c = codec(name)
    ggml_oracle.assert_round_trip(c, c.fit(matrix, importance_vector(kind)), lambda c, raw: gguf.quants.dequantize(raw, c.qtype))


@pytest.mark.parametrize("name", TYPES)
def test_random_bytes_unpack_pack(name):
    """Every bit pattern of a block is a block: unpack/pack is the identity on arbitrary bytes."""
    c = codec(name)
    raw = np.random.default_rng(3).integers(0, 256, (5, 4 * c.type_size), dtype=np.uint8)
    assert np.array_equal(c.pack(c.unpack(raw)), raw)
    ref = gguf.quants.dequantize(raw, c.qtype).reshape(5, -1)
    np.testing.assert_array_equal(c.dequantize(c.unpack(raw)).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_with_codes(name, matrix):
    c = codec(name)
    blocks = c.fit(matrix)
    q = c.codes(blocks)
    assert q.shape == matrix.shape and q.min() >= 0 and q.max() <= 15
    assert c.pack(c.with_codes(blocks, q)).tobytes() == c.pack(blocks).tobytes()
    np.testing.assert_array_equal(c.codes(c.with_codes(blocks, 15 - q)), 15 - q)
    with pytest.raises(ValueError, match="outside"):
        c.with_codes(blocks, q + 16)


@pytest.mark.parametrize("name", TYPES)
def test_grid_is_the_scaled_table(name, matrix):
    """The grid's levels are the table, its scale per 32 weights the one ggml dequantizes with (IQ4_XS:
    d * (ls - 32)), so grid.dequantize of the codes is gguf-py's dequantization; and the nearest levels of those
    weights are the codes."""
    c = codec(name)
    blocks = c.fit(matrix)
    grid, q = c.grid(blocks), c.codes(blocks)
    assert grid.levels is VALUES and (grid.group, grid.qmin, grid.qmax) == (32, 0, 15)
    ref = gguf.quants.dequantize(c.pack(blocks), c.qtype).reshape(matrix.shape)
    np.testing.assert_array_equal(grid.dequantize(q).view(np.uint32), ref.view(np.uint32))
    finite = np.isfinite(ref).all(1) & (np.abs(grid.scale) < 1e36).all(1)  # scale * 127 stays finite
    assert finite.sum() > 40
    np.testing.assert_array_equal(grid.quantize(ref)[finite], q[finite])
    assert (grid.quantize(ref[:, 32:64], slice(32, 64))[finite] == q[finite, 32:64]).all()


def test_grid_rounds_to_the_nearest_scaled_value():
    """(w - offset) / scale rounded by nearest_index (a tie goes up), 0 where the scale is 0, for either sign of
    the scale."""
    c = codec("IQ4_NL")
    d = np.array([[2.0, -0.5, 0.0]], np.float16)
    grid = c.grid(dataclasses.replace(c.fit(np.zeros((1, 96), F32)), d=d))
    mids = (VALUES[:-1] + VALUES[1:]) / 2
    x = np.concatenate([VALUES * 2, mids * 2, np.full(1, 1e9)])  # block 0: on the values, ties, beyond the top
    x = np.concatenate([x[:32], VALUES[::-1] * -0.5, mids[:15] * -0.5, [0.3], np.linspace(-1, 1, 32)]).astype(F32)
    got = grid.quantize(x[None, :96])[0]
    np.testing.assert_array_equal(got[:16], np.arange(16))
    np.testing.assert_array_equal(got[16:31], np.arange(1, 16))  # ties go to the upper value
    assert got[31] == 15
    np.testing.assert_array_equal(got[32:48], np.arange(16)[::-1])  # negative scale: the order flips
    np.testing.assert_array_equal(got[48:63], np.arange(1, 16))  # x = mids exactly: ties go up
    np.testing.assert_array_equal(got[64:], best_index(np.zeros(32, F32)))  # scale 0: the value nearest 0


@pytest.mark.parametrize("name", TYPES)
def test_rejects_partial_blocks(name):
    c = codec(name)
    with pytest.raises(ValueError, match="not a multiple of"):
        c.quantize(np.zeros((2, c.block_size + 16), F32))


def test_table_is_gguf_pys():
    assert KVALUES.tolist() == list(gguf.quants.IQ4_NL.kvalues) and KVALUES[0] == -127 and KVALUES[-1] == 113


def test_best_index_ties_and_limits():
    mids = (VALUES[:-1] + VALUES[1:]) / 2
    np.testing.assert_array_equal(best_index(VALUES), np.arange(16))
    np.testing.assert_array_equal(best_index(mids), np.arange(1, 16))  # a tie goes to the upper value
    x = np.array([-np.inf, -1e9, -127.5, 113.5, 1e9, np.inf, np.nan, 0.0, -0.0], F32)
    np.testing.assert_array_equal(best_index(x), [0, 0, 0, 15, 15, 15, 15, 8, 8])


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "models/bench-a/model.safetensors").exists(), reason="needs ../shared")
@pytest.mark.parametrize("name", TYPES)
def test_bench_a_matches_ggml(name):
    """Every 2-D tensor of bench-a, every 8th row, with and without importance (scripts/check_codecs_bench_a.py
    checks every row)."""
    c = codec(name)
    for key, w in bench_a_matrices(every=8):
        imp = np.random.default_rng(zlib.crc32(key.encode())).gamma(0.5, 2.0, w.shape[1]).astype(F32)
        for importance in (None, imp):
            assert np.array_equal(c.quantize(w, importance), ggml_oracle.ggml_bytes(c.qtype, w, importance)), (key, importance is None)

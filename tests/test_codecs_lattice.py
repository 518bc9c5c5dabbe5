"""The lattice codecs (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M) against libggml and gguf-py, bit for bit; their
codebooks and neighbour lists against gguf-py's grids and a plain re-reading of ggml's definition."""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest

import ggml_oracle
from edgequant.convert.codecs import codec
from edgequant.convert.codecs.lattice_search import codebook, gguf_points
from test_codecs_symmetric import SHARED, bench_a_matrices

TYPES = ["IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
CODEBOOK_TYPES = TYPES[:-1]  # IQ1_M is on IQ1_S's codebook and neighbour lists (ggml's iq2_data entry is shared)
N = 512  # two super-blocks per row
F32 = np.float32


def lattice_rows(rng) -> np.ndarray:
    """Rows that reach the searches' corner cases: sub-blocks of zeros, -0.0 and values below IQ3_XXS's 1e-8 (the
    skipped sub-blocks; IQ3_S stores the following sub-blocks' indices and signs shifted), an all-zero super-block,
    weights on the codebook's odd levels (distance ties between neighbours), odd counts of negatives with equal
    x*x (the parity flip's tie), constant and single-outlier rows, large and tiny magnitudes (not so large that a neighbour's weighted distance
    overflows: ggml aborts there)."""
    g = rng.standard_normal((6, N)).astype(F32)
    zeros = g[0].copy()
    zeros[32:64] = 0
    zeros[96:128] = -0.0
    zeros[256 + 224:] = 0
    tiny = g[1].copy()
    tiny[:32] *= F32(1e-9)
    tiny[256:512] = 0  # a whole super-block of zeros
    odd_levels = (2 * rng.integers(0, 8, N) + 1).astype(F32) * np.where(rng.random(N) < 0.4, -1, 1).astype(F32) * F32(0.37)
    ties = np.tile(np.array([-1, 1, 1, 1, -1, 1, 1, 1], F32), N // 8) * F32(0.5)  # 2 negatives: even; below odd
    odd_ties = np.tile(np.array([-1, 1, 1, 1, 1, 1, 1, 1], F32), N // 8) * F32(0.25)
    constant = np.full(N, 0.75, F32)
    outlier = g[2] * F32(1e-3)
    outlier[::97] = F32(50)
    halves = (np.round(g[3] * 8) / 2 + F32(0.25)).astype(F32)  # on nearest_int's rounding boundaries at scale 1
    return np.stack([zeros, tiny, odd_levels, ties, odd_ties, constant, outlier, halves, g[4] * F32(1e-20),
                     g[5] * F32(3e8)]).astype(F32)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(4321)
    gaussian = rng.standard_normal((24, N)).astype(F32) * rng.uniform(0.01, 3, (24, 1)).astype(F32)
    gaussian[rng.random(gaussian.shape) < 0.01] *= 40  # outliers
    return np.concatenate([gaussian, lattice_rows(rng)])


IMPORTANCE = ["none", "random", "with_zeros"]


def importance_vector(kind: str) -> np.ndarray | None:
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    imp = rng.gamma(0.5, 2.0, N).astype(F32)
    if kind == "with_zeros":
        imp[rng.random(N) < 0.3] = 0
        imp[32:64] = 0  # a whole sub-block without importance
        imp[256 + 64 : 256 + 96] = 0
    return imp


@pytest.mark.parametrize("kind", IMPORTANCE)
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_ggml(name, kind, matrix):
    c, importance = codec(name), importance_vector(kind)
    if importance is None and c.needs_importance:  # ggml asserts an importance (it would abort the process)
        with pytest.raises(ValueError, match="only with an importance"):
            c.fit(matrix)
        return
    ggml_oracle.assert_codec_bytes_match(c, matrix, importance)


@pytest.mark.parametrize("name", TYPES)
def test_unpack_pack_dequantize(name, matrix):
    """fit's blocks pack and unpack to themselves, and dequantize as gguf-py and libggml do."""
    c = codec(name)
    blocks = c.fit(matrix, importance_vector("random"))
    ggml_oracle.assert_round_trip(c, blocks, lambda c, raw: gguf.quants.dequantize(raw, c.qtype))
    ggml_oracle.assert_round_trip(c, blocks, lambda c, raw: ggml_oracle.dequantize_row(c.qtype, raw))


@pytest.mark.parametrize("name", TYPES)
def test_random_bytes(name):
    """Every bit pattern of a block is a block: unpack/pack is the identity on arbitrary bytes, and they dequantize
    as gguf-py's and libggml's dequantizers do (scales kept finite: NaN payloads are the hardware's)."""
    c = codec(name)
    raw = np.random.default_rng(3).integers(0, 256, (5, 4 * c.type_size), dtype=np.uint8)
    if name == "IQ1_M":  # d's exponent: bits 10..14 of its fp16, the last scale word's bits 12..14 hold 12..14
        raw.reshape(5, 4, c.type_size)[..., 55] &= 0xBF  # ... so clearing bit 14 keeps it finite
    else:
        raw.reshape(5, 4, c.type_size)[..., 1] &= 0x3F  # fp16 d below 2.0: finite
    assert np.array_equal(c.pack(c.unpack(raw)), raw)
    ours = c.dequantize(c.unpack(raw)).view(np.uint32)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, c.qtype).reshape(5, -1).view(np.uint32))
    np.testing.assert_array_equal(ours, ggml_oracle.dequantize_row(c.qtype, raw).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_rejects_partial_blocks(name):
    c = codec(name)
    with pytest.raises(ValueError, match="not a multiple of"):
        c.quantize(np.zeros((2, c.block_size + 32), F32))


@pytest.mark.parametrize("name", TYPES)
def test_no_scalar_grid(name):
    c = codec(name)
    assert not c.scalar_grid
    with pytest.raises(NotImplementedError, match="no per-weight grid"):
        c.grid(c.fit(np.ones((1, 256), F32), np.ones(256, F32)))


@pytest.mark.parametrize("name", CODEBOOK_TYPES)
def test_codebook_and_neighbours(name):
    """The codebook is gguf-py's grid (levels: positions in grid_map), kmap inverts it, and each off-codebook level
    vector's neighbours are, read plainly from ggml's iq3xs_init_impl / iq2xs_init_impl: every point at one of the
    nwant smallest distinct squared distances of (2u+1), by (distance, index)."""
    book = codebook(name)
    cls = getattr(gguf.quants, name)
    cls.init_grid()
    size, dim = cls.grid_shape
    np.testing.assert_array_equal(np.asarray(cls.grid_map, F32)[book.points], cls.grid.reshape(size, dim))
    assert np.array_equal(book.points, gguf_points(name)) and book.kmap[0] == 0 and book.dim == dim
    on = np.flatnonzero(book.kmap >= 0)
    assert len(on) == size and sorted(book.kmap[on]) == list(range(size))
    nwant = {"IQ3_XXS": 2, "IQ3_S": 3, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 1, "IQ1_S": 3}[name]
    rng = np.random.default_rng(size)
    for _ in range(40):
        levels = rng.integers(0, book.kmax, dim)
        u = sum(int(l) << (book.bits * k) for k, l in enumerate(levels))
        if book.kmap[u] >= 0:
            assert (book.points[book.kmap[u]] == levels).all()
            continue
        dist = sorted((sum((2 * int(p[k]) + 1 - (2 * int(levels[k]) + 1)) ** 2 for k in range(dim)), j)
                      for j, p in enumerate(book.points))
        wanted = sorted({d for d, _ in dist})[:nwant]
        expected = [j for d, j in dist if d in wanted]
        assert book.flat[book.start[u]:book.start[u] + book.count[u]].tolist() == expected, u


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "models/bench-a/model.safetensors").exists(), reason="needs ../shared")
@pytest.mark.parametrize("name", TYPES)
def test_bench_a_matches_ggml(name):
    """Every 2-D tensor of bench-a, every 32nd row, with and without importance (scripts/check_codecs_bench_a.py
    checks every row)."""
    c = codec(name)
    for key, w in bench_a_matrices(every=32):
        imp = np.random.default_rng(zlib.crc32(key.encode())).gamma(0.5, 2.0, w.shape[1]).astype(F32)
        for importance in (imp,) if c.needs_importance else (None, imp):
            assert np.array_equal(c.quantize(w, importance), ggml_oracle.ggml_bytes(c.qtype, w, importance)), (key, importance is None)

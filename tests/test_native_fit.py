"""The C block fits (edgequant.native.fit), every build this CPU runs, against the numpy codecs and libggml: the
same bytes, block for block."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

import ggml_oracle
from edgequant.convert.codecs import codec
from test_codecs_affine import adversarial_rows as affine_edge_rows
from test_codecs_affine import importances
from test_codecs_symmetric import adversarial_rows as symmetric_edge_rows

fit = pytest.importorskip("edgequant.native.fit")
from edgequant.native import available_isas  # noqa: E402

ISAS = available_isas()  # the portable build ("scalar": SSE2/NEON vectors) and, where the CPU has it, AVX2

TYPES = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"]
N = 512  # the edge-case rows' length: two super-blocks


def overflow_rows(rng: np.random.Generator) -> np.ndarray:
    """Magnitudes whose squares overflow float32 (inf and NaN inside the searches), and random finite bit patterns."""
    g = rng.standard_normal((4, N)).astype(np.float32)
    spread = rng.standard_normal(N) * 10.0 ** rng.integers(-40, 38, N)
    bits = rng.integers(0, 2**32, (4, N), dtype=np.uint64).astype(np.uint32).view(np.float32)
    rows = [g[0] * 1e20, g[1] * 1e37, np.full(N, 3e38), -np.abs(g[2]) * 1e30, spread, *np.where(np.isfinite(bits), bits, 0)]
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    rng = np.random.default_rng(2024)
    gaussian = rng.standard_normal((32, N)) * rng.uniform(1e-3, 10, (32, 1))
    return np.concatenate([gaussian.astype(np.float32), affine_edge_rows(rng), symmetric_edge_rows(rng)])


def differing_rows(a: np.ndarray, b: np.ndarray, rows: int, type_size: int) -> np.ndarray:
    return np.flatnonzero((a.reshape(rows, -1, type_size) != b.reshape(rows, -1, type_size)).any(axis=(1, 2)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["none", "random", "zeros", "skewed"])
@pytest.mark.parametrize("name", TYPES)
def test_same_bytes_as_numpy_and_ggml(name, kind, isa, matrix):
    c = codec(name)
    imp = importances(np.random.default_rng(3))[kind]
    ours = fit.quantize(matrix, c.qtype, imp, isa=isa)
    assert ours.shape == (len(matrix), N // c.block_size * c.type_size) and ours.dtype == np.uint8
    assert differing_rows(ours, c.quantize(matrix, imp), len(matrix), c.type_size).size == 0
    assert differing_rows(ours, ggml_oracle.quantize_chunk(c.qtype, matrix, imp), len(matrix), c.type_size).size == 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_overflowing_magnitudes_as_numpy(name, isa):
    """Beyond |w| ~ 1e19 the searches see inf and NaN; the C fits still write the numpy codecs' bytes (those can
    differ from ggml's for Q3_K/Q6_K there, which no finite bf16 checkpoint of a trained model comes near)."""
    c = codec(name)
    rng = np.random.default_rng(11)
    w = overflow_rows(rng)
    for imp in (None, (rng.random(N) * 10).astype(np.float32), (rng.random(N) * 1e30).astype(np.float32)):
        with np.errstate(all="ignore"):
            numpy_bytes = c.quantize(w, imp)
        assert differing_rows(fit.quantize(w, c.qtype, imp, isa=isa), numpy_bytes, len(w), c.type_size).size == 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_rows_are_independent(name, isa):
    """A row's bytes do not depend on its neighbours (what encoding in row chunks relies on); wide rows too, and
    rows whose 32-weight blocks do not fill the last batch of lanes."""
    c = codec(name)
    rng = np.random.default_rng(5)
    n = 4096 + 256 + (32 if c.block_size == 32 else 0)
    w = rng.standard_normal((6, n)).astype(np.float32)
    imp = rng.random(n).astype(np.float32)
    whole = fit.quantize(w, c.qtype, imp, isa=isa)
    out = np.zeros_like(whole)
    for r in range(len(w)):
        fit.quantize(w[r:r + 1], c.qtype, imp, out[r:r + 1], isa=isa)
    assert np.array_equal(out, whole)
    assert np.array_equal(whole, ggml_oracle.quantize_chunk(c.qtype, w, imp))


def test_supported_types_and_errors():
    Q = GGMLQuantizationType
    assert all(fit.supports(Q[name]) for name in TYPES)
    assert not fit.supports(Q.Q8_K) and not fit.supports(Q.F16)
    w = np.zeros((2, 96), np.float32)
    with pytest.raises(ValueError, match="no native fit"):
        fit.quantize(w, Q.Q4_K)  # 96 is not a multiple of 256
    with pytest.raises(ValueError, match="importance"):
        fit.quantize(np.zeros((2, 256), np.float32), Q.Q4_K, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        fit.quantize(np.zeros((2, 256), np.float32), Q.Q4_K, out=np.zeros((2, 100), np.uint8))


def test_neon_build_under_qemu(tmp_path, matrix):
    """The portable build as AArch64 compiles it (NEON vectors) writes the numpy codecs' bytes too: native/tests/
    fit_bytes.c with the package's sources and flags, run under qemu-user, every type, with and without importance."""
    import runpy
    import shutil
    import subprocess
    from pathlib import Path

    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    root = Path(__file__).resolve().parents[1]
    build = runpy.run_path(str(root / "native" / "build_native.py"))
    sources = [root / "native" / "tests" / "fit_bytes.c", *(root / s for s in build["SOURCES"])]
    objects = []
    for src in sources:
        objects.append(str(tmp_path / (src.stem + ".o")))
        subprocess.run([cc, *build["COMPILE_ARGS"], "-march=armv8-a", f"-I{root / 'native'}", "-c", str(src), "-o",
                        objects[-1]], check=True, capture_output=True, text=True)
    exe = tmp_path / "fit_bytes"
    subprocess.run([cc, "-static", *objects, "-o", str(exe), "-lm", "-pthread"], check=True, capture_output=True, text=True)
    weights, imp_path = tmp_path / "w.f32", tmp_path / "imp.f32"
    matrix.tofile(weights)
    imp = importances(np.random.default_rng(3))["zeros"]
    imp.tofile(imp_path)
    for name in TYPES:
        c = codec(name)
        for importance, arg in ((None, "-"), (imp, str(imp_path))):
            run = subprocess.run([qemu, str(exe), str(int(c.qtype)), str(len(matrix)), str(N), str(weights), arg],
                                 capture_output=True, timeout=300)
            assert run.returncode == 0, run.stderr
            neon = np.frombuffer(run.stdout, np.uint8)
            assert differing_rows(neon, c.quantize(matrix, importance), len(matrix), c.type_size).size == 0, name

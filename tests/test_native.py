"""edgequant.native (C kernels) against libggml's own CPU functions bit for bit, gguf-py's dequantization, its C
consistency harness (natively, and the NEON build under qemu-user), `edgequant verify`, and the bf16 widening of
checkpoint loading.

Pairings for bit-exactness: our "scalar" kernels against ggml's exported *_generic functions, our "avx2" kernels
against what ggml-cpu dispatches (its type traits) when it was built with AVX2 and without AVX-512, our "neon"
K-quant and IQ4 dots against ggml's arch/arm code cross-compiled and run under qemu-user.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import platform
import runpy
import shutil
import subprocess

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import edgequant.native as native
import ggml_oracle
from edgequant.cli import main
from edgequant.commands.verify import kernel_reference

Q = GGMLQuantizationType
WEIGHT_TYPES = native.WEIGHT_TYPES
ACT_TYPES = (Q.Q8_0, Q.Q8_1, Q.Q8_K)
NATIVE = pathlib.Path(__file__).resolve().parent.parent / "native"
SOURCES = [NATIVE / f for f in ("tests/consistency.c", "dispatch.c", "scalar.c", "neon.c", "avx2.c")]

VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Traits(ctypes.Structure):  # struct ggml_type_traits_cpu
    _fields_ = [("from_float", FROM_FLOAT), ("vec_dot", VEC_DOT), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class GgmlCpu:
    """libggml-cpu: the kernels it dispatches (type traits) and its *_generic reference functions."""

    def __init__(self):
        self.lib = ggml_oracle._load("ggml-cpu")
        self.lib.ggml_cpu_init()  # fills the fp16 table its kernels read
        self.lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
        self.lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    def traits(self, qtype) -> Traits:
        return self.lib.ggml_get_type_traits_cpu(int(qtype)).contents

    def dispatches_avx2(self) -> bool:
        return bool(self.lib.ggml_cpu_has_avx2()) and not self.lib.ggml_cpu_has_avx512()

    def _generic(self, name: str, proto):
        return proto(ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value)

    def quantizer(self, act, isa: str):
        if isa == "scalar":
            return self._generic(f"quantize_row_{_ggml_name(act)}_generic", FROM_FLOAT)
        return self.traits(act).from_float

    def vec_dot(self, qtype, isa: str):
        if isa == "scalar":
            return self._generic(f"ggml_vec_dot_{_ggml_name(qtype)}_{_ggml_name(native.activation_type(qtype))}_generic", VEC_DOT)
        return self.traits(qtype).vec_dot

    def quantize(self, act, x: np.ndarray, isa: str) -> np.ndarray:
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        block, size = native.block_layout(act)
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        fn = self.quantizer(act, isa)
        for i in range(x.shape[0]):
            fn(x[i].ctypes.data, out[i].ctypes.data, x.shape[1])
        return out

    def dot_rows(self, qtype, raw: np.ndarray, act: np.ndarray, isa: str) -> np.ndarray:
        n = raw.shape[1] // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0]
        fn, s = self.vec_dot(qtype, isa), ctypes.c_float()
        out = np.empty(raw.shape[0], np.float32)
        for r in range(raw.shape[0]):
            fn(n, ctypes.byref(s), 0, raw[r].ctypes.data, 0, act.ctypes.data, 0, 1)
            out[r] = s.value
        return out


def _ggml_name(qtype) -> str:
    return qtype.name.lower().replace("_k", "_K")


@pytest.fixture(scope="module")
def ggml() -> GgmlCpu:
    return GgmlCpu()


def comparable_isas():
    """Our ISAs that have a ggml counterpart in this process (skipped with the reason otherwise)."""
    return [pytest.param("scalar"), pytest.param("avx2", marks=pytest.mark.skipif(
        "avx2" not in native.available_isas(), reason="this CPU does not run AVX2"))]


def need_ggml_isa(ggml: GgmlCpu, isa: str) -> None:
    if isa == "avx2" and not ggml.dispatches_avx2():
        pytest.skip("libggml-cpu here is not an AVX2 (without AVX-512) build, so its dispatched kernels differ")


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---- inputs ----

HALF_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82], Q.Q3_K: [108],
               Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0]}


def random_blocks(qtype, rows: int, n: int, rng) -> np.ndarray:
    """Uniformly random codes and scale bytes (so every code and bit pattern occurs), with finite f16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, n // block, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        raw[:, :, at : at + 2] = (0.01 * rng.standard_normal((rows, n // block))).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def activation_rows(n: int, rng) -> np.ndarray:
    """Gaussian rows at several scales, one with outliers, one all zero, and one of halfway cases: k + 1/2 with 127 in
    every block, so that x/d is exactly halfway between integers (ggml's SIMD quantizers round those to even)."""
    x = rng.standard_normal((6, n)).astype(np.float32) * np.array([1e-3, 1, 30, 1, 0, 0], np.float32)[:, None]
    x[3, rng.integers(0, n, 4)] = 80.0
    x[4] = rng.integers(-126, 126, n) + 0.5
    x[4, ::32] = 127.0
    return x


def weights(qtype, kind: str, rng, rows: int = 48, n: int = 1024) -> np.ndarray:
    if kind == "random-bytes":
        return random_blocks(qtype, rows, n, rng)
    return ggml_oracle.quantize_chunk(qtype, rng.standard_normal((rows, n)).astype(np.float32))


# ---- bit-exactness against libggml ----


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_activation_type_is_ggmls_vec_dot_type(ggml, qtype):
    assert ggml.traits(qtype).vec_dot_type == int(native.activation_type(qtype))


@pytest.mark.parametrize("isa", comparable_isas())
@pytest.mark.parametrize("act", ACT_TYPES, ids=lambda t: t.name)
def test_quantize_activations_bit_exact(ggml, act, isa):
    need_ggml_isa(ggml, isa)
    x = activation_rows(2048, np.random.default_rng(1))
    np.testing.assert_array_equal(native.quantize_activations(x, act, isa), ggml.quantize(act, x, isa))


@pytest.mark.parametrize("isa", native.available_isas())
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(qtype, isa):
    rng = np.random.default_rng(2)
    for raw in (weights(qtype, "random-bytes", rng), weights(qtype, "ggml", rng)):
        np.testing.assert_array_equal(bits(native.dequantize(raw, qtype, isa)), bits(gguf.quants.dequantize(raw, qtype)))


@pytest.mark.parametrize("isa", native.available_isas())
def test_dequantize_q8_k_matches_ggml(isa):
    raw = ggml_oracle.quantize_row_ref(Q.Q8_K, activation_rows(1024, np.random.default_rng(3)))
    np.testing.assert_array_equal(bits(native.dequantize(raw, Q.Q8_K, isa)), bits(ggml_oracle.dequantize_row(Q.Q8_K, raw)))


@pytest.mark.parametrize("kind", ["ggml", "random-bytes"])
@pytest.mark.parametrize("isa", comparable_isas())
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dot_bit_exact(ggml, qtype, isa, kind):
    need_ggml_isa(ggml, isa)
    rng = np.random.default_rng(4)
    raw = weights(qtype, kind, rng, n=1024)
    for act in ggml.quantize(native.activation_type(qtype), activation_rows(1024, rng), isa):
        np.testing.assert_array_equal(bits(native.dot_rows(raw, act, qtype, isa)), bits(ggml.dot_rows(qtype, raw, act, isa)))


@pytest.mark.parametrize("isa", comparable_isas())
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dot_bit_exact_on_one_and_an_odd_number_of_blocks(ggml, qtype, isa):
    """Kernels that pair blocks (IQ4_NL on AVX2, the legacy types on NEON) finish an odd count the generic way."""
    need_ggml_isa(ggml, isa)
    rng = np.random.default_rng(8)
    block = GGML_QUANT_SIZES[qtype][0]
    for n in (block, 37 * 32 if block == 32 else 3 * 256):
        raw = weights(qtype, "random-bytes", rng, rows=16, n=n)
        for act in ggml.quantize(native.activation_type(qtype), activation_rows(n, rng), isa):
            np.testing.assert_array_equal(bits(native.dot_rows(raw, act, qtype, isa)), bits(ggml.dot_rows(qtype, raw, act, isa)),
                                          err_msg=f"n={n}")


IQ4_TYPES = (Q.IQ4_NL, Q.IQ4_XS)


def iq4_adversarial_blocks(qtype, rng, n: int = 1024) -> np.ndarray:
    """Rows at the ends of every field, then random bytes under scales drawn from the same extremes:

        row  f16 scale   bytes after d   (IQ4_XS: scales_h/scales_l are among those bytes)
        0    +65504      0x00            every index 0 (-127), IQ4_XS ls = 0 (-32)
        1    -65504      0xFF            every index 15 (113), IQ4_XS ls = 63 (+31)
        2    +65504      0xF0            low nibbles -127, high nibbles 113
        3    +65504      0x0F            the other way round
        4..7 2^-24 (smallest subnormal), +0, -0, -1      random
        8..  random among all of the above                   random
    """
    block, size = GGML_QUANT_SIZES[qtype]
    halves = np.array([65504, -65504, 65504, 65504, 2.0**-24, 0.0, -0.0, -1.0], np.float16)
    raw = rng.integers(0, 256, (len(halves) + 8, n // block, size), dtype=np.uint8)
    for row, byte in enumerate((0x00, 0xFF, 0xF0, 0x0F)):
        raw[row, :, 2:] = byte
    raw[:, :, 0:2] = rng.choice(halves, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    raw[: len(halves), :, 0:2] = halves[:, None, None].view(np.uint8)
    return raw.reshape(raw.shape[0], -1)


def iq4_adversarial_activations(n: int, rng) -> np.ndarray:
    """Every activation at +-127 (constant magnitude), alternating signs, block sums that cancel (the float sum is
    then all rounding), one outlier per 256 that flushes the rest to small codes, and Gaussian rows."""
    x = np.empty((6, n), np.float32)
    x[0] = 1.0
    x[1] = np.where(np.arange(n) % 2, -1.0, 1.0)
    x[2] = np.where((np.arange(n) // 32) % 2, -1.0, 1.0) * (1 + 1e-3 * rng.standard_normal(n))
    x[3] = 1e-2 * rng.standard_normal(n)
    x[3, ::256] = 50.0
    x[4:] = rng.standard_normal((2, n))
    return x


@pytest.mark.parametrize("isa", comparable_isas())
@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_iq4_dot_bit_exact_on_adversarial_rows(ggml, qtype, isa):
    need_ggml_isa(ggml, isa)
    rng = np.random.default_rng(9)
    raw = iq4_adversarial_blocks(qtype, rng)
    largest = 0.0
    for act in ggml.quantize(native.activation_type(qtype), iq4_adversarial_activations(1024, rng), isa):
        ours = native.dot_rows(raw, act, qtype, isa)
        np.testing.assert_array_equal(bits(ours), bits(ggml.dot_rows(qtype, raw, act, isa)))
        largest = max(largest, float(np.abs(ours).max()))
    assert 1e9 < largest < np.inf  # the f16 extremes reach the float sums, which stay finite


def test_iq4nl_values_are_gguf_pys_and_ggmls():
    """The table compiled in (from gguf-py, through build_native.py) read back by dequantizing indices 0..15 under d = 1,
    against gguf-py's kvalues and libggml's own dequantize_row_iq4_nl."""
    block = np.zeros((1, 18), np.uint8)
    block[0, :2] = np.array([1.0], np.float16).view(np.uint8)
    block[0, 2:] = np.arange(16, dtype=np.uint8) * 0x11  # index j in both nibbles of byte j
    expected = np.tile(np.array(gguf.quants.IQ4_NL.kvalues, np.float32), 2)
    for isa in native.available_isas():
        np.testing.assert_array_equal(native.dequantize(block, Q.IQ4_NL, isa)[0], expected)
    np.testing.assert_array_equal(ggml_oracle.dequantize_row(Q.IQ4_NL, block)[0], expected)


@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_parity_rounds_iq4_activations_as_ggml_cpu(ggml, qtype):
    """`edgequant parity` models llama.cpp's activation rounding for every native.WEIGHT_TYPES type: for IQ4 weights,
    ggml-cpu's own quantizer for their vec_dot_type (Q8_0, Q8_K) and back."""
    import torch

    from edgequant.runners.parity import activation_rounding

    need_ggml_isa(ggml, "avx2")  # the quantizer ggml-cpu dispatches here is the one our "best" reproduces
    x = activation_rows(512, np.random.default_rng(10))
    act = Q(ggml.traits(qtype).vec_dot_type)
    expected = ggml_oracle.dequantize_row(act, ggml.quantize(act, x, "avx2"))
    np.testing.assert_array_equal(bits(activation_rounding(qtype)(torch.from_numpy(x)).numpy()), bits(expected))


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_ggml_generic_and_avx2_sums_differ(ggml, qtype):
    """The pairing matters: ggml's two paths round differently on most rows, so bit-exactness with each is a real test."""
    need_ggml_isa(ggml, "avx2")
    rng = np.random.default_rng(5)
    raw = weights(qtype, "random-bytes", rng, rows=64)
    act = ggml.quantize(native.activation_type(qtype), rng.standard_normal((1, 1024)), "scalar")[0]
    assert (bits(ggml.dot_rows(qtype, raw, act, "scalar")) != bits(ggml.dot_rows(qtype, raw, act, "avx2"))).mean() > 0.3


@pytest.mark.shared
@pytest.mark.parametrize("isa", comparable_isas())
def test_dot_bit_exact_on_bench_a(ggml, shared_dir, isa):
    """Real weights (bench-a, layers 0 and 7) in every type, dotted with real token embeddings."""
    from edgequant.checkpoint import Checkpoint

    need_ggml_isa(ggml, isa)
    ck = Checkpoint(shared_dir / "models" / "bench-a")
    x = ck.load("model.embed_tokens.weight").float().numpy()[::97][:24]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.up_proj.weight"):
        w = ck.load(name).float().numpy()[:256]
        for qtype in WEIGHT_TYPES:
            raw = ggml_oracle.quantize_chunk(qtype, w)
            for act in ggml.quantize(native.activation_type(qtype), x, isa):
                np.testing.assert_array_equal(bits(native.dot_rows(raw, act, qtype, isa)),
                                              bits(ggml.dot_rows(qtype, raw, act, isa)), err_msg=f"{name} {qtype.name}")


# ---- the lattice i-quants (dots only) ----

LATTICE_TYPES = native.LATTICE_TYPES


def lattice_weights(qtype, kind: str, rng, rows: int = 24, n: int = 1024) -> np.ndarray:
    """ggml_quantize_chunk's blocks (with a random importance vector, as these types are built), or random bytes
    under a finite fp16 d: every index, sign, scale and shift bit occurs (all bit patterns are valid points)."""
    if kind == "ggml":
        importance = rng.gamma(0.5, 2.0, n).astype(np.float32)
        return ggml_oracle.quantize_chunk(qtype, rng.standard_normal((rows, n)).astype(np.float32), importance)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, n // block, size), dtype=np.uint8)
    d = (0.01 * rng.standard_normal((rows, n // block))).astype(np.float16).view(np.uint16)
    if qtype == Q.IQ1_M:  # d is split into the top nibbles of the four scale words (bytes 48..55)
        words = raw[..., 48:56].copy().view("<u2") & 0x0FFF
        for k in range(4):
            words[..., k] |= ((d >> (4 * k)) & 15) << 12
        raw[..., 48:56] = words.view(np.uint8)
    else:
        raw[..., 0:2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_lattice_activation_type_is_ggmls(ggml, qtype):
    assert ggml.traits(qtype).vec_dot_type == int(native.activation_type(qtype)) == int(Q.Q8_K)


@pytest.mark.parametrize("kind", ["ggml", "random-bytes"])
@pytest.mark.parametrize("isa", comparable_isas())
@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_lattice_dot_bit_exact(ggml, qtype, isa, kind):
    need_ggml_isa(ggml, isa)
    rng = np.random.default_rng(11)
    for n in (256, 512, 768, 1024):  # one super-block, two and three (the AVX2 kernels decode up to two ahead), four
        raw = lattice_weights(qtype, kind, rng, n=n)
        for act in ggml.quantize(Q.Q8_K, activation_rows(n, rng), isa):
            np.testing.assert_array_equal(bits(native.dot_rows(raw, act, qtype, isa)), bits(ggml.dot_rows(qtype, raw, act, isa)),
                                          err_msg=f"n={n}")


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_lattice_ggml_generic_and_avx2_sums_differ(ggml, qtype):
    """As for the other types: ggml's generic and AVX2 paths round differently, so each pairing is a real test."""
    need_ggml_isa(ggml, "avx2")
    rng = np.random.default_rng(12)
    raw = lattice_weights(qtype, "random-bytes", rng, rows=64)
    act = ggml.quantize(Q.Q8_K, rng.standard_normal((1, 1024)), "scalar")[0]
    assert (bits(ggml.dot_rows(qtype, raw, act, "scalar")) != bits(ggml.dot_rows(qtype, raw, act, "avx2"))).mean() > 0.3


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_lattice_matmul_is_quantize_then_dot(qtype):
    """matmul (what verify runs) on every thread count, and verify's float64 model of it (gguf-py's dequantization)."""
    rng = np.random.default_rng(13)
    raw, x = lattice_weights(qtype, "ggml", rng, rows=21, n=512), rng.standard_normal((5, 512)).astype(np.float32)
    expect = np.stack([native.dot_rows(raw, a, qtype) for a in native.quantize_activations(x, Q.Q8_K)])
    for threads in (1, 3):
        np.testing.assert_array_equal(bits(native.matmul(raw, x, qtype, n_threads=threads)), bits(expect))
    ref = kernel_reference(raw, qtype, x)
    np.testing.assert_allclose(expect, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.shared
@pytest.mark.parametrize("isa", comparable_isas())
def test_lattice_dot_bit_exact_on_bench_a(ggml, shared_dir, isa):
    """Real weights (bench-a layer 7's up_proj, with a random importance) in every lattice type, dotted with real token
    embeddings."""
    from edgequant.checkpoint import Checkpoint

    need_ggml_isa(ggml, isa)
    ck = Checkpoint(shared_dir / "models" / "bench-a")
    x = ck.load("model.embed_tokens.weight").float().numpy()[::97][:16]
    w = ck.load("model.layers.7.mlp.up_proj.weight").float().numpy()[:128]
    importance = np.random.default_rng(14).gamma(0.5, 2.0, w.shape[1]).astype(np.float32)
    for qtype in LATTICE_TYPES:
        raw = ggml_oracle.quantize_chunk(qtype, w, importance)
        for act in ggml.quantize(Q.Q8_K, x, isa):
            np.testing.assert_array_equal(bits(native.dot_rows(raw, act, qtype, isa)), bits(ggml.dot_rows(qtype, raw, act, isa)),
                                          err_msg=qtype.name)


# ---- matmul and the Python front end ----


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda t: t.name)
def test_matmul_is_quantize_then_dot_on_every_thread_count(qtype):
    rng = np.random.default_rng(6)
    raw, x = weights(qtype, "ggml", rng, rows=45, n=512), rng.standard_normal((7, 512)).astype(np.float32)
    act = native.activation_type(qtype)
    expect = np.stack([native.dot_rows(raw, a, qtype) for a in native.quantize_activations(x, act)])
    for threads in (1, 2, 5, 0):
        np.testing.assert_array_equal(bits(native.matmul(raw, x, qtype, n_threads=threads)), bits(expect))
    # and it is verify's float64 model of the kernels, up to float32 rounding
    ref = kernel_reference(raw, qtype, x)
    np.testing.assert_allclose(expect, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_front_end_rejects_bad_input():
    raw = np.zeros((2, 144), np.uint8)
    with pytest.raises(ValueError, match="columns"):
        native.matmul(raw, np.zeros((1, 128), np.float32), Q.Q4_K)
    with pytest.raises(ValueError, match="multiple of 256"):
        native.quantize_activations(np.zeros((1, 100), np.float32), Q.Q8_K)
    with pytest.raises(ValueError, match="uint8"):
        native.dequantize(np.zeros((2, 143), np.uint8), Q.Q4_K)
    with pytest.raises(ValueError, match="no dot kernel"):
        native.activation_type(Q.F16)
    with pytest.raises(ValueError, match="not available"):
        native.matmul(raw, np.zeros((1, 256), np.float32), Q.Q4_K, isa="neon" if platform.machine() != "aarch64" else "avx2")


# ---- the C consistency harness: natively, and NEON under qemu-user ----


def _compile_and_run(cc: str, flags: list[str], source_flags: dict, out, runner: list[str] = ()) -> subprocess.CompletedProcess:
    """Compile native/tests/consistency.c with the kernels (each source with its own extra flags), link, run."""
    objects = []
    for src in SOURCES:
        obj = out.parent / (src.stem + ".o")
        extra = source_flags.get(f"native/{src.name}", [])
        subprocess.run([cc, *BUILD["COMPILE_ARGS"], *flags, *extra, f"-I{NATIVE}", "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True, text=True)
        objects.append(str(obj))
    subprocess.run([cc, *flags, *objects, "-o", str(out), "-lm", "-pthread"], check=True, capture_output=True, text=True)
    return subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)


BUILD = runpy.run_path(str(NATIVE / "build_native.py"))  # COMPILE_ARGS and SOURCE_FLAGS, as the package build uses them


def test_consistency_harness_host(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    run = _compile_and_run(cc, [], BUILD["SOURCE_FLAGS"], tmp_path / "consistency")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passed: 0 failure(s)" in run.stdout or "only the scalar kernels" in run.stdout


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_consistency_harness_neon_under_qemu(tmp_path, march):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    run = _compile_and_run(cc, [f"-march={march}", "-static"], {}, tmp_path / "consistency", runner=[qemu])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "best ISA: neon" in run.stdout and "passed: 0 failure(s)" in run.stdout


# NEON against ggml's own Arm code: ggml-cpu's quants.c and arch/arm/quants.c cross-compiled as ggml builds them
# (GCC, its default contraction), linked with native/tests/ggml_arm.c and our kernels, run under qemu-user.  The
# llama.cpp sources are the ones scripts/build_llama_tools.sh unpacks.  The legacy types are left out: ggml adds their
# products with vmlaq_n_f32, which GCC 12 emits unfused, and neon.c fuses (see its header).
LLAMA_TOOLS = pathlib.Path(os.environ.get("LLAMA_TOOLS_DIR", NATIVE.parent / ".cache" / "llama-tools"))
GGML_ARM_TYPES = ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_neon_dots_bit_exact_with_ggml_arm_under_qemu(tmp_path, march):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    ggml = next(LLAMA_TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/ggml"), None)
    if ggml is None:
        pytest.skip(f"no llama.cpp sources under {LLAMA_TOOLS} (scripts/build_llama_tools.sh unpacks them)")
    arch = [f"-march={march}"]
    ggml_flags = [*arch, "-O3", "-DNDEBUG", "-std=gnu11", *(f"-I{ggml / d}" for d in ("include", "src", "src/ggml-cpu"))]
    objects = []
    for src, flags in [(ggml / "src/ggml-cpu/quants.c", ggml_flags), (ggml / "src/ggml-cpu/arch/arm/quants.c", ggml_flags),
                       *((NATIVE / f, [*BUILD["COMPILE_ARGS"], *arch, f"-I{NATIVE}"])
                         for f in ("tests/ggml_arm.c", "dispatch.c", "scalar.c", "neon.c"))]:
        objects.append(str(tmp_path / f"{src.parent.name}-{src.stem}.o"))
        subprocess.run([cc, *flags, "-c", str(src), "-o", objects[-1]], check=True, capture_output=True, text=True)
    exe = tmp_path / "ggml_arm"
    # ggml's files also define functions that call into ggml-base; the dots never reach them
    subprocess.run([cc, *arch, "-static", *objects, "-o", str(exe), "-lm", "-pthread", "-Wl,--unresolved-symbols=ignore-all"],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([qemu, str(exe), *GGML_ARM_TYPES], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": 0 of 600 results differ") == len(GGML_ARM_TYPES), run.stdout


# ---- edgequant verify ----


@pytest.fixture(scope="module")
def tiny_q4_k_m(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "tiny-Q4_K_M.gguf"
    assert main(["build", str(tiny_llama), "--target", "Q4_K_M", "--method", "rtn", "-o", str(out), "--quiet"]) == 0
    return out


def verify(model, path, capsys, *extra) -> tuple[int, list[dict], str]:
    rc = main(["verify", str(model), str(path), "--json", *extra])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def corrupt(src, dst, name: str, how: str) -> None:
    """Copy src to dst with block 5 of tensor `name` replaced: by block 6 ("swap"), random bytes with plausible
    scales ("random"), or a NaN scale ("nan")."""
    shutil.copy(src, dst)
    t = next(t for t in gguf.GGUFReader(dst).tensors if t.name == name)
    size = GGML_QUANT_SIZES[t.tensor_type][1]
    data = np.memmap(dst, dtype=np.uint8, mode="r+", offset=t.data_offset, shape=(t.n_bytes,))
    block = slice(5 * size, 6 * size)
    if how == "swap":
        data[block] = data[6 * size : 7 * size].copy()
    elif how == "random":
        data[block] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
        data[5 * size : 5 * size + 4] = np.array([0.01, 0.001], np.float16).view(np.uint8)  # Q4_K d, dmin
    else:
        data[5 * size : 5 * size + 2] = np.array([np.nan], np.float16).view(np.uint8)
    data.flush()


def test_verify_passes_on_a_correct_gguf(tiny_llama, tiny_q4_k_m, capsys):
    rc, results, _ = verify(tiny_llama, tiny_q4_k_m, capsys)
    assert rc == 0
    assert {r["type"] for r in results} == {"Q4_K", "Q6_K"} and len(results) == 16
    for r in results:
        assert r["kernel_error"] < 1e-5 and 1e-3 < r["q8_error"] < 3e-2 and r["source_error"] < r["source_tol"], r


@pytest.mark.parametrize("how", ["swap", "random", "nan"])
def test_verify_names_a_corrupted_block(tiny_llama, tiny_q4_k_m, tmp_path, capsys, how):
    bad = tmp_path / "bad.gguf"
    corrupt(tiny_q4_k_m, bad, "blk.0.attn_q.weight", how)
    rc, results, err = verify(tiny_llama, bad, capsys)
    assert rc == 1
    assert [r["name"] for r in results if not r["ok"]] == ["blk.0.attn_q.weight"]
    assert "blk.0.attn_q.weight" in err and "row 5" in err
    failed = next(r for r in results if not r["ok"])
    assert failed["source_error"] > 2 * failed["source_tol"] and failed["source_row"] == 5
    if how == "nan":
        assert failed["kernel_error"] == float("inf")


def llama_quantize(src, dst, ftype: str) -> None:
    """llama.cpp's own quantizer (libllama, through llama-cpp-python): blocks that no code of ours wrote."""
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module", params=["IQ4_NL", "IQ4_XS"])
def tiny_iq4(tiny_llama, tmp_path_factory, request):
    """(type, path) of the tiny model's F16 GGUF put through llama-quantize's IQ4_NL or IQ4_XS recipe."""
    tmp = tmp_path_factory.mktemp(f"verify-{request.param}")
    assert main(["build", str(tiny_llama), "--target", "F16", "-o", str(tmp / "f16.gguf"), "--quiet"]) == 0
    llama_quantize(tmp / "f16.gguf", tmp / f"{request.param}.gguf", request.param)
    return Q[request.param], tmp / f"{request.param}.gguf"


def test_verify_passes_on_llama_quantize_iq4(tiny_llama, tiny_iq4, capsys):
    qtype, path = tiny_iq4
    rc, results, _ = verify(tiny_llama, path, capsys)
    assert rc == 0
    iq4 = [r for r in results if r["type"] == qtype.name]
    assert len(iq4) >= 14  # the 7 linears of both layers at least; the recipe may also pick the embedding
    for r in iq4:
        assert r["kernel_error"] < 1e-5 and 1e-3 < r["q8_error"] < 3e-2 and r["source_error"] < r["source_tol"], r


@pytest.mark.parametrize("how", ["swap", "random", "nan"])
def test_verify_names_a_corrupted_iq4_block(tiny_llama, tiny_iq4, tmp_path, capsys, how):
    qtype, path = tiny_iq4
    bad = tmp_path / "bad.gguf"
    corrupt(path, bad, "blk.0.attn_q.weight", how)
    rc, results, err = verify(tiny_llama, bad, capsys)
    assert rc == 1
    assert [r["name"] for r in results if not r["ok"]] == ["blk.0.attn_q.weight"]
    failed = next(r for r in results if not r["ok"])
    row = 5 // (failed["shape"][1] // GGML_QUANT_SIZES[qtype][0])  # the row block 5 lies in
    assert failed["type"] == qtype.name and f"row {row}" in err
    # (an IQ4_NL block is an eighth of a 256-wide row, so a swapped one is a smaller share of the row's error)
    assert failed["source_error"] > failed["source_tol"] and failed["source_row"] == row
    if how == "nan":
        assert failed["kernel_error"] == float("inf")


def test_verify_reads_real_activations_with_calib(tiny_llama, tiny_q4_k_m, fixture_text, capsys):
    rc, results, _ = verify(tiny_llama, tiny_q4_k_m, capsys, "--calib", str(fixture_text), "--rows", "64", "--seqlen", "32")
    assert rc == 0
    by_name = {r["name"]: r["activations"] for r in results}
    assert by_name["blk.0.attn_q.weight"] == by_name["blk.1.ffn_down.weight"] == "calib"
    assert by_name["token_embd.weight"] == by_name["output.weight"] == "gauss"  # no linear reads them in the pass


def test_verify_refuses_a_gguf_of_another_model(tiny_llama, tiny_qwen2, tmp_path, capsys):
    other = tmp_path / "qwen2-Q8_0.gguf"
    assert main(["build", str(tiny_qwen2), "--target", "Q8_0", "--method", "rtn", "-o", str(other), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tiny_llama), str(other)]) == 2
    assert "not built from this model" in capsys.readouterr().err


def test_bf16_widening_and_nonfinite_count():
    """Checkpoint loading's bf16 -> float32: every bit pattern as torch widens it, NaN/Inf counted; the numpy
    fallback and the F16/F32 paths give the same values and counts."""
    import torch

    from edgequant import checkpoint
    from edgequant.native import widen

    raw = np.arange(1 << 16, dtype=np.uint16)
    expected = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    n_bad = int(np.count_nonzero(~np.isfinite(expected)))
    assert n_bad == 2 * 128  # exponent all ones: Inf and 127 NaN mantissas, both signs
    w, bad = widen.bf16_to_float32(raw)
    assert bad == n_bad and np.array_equal(w.view(np.uint32), expected.view(np.uint32))
    for repeat in (1, 3):  # in place: the bf16 values in the buffer's upper half (several internal chunks, too)
        w, space = widen.bf16_buffer(raw.size * repeat)
        space[:] = np.tile(raw, repeat).view(np.uint8)
        assert widen.widen_in_place(w) == n_bad * repeat
        assert np.array_equal(w.view(np.uint32), np.tile(expected, repeat).view(np.uint32))
    w, bad = checkpoint.to_float32(raw.view(np.uint8), "BF16")  # numpy, without the extension
    assert bad == n_bad and np.array_equal(w.view(np.uint32), expected.view(np.uint32))
    halves = np.array([1.5, -np.inf, np.nan, 65504, 0], np.float16)
    assert checkpoint.to_float32(halves.view(np.uint8), "F16")[1] == 2
    singles = np.array([3e38, 3e38, -1, np.inf], np.float32)  # a finite sum that overflows is still checked
    assert checkpoint.to_float32(singles[:3].copy().view(np.uint8), "F32")[1] == 0
    assert checkpoint.to_float32(singles.view(np.uint8), "F32")[1] == 1


def test_checkpoint_load_with_and_without_the_extension(tiny_llama, monkeypatch):
    """Checkpoint.load widens bf16 in place in C, or in numpy without the extension: both are torch's .float()."""
    import torch
    from safetensors.torch import load_file

    from edgequant import checkpoint

    expected = load_file(tiny_llama / "model.safetensors")
    ck = checkpoint.Checkpoint(tiny_llama)
    for native in (True, False):
        if not native:
            monkeypatch.setattr(checkpoint, "widen", None)
        for name, t in expected.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(ck.load(name), t.float()), name

"""Quantized matmul kernels in C (scalar, AVX2, NEON), with llama.cpp's CPU arithmetic: numpy front end.

    y = matmul(raw, x, qtype)       # x (m, n) float32 . dequant(raw (rows, bytes))^T, as ggml-cpu computes it

Weight rows are GGUF block bytes, (rows, n // block_size * type_size) uint8.  Activations are quantized to the
type ggml pairs with the weight type (`activation_type`), the way the chosen ISA's ggml code does it.  `isa`
is "scalar", "avx2", "neon" or "best" (the fastest this CPU runs); see native/kernels.h for what each matches.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ._kernels import ffi, lib

ISAS = {"scalar": 0, "avx2": 1, "neon": 2}
WEIGHT_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
)
# the lattice i-quants: dot kernels (and so matmul) only, no row dequantization in C
LATTICE_TYPES = tuple(
    GGMLQuantizationType[name] for name in ("IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
)
DOT_TYPES = WEIGHT_TYPES + LATTICE_TYPES


def available_isas() -> list[str]:
    return [name for name, code in ISAS.items() if lib.eq_isa_available(code)]


def best_isa() -> str:
    return next(name for name, code in ISAS.items() if code == lib.eq_isa_best())


def activation_type(qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The activation type ggml-cpu's vec_dot_type pairs with `qtype` (Q8_0, Q8_1 or Q8_K)."""
    code = lib.eq_activation_type(int(qtype))
    if code < 0:
        raise ValueError(f"no dot kernel for {GGMLQuantizationType(qtype).name}")
    return GGMLQuantizationType(code)


def _isa(isa: str) -> int:
    if isa == "best":
        return lib.eq_isa_best()
    if isa not in ISAS or not lib.eq_isa_available(ISAS[isa]):
        raise ValueError(f"ISA {isa!r} is not available here; have {', '.join(available_isas())}")
    return ISAS[isa]


def block_layout(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements, bytes) per block, as the kernels read them (gguf-py's GGML_QUANT_SIZES has an outdated Q8_1)."""
    block, size = lib.eq_block_size(int(qtype)), lib.eq_type_size(int(qtype))
    if not block:
        raise ValueError(f"no kernels for {GGMLQuantizationType(qtype).name}")
    return block, size


def _row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    block, size = block_layout(qtype)
    if n % block:
        raise ValueError(f"{qtype.name}: row length {n} is not a multiple of {block}")
    return n // block * size


def _row_length(qtype: GGMLQuantizationType, raw: np.ndarray) -> int:
    block, size = block_layout(qtype)
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % size:
        raise ValueError(f"{qtype.name}: expected (rows, k*{size}) uint8 block bytes, got {raw.dtype} {raw.shape}")
    return raw.shape[1] // size * block


def _ptr(a: np.ndarray, ctype: str = "void *"):
    return ffi.cast(ctype, a.ctypes.data)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(f"native kernel rejected {what} (status {status})")


def quantize_activations(x: np.ndarray, act_type: GGMLQuantizationType, isa: str = "best") -> np.ndarray:
    """(m, n) float32 -> (m, bytes) uint8 activation blocks (Q8_0, Q8_1 or Q8_K)."""
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    out = np.empty((x.shape[0], _row_bytes(act_type, x.shape[1])), dtype=np.uint8)
    code = _isa(isa)
    for i in range(x.shape[0]):
        _check(lib.eq_quantize_row(code, int(act_type), _ptr(x[i], "float *"), _ptr(out[i]), x.shape[1]),
               f"quantizing to {act_type.name}")
    return out


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, isa: str = "best") -> np.ndarray:
    """(rows, bytes) uint8 -> (rows, n) float32, bit-identical to gguf.quants.dequantize."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = _row_length(qtype, raw)
    out = np.empty((raw.shape[0], n), dtype=np.float32)
    code = _isa(isa)
    for r in range(raw.shape[0]):
        _check(lib.eq_dequantize_row(code, int(qtype), _ptr(raw[r]), _ptr(out[r], "float *"), n), f"dequantizing {qtype.name}")
    return out


def dot_rows(raw: np.ndarray, activations: np.ndarray, qtype: GGMLQuantizationType, isa: str = "best") -> np.ndarray:
    """Dot of every weight row (rows, bytes) with one quantized activation row -> (rows,) float32."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    activations = np.ascontiguousarray(activations, dtype=np.uint8).reshape(-1)
    n = _row_length(qtype, raw)
    if activations.size != _row_bytes(activation_type(qtype), n):
        raise ValueError(f"activation row has {activations.size} bytes, {qtype.name} x {n} needs "
                         f"{_row_bytes(activation_type(qtype), n)}")
    out = np.empty(raw.shape[0], dtype=np.float32)
    _check(lib.eq_dot_rows(_isa(isa), int(qtype), n, raw.shape[0], _ptr(raw), raw.strides[0], _ptr(activations),
                           _ptr(out, "float *")), f"{qtype.name} dot")
    return out


def matmul(raw: np.ndarray, x: np.ndarray, qtype: GGMLQuantizationType, isa: str = "best", n_threads: int = 0) -> np.ndarray:
    """Y = X . W^T with W given as GGUF block rows (rows, bytes) and X (m, n) float32 -> (m, rows) float32.

    X is quantized to the activation type first, as llama.cpp's CPU backend does; `n_threads` <= 0 uses every core.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    n = _row_length(qtype, raw)
    if x.shape[1] != n:
        raise ValueError(f"activations have {x.shape[1]} columns, the {qtype.name} weights {n}")
    y = np.empty((x.shape[0], raw.shape[0]), dtype=np.float32)
    _check(lib.eq_matmul(_isa(isa), int(qtype), n, raw.shape[0], _ptr(raw), raw.strides[0], x.shape[0],
                         _ptr(x, "float *"), _ptr(y, "float *"), n_threads), f"{qtype.name} matmul")
    return y

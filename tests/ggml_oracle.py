"""libggml, bundled with llama-cpp-python, as a test oracle through ctypes.

Only tests import this: it is the independent reference our codecs and kernels are compared with.
"""

from __future__ import annotations

import ctypes
import pathlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def _lib_dir() -> pathlib.Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    return pathlib.Path(llama_cpp.__file__).parent / "lib"


def _load(name: str) -> ctypes.CDLL:
    for path in sorted(_lib_dir().glob(f"lib{name}.*")):
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    raise FileNotFoundError(f"lib{name} not found in {_lib_dir()}")


_base = None


def base() -> ctypes.CDLL:
    global _base
    if _base is None:
        _base = _load("ggml-base")
        _base.ggml_quantize_chunk.restype = ctypes.c_size_t
        _base.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
        ]
        _base.ggml_quantize_init.argtypes = [ctypes.c_int]
    return _base


def quantize_chunk(qtype: GGMLQuantizationType, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk on a (rows, n_per_row) float32 array -> (rows, bytes_per_row) uint8."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, n = w.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    lib = base()
    lib.ggml_quantize_init(int(qtype))
    imat = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        assert importance.shape == (n,)
        imat = importance.ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, n, imat)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def _row_function(template: str, qtype: GGMLQuantizationType):
    """libggml-base's row function `template` names for qtype (quantize_row_{}_ref -> quantize_row_q8_K_ref)."""
    name = template.format(qtype.name.lower().replace("_k", "_K"))
    fn = getattr(base(), name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def quantize_row_ref(qtype: GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """quantize_row_<type>_ref on a (rows, n_per_row) float32 array, for types ggml_quantize_chunk lacks (Q8_K)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
    _row_function("quantize_row_{}_ref", qtype)(w.ctypes.data, out.ctypes.data, w.size)
    return out


def dequantize_row(qtype: GGMLQuantizationType, raw: np.ndarray) -> np.ndarray:
    """dequantize_row_<type> on (rows, bytes_per_row) uint8 -> (rows, n_per_row) float32."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((raw.shape[0], raw.shape[1] // size * block), dtype=np.float32)
    _row_function("dequantize_row_{}", qtype)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def ggml_bytes(qtype: GGMLQuantizationType, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes ggml writes for qtype: ggml_quantize_chunk, or quantize_row_q8_K_ref for Q8_K (which the chunk
    function lacks; Q8_K takes no importance)."""
    if qtype == GGMLQuantizationType.Q8_K:
        return quantize_row_ref(qtype, w)
    return quantize_chunk(qtype, w, importance)


def assert_codec_bytes_match(c, w: np.ndarray, importance: np.ndarray | None) -> None:
    """codec `c`'s quantize(w, importance) against ggml_bytes, naming how many blocks (and which rows) differ."""
    ours = c.quantize(w, importance)
    ref = ggml_bytes(c.qtype, w, importance)
    assert ours.shape == ref.shape
    differ = (ours.reshape(len(w), -1, c.type_size) != ref.reshape(len(w), -1, c.type_size)).any(-1)
    assert not differ.any(), f"{differ.sum()} of {differ.size} blocks differ, rows {np.nonzero(differ.any(1))[0]}"

def assert_round_trip(c, blocks, reference_dequantize) -> None:
    """pack -> unpack gives the same fields bit for bit, and the codec dequantizes the bytes exactly as
    `reference_dequantize(c, raw)` (gguf-py's, or ggml's) does."""
    raw = c.pack(blocks)
    again = c.unpack(raw)
    for field in blocks.__dataclass_fields__:
        a, b = getattr(blocks, field), getattr(again, field)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), field
    ours = c.dequantize(again)
    ref = reference_dequantize(c, raw)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), ref.reshape(ours.shape).view(np.uint32))

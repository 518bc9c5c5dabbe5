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

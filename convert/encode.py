"""float32 tensor -> the exact bytes of one GGUF tensor of a given type (float types via gguf-py, blocks via codecs)."""

from __future__ import annotations

import gguf
import numpy as np

from .codecs import codec

FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, n_per_row) or 1-D float32 -> uint8 bytes, as llama-quantize (or convert_hf_to_gguf for floats) writes."""
    if qtype in FLOAT_TYPES:
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(-1)
    w2 = w.reshape(-1, w.shape[-1])
    return codec(qtype).quantize(w2, importance).reshape(-1)

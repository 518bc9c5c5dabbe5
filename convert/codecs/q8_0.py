"""Q8_0: blocks of 32 weights, one fp16 scale, int8 codes (w = d * q).

Q8_0 block, 34 bytes:

    byte   0..1    2..33
           d       qs[0..31]
           fp16    int8 code q_j of weight j

ggml's only Q8_0 encoder is the reference one (it ignores an importance vector):
d = max|w| / 127, q = roundf(w * (1/d)).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .fields import block_fields, c_to_int8, fp16_bytes, fp16_field
from .legacy_symmetric import ScaledBlocks, ScaledCodec

F32 = np.float32


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) as trunc(v + copysign(0.5 - 2**-25, v)): exact for every float32."""
    return np.trunc(v + np.copysign(np.nextafter(F32(0.5), F32(0.0)), v))


class Q8_0(ScaledCodec):
    qtype = GGMLQuantizationType.Q8_0
    type_size = 34
    uses_importance = False
    qmin, qmax = -128, 127

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> ScaledBlocks:
        x = self.blocks_of(w)
        d = np.abs(x).max(axis=-1) / F32(127)
        with np.errstate(invalid="ignore", over="ignore"):  # subnormal d: 1/d = inf, as in ggml
            inv = np.divide(F32(1.0), d, out=np.zeros_like(d), where=d != 0)
            q = c_to_int8(_roundf(x * inv[..., None]))
        return ScaledBlocks(d.astype(np.float16), q)

    def pack(self, blocks: ScaledBlocks) -> np.ndarray:
        return np.concatenate([fp16_bytes(blocks.d), blocks.q.view(np.uint8)], axis=-1).reshape(blocks.d.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> ScaledBlocks:
        d, qs = block_fields(raw, self.type_size, 2, 32)
        return ScaledBlocks(fp16_field(d), qs.view(np.int8))

"""Q4_1: blocks of 32 weights with an fp16 scale and an fp16 min, 4-bit codes.

Block (20 bytes):

    offset  size  field
    0       2     d   fp16
    2       2     m   fp16
    4       16    qs  byte j = q[j] | q[j + 16] << 4

w = d * q + m, q in [0, 15].  The encoders are legacy_affine.LegacyMinCodec's.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .legacy_affine import LegacyMinCodec, pack_half_nibbles, unpack_half_nibbles


class Q4_1(LegacyMinCodec):
    qtype = GGMLQuantizationType.Q4_1
    type_size = 20
    nmax = 15

    def ref_codes(self, low_byte):
        # ggml: MIN(15, (int8_t)(v + 0.5f)).  v >= 0 here, so no negative byte survives to the uint8 store.
        return np.minimum(15, low_byte)

    def pack_codes(self, q):
        return pack_half_nibbles(q)

    def unpack_codes(self, raw):
        return unpack_half_nibbles(raw)

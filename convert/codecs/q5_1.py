"""Q5_1: blocks of 32 weights with an fp16 scale and an fp16 min, 5-bit codes.

Block (24 bytes):

    offset  size  field
    0       2     d   fp16
    2       2     m   fp16
    4       4     qh  uint32 little-endian, bit j = bit 4 of q[j]
    8       16    qs  byte j = lo4(q[j]) | lo4(q[j + 16]) << 4

w = d * q + m, q in [0, 31].
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .legacy_affine import LegacyMinCodec, pack_half_nibbles, unpack_half_nibbles


class Q5_1(LegacyMinCodec):
    qtype = GGMLQuantizationType.Q5_1
    type_size = 24
    nmax = 31

    def ref_codes(self, low_byte):
        # ggml stores (uint8_t)(v + 0.5f) and keeps its low 5 bits (4 in qs, 1 in qh).
        return low_byte.view(np.uint8) & 0x1F

    def pack_codes(self, q):
        qh = np.packbits(q >> 4, axis=-1, bitorder="little")
        return np.concatenate([qh, pack_half_nibbles(q)], axis=-1)

    def unpack_codes(self, raw):
        high = np.unpackbits(raw[:, :4], axis=-1, bitorder="little") << 4
        return unpack_half_nibbles(raw[:, 4:]) | high

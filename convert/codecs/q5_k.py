"""Q5_K: 5-bit codes, super-blocks of 256 = 8 sub-blocks of 32, each with a 6-bit scale and min.

Block (176 bytes):

    offset  size  field
    0       2     d      fp16
    2       2     dmin   fp16
    4       12    scales 8 six-bit scales + 8 six-bit mins (see kquant_scales.pack_scale_min_6bit)
    16      32    qh     bit g of byte j = bit 4 of q[32g + j]   (g = sub-block 0..7)
    48      128   qs     low 4 bits of the codes, laid out as Q4_K's qs

w = (d * scale[g]) * q - (dmin * min[g]), q in [0, 31].
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .kquant_scales import QK_K, SixBitScaleMinCodec, pack_nibbles, unpack_nibbles

_SUB_BIT = (np.uint8(1) << np.arange(8, dtype=np.uint8)).reshape(1, 8, 1)


class Q5_K(SixBitScaleMinCodec):
    qtype = GGMLQuantizationType.Q5_K
    type_size = 176
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_imatrix_scales = True

    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        q = q.reshape(-1, 8, 32).astype(np.uint8)
        qh = np.bitwise_or.reduce((q >> 4) * _SUB_BIT, axis=1)
        return np.concatenate([qh, pack_nibbles(q & 0x0F)], axis=-1)

    def unpack_codes(self, raw: np.ndarray) -> np.ndarray:
        qh = raw[:, None, :32]
        high = ((qh & _SUB_BIT) != 0).astype(np.uint8) << 4
        return unpack_nibbles(raw[:, 32:]) | high.reshape(-1, QK_K)

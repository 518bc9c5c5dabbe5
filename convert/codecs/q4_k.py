"""Q4_K: 4-bit codes, super-blocks of 256 = 8 sub-blocks of 32, each with a 6-bit scale and min.

Block (144 bytes):

    offset  size  field
    0       2     d      fp16, multiplies the sub-block scales
    2       2     dmin   fp16, multiplies the sub-block mins
    4       12    scales 8 six-bit scales + 8 six-bit mins (see kquant_scales.pack_scale_min_6bit)
    16      128   qs     4 chunks of 64 weights; byte l of chunk c = q[64c + l] | q[64c + 32 + l] << 4

w = (d * scale[g]) * q - (dmin * min[g]), q in [0, 15], g = sub-block of 32.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .kquant_scales import SixBitScaleMinCodec, pack_nibbles, unpack_nibbles


class Q4_K(SixBitScaleMinCodec):
    qtype = GGMLQuantizationType.Q4_K
    type_size = 144
    nmax = 15
    ref_search = (-1.0, 0.1, 20)
    clamp_imatrix_scales = False

    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        return pack_nibbles(q)

    def unpack_codes(self, raw: np.ndarray) -> np.ndarray:
        return unpack_nibbles(raw)

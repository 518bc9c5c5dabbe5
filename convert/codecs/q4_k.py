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

from .kquant_scales import QK_K, SixBitScaleMinCodec


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(S, 256) 4-bit codes -> (S, 128): each 64-weight chunk becomes 32 bytes of (low half | high half << 4)."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def unpack_nibbles(raw: np.ndarray) -> np.ndarray:
    """(S, 128) -> (S, 256) 4-bit codes; inverse of pack_nibbles."""
    b = raw.reshape(-1, 4, 1, 32)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(-1, QK_K)


class Q4KCodec(SixBitScaleMinCodec):
    qtype = GGMLQuantizationType.Q4_K
    type_size = 144
    nmax = 15
    ref_search = (-1.0, 0.1, 20)
    clamp_imatrix_scales = False

    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        return pack_nibbles(q)

    def unpack_codes(self, raw: np.ndarray) -> np.ndarray:
        return unpack_nibbles(raw)

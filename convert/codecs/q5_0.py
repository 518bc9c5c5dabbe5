"""Q5_0: blocks of 32 weights, one fp16 scale, 5-bit codes (w = d * q, q in [-16, 15]).

Block, 22 bytes (u_j = q_j + 16 is the stored 5-bit code of weight j):

    byte   0..1    2..5                         6 + j, j = 0..15
           d       qh: uint32 little endian,    (u_j & 15) | (u_(j+16) & 15) << 4
           fp16    bit j = u_j >> 4

The encoders are legacy_symmetric.SymmetricLegacy's with nmax = 16.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .fields import block_fields, fp16_bytes, fp16_field
from .legacy_symmetric import ScaledBlocks, SymmetricLegacy


class Q5_0(SymmetricLegacy):
    qtype = GGMLQuantizationType.Q5_0
    type_size = 22
    nmax = 16

    def pack(self, blocks: ScaledBlocks) -> np.ndarray:
        u = (blocks.q + 16).view(np.uint8)
        qh = np.packbits(u >> 4, axis=-1, bitorder="little")
        qs = (u[..., :16] & 0xF) | ((u[..., 16:] & 0xF) << 4)
        return np.concatenate([fp16_bytes(blocks.d), qh, qs], axis=-1).reshape(u.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> ScaledBlocks:
        d, qh, qs = block_fields(raw, self.type_size, 2, 4, 16)
        high = np.unpackbits(qh, axis=-1, bitorder="little")
        u = np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (high << 4)
        return ScaledBlocks(fp16_field(d), u.astype(np.int8) - 16)

"""Q4_0: blocks of 32 weights, one fp16 scale, 4-bit codes (w = d * q, q in [-8, 7]).

Q4_0 block, 18 bytes (u_j = q_j + 8 is the stored 4-bit code of weight j):

    byte   0..1    2 + j, j = 0..15
           d       u_j | u_(j+16) << 4
           fp16    (low nibble: first half of the block, high nibble: second half)

The encoders are legacy_symmetric.SymmetricLegacy's with nmax = 8.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .fields import block_fields, fp16_bytes, fp16_field
from .legacy_symmetric import ScaledBlocks, SymmetricLegacy


class Q4_0(SymmetricLegacy):
    qtype = GGMLQuantizationType.Q4_0
    type_size = 18
    nmax = 8

    def pack(self, blocks: ScaledBlocks) -> np.ndarray:
        u = (blocks.q + 8).view(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << 4)
        return np.concatenate([fp16_bytes(blocks.d), qs], axis=-1).reshape(u.shape[0], -1)

    def unpack(self, raw: np.ndarray) -> ScaledBlocks:
        d, qs = block_fields(raw, self.type_size, 2, 16)
        u = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
        return ScaledBlocks(fp16_field(d), u.astype(np.int8) - 8)

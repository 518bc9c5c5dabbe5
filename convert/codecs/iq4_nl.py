"""IQ4_NL: blocks of 32 weights, one fp16 scale, 4-bit indices into ggml's 16 non-uniform values.

w = d * kvalues[i] (float32), kvalues = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113).

IQ4_NL block, 18 bytes (i_j is the 4-bit table index of weight j):

    byte   0..1    2 + j, j = 0..15
           d       i_j | i_(j+16) << 4
           fp16    (low nibble: first half of the block, high nibble: second half)

`fit` is ggml's `quantize_iq4_nl` (iquant_nl's scale search on each block, importance weighted with sigma2 over
the block), then d = fp16(scale) and the indices nearest to x * (1/scale) with the unrounded scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType

from .fields import Fp16ScaleSteps, block_fields, fp16_bytes, fp16_field
from .iquant_nl import F32, TableCodec, importance_weights, indices, pack_halves, sub_block_scales, unpack_halves


@dataclasses.dataclass(frozen=True)
class NLBlocks:
    """d: (rows, nb) float16; q: (rows, nb, 32) uint8 table indices."""

    d: np.ndarray
    q: np.ndarray


class IQ4_NL(Fp16ScaleSteps, TableCodec):
    """A refit moves d in steps of its ulp (Fp16ScaleSteps), as for Q4_0."""

    qtype = GGMLQuantizationType.IQ4_NL
    block_size = 32
    type_size = 18

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> NLBlocks:
        x = self.blocks_of(w)
        scale = sub_block_scales(x, importance_weights(x, importance))
        return NLBlocks(scale.astype(np.float16), indices(x, scale))

    def pack(self, blocks: NLBlocks) -> np.ndarray:
        rows = blocks.q.shape[0]
        return np.concatenate([fp16_bytes(blocks.d), pack_halves(blocks.q)], axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> NLBlocks:
        d, qs = block_fields(raw, self.type_size, 2, 16)
        return NLBlocks(fp16_field(d), unpack_halves(qs))

    def group_scales(self, blocks: NLBlocks) -> np.ndarray:
        return blocks.d.astype(F32)

    def with_codes(self, blocks: NLBlocks, q: np.ndarray) -> NLBlocks:
        return NLBlocks(blocks.d, self.checked_indices(q, blocks.q.shape))

"""IQ3_XXS: super-blocks of 256 = 8 sub-blocks of 32, fp16 d, per sub-block a 4-bit scale and 4 sign indices, per
4 weights one point of a 256-point codebook (lattice_search: levels 2l+1, dequantized as gguf-py's grid, 4..62).

w = ((d * (0.5 + ls)) * 0.5) * grid[index][j] * (±1), float32 in this order (ggml's and gguf-py's dequantization).
The signs of each 8 weights are a 7-bit index into ggml's ksigns table (gguf-py's `IQ2_XXS.ksigns`): the 8th sign
is the parity of the other 7, so the count of negatives is even.

IQ3_XXS block, 98 bytes:

    offset  size  field
    0       2     d        fp16
    2       64    qs       codebook index of weights 4j..4j+3, j = 0..63
    66      32    aux      8 uint32 LE, one per sub-block g: bits 7k..7k+6 = sign index of weights 32g+8k..+7
                           (k = 0..3), bits 28..31 = ls[g]

`fit` is ggml's `quantize_row_iq3_xxs_impl` (the search of lattice_search, trials -15..15, sub-blocks with max |x| <
1e-8 skipped); then d = max_scale / 31, stored as fp16(d * 1.0125), ls = clamp(nearest_int(0.5 * (scale/d - 1)),
0, 15); an all-zero super-block (max_scale 0) is stored as zeros.  llama.cpp requires an importance matrix for
this type (build refuses without one, as llama-quantize does); the fit itself runs either way, as ggml's does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS
from gguf.quants import IQ3_XXS as _GGUF_IQ3_XXS

from .fields import block_fields, fp16_bytes, fp16_field
from .lattice_search import F32, even_sign_sub_blocks, search, search_weights, sequential_max, super_block_scales
from .lattice import LatticeCodec

KSIGNS = np.frombuffer(_GGUF_IQ2_XXS.ksigns, dtype=np.uint8)  # 7-bit index -> the 8 sign bits (bit 7: parity)
EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS


@dataclasses.dataclass(frozen=True)
class XXSBlocks:
    """d: (rows, nb) float16; index: (rows, nb, 64) uint8 codebook indices; signs: (rows, nb, 32) uint8 7-bit
    sign indices (per 8 weights); scales: (rows, nb, 8) uint8 4-bit ls."""

    d: np.ndarray
    index: np.ndarray
    signs: np.ndarray
    scales: np.ndarray


class IQ3_XXS(LatticeCodec):
    qtype = GGMLQuantizationType.IQ3_XXS
    block_size = 256
    type_size = 98

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> XXSBlocks:
        x = self.blocks_of(w)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance)
        xval, signs = even_sign_sub_blocks(x, weight, 32)
        with np.errstate(invalid="ignore"):
            zero = sequential_max(xval, axis=1) < EPS
        scale, index = search(xval, weight.reshape(-1, 32), "IQ3_XXS", range(-15, 16), 0.2, zero, "off")
        flip = scale < 0  # "should never happen" in ggml; it flips the scale and the sign indices
        signs = np.where(flip[:, None], ~signs & 127, signs)
        scale = np.where(flip, -scale, scale)
        signs = np.where(zero[:, None], 0, signs).astype(np.uint8)
        scale = scale.reshape(rows, nb, 8)
        max_scale, d, ls = super_block_scales(scale, 1.0125)
        empty = (max_scale == 0)[..., None]
        index = index.reshape(rows, nb, 64).astype(np.uint8)
        return XXSBlocks(np.where(empty[..., 0], np.float16(0), d),
                         np.where(empty, 0, index).astype(np.uint8),
                         np.where(empty, 0, signs.reshape(rows, nb, 32)).astype(np.uint8),
                         np.where(empty, 0, ls).astype(np.uint8))

    def pack(self, blocks: XXSBlocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        s = blocks.signs.reshape(rows, nb, 8, 4).astype(np.uint32)
        aux = (s << (7 * np.arange(4, dtype=np.uint32))).sum(-1, dtype=np.uint32)
        aux = (aux | (blocks.scales.astype(np.uint32) << 28)).astype("<u4")
        fields = [fp16_bytes(blocks.d), blocks.index, aux.view(np.uint8).reshape(rows, nb, 32)]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> XXSBlocks:
        d, qs, aux = block_fields(raw, self.type_size, 2, 64, 32)
        aux = np.ascontiguousarray(aux).view("<u4")  # (rows, nb, 8)
        signs = (aux[..., None] >> (7 * np.arange(4, dtype=np.uint32))) & 127
        return XXSBlocks(fp16_field(d), np.ascontiguousarray(qs), signs.reshape(*aux.shape[:-1], 32).astype(np.uint8),
                         (aux >> 28).astype(np.uint8))

    def dequantize(self, blocks: XXSBlocks) -> np.ndarray:
        _GGUF_IQ3_XXS.init_grid()
        rows, nb, _ = blocks.index.shape
        db = blocks.d.astype(F32)[..., None] * (F32(0.5) + blocks.scales.astype(F32)) * F32(0.5)  # (rows, nb, 8)
        grid = _GGUF_IQ3_XXS.grid.reshape(256, 4)[blocks.index].reshape(rows, nb, 8, 32)
        bits = KSIGNS[blocks.signs].reshape(rows, nb, 8, 4, 1) >> np.arange(8, dtype=np.uint8)
        sign = np.where(bits.reshape(rows, nb, 8, 32) & 1, F32(-1), F32(1))
        return (db[..., None] * grid * sign).reshape(rows, -1)

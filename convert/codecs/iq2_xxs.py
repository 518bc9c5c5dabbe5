"""IQ2_XXS: super-blocks of 256 = 8 sub-blocks of 32, fp16 d, per sub-block a 4-bit scale and 4 sign indices, per 8
weights one point of a 256-point codebook (lattice_search: levels 2l+1, l in [0, 2]; dequantized as gguf-py's grid,
8/25/43); the signs as IQ3_XXS's, 7-bit indices into ksigns (iq3_xxs.KSIGNS).

w = ((d * (0.5 + ls)) * 0.25) * grid[index][j] * (±1), float32 in this order (ggml's and gguf-py's dequantization).

IQ2_XXS block, 66 bytes; per sub-block g, 8 bytes at 2 + 8g:

    offset      size  field
    0           2     d        fp16
    2 + 8g      4     index    codebook index of weights 32g + 8k..+7, k = 0..3
    6 + 8g      4     aux      uint32 LE: bits 7k..7k+6 = sign index of group k, bits 28..31 = ls[g]

`fit` is ggml's `quantize_iq2_xxs`: importance required (ggml asserts it), weights imatrix * sqrt(sigma2 + x^2)
with sigma2 = sum(x^2)/256, the even-sign rule; per sub-block, max |x| < 1e-15 skips it, else ggml's
make_qp_quants(4 levels) gives a first scale, eff_max = 3 * scale (<= 0 skips), trials -6..6 in steps of 0.1
scale from eff_max, and the final pass redoes every group whenever the scale is > 0 (lattice_search "all"); then d
= max_scale / 31 stored as fp16, ls = clamp(nearest_int(0.5 * (scale/d - 1)), 0, 15); an all-zero super-block
(max_scale 0) is stored as zeros.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS

from .fields import block_fields, fp16_bytes, fp16_field
from .iq3_xxs import KSIGNS
from .lattice import LatticeCodec
from .lattice_search import F32, even_sign_sub_blocks, search, search_weights, sequential_max, super_block_scales
from .search_affine import make_qp_quants

EPS = F32(1e-15)  # GROUP_MAX_EPS
KMAXQ = 3


@dataclasses.dataclass(frozen=True)
class XXS2Blocks:
    """d: (rows, nb) float16; index: (rows, nb, 32) uint8 codebook indices; signs: (rows, nb, 32) uint8 7-bit
    sign indices (per 8 weights); scales: (rows, nb, 8) uint8 4-bit ls."""

    d: np.ndarray
    index: np.ndarray
    signs: np.ndarray
    scales: np.ndarray


class IQ2_XXS(LatticeCodec):
    qtype = GGMLQuantizationType.IQ2_XXS
    block_size = 256
    type_size = 66
    needs_importance = True

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> XXS2Blocks:
        x = self.blocks_of(w)
        self.check_importance(importance)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance, doubled=False).reshape(-1, 32)
        xval, signs = even_sign_sub_blocks(x, weight, 32)
        with np.errstate(all="ignore"):
            small = sequential_max(xval, axis=1) < EPS
            scale0, _ = make_qp_quants(np.ascontiguousarray(xval.T), np.ascontiguousarray(weight.T), KMAXQ + 1)
            eff_max = scale0 * F32(KMAXQ)
        zero = small | (eff_max <= 0)
        scale, index = search(xval, weight, "IQ2_XXS", range(-6, 7), 0.1, zero, "all", peak=eff_max, scale0=scale0)
        flip = scale < 0  # "should never happen" in ggml; it flips the scale and the sign indices
        signs = np.where(flip[:, None], ~signs & 127, signs)
        signs = np.where(zero[:, None], 0, signs).astype(np.uint8)  # a skipped sub-block's q2 stays as memset
        index = np.where(zero[:, None], 0, index)
        scale = np.where(flip, -scale, scale).reshape(rows, nb, 8)
        max_scale, d, ls = super_block_scales(scale, 1.0)
        empty = (max_scale == 0)[..., None]
        return XXS2Blocks(np.where(empty[..., 0], np.float16(0), d),
                          np.where(empty, 0, index.reshape(rows, nb, 32)).astype(np.uint8),
                          np.where(empty, 0, signs.reshape(rows, nb, 32)).astype(np.uint8),
                          np.where(empty, 0, ls).astype(np.uint8))

    def pack(self, blocks: XXS2Blocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        s = blocks.signs.reshape(rows, nb, 8, 4).astype(np.uint32)
        aux = (s << (7 * np.arange(4, dtype=np.uint32))).sum(-1, dtype=np.uint32)
        aux = (aux | (blocks.scales.astype(np.uint32) << 28)).astype("<u4")
        sub = np.concatenate([blocks.index.reshape(rows, nb, 8, 4), aux[..., None].view(np.uint8)], axis=-1)
        return np.concatenate([fp16_bytes(blocks.d), sub.reshape(rows, nb, 64)], axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> XXS2Blocks:
        d, qs = block_fields(raw, self.type_size, 2, 64)
        sub = np.ascontiguousarray(qs).reshape(*qs.shape[:-1], 8, 8)
        aux = np.ascontiguousarray(sub[..., 4:]).view("<u4")[..., 0]  # (rows, nb, 8)
        signs = (aux[..., None] >> (7 * np.arange(4, dtype=np.uint32))) & 127
        return XXS2Blocks(fp16_field(d), np.ascontiguousarray(sub[..., :4]).reshape(*qs.shape[:-1], 32),
                          signs.reshape(*aux.shape[:-1], 32).astype(np.uint8), (aux >> 28).astype(np.uint8))

    def dequantize(self, blocks: XXS2Blocks) -> np.ndarray:
        _GGUF_IQ2_XXS.init_grid()
        rows, nb, _ = blocks.index.shape
        db = blocks.d.astype(F32)[..., None] * (F32(0.5) + blocks.scales.astype(F32)) * F32(0.25)  # (rows, nb, 8)
        grid = _GGUF_IQ2_XXS.grid.reshape(256, 8)[blocks.index].reshape(rows, nb, 8, 32)
        bits = KSIGNS[blocks.signs][..., None] >> np.arange(8, dtype=np.uint8)
        sign = np.where(bits.reshape(rows, nb, 8, 32) & 1, F32(-1), F32(1))
        return (db[..., None] * grid * sign).reshape(rows, -1)

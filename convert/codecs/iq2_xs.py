"""IQ2_XS: super-blocks of 256 = 16 sub-blocks of 16, fp16 d, a 4-bit scale per sub-block, per 8 weights one point
of a 512-point codebook (lattice_search: levels 2l+1, l in [0, 2]; dequantized as gguf-py's grid, 8/25/43) and a
7-bit sign index (iq3_xxs.KSIGNS: the 8th sign is the parity of the other 7).

w = ((d * (0.5 + ls)) * 0.25) * grid[index][j] * (±1), float32 in this order (ggml's and gguf-py's dequantization).

IQ2_XS block, 74 bytes:

    offset  size  field
    0       2     d        fp16
    2       64    qs       32 uint16 LE, one per 8 weights j: bits 0..8 index, bits 9..15 sign index
    66      8     scales   byte k: ls[2k] | ls[2k+1] << 4

`fit` is ggml's `quantize_iq2_xs`: importance required (ggml asserts it), weights imatrix * sqrt(sigma2 + x^2) with
sigma2 = sum(x^2)/256, the even-sign rule of IQ3_XXS, the search of lattice_search on 16-weight sub-blocks (trials
-9..9 in steps of 0.1, sub-blocks with max |x| < 1e-15 skipped, only off-codebook groups redone in the final pass);
then d = max_scale / 31 stored as fp16, ls = clamp(nearest_int(0.5 * (scale/d - 1)), 0, 15); an all-zero
super-block (max_scale 0) is stored as zeros.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_XS as _GGUF_IQ2_XS

from .fields import block_fields, fp16_bytes, fp16_field
from .iq3_xxs import KSIGNS
from .lattice import LatticeCodec
from .lattice_search import F32, even_sign_sub_blocks, search, search_weights, sequential_max, super_block_scales

EPS = F32(1e-15)  # GROUP_MAX_EPS


@dataclasses.dataclass(frozen=True)
class XS2Blocks:
    """d: (rows, nb) float16; index: (rows, nb, 32) uint16 9-bit codebook indices; signs: (rows, nb, 32) uint8
    7-bit sign indices (per 8 weights); scales: (rows, nb, 16) uint8 4-bit ls."""

    d: np.ndarray
    index: np.ndarray
    signs: np.ndarray
    scales: np.ndarray


class IQ2_XS(LatticeCodec):
    qtype = GGMLQuantizationType.IQ2_XS
    block_size = 256
    type_size = 74
    needs_importance = True

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> XS2Blocks:
        x = self.blocks_of(w)
        self.check_importance(importance)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance, doubled=False)
        xval, signs = even_sign_sub_blocks(x, weight, 16)
        with np.errstate(invalid="ignore"):
            zero = sequential_max(xval, axis=1) < EPS
        scale, index = search(xval, weight.reshape(-1, 16), "IQ2_XS", range(-9, 10), 0.1, zero, "off")
        flip = scale < 0  # "should never happen" in ggml; it flips the scale and the sign indices
        signs = np.where(flip[:, None], ~signs & 127, signs)
        signs = np.where(zero[:, None], 0, signs).astype(np.uint8)  # a skipped sub-block's q2 stays as memset
        index = np.where(zero[:, None], 0, index)
        scale = np.where(flip, -scale, scale).reshape(rows, nb, 16)
        max_scale, d, ls = super_block_scales(scale, 1.0)
        empty = (max_scale == 0)[..., None]
        return XS2Blocks(np.where(empty[..., 0], np.float16(0), d),
                         np.where(empty, 0, index.reshape(rows, nb, 32)).astype(np.uint16),
                         np.where(empty, 0, signs.reshape(rows, nb, 32)).astype(np.uint8),
                         np.where(empty, 0, ls).astype(np.uint8))

    def pack(self, blocks: XS2Blocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        qs = (blocks.index.astype(np.uint16) | (blocks.signs.astype(np.uint16) << 9)).astype("<u2")
        scales = blocks.scales[..., 0::2] | (blocks.scales[..., 1::2] << 4)
        fields = [fp16_bytes(blocks.d), qs.view(np.uint8).reshape(rows, nb, 64), scales]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> XS2Blocks:
        d, qs, scales = block_fields(raw, self.type_size, 2, 64, 8)
        qs = np.ascontiguousarray(qs).view("<u2")
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(*scales.shape[:-1], 16)
        return XS2Blocks(fp16_field(d), (qs & 511).astype(np.uint16), (qs >> 9).astype(np.uint8), ls.astype(np.uint8))

    def dequantize(self, blocks: XS2Blocks) -> np.ndarray:
        _GGUF_IQ2_XS.init_grid()
        rows, nb, _ = blocks.index.shape
        db = blocks.d.astype(F32)[..., None] * (F32(0.5) + blocks.scales.astype(F32)) * F32(0.25)  # (rows, nb, 16)
        grid = _GGUF_IQ2_XS.grid.reshape(512, 8)[blocks.index].reshape(rows, nb, 16, 16)
        bits = KSIGNS[blocks.signs][..., None] >> np.arange(8, dtype=np.uint8)
        sign = np.where(bits.reshape(rows, nb, 16, 16) & 1, F32(-1), F32(1))
        return (db[..., None] * grid * sign).reshape(rows, -1)

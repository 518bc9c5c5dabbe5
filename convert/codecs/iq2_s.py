"""IQ2_S: super-blocks of 256 = 16 sub-blocks of 16, fp16 d, a 4-bit scale per sub-block, one sign bit per weight,
per 8 weights one point of a 1024-point codebook (lattice_search: levels 2l+1, l in [0, 2]; dequantized as gguf-py's
grid, 8/25/43).

w = ((d * (0.5 + ls)) * 0.25) * grid[index][j] * (±1), float32 in this order (ggml's and gguf-py's dequantization).

IQ2_S block, 82 bytes:

    offset  size  field
    0       2     d        fp16
    2       32    qs       low 8 bits of the codebook index of weights 8j..8j+7, j = 0..31
    34      32    signs    bit i of byte j: weight 8j + i is negative
    66      8     qh       bits 2(j % 4)..2(j % 4)+1 of byte j // 4: bits 8..9 of index j
    74      8     scales   byte k: ls[2k] | ls[2k+1] << 4

`fit` is ggml's `quantize_iq2_s` (the search of lattice_search on 16-weight sub-blocks, trials -9..9 in steps of 0.1,
weights 0.25*sigma2 + x^2 without importance, sub-blocks with max |x| < 1e-8 skipped, only off-codebook groups redone
in the final pass); then d = max_scale / 31, stored as fp16(d * 0.9875), ls = clamp(nearest_int(0.5 * (scale/d -
1)), 0, 15); a super-block whose scales are all 0 keeps d = 0 and ls = 0.  llama.cpp requires an importance matrix
for this type (build refuses without one, as llama-quantize does); the fit itself runs either way, as ggml's does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ2_S as _GGUF_IQ2_S

from .fields import block_fields, fp16_bytes, fp16_field
from .lattice import LatticeCodec
from .lattice_search import F32, search, search_weights, sequential_max, super_block_scales

EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ2_S


@dataclasses.dataclass(frozen=True)
class S2Blocks:
    """d: (rows, nb) float16; index: (rows, nb, 32) uint16 10-bit codebook indices; signs: (rows, nb, 32) uint8
    sign bits (bit i of byte j: weight 8j + i); scales: (rows, nb, 16) uint8 4-bit ls."""

    d: np.ndarray
    index: np.ndarray
    signs: np.ndarray
    scales: np.ndarray


class IQ2_S(LatticeCodec):
    qtype = GGMLQuantizationType.IQ2_S
    block_size = 256
    type_size = 82

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> S2Blocks:
        x = self.blocks_of(w)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance, plain_sigma=True)
        sub = x.reshape(-1, 16)
        neg = ~(sub >= 0)  # ggml: `xb >= 0` keeps the value, so NaN counts as negative
        xval = np.where(neg, -sub, sub)
        signs = (neg.reshape(-1, 2, 8).astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)
        with np.errstate(invalid="ignore"):
            zero = sequential_max(xval, axis=1) < EPS
        scale, index = search(xval, weight.reshape(-1, 16), "IQ2_S", range(-9, 10), 0.1, zero, "off")
        flip = scale < 0  # "should never happen" in ggml; it flips the scale and every sign bit
        signs = np.where(flip[:, None], ~signs, signs)
        signs = np.where(zero[:, None], 0, signs).astype(np.uint8)  # a skipped sub-block's bytes stay as memset
        scale = np.where(flip, -scale, scale).reshape(rows, nb, 16)
        max_scale, d, ls = super_block_scales(scale, 0.9875)
        unset = max_scale == 0  # ggml's `if (!max_scale) continue;`: d and the scales stay as memset
        return S2Blocks(np.where(unset, np.float16(0), d), index.reshape(rows, nb, 32).astype(np.uint16),
                        signs.reshape(rows, nb, 32), np.where(unset[..., None], 0, ls).astype(np.uint8))

    def pack(self, blocks: S2Blocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        high = ((blocks.index >> 8) & 3).astype(np.uint8).reshape(rows, nb, 8, 4)
        qh = (high << (2 * np.arange(4, dtype=np.uint8))).sum(-1, dtype=np.uint8)
        scales = blocks.scales[..., 0::2] | (blocks.scales[..., 1::2] << 4)
        fields = [fp16_bytes(blocks.d), (blocks.index & 255).astype(np.uint8), blocks.signs, qh, scales]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> S2Blocks:
        d, qs, signs, qh, scales = block_fields(raw, self.type_size, 2, 32, 32, 8, 8)
        high = ((qh[..., None] >> (2 * np.arange(4, dtype=np.uint8))) & 3).reshape(*qh.shape[:-1], 32)
        index = qs.astype(np.uint16) | (high.astype(np.uint16) << 8)
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(*scales.shape[:-1], 16)
        return S2Blocks(fp16_field(d), index, np.ascontiguousarray(signs), ls.astype(np.uint8))

    def dequantize(self, blocks: S2Blocks) -> np.ndarray:
        _GGUF_IQ2_S.init_grid()
        rows, nb, _ = blocks.index.shape
        db = blocks.d.astype(F32)[..., None] * (F32(0.5) + blocks.scales.astype(F32)) * F32(0.25)  # (rows, nb, 16)
        grid = _GGUF_IQ2_S.grid.reshape(1024, 8)[blocks.index].reshape(rows, nb, 16, 16)
        bits = (blocks.signs[..., None] >> np.arange(8, dtype=np.uint8)) & 1
        sign = np.where(bits.reshape(rows, nb, 16, 16), F32(-1), F32(1))
        return (db[..., None] * grid * sign).reshape(rows, -1)

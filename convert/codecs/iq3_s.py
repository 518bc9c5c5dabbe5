"""IQ3_S: super-blocks of 256 = 8 sub-blocks of 32, fp16 d, a 4-bit scale per sub-block, one sign bit per weight,
per 4 weights one point of a 512-point codebook (lattice_search: levels 2l+1, as gguf-py's grid, 1..15).

w = (d * (1 + 2 * ls)) * grid[index][j] * (±1), float32 in this order (ggml's and gguf-py's dequantization).

IQ3_S block, 110 bytes:

    offset  size  field
    0       2     d        fp16
    2       64    qs       low 8 bits of the codebook index of weights 4j..4j+3, j = 0..63
    66      8     qh       bit j % 8 of byte j // 8: bit 8 of index j
    74      32    signs    bit i of byte k: weight 8k + i is negative
    106     4     scales   byte k: ls[2k] | ls[2k+1] << 4

`fit` is ggml's `quantize_iq3_s` (the search of lattice_search, trials -9..9, every group redone in the final pass;
only all-zero sub-blocks are skipped); then d = max_scale / 31, stored as fp16(d * 1.033), ls = clamp(
nearest_int(0.5 * (scale/d - 1)), 0, 15); a super-block whose scales are all 0 keeps d = 0 and ls = 0.

ggml advances its qs and signs pointers only past the sub-blocks it quantizes: after a skipped (all-zero)
sub-block, the next ones' qs and signs land one sub-block early, and the super-block's last slots stay zero (qh is
indexed by position and does not shift).  The codec writes what ggml writes, so fit reproduces that shift; the
logical blocks are the stored layout (index j = qs[j] | qh bit j << 8).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import IQ3_S as _GGUF_IQ3_S

from .fields import block_fields, fp16_bytes, fp16_field
from .lattice_search import F32, search, search_weights, sequential_max, super_block_scales
from .lattice import LatticeCodec


@dataclasses.dataclass(frozen=True)
class SBlocks:
    """d: (rows, nb) float16; index: (rows, nb, 64) uint16 9-bit codebook indices; signs: (rows, nb, 32) uint8
    sign bits (bit i of byte k: weight 8k + i); scales: (rows, nb, 8) uint8 4-bit ls."""

    d: np.ndarray
    index: np.ndarray
    signs: np.ndarray
    scales: np.ndarray


class IQ3_S(LatticeCodec):
    qtype = GGMLQuantizationType.IQ3_S
    block_size = 256
    type_size = 110

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> SBlocks:
        x = self.blocks_of(w)
        rows, nb, _ = x.shape
        weight = search_weights(x, importance)
        sub = x.reshape(-1, 32)
        neg = ~(sub >= 0)  # ggml: `xb >= 0` keeps the value, so NaN counts as negative
        xval = np.where(neg, -sub, sub)
        signs = (neg.reshape(-1, 4, 8).astype(np.uint8) << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)
        zero = sequential_max(xval, axis=1) == 0  # ggml: `if (!max)`
        scale, index = search(xval, weight.reshape(-1, 32), "IQ3_S", range(-9, 10), 0.2, zero, "all_if_off")
        flip = scale < 0  # "should never happen" in ggml; it flips the scale and every sign bit
        signs = np.where(flip[:, None], ~signs, signs).astype(np.uint8)
        scale = np.where(flip, -scale, scale).reshape(rows, nb, 8)
        max_scale, d, ls = super_block_scales(scale, 1.033)
        index = index.reshape(rows, nb, 8, 8)
        high = (index >> 8).astype(np.uint16) << 8
        low, signs = self._shifted(zero.reshape(rows, nb, 8), index & 255, signs.reshape(rows, nb, 8, 4))
        unset = (max_scale == 0)  # ggml's `if (!max_scale) continue;`: d and the scales stay as memset
        return SBlocks(np.where(unset, np.float16(0), d),
                       (low.astype(np.uint16) | high).reshape(rows, nb, 64),
                       signs.reshape(rows, nb, 32),
                       np.where(unset[..., None], 0, ls).astype(np.uint8))

    @staticmethod
    def _shifted(zero: np.ndarray, low: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """qs low bytes (rows, nb, 8, 8) and signs (rows, nb, 8, 4) where ggml stores them: sub-block g's at slot
        (number of non-skipped sub-blocks before g), the slots past the last zero (module docstring).  A skipped
        sub-block's own bytes are not written."""
        if not zero.any():
            return low, signs
        slot = np.cumsum(~zero, axis=-1) - 1  # (rows, nb, 8)
        r, b, g = np.nonzero(~zero)
        out_low, out_signs = np.zeros_like(low), np.zeros_like(signs)
        out_low[r, b, slot[r, b, g]] = low[r, b, g]
        out_signs[r, b, slot[r, b, g]] = signs[r, b, g]
        return out_low, out_signs

    def pack(self, blocks: SBlocks) -> np.ndarray:
        rows, nb, _ = blocks.index.shape
        high = ((blocks.index >> 8) & 1).astype(np.uint8).reshape(rows, nb, 8, 8)
        qh = (high << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)
        scales = blocks.scales[..., 0::2] | (blocks.scales[..., 1::2] << 4)
        fields = [fp16_bytes(blocks.d), (blocks.index & 255).astype(np.uint8), qh, blocks.signs, scales]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> SBlocks:
        d, qs, qh, signs, scales = block_fields(raw, self.type_size, 2, 64, 8, 32, 4)
        high = ((qh[..., None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(*qh.shape[:-1], 64)
        index = qs.astype(np.uint16) | (high.astype(np.uint16) << 8)
        ls = np.stack([scales & 15, scales >> 4], axis=-1).reshape(*scales.shape[:-1], 8)
        return SBlocks(fp16_field(d), index, np.ascontiguousarray(signs), ls.astype(np.uint8))

    def dequantize(self, blocks: SBlocks) -> np.ndarray:
        _GGUF_IQ3_S.init_grid()
        rows, nb, _ = blocks.index.shape
        db = blocks.d.astype(F32)[..., None] * (F32(1) + F32(2) * blocks.scales.astype(F32))  # (rows, nb, 8)
        grid = _GGUF_IQ3_S.grid.reshape(512, 4)[blocks.index].reshape(rows, nb, 8, 32)
        bits = (blocks.signs[..., None] >> np.arange(8, dtype=np.uint8)) & 1
        sign = np.where(bits.reshape(rows, nb, 8, 32), F32(-1), F32(1))
        return (db[..., None] * grid * sign).reshape(rows, -1)

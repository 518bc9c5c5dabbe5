"""IQ4_XS: super-blocks of 256 = 8 sub-blocks of 32, fp16 d, a 6-bit scale per sub-block, 4-bit indices into ggml's
16 non-uniform values (iquant_nl.KVALUES).

w = (d * (ls[g] - 32)) * kvalues[i], ls[g] in [0, 63] the stored scale of sub-block g (float32, in this order).

IQ4_XS block, 136 bytes:

    offset  size  field
    0       2     d         fp16
    2       2     scales_h  uint16 LE: bits 2g..2g+1 = ls[g] >> 4, g = 0..7
    4       4     scales_l  byte k: ls[2k] & 15 | (ls[2k+1] & 15) << 4
    8       128   qs        per sub-block g, 16 bytes at 8 + 16g: byte j = i[32g + j] | i[32g + 16 + j] << 4

`fit` is ggml's `quantize_iq4_xs`: iquant_nl's scale search on each sub-block (importance weighted with sigma2 over
the super-block), then d = -s/32 for the signed sub-block scale s of largest magnitude, each sub-block scale
re-quantized to l = clamp(nearest_int(scale/d), -32, 31), and the indices nearest to x * (1/(d*l)), d unrounded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType

from .base import IntegerScales
from .fields import block_fields, fp16_bytes, fp16_field
from .iquant_nl import F32, TableCodec, importance_weights, indices, pack_halves, sub_block_scales, unpack_halves
from .search_symmetric import nearest_int


@dataclasses.dataclass(frozen=True)
class XSBlocks:
    """d: (rows, nb) float16; scales: (rows, nb, 8) uint8 stored 6-bit scales (l + 32); q: (rows, nb, 256) uint8
    table indices."""

    d: np.ndarray
    scales: np.ndarray
    q: np.ndarray


def signed_peak_scale(s: np.ndarray) -> np.ndarray:
    """ggml's `if (|s| > amax) { amax = |s|; max = s; }` over the sub-blocks s[..., 8], from amax = max = +0
    (NaN scales never win, unlike an argmax)."""
    amax = np.zeros(s.shape[:-1], F32)
    peak = np.zeros(s.shape[:-1], F32)
    for g in range(s.shape[-1]):
        a = np.abs(s[..., g])
        take = a > amax
        amax, peak = np.where(take, a, amax), np.where(take, s[..., g], peak)
    return peak


class IQ4_XS(TableCodec):
    qtype = GGMLQuantizationType.IQ4_XS
    block_size = 256
    type_size = 136

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> XSBlocks:
        x = self.blocks_of(w)
        rows, nb, _ = x.shape
        wt = importance_weights(x, importance)
        x, wt = x.reshape(rows, nb, 8, 32), wt.reshape(rows, nb, 8, 32)
        scales = sub_block_scales(x, wt)
        d = -signed_peak_scale(scales) / F32(32)  # -(+0)/32 = -0.0: an all-zero super-block stores d = -0
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
            l = np.clip(nearest_int(inv[..., None] * scales), -32, 31)
            q = indices(x, d[..., None] * l.astype(F32))
        return XSBlocks(d.astype(np.float16), (l + 32).astype(np.uint8), q.reshape(rows, nb, 256))

    def pack(self, blocks: XSBlocks) -> np.ndarray:
        rows, nb, _ = blocks.scales.shape
        ls = blocks.scales.astype(np.uint16)
        scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=-1).astype("<u2")
        low = blocks.scales & 0xF
        scales_l = low[..., 0::2] | (low[..., 1::2] << 4)
        fields = [fp16_bytes(blocks.d), scales_h[..., None].view(np.uint8), scales_l, pack_halves(blocks.q)]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> XSBlocks:
        d, sh, sl, qs = block_fields(raw, self.type_size, 2, 2, 4, 128)
        high = (np.ascontiguousarray(sh).view("<u2") >> (2 * np.arange(8, dtype=np.uint16))) & 3
        low = np.stack([sl & 0xF, sl >> 4], axis=-1).reshape(*sl.shape[:-1], 8)
        return XSBlocks(fp16_field(d), (low | (high.astype(np.uint8) << 4)).astype(np.uint8), unpack_halves(qs))

    def group_scales(self, blocks: XSBlocks) -> np.ndarray:
        dl = blocks.d.astype(F32)[..., None] * (blocks.scales.astype(F32) - F32(32))
        return dl.reshape(dl.shape[0], -1)

    def integer_scales(self, blocks: XSBlocks) -> IntegerScales:
        """The sub-block scales l = ls - 32 in [-32, 31] under their super-block's d (w = (d * l) * kvalues[i])."""
        rows = blocks.d.shape[0]
        return IntegerScales(np.repeat(blocks.d.astype(F32), 8, axis=1),
                             blocks.scales.reshape(rows, -1).astype(np.int32) - 32, None, None, -32, 31)

    def with_integer_scales(self, blocks: XSBlocks, scale: np.ndarray, min: np.ndarray | None = None) -> XSBlocks:
        scale = np.asarray(scale)
        if np.any(scale < -32) or np.any(scale > 31):
            raise ValueError(f"{self.name}: sub-block scales outside [-32, 31]")
        return dataclasses.replace(blocks, scales=(scale.reshape(blocks.scales.shape) + 32).astype(np.uint8))

    def with_codes(self, blocks: XSBlocks, q: np.ndarray) -> XSBlocks:
        return dataclasses.replace(blocks, q=self.checked_indices(q, blocks.q.shape))

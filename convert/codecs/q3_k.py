"""Q3_K: super-blocks of 256 weights in 16 groups of 16, w = d * sc[g] * q, q in [-4, 3], sc in [-32, 31].

Block, 110 bytes.  u_j = q_j + 4 is the 3-bit code of weight j, s_g = sc[g] + 32 the 6-bit scale of group g
(weights 16g..16g+15); h = 0, 1 is the half (weights 128h..128h+127), l = 0..31, m = 0..3:

    byte              field     content
    0..31             hmask     bit k of hmask[l]  = u[32k + l] >> 2          (k = 0..7)
    32..95            qs        qs[32h + l]        = sum over k = 0..3 of (u[128h + 32k + l] & 3) << 2k
    96..103           scales    scales[j]          = (s[j] & 15) | (s[j+8] & 15) << 4        (j = 0..7)
    104..107                    scales[8 + m]      = sum over i = 0..3 of (s[4i + m] >> 4) << 2i
    108..109          d         fp16

Encoders (ggml `quantize_row_q3_K_ref` / `_impl`):
  - without importance: group scales from `make_q3_quants` (nmax 4); the scales are quantized to 6 bits
    with d = max_scale / -32 (all zero if the largest scale is 0);
  - with importance: per super-block sigma2 = 2*mean(w^2), weights imp * sqrt(sigma2 + w^2); group
    scales from `make_qx_quants` (nmax 4); the 16 scales themselves from `make_qx_quants` (nmax 32,
    weighted by each group's total weight) giving d and the 6-bit scales.
Both then requantize every group on its stored scale (see kquant_symmetric.requantize).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .fields import block_fields, fp16_bytes, fp16_field
from .kquant_symmetric import PAIR_SHIFT, SuperBlockCodec, SuperBlocks, requantize
from .search_symmetric import make_q3_quants, make_qx_quants, nearest_int, sequential_sum, signed_peak

F32 = np.float32

_BIT_SHIFT = np.arange(8, dtype=np.uint8)[:, None]


class Q3_K(SuperBlockCodec):
    qtype = GGMLQuantizationType.Q3_K
    type_size = 110
    qmin, qmax = -4, 3
    scale_range = (-32, 31)

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> SuperBlocks:
        x = self.groups_of(w)
        if importance is None:
            d, sc, codes = self._scales_plain(x)
        else:
            d, sc, codes = self._scales_weighted(x, np.asarray(importance, dtype=F32))
        codes = requantize(x, d, sc, codes, 4)
        return SuperBlocks(d, sc, codes.reshape(*d.shape, 256).astype(np.int8) - 4)

    @staticmethod
    def _scales_plain(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scales, codes = make_q3_quants(x, 4)
        _, max_scale = signed_peak(scales)
        nonzero = max_scale != 0
        with np.errstate(all="ignore"):  # max_scale 0: scales stored as 0 (sc = -32) and d = 0
            iscale = F32(-32.0) / max_scale
            sc = np.clip(nearest_int(iscale[..., None] * scales).astype(np.int8), -32, 31)
            d = np.where(nonzero, F32(1.0) / iscale, F32(0.0)).astype(np.float16)
        return d, np.where(nonzero[..., None], sc, -32).astype(np.int8), codes

    @staticmethod
    def _scales_weighted(x: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, nb = x.shape[:2]
        x2 = x * x
        sigma2 = F32(2.0) * sequential_sum(x2.reshape(rows, nb, 256), axis=-1) / F32(256)
        weights = importance.reshape(nb, 16, 16) * np.sqrt(sigma2[..., None, None] + x2)
        scales, codes = make_qx_quants(x, 4, weights)
        d, s6 = make_qx_quants(scales, 32, sequential_sum(weights, axis=-1))
        return d.astype(np.float16), s6.astype(np.int8) - 32, codes

    def pack(self, blocks: SuperBlocks) -> np.ndarray:
        rows, nb = blocks.d.shape
        u = (blocks.q + 4).view(np.uint8)
        hmask = np.bitwise_or.reduce((u.reshape(rows, nb, 8, 32) >> 2) << _BIT_SHIFT, axis=-2)
        qs = np.bitwise_or.reduce((u.reshape(rows, nb, 2, 4, 32) & 3) << PAIR_SHIFT, axis=-2)
        s = (blocks.scales + 32).view(np.uint8)
        low = (s[..., :8] & 0xF) | ((s[..., 8:] & 0xF) << 4)
        high = np.bitwise_or.reduce((s.reshape(rows, nb, 4, 4) >> 4) << PAIR_SHIFT, axis=-2)
        fields = [hmask, qs.reshape(rows, nb, 64), low, high, fp16_bytes(blocks.d)]
        return np.concatenate(fields, axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> SuperBlocks:
        hmask, qs, low, high, d = block_fields(raw, self.type_size, 32, 64, 8, 4, 2)
        rows, nb = d.shape[:2]
        hbit = (hmask[..., None, :] >> _BIT_SHIFT) & 1
        u = ((qs.reshape(rows, nb, 2, 1, 32) >> PAIR_SHIFT) & 3).reshape(rows, nb, 256)
        u |= hbit.reshape(rows, nb, 256) << 2
        s = np.concatenate([low & 0xF, low >> 4], axis=-1)
        s |= (((high[..., None, :] >> PAIR_SHIFT) & 3) << 4).reshape(rows, nb, 16)
        return SuperBlocks(fp16_field(d), s.astype(np.int8) - 32, u.astype(np.int8) - 4)

"""Q6_K: super-blocks of 256 weights in 16 groups of 16, w = d * sc[g] * q, q in [-32, 31].

Block, 210 bytes.  u_j = q_j + 32 is the 6-bit code of weight j; h = 0, 1 is the half (weights 128h..128h+127),
l = 0..31:

    byte              field     content
    0..127            ql        ql[64h + l]      = (u[128h+l]    & 15) | (u[128h+l+64] & 15) << 4
                                ql[64h + 32 + l] = (u[128h+l+32] & 15) | (u[128h+l+96] & 15) << 4
    128..191          qh        qh[32h + l] = u[128h+l] >> 4 | (u[128h+l+32] >> 4) << 2
                                            | (u[128h+l+64] >> 4) << 4 | (u[128h+l+96] >> 4) << 6
    192..207          scales    sc[g], int8, group g = weights 16g..16g+15
    208..209          d         fp16

Encoder (ggml `quantize_row_q6_K_ref` / `_impl`): each group's scale comes from `make_qx_quants` (nmax 32,
weights w^2, or the raw importance when given); the scales are quantized to int8 with
d = max_scale / -128; then every group is requantized on its stored scale d*sc (groups whose stored scale
is 0 keep the search's codes).  Super-blocks whose scales are all below 1e-15 are written as zeros.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .fields import block_fields, fp16_bytes, fp16_field
from .kquant_symmetric import PAIR_SHIFT, SuperBlockCodec, SuperBlocks, requantize
from .search_symmetric import GROUP_MAX_EPS, make_qx_quants, nearest_int, signed_peak

F32 = np.float32


class Q6_K(SuperBlockCodec):
    qtype = GGMLQuantizationType.Q6_K
    type_size = 210
    qmin, qmax = -32, 31
    scale_range = (-128, 127)

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> SuperBlocks:
        x = self.groups_of(w)
        if importance is None:
            weights = x * x
        else:
            weights = np.broadcast_to(np.asarray(importance, dtype=F32).reshape(x.shape[1:]), x.shape)
        scales, codes = make_qx_quants(x, 32, weights)
        max_abs, max_scale = signed_peak(scales)
        with np.errstate(all="ignore"):  # blank super-blocks (max_scale 0) are reset below
            iscale = F32(-128.0) / max_scale
            d = (F32(1.0) / iscale).astype(np.float16)
            sc = np.minimum(127, nearest_int(iscale[..., None] * scales)).astype(np.int8)
        codes = requantize(x, d, sc, codes, 32)
        blank = max_abs < GROUP_MAX_EPS
        d[blank], sc[blank], codes[blank] = 0, 0, 0
        return SuperBlocks(d, sc, codes.reshape(*d.shape, 256).astype(np.int8) - 32)

    def pack(self, blocks: SuperBlocks) -> np.ndarray:
        rows, nb = blocks.d.shape
        u = (blocks.q + 32).view(np.uint8).reshape(rows, nb, 2, 4, 32)  # [half, quarter, l]
        ql = (u[..., :2, :] & 0xF) | ((u[..., 2:, :] & 0xF) << 4)
        qh = np.bitwise_or.reduce((u >> 4) << PAIR_SHIFT, axis=-2)
        fields = [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), blocks.scales.view(np.uint8)]
        return np.concatenate([*fields, fp16_bytes(blocks.d)], axis=-1).reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> SuperBlocks:
        ql, qh, scales, d = block_fields(raw, self.type_size, 128, 64, 16, 2)
        rows, nb = d.shape[:2]
        ql = ql.reshape(rows, nb, 2, 2, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=-2)
        high = (qh.reshape(rows, nb, 2, 1, 32) >> PAIR_SHIFT) & 3
        u = (low | (high << 4)).reshape(rows, nb, 256)
        return SuperBlocks(fp16_field(d), scales.view(np.int8), u.astype(np.int8) - 32)

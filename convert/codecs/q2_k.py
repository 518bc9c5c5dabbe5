"""Q2_K: 2-bit codes, super-blocks of 256 = 16 sub-blocks of 16, each with a 4-bit scale and min.

Block (84 bytes):

    offset  size  field
    0       16    scales byte g = scale[g] | min[g] << 4
    16      64    qs     2 halves of 128 weights; byte l of half h =
                         q[128h + l] | q[128h + 32 + l] << 2 | q[128h + 64 + l] << 4 | q[128h + 96 + l] << 6
    80      2     d      fp16, multiplies the scales
    82      2     dmin   fp16, multiplies the mins

w = (d * scale[g]) * q - (dmin * min[g]), q in [0, 3], g = sub-block of 16.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .kquant_scales import QK_K, ScaleMinBlocks, ScaleMinCodec, running_max_from_zero
from .search_affine import F32, in_order_sum, make_qkx2_quants, make_qkx3_quants, make_qp_quants, nearest_int

_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


class Q2_K(ScaleMinCodec):
    qtype = GGMLQuantizationType.Q2_K
    type_size = 84
    group = 16
    nmax = 3
    scale_max = 15

    @np.errstate(all="ignore")  # degenerate blocks overflow or divide by zero, in ggml too
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> ScaleMinBlocks:
        w = np.asarray(w, dtype=F32)
        rows, n = w.shape
        self.check_shape(n)
        nb = n // QK_K
        x = self.sub_blocks(w)  # (16, rows * nb * 16)
        if importance is None:
            # quantize_row_q2_K_ref: weights |x|, absolute-error search; 4-bit scales/mins relative to the max.
            sub_scale, sub_min, search_codes = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
            sub_scale = sub_scale.reshape(rows, nb, 16)
            sub_min = sub_min.reshape(rows, nb, 16)
            max_scale = running_max_from_zero(sub_scale)
            max_min = running_max_from_zero(sub_min)
            ls = nearest_int((F32(15) / max_scale)[..., None] * sub_scale)
            lm = nearest_int((F32(15) / max_min)[..., None] * sub_min)
            ls = np.where(max_scale[..., None] > 0, ls & 0xFF, 0)
            lm = np.where(max_min[..., None] > 0, (lm & 0x0F) << 4, 0)
            byte = ls | lm
            d = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(np.float16)
            dmin = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(np.float16)
        else:
            # quantize_row_q2_K_impl: weights importance * sqrt(sigma2 + x^2), sigma2 = mean(x^2) of the
            # super-block; the 16 scales and mins are quantized by a weighted search.
            sb = np.ascontiguousarray(w.reshape(-1, QK_K).T)
            sigma2 = in_order_sum(sb * sb) / F32(QK_K)
            qw = np.asarray(importance, dtype=F32).reshape(1, -1, 16)
            qw = np.ascontiguousarray(np.broadcast_to(qw, (rows, n // 16, 16)).reshape(-1, 16).T)
            weights = qw * np.sqrt(np.repeat(sigma2, 16) + x * x)
            sw = in_order_sum(weights).reshape(-1, 16).T
            sub_scale, sub_min, search_codes = make_qkx3_quants(x, weights, 3, -0.9, 0.05, 36, use_mad=False)
            d_block, ls = make_qp_quants(sub_scale.reshape(-1, 16).T, sw, 15)
            m_block, lm = make_qp_quants(sub_min.reshape(-1, 16).T, sw, 15)
            byte = (ls | (lm << 4)).T.reshape(rows, nb, 16)
            d = d_block.astype(np.float16).reshape(rows, nb)
            dmin = m_block.astype(np.float16).reshape(rows, nb)
        byte = byte.astype(np.uint8)
        scales, mins = byte & 0x0F, byte >> 4
        search_codes = search_codes.T.reshape(rows, nb, QK_K)
        q = self.requantize(w, d, dmin, scales, mins, search_codes)
        return ScaleMinBlocks(d, dmin, scales, mins, q)

    def pack(self, blocks: ScaleMinBlocks) -> np.ndarray:
        rows, nb = blocks.d.shape
        q = blocks.q.reshape(-1, 2, 4, 32).astype(np.uint8)
        qs = np.bitwise_or.reduce(q << _SHIFTS, axis=2).reshape(-1, 64)
        out = np.concatenate([
            (blocks.scales | (blocks.mins << 4)).reshape(-1, 16).astype(np.uint8),
            qs,
            blocks.d.reshape(-1, 1).view(np.uint8),
            blocks.dmin.reshape(-1, 1).view(np.uint8),
        ], axis=-1)
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, raw: np.ndarray) -> ScaleMinBlocks:
        rows = raw.shape[0]
        b = np.ascontiguousarray(raw).reshape(rows, -1, self.type_size)
        nb = b.shape[1]
        sm = b[..., :16]
        qs = b[..., 16:80].reshape(-1, 2, 1, 32)
        q = ((qs >> _SHIFTS) & 0x03).reshape(rows, nb, QK_K)
        d = b[..., 80:82].copy().view(np.float16).reshape(rows, nb)
        dmin = b[..., 82:84].copy().view(np.float16).reshape(rows, nb)
        return ScaleMinBlocks(d, dmin, sm & 0x0F, sm >> 4, q)

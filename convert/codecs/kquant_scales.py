"""What the K-quants with a per-sub-block scale *and* min share: Q2_K, Q4_K, Q5_K.

A super-block of 256 weights has fp16 `d` and `dmin`; each sub-block g (16 or 32 weights) has integer
`scale[g]` and `min[g]`, and weight i of sub-block g dequantizes to

    (d * scale[g]) * q[i] - (dmin * min[g])        (float32, in this order, as ggml and gguf-py do)

This module holds the logical blocks, the grid/codes plumbing, the final requantization every one of these
types ends with, and the 6-bit scale/min packing and 4-bit code layout of Q4_K and Q5_K (whose `fit` is also
shared, below).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import ClassVar

import numpy as np

from .base import AffineGrid, Codec, IntegerScales
from .search_affine import F32, in_order_sum, make_qkx2_quants, make_qkx3_quants, make_qp_quants, nearest_int

QK_K = 256


@dataclasses.dataclass(frozen=True)
class ScaleMinBlocks:
    """Logical Q2_K/Q4_K/Q5_K blocks of a (rows, n_per_row) tensor; nb = n_per_row // 256, ns sub-blocks.

    d, dmin: (rows, nb) float16; scales, mins: (rows, nb, ns) uint8; q: (rows, nb, 256) uint8 codes.
    """

    d: np.ndarray
    dmin: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    q: np.ndarray


def running_max_from_zero(v: np.ndarray) -> np.ndarray:
    """max(0, v[..., 0], v[..., 1], ...) as ggml's `if (s > m) m = s` loop starting at m = 0 computes it."""
    top = np.zeros(v.shape[:-1], dtype=F32)
    for j in range(v.shape[-1]):
        top = np.where(v[..., j] > top, v[..., j], top)
    return top


class ScaleMinCodec(Codec):
    """Grid plumbing for the scale+min K-quants; subclasses set `group`, `nmax` and do fit/pack/unpack."""

    block_size = QK_K
    group: ClassVar[int]  # weights per sub-block
    nmax: ClassVar[int]  # largest code
    scale_max: ClassVar[int]  # largest sub-block scale and min (4 or 6 bits)

    def grid(self, blocks: ScaleMinBlocks) -> AffineGrid:
        rows = blocks.d.shape[0]
        scale = blocks.d.astype(F32)[..., None] * blocks.scales.astype(F32)
        offset = -(blocks.dmin.astype(F32)[..., None] * blocks.mins.astype(F32))
        return AffineGrid(scale.reshape(rows, -1), offset.reshape(rows, -1), self.group, 0, self.nmax)

    def codes(self, blocks: ScaleMinBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def integer_scales(self, blocks: ScaleMinBlocks) -> IntegerScales:
        rows, _, ns = blocks.scales.shape
        return IntegerScales(np.repeat(blocks.d.astype(F32), ns, axis=1), blocks.scales.reshape(rows, -1).astype(np.int32),
                             np.repeat(blocks.dmin.astype(F32), ns, axis=1), blocks.mins.reshape(rows, -1).astype(np.int32),
                             0, self.scale_max)

    def with_integer_scales(self, blocks: ScaleMinBlocks, scale: np.ndarray, min: np.ndarray | None = None) -> ScaleMinBlocks:
        for v in (scale, min):
            if np.any(v < 0) or np.any(v > self.scale_max):
                raise ValueError(f"{self.name}: sub-block scales/mins outside [0, {self.scale_max}]")
        shape = blocks.scales.shape
        return dataclasses.replace(blocks, scales=np.asarray(scale).reshape(shape).astype(np.uint8),
                                   mins=np.asarray(min).reshape(shape).astype(np.uint8))

    def with_codes(self, blocks: ScaleMinBlocks, q: np.ndarray) -> ScaleMinBlocks:
        q = np.asarray(q)
        if q.size and (q.min() < 0 or q.max() > self.nmax):
            raise ValueError(f"{self.name}: codes outside [0, {self.nmax}]")
        return dataclasses.replace(blocks, q=q.reshape(blocks.q.shape).astype(np.uint8))

    def sub_blocks(self, w: np.ndarray) -> np.ndarray:
        """(rows, n) -> element-major (group, rows * n // group) float32, the layout the searches take."""
        return np.ascontiguousarray(w.reshape(-1, self.group).T)

    def requantize(self, w: np.ndarray, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                   search_codes: np.ndarray) -> np.ndarray:
        """Final codes: round every weight onto the stored (fp16-rounded) grid, as ggml does last.

        Sub-blocks whose stored scale is zero keep the codes of the search (ggml skips them).
        w: (rows, n); d, dmin: (rows, nb) float16; scales, mins: (rows, nb, ns); search_codes: like q.
        """
        rows, nb, ns = scales.shape
        x = w.reshape(rows, nb, ns, self.group)
        step = (d.astype(F32)[..., None] * scales.astype(F32))[..., None]
        shift = (dmin.astype(F32)[..., None] * mins.astype(F32))[..., None]
        with np.errstate(all="ignore"):
            q = np.clip(nearest_int((x + shift) / step), 0, self.nmax)
        q = np.where(step != 0, q, search_codes.reshape(x.shape))
        return q.reshape(rows, nb, QK_K).astype(np.uint8)


def pack_scale_min_6bit(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> 12 bytes (Q4_K/Q5_K), writing the bytes as ggml does.

        byte  0..3   [ hi2(scale[4+j]) | scale[j] (6) ]
        byte  4..7   [ hi2(min[4+j])   | min[j]   (6) ]
        byte  8..11  [ lo4(min[4+j])   | lo4(scale[4+j]) ]

    Out-of-range inputs (ggml can produce a wrapped uint8 in one corner case) give ggml's bytes too.
    """
    scales = np.asarray(scales, dtype=np.uint8)
    mins = np.asarray(mins, dtype=np.uint8)
    out = np.empty(scales.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = scales[..., :4] | ((scales[..., 4:] >> 4) << 6)
    out[..., 4:8] = mins[..., :4] | ((mins[..., 4:] >> 4) << 6)
    out[..., 8:12] = (scales[..., 4:] & 0x0F) | ((mins[..., 4:] & 0x0F) << 4)
    return out


def unpack_scale_min_6bit(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> (scales, mins), each (..., 8) uint8 in [0, 63]; a bijection with pack_scale_min_6bit."""
    lo_s, lo_m, hi = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = np.concatenate([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=-1)
    mins = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return scales, mins


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(S, 256) 4-bit codes -> (S, 128): each 64-weight chunk becomes 32 bytes of (low half | high half << 4)."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def unpack_nibbles(raw: np.ndarray) -> np.ndarray:
    """(S, 128) -> (S, 256) 4-bit codes; inverse of pack_nibbles."""
    b = raw.reshape(-1, 4, 1, 32)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(-1, QK_K)


class SixBitScaleMinCodec(ScaleMinCodec):
    """Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales/mins; identical `fit` up to nmax and search settings.

    Block bytes: d (fp16) | dmin (fp16) | 12 scale bytes | codes (layout per subclass).
    """

    group = 32
    scale_max = 63
    ref_search: ClassVar[tuple[float, float, int]]  # (rmin, rdelta, nstep) of quantize_row_*_ref
    clamp_imatrix_scales: ClassVar[bool]  # quantize_row_*_impl applies MIN(63, .) to the scale codes

    @np.errstate(all="ignore")  # degenerate blocks overflow or divide by zero, in ggml too
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> ScaleMinBlocks:
        w = np.asarray(w, dtype=F32)
        rows, n = w.shape
        self.check_shape(n)
        nb = n // QK_K
        x = self.sub_blocks(w)  # (32, rows * nb * 8)
        if importance is None:
            # quantize_row_*_ref: weights |x| + rms(sub-block), then the max scale/min sets d/dmin.
            av_x = np.sqrt(in_order_sum(x * x) / F32(32))
            sub_scale, sub_min, search_codes = make_qkx2_quants(x, av_x + np.abs(x), self.nmax, *self.ref_search,
                                                                use_mad=False)
            sub_scale = sub_scale.reshape(rows, nb, 8)
            sub_min = sub_min.reshape(rows, nb, 8)
            max_scale = running_max_from_zero(sub_scale)
            max_min = running_max_from_zero(sub_min)
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
            ls = np.minimum(63, nearest_int(inv_scale[..., None] * sub_scale) & 0xFF)
            lm = np.minimum(63, nearest_int(inv_min[..., None] * sub_min) & 0xFF)
            d = (max_scale / F32(63)).astype(np.float16)
            dmin = (max_min / F32(63)).astype(np.float16)
        else:
            # quantize_row_*_impl: weights importance * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) of the
            # super-block; the 8 scales and mins are themselves quantized by a weighted search.
            sb = np.ascontiguousarray(w.reshape(-1, QK_K).T)
            sigma2 = F32(2) * in_order_sum(sb * sb) / F32(QK_K)
            qw = np.asarray(importance, dtype=F32).reshape(1, -1, 32)
            qw = np.ascontiguousarray(np.broadcast_to(qw, (rows, n // 32, 32)).reshape(-1, 32).T)
            weights = qw * np.sqrt(np.repeat(sigma2, 8) + x * x)
            sub_scale, sub_min, search_codes = make_qkx3_quants(x, weights, self.nmax, -0.9, 0.05, 36,
                                                                use_mad=False)
            sw = in_order_sum(weights).reshape(-1, 8).T
            d_block, ls = make_qp_quants(sub_scale.reshape(-1, 8).T, sw, 63)
            m_block, lm = make_qp_quants(sub_min.reshape(-1, 8).T, sw, 63)
            ls, lm = ls.T.reshape(rows, nb, 8), lm.T.reshape(rows, nb, 8)
            if self.clamp_imatrix_scales:
                ls, lm = np.minimum(63, ls), np.minimum(63, lm)
            d = d_block.astype(np.float16).reshape(rows, nb)
            dmin = m_block.astype(np.float16).reshape(rows, nb)
        # Round-trip through the bytes: ggml requantizes with the scales as decoded from what it wrote.
        scales, mins = unpack_scale_min_6bit(pack_scale_min_6bit(ls, lm))
        search_codes = search_codes.T.reshape(rows, nb, QK_K)
        q = self.requantize(w, d, dmin, scales, mins, search_codes)
        return ScaleMinBlocks(d, dmin, scales, mins, q)

    @abstractmethod
    def pack_codes(self, q: np.ndarray) -> np.ndarray:
        """(S, 256) codes -> (S, code bytes)."""

    @abstractmethod
    def unpack_codes(self, raw: np.ndarray) -> np.ndarray:
        """(S, code bytes) -> (S, 256) codes."""

    def pack(self, blocks: ScaleMinBlocks) -> np.ndarray:
        rows, nb = blocks.d.shape
        head = np.concatenate([
            blocks.d.reshape(-1, 1).view(np.uint8),
            blocks.dmin.reshape(-1, 1).view(np.uint8),
            pack_scale_min_6bit(blocks.scales, blocks.mins).reshape(-1, 12),
            self.pack_codes(blocks.q.reshape(-1, QK_K)),
        ], axis=-1)
        return head.reshape(rows, nb * self.type_size)

    def unpack(self, raw: np.ndarray) -> ScaleMinBlocks:
        rows = raw.shape[0]
        b = np.ascontiguousarray(raw).reshape(rows, -1, self.type_size)
        nb = b.shape[1]
        d = b[..., 0:2].copy().view(np.float16).reshape(rows, nb)
        dmin = b[..., 2:4].copy().view(np.float16).reshape(rows, nb)
        scales, mins = unpack_scale_min_6bit(b[..., 4:16])
        q = self.unpack_codes(b[..., 16:].reshape(rows * nb, -1)).reshape(rows, nb, QK_K)
        return ScaleMinBlocks(d, dmin, scales, mins, q)

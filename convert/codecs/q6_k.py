"""Q6_K: super-blocks of 256 weights in 16 groups of 16, w = d * sc[g] * q, q in [-32, 31].  Also the
parts Q3_K shares (same logical blocks, same second pass).

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

import dataclasses
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType

from .base import AffineGrid, Codec, IntegerScales
from .q8_0 import block_fields, checked_levels, fp16_bytes, fp16_field
from .search_symmetric import GROUP_MAX_EPS, make_qx_quants, nearest_int, signed_peak

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class SuperBlocks:
    """Super-blocks of 256 weights in 16 groups of 16: w = d * sc[g] * q.

    d: (rows, n_blocks) float16; scales: (rows, n_blocks, 16) int8 signed group scales sc;
    q: (rows, n_blocks, 256) int8 signed grid levels.
    """

    d: np.ndarray
    scales: np.ndarray
    q: np.ndarray


class SuperBlockCodec(Codec):
    """The symmetric K-quants: one fp16 d per 256 weights, one small integer scale per group of 16."""

    block_size: ClassVar[int] = 256
    qmin: ClassVar[int]
    qmax: ClassVar[int]
    scale_range: ClassVar[tuple[int, int]]  # stored group scales sc

    def groups_of(self, w: np.ndarray) -> np.ndarray:
        """(rows, n) float32 -> (rows, n_blocks, 16 groups, 16 weights)."""
        w = np.ascontiguousarray(w, dtype=F32)
        self.check_shape(w.shape[1])
        return w.reshape(w.shape[0], -1, 16, 16)

    def grid(self, blocks: SuperBlocks) -> AffineGrid:
        scale = (blocks.d.astype(F32)[..., None] * blocks.scales.astype(F32)).reshape(blocks.d.shape[0], -1)
        # -0.0 is the exact additive identity, so scale*q + offset is ggml's (d*sc)*q bit for bit.
        return AffineGrid(scale, np.full_like(scale, -0.0), 16, self.qmin, self.qmax)

    def codes(self, blocks: SuperBlocks) -> np.ndarray:
        return blocks.q.reshape(blocks.q.shape[0], -1).astype(np.int32)

    def with_codes(self, blocks: SuperBlocks, q: np.ndarray) -> SuperBlocks:
        return SuperBlocks(blocks.d, blocks.scales, checked_levels(self, q, blocks.q.shape))

    def integer_scales(self, blocks: SuperBlocks) -> IntegerScales:
        rows = blocks.d.shape[0]
        return IntegerScales(np.repeat(blocks.d.astype(F32), 16, axis=1), blocks.scales.reshape(rows, -1).astype(np.int32),
                             None, None, *self.scale_range)

    def with_integer_scales(self, blocks: SuperBlocks, scale: np.ndarray, min: np.ndarray | None = None) -> SuperBlocks:
        lo, hi = self.scale_range
        if np.any(scale < lo) or np.any(scale > hi):
            raise ValueError(f"{self.name}: group scales outside [{lo}, {hi}]")
        return SuperBlocks(blocks.d, np.asarray(scale).reshape(blocks.scales.shape).astype(np.int8), blocks.q)



def requantize(x: np.ndarray, d: np.ndarray, sc: np.ndarray, codes: np.ndarray, nmax: int) -> np.ndarray:
    """ggml's second K-quant pass: codes of x (rows, nb, 16, 16) on the stored group scales fp32(d) * sc.

    Returns uint8 codes = clip(nearest_int(x / (d*sc)), -nmax, nmax-1) + nmax; a group whose stored
    scale is zero keeps its `codes` from the scale search.
    """
    step = d.astype(F32)[..., None] * sc.astype(F32)
    with np.errstate(all="ignore"):
        fresh = np.clip(nearest_int(x / step[..., None]), -nmax, nmax - 1) + nmax
    return np.where((step != 0)[..., None], fresh, codes).astype(np.uint8)


# Shifts of 4 two-bit fields in a byte (Q6_K's high bits, Q3_K's low bits and scale high bits).
PAIR_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


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

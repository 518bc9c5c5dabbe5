"""What every GGML block codec offers, and the affine grid the GPTQ solver quantizes onto.

A codec works on a whole 2-D tensor at once, vectorized over its blocks:

    blocks = codec.fit(w, importance)    # choose scales/mins *and* codes, as ggml_quantize_chunk does
    raw    = codec.pack(blocks)          # exact GGUF bytes, (rows, n_per_row // block_size * type_size) uint8
    blocks = codec.unpack(raw)           # inverse of pack, bit for bit
    w_hat  = codec.dequantize(blocks)    # float32, bit-identical to gguf.quants.dequantize(raw)
    grid   = codec.grid(blocks)          # per-group affine grid: w_hat = scale * q + offset, q in [qmin, qmax]
    ints   = codec.integer_scales(blocks)  # K-quants: the stored integer sub-block scales (and mins), else None

`fit` is the only place scales are chosen; `pack` never re-chooses them.  Every block type llama.cpp
dequantizes is affine per group of 16 or 32 weights (`scale * q + offset` in float32, evaluated in that
order, which is also the order gguf-py and ggml use), so a single `AffineGrid` serves every type, except the
non-uniform table types (IQ4_NL, IQ4_XS: `has_grid` False), whose `grid` raises and whose codes are table indices.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .registry import register


@dataclasses.dataclass(frozen=True)
class AffineGrid:
    """Fixed per-group grids for a tensor: w_hat[r, c] = scale[r, g] * q + offset[r, g], g = c // group.

    `scale`/`offset` are float32 arrays of shape (rows, n_per_row // group).
    """

    scale: np.ndarray
    offset: np.ndarray
    group: int
    qmin: int
    qmax: int

    def quantize(self, w: np.ndarray, cols: slice | None = None) -> np.ndarray:
        """Nearest codes on the fixed grid for columns `cols` of a (rows, n) float32 array (int32)."""
        scale, offset = self.columns(cols, w.shape[-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((w - offset) / scale)
        q = np.where(scale == 0, 0, q)
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q: np.ndarray, cols: slice | None = None) -> np.ndarray:
        if cols is None:  # whole groups: broadcast per group rather than gather a value per column
            rows, n = q.shape
            g = q.reshape(rows, n // self.group, self.group).astype(np.float32)
            return (self.scale[..., None] * g + self.offset[..., None]).reshape(rows, n)
        scale, offset = self.columns(cols, q.shape[-1])
        return (scale * q.astype(np.float32) + offset).astype(np.float32)

    def columns(self, cols: slice | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """scale/offset expanded to one value per column of `cols` (default: all columns)."""
        start = 0 if cols is None or cols.start is None else cols.start
        g = (start + np.arange(n)) // self.group
        return self.scale[:, g], self.offset[:, g]


@dataclasses.dataclass(frozen=True)
class IntegerScales:
    """A K-quant's sub-block parameters as stored: per group g of a row, w_hat = (d * scale[g]) * q - (dmin * min[g]),
    scale and min integers in [lo, hi], d and dmin the group's super-block floats.  What a refit may change.

    d, dmin: (rows, groups) float32; scale, min: (rows, groups) int32; dmin and min are None for the symmetric
    K-quants (Q3_K, Q6_K: w_hat = (d * scale[g]) * q).
    """

    d: np.ndarray
    scale: np.ndarray
    dmin: np.ndarray | None
    min: np.ndarray | None
    lo: int
    hi: int


class Codec(ABC):
    """One GGML block type.  Subclasses set the class attributes and implement the five methods; setting `qtype`
    registers the class (registry.py)."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]  # weights per block
    type_size: ClassVar[int]  # bytes per block
    # Does `fit` use the importance vector?  (ggml ignores it for some types, e.g. Q8_0.)
    uses_importance: ClassVar[bool] = True
    # Does `grid` give an AffineGrid?  (Not for the non-uniform table types: iquant_nl.TableCodec.)
    has_grid: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "qtype" in cls.__dict__:  # a concrete codec: one instance serves every lookup
            assert (cls.block_size, cls.type_size) == GGML_QUANT_SIZES[cls.qtype], cls.qtype
            register(cls)

    @property
    def name(self) -> str:
        return self.qtype.name

    @abstractmethod
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None):
        """Quantize a (rows, n_per_row) float32 tensor as ggml_quantize_chunk would: returns the codec's Blocks.

        `importance` is a per-column (n_per_row,) float32 vector (llama-imatrix's definition) or None.
        """

    @abstractmethod
    def pack(self, blocks) -> np.ndarray:
        """Blocks -> (rows, n_blocks_per_row * type_size) uint8, the exact GGUF bytes."""

    @abstractmethod
    def unpack(self, raw: np.ndarray):
        """(rows, n_bytes) uint8 -> Blocks."""

    @abstractmethod
    def grid(self, blocks) -> AffineGrid:
        """The fixed grid the blocks' parameters define (codes ignored)."""

    @abstractmethod
    def with_codes(self, blocks, q: np.ndarray):
        """The same parameters with new integer codes q, shape (rows, n_per_row), within grid range."""

    def dequantize(self, blocks) -> np.ndarray:
        """float32 (rows, n_per_row), bit-identical to gguf.quants.dequantize of the packed bytes."""
        return self.grid(blocks).dequantize(self.codes(blocks))

    @abstractmethod
    def codes(self, blocks) -> np.ndarray:
        """Integer codes (rows, n_per_row) int32, as levels of the grid (w_hat = scale*q + offset)."""

    def integer_scales(self, blocks) -> IntegerScales | None:
        """The integer sub-block scales a refit may change (K-quants); None for types whose scales are floats."""
        return None

    def with_integer_scales(self, blocks, scale: np.ndarray, min: np.ndarray | None = None):
        """The same blocks with new integer scales (and mins), shapes and ranges as integer_scales gives them."""
        raise NotImplementedError(f"{self.name} has no integer sub-block scales")

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """fit + pack: the bytes ggml_quantize_chunk writes for the same input."""
        return self.pack(self.fit(np.ascontiguousarray(w, dtype=np.float32), importance))

    def check_shape(self, n_per_row: int) -> None:
        if n_per_row % self.block_size:
            raise ValueError(f"{self.name}: row length {n_per_row} is not a multiple of {self.block_size}")

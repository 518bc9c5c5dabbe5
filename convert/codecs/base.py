"""What every GGML block codec offers, and the grid the GPTQ solver quantizes onto.

A codec works on a whole 2-D tensor at once, vectorized over its blocks:

    blocks = codec.fit(w, importance)    # choose scales/mins *and* codes, as ggml_quantize_chunk does
    raw    = codec.pack(blocks)          # exact GGUF bytes, (rows, n_per_row // block_size * type_size) uint8
    blocks = codec.unpack(raw)           # inverse of pack, bit for bit
    w_hat  = codec.dequantize(blocks)    # float32, bit-identical to gguf.quants.dequantize(raw)
    grid   = codec.grid(blocks)          # per-group grid: w_hat = scale * level(q) + offset
    ints   = codec.integer_scales(blocks)  # the scales a refit may move, as integers (K-quants: as stored)

`fit` is the only place scales are chosen; `pack` never re-chooses them.  Every block type llama.cpp dequantizes
is affine in a level per group of 16 or 32 weights (`scale * level + offset` in float32, evaluated in that order,
which is also the order gguf-py and ggml use), so a single `AffineGrid` serves every type.  The level of a code q
is q itself (q in [qmin, qmax]) for the uniform types, and `levels[q]` for the non-uniform table types (IQ4_NL,
IQ4_XS: q indexes ggml's 16 values).
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
    """Fixed per-group grids for a tensor: w_hat[r, c] = scale[r, g] * level(q) + offset[r, g], g = c // group.

    `scale`/`offset` are float32 arrays of shape (rows, n_per_row // group).  level(q) = q for codes q in
    [qmin, qmax], or `levels[q]` when the codec has a table: float32 (qmax - qmin + 1,) ascending, qmin = 0.
    """

    scale: np.ndarray
    offset: np.ndarray
    group: int
    qmin: int
    qmax: int
    levels: np.ndarray | None = None

    def quantize(self, w: np.ndarray, cols: slice | None = None) -> np.ndarray:
        """Nearest codes on the fixed grid for columns `cols` of a (rows, n) float32 array (int32): the level
        nearest to (w - offset) / scale, taken as 0 where scale == 0 (rint, or nearest_index on a table)."""
        scale, offset = self.columns(cols, w.shape[-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(scale == 0, np.float32(0), (w - offset) / scale)
        if self.levels is not None:
            return nearest_index(self.levels, x).astype(np.int32)
        return np.clip(np.rint(x), self.qmin, self.qmax).astype(np.int32)

    def level(self, q: np.ndarray) -> np.ndarray:
        """The level of each code, float32."""
        return q.astype(np.float32) if self.levels is None else self.levels[q]

    def dequantize(self, q: np.ndarray, cols: slice | None = None) -> np.ndarray:
        v = self.level(q)
        if cols is None:  # whole groups: broadcast per group rather than gather a value per column
            rows, n = q.shape
            g = v.reshape(rows, n // self.group, self.group)
            return (self.scale[..., None] * g + self.offset[..., None]).reshape(rows, n)
        scale, offset = self.columns(cols, q.shape[-1])
        return (scale * v + offset).astype(np.float32)

    def columns(self, cols: slice | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """scale/offset expanded to one value per column of `cols` (default: all columns)."""
        start = 0 if cols is None or cols.start is None else cols.start
        g = (start + np.arange(n)) // self.group
        return self.scale[:, g], self.offset[:, g]


def nearest_index(levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the level nearest to each x (int64), for ascending float32 `levels`, as ggml's best_index_int8
    decides: below the first / above the last level 0 / n-1; between levels[m-1] <= x < levels[m] the lower one
    wins iff x - levels[m-1] < levels[m] - x in float32, so a tie goes up; NaN ends on n-1."""
    x = np.asarray(x, dtype=np.float32)
    n = len(levels)
    mu = np.clip(np.searchsorted(levels, x, side="right"), 1, n - 1)  # NaN sorts last: n-1
    with np.errstate(invalid="ignore"):
        i = np.where(x - levels[mu - 1] < levels[mu] - x, mu - 1, mu)
        i = np.where(x >= levels[n - 1], n - 1, i)
        return np.where(x <= levels[0], 0, i)


@dataclasses.dataclass(frozen=True)
class IntegerScales:
    """A codec's group parameters as integers: per group g of a row,
    w_hat = (d * scale[g]) * level(q) - (dmin * min[g]), scale and min integers in [lo, hi], d and dmin the group's
    floats.  What a refit may change.

    d, dmin: (rows, groups) float32; scale, min: (rows, groups) int32; dmin and min are None for the types without
    a min (w_hat = (d * scale[g]) * level(q)).  K-quants: the stored sub-block scales under their super-block's d;
    an fp16 scale: k steps of its ulp (fields.fp16_steps).
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
    # Does `fit` require it?  (ggml asserts an importance for IQ2_XXS and IQ2_XS.)
    needs_importance: ClassVar[bool] = False
    # Are the weights on a per-weight grid (`grid`, `codes`, `with_codes`)?  Not for the lattice types (lattice.py),
    # whose groups of weights are codebook points.
    scalar_grid: ClassVar[bool] = True

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
        """Integer codes (rows, n_per_row) int32 of the grid (w_hat = scale * level(q) + offset)."""

    def integer_scales(self, blocks) -> IntegerScales | None:
        """The scales a refit may change, as integers (the K-quants' stored sub-block scales, an fp16 scale as steps
        of its ulp); None where there are none, or they are not finite."""
        return None

    def with_integer_scales(self, blocks, scale: np.ndarray, min: np.ndarray | None = None):
        """The same blocks with new integer scales (and mins), shapes and ranges as integer_scales gives them."""
        raise NotImplementedError(f"{self.name} has no integer sub-block scales")

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """fit + pack: the bytes ggml_quantize_chunk writes for the same input."""
        return self.pack(self.fit(np.ascontiguousarray(w, dtype=np.float32), importance))

    def check_importance(self, importance: np.ndarray | None) -> None:
        if importance is None and self.needs_importance:
            raise ValueError(f"{self.name}: ggml quantizes this type only with an importance vector")

    def check_shape(self, n_per_row: int) -> None:
        if n_per_row % self.block_size:
            raise ValueError(f"{self.name}: row length {n_per_row} is not a multiple of {self.block_size}")

    def blocks_of(self, w: np.ndarray) -> np.ndarray:
        """(rows, n) weights -> float32 (rows, n // block_size, block_size), the row length checked."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor, got shape {w.shape}")
        self.check_shape(w.shape[1])
        return w.reshape(w.shape[0], -1, self.block_size)

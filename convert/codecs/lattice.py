"""The codec base of the lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S; IQ1_M to come): types
whose weights come in groups of 4 or 8, each group one point of a fixed codebook, with sign bits and small block
scales.

Their weights have no per-weight scalar grid (w_hat = scale * level(q) + offset with q chosen weight by weight): a
group's point is chosen jointly, so `grid`, `codes` and `with_codes` of the scalar codecs do not exist for them,
and whatever quantizes onto a scalar grid (the GPTQ solver, a refit) must check `scalar_grid` first.  What they
offer is the common part: fit, pack, unpack, dequantize.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import AffineGrid, Codec

F32 = np.float32


class LatticeCodec(Codec):
    scalar_grid: ClassVar[bool] = False

    def grid(self, blocks) -> AffineGrid:
        raise NotImplementedError(f"{self.name} chooses codebook points per group of weights: "
                                  f"it has no per-weight grid")

    def codes(self, blocks) -> np.ndarray:
        raise NotImplementedError(f"{self.name} has codebook indices, not per-weight codes")

    def with_codes(self, blocks, q: np.ndarray):
        raise NotImplementedError(f"{self.name} has codebook indices, not per-weight codes")

    def blocks_of(self, w: np.ndarray) -> np.ndarray:
        """(rows, n) float32 -> (rows, n // block_size, block_size), checked."""
        w = np.ascontiguousarray(w, dtype=F32)
        if w.ndim != 2:
            raise ValueError(f"{self.name}: expected a 2-D tensor, got shape {w.shape}")
        self.check_shape(w.shape[1])
        return w.reshape(w.shape[0], -1, self.block_size)

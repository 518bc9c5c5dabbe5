"""The codec base of the lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): types
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



class LatticeCodec(Codec):
    scalar_grid: ClassVar[bool] = False

    def grid(self, blocks) -> AffineGrid:
        raise NotImplementedError(f"{self.name} chooses codebook points per group of weights: "
                                  f"it has no per-weight grid")

    def codes(self, blocks) -> np.ndarray:
        raise NotImplementedError(f"{self.name} has codebook indices, not per-weight codes")

    def with_codes(self, blocks, q: np.ndarray):
        raise NotImplementedError(f"{self.name} has codebook indices, not per-weight codes")


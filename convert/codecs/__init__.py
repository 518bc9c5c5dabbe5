"""One codec per GGML block type, looked up by `codec(qtype)` (a GGMLQuantizationType or its name)."""

from __future__ import annotations

from .base import AffineGrid, Codec
from .registry import CODECS, codec

# Defining a codec class registers it (Codec.__init_subclass__): importing the modules fills CODECS.  Keep sorted.
from . import iq1_m, iq1_s, iq2_s, iq2_xs, iq2_xxs, iq3_s, iq3_xxs, iq4_nl, iq4_xs  # noqa: F401
from . import q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0, q8_k  # noqa: F401

__all__ = ["AffineGrid", "Codec", "CODECS", "codec"]

"""One codec per GGML block type, looked up by `codec(qtype)` (a GGMLQuantizationType or its name)."""

from __future__ import annotations

from gguf import GGMLQuantizationType

from .base import AffineGrid, Codec

CODECS: dict[GGMLQuantizationType, Codec] = {}


def register(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.qtype] = cls()
    return cls


def codec(qtype: GGMLQuantizationType | str) -> Codec:
    if isinstance(qtype, str):
        qtype = GGMLQuantizationType[qtype]
    try:
        return CODECS[qtype]
    except KeyError:
        raise ValueError(f"no codec for {qtype.name}; have {', '.join(t.name for t in CODECS)}") from None


__all__ = ["AffineGrid", "Codec", "CODECS", "codec", "register"]

# Codec modules register themselves on import (one line each, keep sorted).
from . import q2_k  # noqa: E402,F401
from . import q3_k  # noqa: E402,F401
from . import q4_0  # noqa: E402,F401
from . import q4_1  # noqa: E402,F401
from . import q4_k  # noqa: E402,F401
from . import q5_0  # noqa: E402,F401
from . import q5_1  # noqa: E402,F401
from . import q5_k  # noqa: E402,F401
from . import q6_k  # noqa: E402,F401
from . import q8_0  # noqa: E402,F401
from . import q8_k  # noqa: E402,F401

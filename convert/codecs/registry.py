"""The codec of each GGML block type, looked up by `codec(qtype)`.

A leaf module: `Codec.__init_subclass__` (base.py) adds every class that sets `qtype`, so defining a codec class
is all it takes to register it, and codec modules need not import the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gguf import GGMLQuantizationType

if TYPE_CHECKING:
    from .base import Codec

CODECS: dict[GGMLQuantizationType, Codec] = {}


def register(cls: type[Codec]) -> None:
    """Add an instance of `cls` to CODECS (called while `cls` is being created, before ABCMeta has marked it
    abstract, so check for unimplemented methods here)."""
    missing = sorted(name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False))
    if missing:
        raise TypeError(f"{cls.__name__} does not implement {', '.join(missing)}")
    CODECS[cls.qtype] = cls()


def codec(qtype: GGMLQuantizationType | str) -> Codec:
    if isinstance(qtype, str):
        qtype = GGMLQuantizationType[qtype]
    try:
        return CODECS[qtype]
    except KeyError:
        raise ValueError(f"no codec for {qtype.name}; have {', '.join(t.name for t in CODECS)}") from None

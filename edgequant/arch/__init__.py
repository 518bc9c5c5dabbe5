"""Per-architecture knowledge as small declarative adapters: one module per family, registered by HF class name.

An adapter says which GGUF architecture a Hugging Face class becomes, whether llama.cpp wants the LLaMA Q/K row
permutation, and reads the hyperparameters llama.cpp needs.  Tensor names come from gguf-py's TensorNameMap.
"""

from __future__ import annotations

from . import llama, mistral, qwen2, qwen3  # noqa: F401  (each registers its adapters)
from .base import ARCHES, Arch, Hparams, for_class, permute_rotary, read_hparams, register, unpermute_rotary

__all__ = ["ARCHES", "Arch", "Hparams", "for_class", "permute_rotary", "read_hparams", "register", "unpermute_rotary"]

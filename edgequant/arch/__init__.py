"""Per-architecture knowledge as small declarative adapters: one module per family, registered by HF class name.

An adapter (base.Arch) owns the model's structure: where its layers, embeddings, final norm and head are, each
tensor's GGUF name (gguf-py's TensorNameMap) apart from its data transform, which linears share an input, and the
architecture's GGUF metadata.
"""

from __future__ import annotations

from . import gemma, llama, mistral, moe, phi3, qwen2, qwen3  # noqa: F401  (each registers its adapters)
from .base import ARCHES, Arch, ExpertStack, Experts, Hparams, Layout, for_class, permute_rotary, read_hparams, register, unpermute_rotary

__all__ = ["ARCHES", "Arch", "ExpertStack", "Experts", "Hparams", "Layout", "for_class", "permute_rotary", "read_hparams", "register",
           "unpermute_rotary"]

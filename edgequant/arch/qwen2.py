"""Qwen2: NEOX rope (no Q/K permutation), q/k/v biases, usually tied embeddings."""

import gguf

from .base import Arch, register

QWEN2 = register(Arch(hf_classes=("Qwen2ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.QWEN2))

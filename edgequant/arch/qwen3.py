"""Qwen3: like Qwen2 without biases, plus per-head RMSNorm on Q and K (attn_q_norm / attn_k_norm)."""

import gguf

from .base import Arch, register

QWEN3 = register(Arch(hf_classes=("Qwen3ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.QWEN3))

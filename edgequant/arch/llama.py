"""LLaMA: rotary Q/K rows permuted for llama.cpp; Llama-3.x "llama3" rope scaling becomes a rope_freqs tensor."""

import math
from dataclasses import dataclass

import gguf
import numpy as np

from .base import Arch, Hparams, RotaryPermute, register


@dataclass(frozen=True)
class LlamaArch(Arch):
    def extra_tensors(self, hp: Hparams) -> list[tuple[str, np.ndarray]]:
        if hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type")) != "llama3":
            return []
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(hp))]

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        super().metadata(w, hp)  # Mixtral's expert counts
        w.add_vocab_size(hp.n_vocab)  # llama.cpp's LLaMA loader reads <arch>.vocab_size
        w.add_rope_dimension_count(hp.head_dim)


def llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling: long wavelengths stretched by `factor`, short ones kept,
    a smooth ramp between (as transformers' _compute_llama3_parameters)."""
    s = hp.rope_scaling
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, ramp))
    return out.astype(np.float32)


# HF stores rotary halves per head; llama.cpp's LLaMA rope wants interleaved pairs
LLAMA = register(LlamaArch(
    hf_classes=("LlamaForCausalLM",), gguf_arch=gguf.MODEL_ARCH.LLAMA,
    transforms=(("*.self_attn.q_proj.weight", RotaryPermute("n_head")),
                ("*.self_attn.k_proj.weight", RotaryPermute("n_head_kv"))),
))

"""Phi-3 / Phi-3.5 / Phi-4-mini: q/k/v in one qkv_proj and gate/up in one gate_up_proj, kept fused in the GGUF as
llama.cpp's PHI3 graph reads them (attn_qkv, ffn_up of 2·n_ff rows, gate first); NEOX rope, possibly partial
(Phi-4-mini rotates 3/4 of each head); LongRoPE's per-frequency factors as rope_factors_{long,short} tensors."""

import math
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import UserError
from .base import Arch, Hparams, register


@dataclass(frozen=True)
class Phi3Arch(Arch):
    def check(self, hp: Hparams) -> None:
        if hp.rope_scaling.get("long_factor"):
            longrope_attention_factor(hp, original_positions(hp) or hp.n_ctx)  # refuses scalings it does not know

    def extra_tensors(self, hp: Hparams) -> list[tuple[str, np.ndarray]]:
        s = hp.rope_scaling
        if not s.get("long_factor"):
            return []
        long, short = s.get("long_factor"), s.get("short_factor")
        if short is None or len(long) != len(short) or len(long) != hp.rope_dim // 2:
            raise UserError(f"config.json: LongRoPE needs long_factor and short_factor of {hp.rope_dim // 2} values "
                            f"each (half the rotated dimensions)")
        names = gguf.TENSOR_NAMES
        # llama.cpp picks long or short by context length, as transformers does by sequence length
        return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, dtype=np.float32)),
                (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short, dtype=np.float32))]

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        w.add_rope_dimension_count(hp.rope_dim)
        w.add_sliding_window(hp.config.get("sliding_window") or 0)  # 0: llama.cpp tells Phi-4 from Phi-3 by it
        original = original_positions(hp)
        if original is not None:
            w.add_rope_scaling_orig_ctx_len(original)
        if hp.rope_scaling.get("long_factor"):
            w.add_rope_scaling_attn_factors(longrope_attention_factor(hp, original or hp.n_ctx))


def original_positions(hp: Hparams) -> int | None:
    """The context the model was pretrained on before LongRoPE stretched it (either config layout)."""
    return hp.rope_scaling.get("original_max_position_embeddings", hp.config.get("original_max_position_embeddings"))


def longrope_attention_factor(hp: Hparams, original: int) -> float:
    """The cos/sin scale LongRoPE applies for a context stretched by `factor` (by default max/original positions),
    as transformers' _compute_longrope_parameters computes it; an explicit attention_factor wins."""
    if hp.rope_scaling.get("attention_factor") is not None:
        return float(hp.rope_scaling["attention_factor"])
    kind = str(hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type", ""))).lower()
    scale = hp.rope_scaling.get("factor") or hp.n_ctx / original
    if scale <= 1.0:
        return 1.0
    if kind in ("longrope", "su"):
        return math.sqrt(1 + math.log(scale) / math.log(original))
    raise UserError(f"config.json: Phi-3 rope scaling {kind!r} is not supported (longrope is)")


PHI3 = register(Phi3Arch(
    hf_classes=("Phi3ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.PHI3,
    # the fused projections read one input each: one Hessian per fused matrix
    input_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
))

"""Mixtures of experts: Qwen3-MoE and Mixtral.  Each layer's FFN is a router (ffn_gate_inp, kept in float as
llama.cpp never quantizes it) over n_expert SwiGLU experts, stacked into llama.cpp's 3-D ffn_{gate,up,down}_exps.
Both route as llama.cpp's graphs do only for what their graphs hard-code: softmax over all experts, the top k, their
weights renormalised to sum 1 (build_moe_ffn(..., norm_w=true, SOFTMAX) in qwen3moe.cpp and llama.cpp); a config
that routes otherwise is refused rather than converted into a model llama.cpp would run differently."""

from dataclasses import dataclass, replace

import gguf

from ..errors import UserError
from .base import Arch, Experts, Hparams, register
from .llama import LLAMA


@dataclass(frozen=True)
class Qwen3MoeArch(Arch):
    def check(self, hp: Hparams) -> None:
        c = hp.config
        if not c.get("norm_topk_prob", False):
            raise UserError("config.json: norm_topk_prob is false, but llama.cpp's Qwen3-MoE always renormalises the "
                            "top-k router weights; the GGUF would compute a different model")
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            raise UserError("config.json: dense layers between the MoE ones (mlp_only_layers / decoder_sparse_step) "
                            "are not supported: llama.cpp's Qwen3-MoE makes every layer a mixture of experts")
        if not c.get("moe_intermediate_size"):
            raise UserError("config.json lacks moe_intermediate_size, which llama.cpp needs")
        self.experts.n_expert(hp)

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        super().metadata(w, hp)
        w.add_expert_feed_forward_length(hp.config["moe_intermediate_size"])


QWEN3_MOE = register(Qwen3MoeArch(
    hf_classes=("Qwen3MoeForCausalLM",), gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    # Hub configs say num_experts; transformers 5 saves its alias num_local_experts
    experts=Experts(count=("num_experts", "num_local_experts")),
    input_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
))

# Mixtral is LLaMA (rotary rows permuted) with every FFN a mixture of 8 experts; published checkpoints name the MoE
# block block_sparse_moe and the projections w1 (gate), w3 (up), w2 (down); transformers 5 calls it mlp.
MIXTRAL = register(replace(
    LLAMA, hf_classes=("MixtralForCausalLM",),
    experts=Experts(count=("num_local_experts",), module="block_sparse_moe", names=("w1", "w3", "w2")),
    input_groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
))

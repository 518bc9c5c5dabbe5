"""GGUF key/values llama.cpp reads: general.*, the architecture's hyperparameters, rope scaling, the tokenizer."""

from __future__ import annotations

import logging

import gguf

from .model import SourceModel
from .vocab import add_vocab


logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab's warnings are about HF template quirks, not ours


def write_metadata(w: gguf.GGUFWriter, m: SourceModel, file_type: gguf.LlamaFileType) -> None:
    hp = m.hp
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(m.name)
    w.add_size_label(gguf.size_label(m.n_params, 0, 0, 0))
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layers)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.explicit_head_dim:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    m.arch.metadata(w, hp)
    kind = hp.rope_scaling.get("rope_type", hp.rope_scaling.get("type"))
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(hp.rope_scaling["factor"])
        if "original_max_position_embeddings" in hp.rope_scaling:
            w.add_rope_scaling_orig_ctx_len(hp.rope_scaling["original_max_position_embeddings"])
    add_vocab(w, m.dir, hp.n_vocab)

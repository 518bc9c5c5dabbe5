"""Gemma 2 and Gemma 3 (text, and the text tower of its vision-language checkpoints): what llama.cpp's GEMMA2/GEMMA3 graphs expect of a converted checkpoint.

  * RMSNorms compute x·(1 + w): every norm weight is stored as w + 1 (q_norm/k_norm too);
  * the embeddings are multiplied by sqrt(hidden) before layer 0 (llama.cpp does it itself; the calibration pass
    must as well) and are always the output head (tied);
  * soft-capping: Gemma 2 caps attention scores (which transformers' SDPA path ignores, so the calibration pass
    runs transformers' eager attention) and both cap the final logits;
  * sliding-window layers, interleaved as llama.cpp assumes (Gemma 2 every other layer, Gemma 3 five in six),
    Gemma 3's local layers with their own rope base;
  * pre/post norms around attention and the FFN, Gemma 3's QK-norm: new tensor names only (gguf-py's map).
"""

import math
from dataclasses import dataclass, replace

import gguf

from ..errors import UserError
from .base import Arch, Hparams, Offset, read_hparams, register


@dataclass(frozen=True)
class GemmaArch(Arch):
    swa_pattern: int = 2  # llama.cpp's default interleaving: layer i slides unless i % pattern == pattern - 1
    layers_27b: int = 46  # llama.cpp takes a model with this many layers for the 27B (its queries scaled apart)
    # what transformers' config class assumes for keys a config.json leaves out (tie_word_embeddings among them)
    defaults: tuple[tuple[str, object], ...] = ()

    def hparams(self, config: dict) -> Hparams:
        # transformers 5 writes Gemma 3's rope per layer type ({"full_attention": {...}, "sliding_attention": {...}}):
        # the global layers' is the model's rope, the local layers' base is metadata of its own
        config = {**dict(self.defaults), **config}
        read = dict(config)
        rope = read.get("rope_parameters")
        if isinstance(rope, dict) and "full_attention" in rope:
            read["rope_parameters"] = rope["full_attention"]
        return replace(read_hparams(read), config=config)

    def buffers(self, hp: Hparams) -> dict[str, float]:
        return {f"{self.layout.embed}.embed_scale": math.sqrt(hp.n_embd)}

    def logit_softcap(self, hp: Hparams) -> float | None:
        return hp.config.get("final_logit_softcapping") or None

    def sliding_layers(self, hp: Hparams) -> list[bool]:
        c = hp.config
        if c.get("layer_types"):
            return [t == "sliding_attention" for t in c["layer_types"]]
        pattern = c.get("sliding_window_pattern", self.swa_pattern)
        return [bool((i + 1) % pattern) for i in range(hp.n_layers)]  # transformers' default layer_types

    def check(self, hp: Hparams) -> None:
        c = hp.config
        # llama.cpp scales queries by 1/sqrt(head_dim), the 27B's (known by its layer count) by 1/sqrt(hidden/heads),
        # whatever the config says
        assumed = hp.n_embd // hp.n_head if hp.n_layers == self.layers_27b else hp.head_dim
        if c.get("query_pre_attn_scalar", assumed) != assumed:
            raise UserError(f"config.json: query_pre_attn_scalar {c['query_pre_attn_scalar']} is not {assumed}, "
                            f"which llama.cpp assumes for this model")

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        c = hp.config
        sliding = self.sliding_layers(hp)
        if any(sliding):
            w.add_sliding_window(c["sliding_window"])
            if sliding != [i % self.swa_pattern < self.swa_pattern - 1 for i in range(hp.n_layers)]:
                w.add_sliding_window_pattern(sliding)  # only where llama.cpp's default interleaving is not it
        if self.logit_softcap(hp):
            w.add_final_logit_softcapping(self.logit_softcap(hp))


@dataclass(frozen=True)
class Gemma2Arch(GemmaArch):
    defaults: tuple[tuple[str, object], ...] = (
        ("tie_word_embeddings", True), ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
        ("query_pre_attn_scalar", 256), ("sliding_window", 4096))

    def check(self, hp: Hparams) -> None:
        super().check(hp)
        if not hp.config.get("attn_logit_softcapping"):
            raise UserError("config.json: Gemma 2 without attention soft-capping, which llama.cpp's GEMMA2 always does")

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        super().metadata(w, hp)
        w.add_attn_logit_softcapping(hp.config["attn_logit_softcapping"])


@dataclass(frozen=True)
class Gemma3Arch(GemmaArch):
    swa_pattern: int = 6
    layers_27b: int = 62
    defaults: tuple[tuple[str, object], ...] = (
        ("tie_word_embeddings", True), ("query_pre_attn_scalar", 256), ("sliding_window", 4096),
        ("rope_local_base_freq", 10000.0), ("rope_theta", 1000000.0))

    def check(self, hp: Hparams) -> None:
        super().check(hp)
        if hp.config.get("attn_logit_softcapping"):
            raise UserError("config.json: Gemma 3 with attention soft-capping, which llama.cpp's GEMMA3 does not do")

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        super().metadata(w, hp)
        c = hp.config
        rope = c.get("rope_parameters") or {}
        local = (rope.get("sliding_attention") or {}).get("rope_theta", c.get("rope_local_base_freq"))
        if local is not None and any(self.sliding_layers(hp)):
            w.add_rope_freq_base_swa(float(local))


NORMS = (("*norm.weight", Offset(1.0)),)  # Gemma's RMSNorm multiplies by (1 + w)
COMMON = dict(transforms=NORMS, embed_scale=True)

GEMMA2 = register(Gemma2Arch(hf_classes=("Gemma2ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.GEMMA2, **COMMON,
                             attention="eager"))  # SDPA would drop the attention soft-capping
GEMMA3 = register(Gemma3Arch(hf_classes=("Gemma3ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.GEMMA3, **COMMON))
# Gemma 3 4B/12B/27B: vision-language checkpoints, in the Hub's original names or in transformers' (>= 4.52) own
GEMMA3_VL = register(replace(GEMMA3, hf_classes=("Gemma3ForConditionalGeneration",), text_class="Gemma3ForCausalLM",
                             text_tower=(("language_model.model.", "model."), ("model.language_model.", "model."),
                                         ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))))

"""What every architecture adapter is made of, and the registry the adapters add themselves to by HF class name.

An adapter (Arch) owns what the rest of edgequant must not guess about a model family:
  * where the parts are in transformers' module tree, which is also the checkpoint's naming (Layout): the decoder
    layers, the embeddings, the final norm, the head, the rotary embeddings;
  * the GGUF name of each checkpoint tensor (gguf-py's TensorNameMap for the GGUF architecture) and, apart from it,
    the data transform llama.cpp wants (Transform: the LLaMA rotary row permutation, Gemma's norm offset, ...);
  * which linears of a decoder layer read the same input, in forward order (`--sequential` solves them group by
    group, and one Hessian serves each group);
  * the architecture's own GGUF metadata and the tensors llama.cpp needs that the checkpoint does not store;
  * what the calibration forward pass needs beyond transformers' decoder layers (the embedding scale);
  * for a vision-language checkpoint whose text tower is the model: where that tower's tensors and config are.
  * for a mixture of experts (Experts): where the experts are in either Hub layout, and the 3-D tensors llama.cpp
    stacks them into.
So a new dense architecture is one small declarative file, and a mixture-of-experts one a few lines more.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import gguf
import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Hparams:
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict  # {} or the HF rope-scaling dict ("rope_type", "factor", ...)
    tied_embeddings: bool
    explicit_head_dim: bool  # config sets head_dim (llama.cpp then reads key/value lengths from the GGUF)
    rope_dim: int  # rotated dimensions per head (partial_rotary_factor · head_dim)
    config: dict = field(default_factory=dict, compare=False, repr=False)  # config.json as read (for adapters)


@dataclass(frozen=True)
class Layout:
    """Where the parts of a causal LM are, as module paths of transformers' model (the checkpoint's names are these
    plus ".weight")."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"
    rotary: tuple[str, ...] = ("model.rotary_emb",)  # computed at init from the config, never loaded


class Transform:
    """A checkpoint tensor -> the array llama.cpp expects, and back.  Works on numpy arrays and torch tensors."""

    def to_gguf(self, w, hp: Hparams):
        return w

    def from_gguf(self, w, hp: Hparams):
        return w


IDENTITY = Transform()


@dataclass(frozen=True)
class RotaryPermute(Transform):
    """HF LLaMA stores each head's rotary halves [x0..x(d/2-1), y0..]; llama.cpp's LLaMA rope rotates interleaved
    pairs [x0, y0, x1, y1, ...]."""

    heads: str  # "n_head" (Q) or "n_head_kv" (K)

    def to_gguf(self, w, hp):
        return permute_rotary(w, getattr(hp, self.heads))

    def from_gguf(self, w, hp):
        return unpermute_rotary(w, getattr(hp, self.heads))


@dataclass(frozen=True)
class Offset(Transform):
    """Norms that compute x·(offset + w) (Gemma's): llama.cpp multiplies by the stored weight, so it stores w + offset."""

    offset: float

    def to_gguf(self, w, hp):
        return w + self.offset

    def from_gguf(self, w, hp):
        return w - self.offset


def permute_rotary(w, n_head: int):
    """Per head, rows [x0..x(d/2-1), y0..] (HF's rotate_half layout) -> [x0, y0, x1, y1, ...] (llama.cpp's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w, n_head: int):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class ExpertStack:
    """One llama.cpp 3-D expert tensor (n_expert, rows, cols): the checkpoint tensors it is made of."""

    gguf_name: str
    name: str  # what it is called here: <layer>.<module>.experts.{gate,up,down}_proj (transformers' own names)
    parts: tuple[str, ...]  # the checkpoint tensors: one per expert (stacked), or one fused 3-D tensor
    rows: tuple[int, int] | None  # of a fused tensor, the row range (axis 1) that is this projection: gate_up's halves
    shape: tuple[int, int, int]


# The stacks of an expert FFN in llama.cpp's order of projections, as (GGUF tensor, transformers' projection name)
EXPERT_TENSORS = ((gguf.MODEL_TENSOR.FFN_GATE_EXP, "gate_proj"), (gguf.MODEL_TENSOR.FFN_UP_EXP, "up_proj"),
                  (gguf.MODEL_TENSOR.FFN_DOWN_EXP, "down_proj"))


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts FFN as the Hub stores it, in either of its layouts, and as llama.cpp's converter stacks
    it: ffn_{gate,up,down}_exps of shape (n_expert, rows, cols), expert e's matrix at [e] (GGML ne = {cols, rows,
    n_expert}); the router (ffn_gate_inp) is an ordinary tensor, mapped by name.
      per expert  <layer>.<module>.experts.<e>.<name>.weight, one 2-D tensor per expert and projection (the layout
                  of published Qwen3-MoE and Mixtral checkpoints, and of transformers' save_pretrained);
      fused       <layer>.<fused>.experts.gate_up_proj (n_expert, 2·ff, d), gate rows first, and .down_proj
                  (n_expert, d, ff): transformers 5's modules, as save_pretrained(save_original_format=False) writes.
    """

    count: tuple[str, ...]  # config keys of the number of routed experts, the first present counts
    used: str = "num_experts_per_tok"  # config key of the experts each token is routed to
    module: str = "mlp"  # the MoE block under a layer, per-expert layout (Mixtral's "block_sparse_moe")
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert projections: gate, up, down
    fused: str = "mlp"  # the MoE block under a layer, fused layout

    def n_expert(self, hp: Hparams) -> int:
        key = next((k for k in self.count if hp.config.get(k)), None)
        if key is None:
            raise UserError(f"config.json lacks {' or '.join(self.count)}: the number of experts llama.cpp needs")
        return int(hp.config[key])

    def stacks(self, prefix: str, bid: int, shapes: dict[str, tuple[int, ...]], n_expert: int) -> list[ExpertStack]:
        """Layer `bid`'s (checkpoint names under `prefix`) expert stacks, from whichever layout `shapes` (checkpoint
        name -> shape) has; [] for a layer without experts; UserError for experts missing or misshapen."""
        fused_gate_up, fused_down = f"{prefix}{self.fused}.experts.gate_up_proj", f"{prefix}{self.fused}.experts.down_proj"
        out = []
        if fused_gate_up in shapes or fused_down in shapes:
            for name in (fused_gate_up, fused_down):
                if len(shapes.get(name, ())) != 3 or shapes[name][0] != n_expert:
                    raise UserError(f"checkpoint: {name} should be a (n_expert={n_expert}, rows, cols) tensor, "
                                    f"found {list(shapes[name]) if name in shapes else 'none'}")
            (_, ff2, d), (_, d_down, ff) = shapes[fused_gate_up], shapes[fused_down]
            if ff2 != 2 * ff or d_down != d:
                raise UserError(f"checkpoint: {fused_gate_up} {list(shapes[fused_gate_up])} and {fused_down} "
                                f"{list(shapes[fused_down])} disagree on the expert FFN size")
            ranges = ((fused_gate_up, (0, ff)), (fused_gate_up, (ff, 2 * ff)), (fused_down, None))
            for (kind, proj), (name, rows) in zip(EXPERT_TENSORS, ranges):
                shape = (n_expert, ff, d) if rows else (n_expert, d, ff)
                out.append(ExpertStack(expert_tensor_name(kind, bid), f"{prefix}{self.fused}.experts.{proj}", (name,),
                                       rows, shape))
            return out
        first = f"{prefix}{self.module}.experts.0."
        if not any(n.startswith(first) for n in shapes):
            return []
        for (kind, proj), hf in zip(EXPERT_TENSORS, self.names):
            parts = tuple(f"{prefix}{self.module}.experts.{e}.{hf}.weight" for e in range(n_expert))
            missing = [p for p in parts if p not in shapes]
            if missing:
                raise UserError(f"checkpoint: {missing[0]} is missing ({len(missing)} of layer {bid}'s {n_expert} "
                                f"experts' {hf})")
            seen = {shapes[p] for p in parts}
            if len(seen) != 1 or len(next(iter(seen))) != 2:
                raise UserError(f"checkpoint: layer {bid}'s experts' {hf} are not 2-D matrices of one shape: {sorted(seen)}")
            out.append(ExpertStack(expert_tensor_name(kind, bid), f"{prefix}{self.fused}.experts.{proj}", parts, None,
                                   (n_expert, *next(iter(seen)))))
        return out


def expert_tensor_name(kind: gguf.MODEL_TENSOR, bid: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


# A decoder layer's linears by the input they read, in forward order (the LLaMA family's).
LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class Arch:
    hf_classes: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    layout: Layout = Layout()
    # (glob on the checkpoint name, Transform): the first match applies, else the tensor is stored as it is
    transforms: tuple[tuple[str, Transform], ...] = ()
    input_groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS
    skip: tuple[str, ...] = ("*rotary_emb.inv_freq",)  # checkpoint tensors llama.cpp does not use (globs)
    embed_scale: bool = False  # the model multiplies the embeddings by sqrt(hidden size) before layer 0 (Gemma)
    attention: str = "sdpa"  # "eager" where SDPA cannot compute what the model does (Gemma 2's soft-capping)
    # A vision-language checkpoint converted as its text model (llama.cpp's converter does the same, and leaves the
    # vision tower and projector to a separate mmproj file): the text model's class, and where its tensors are in
    # the checkpoint as (checkpoint prefix, the text model's prefix); tensors under no prefix are not the text model's
    text_class: str = ""
    text_tower: tuple[tuple[str, str], ...] = ()
    experts: Experts | None = None  # a mixture-of-experts FFN: where its experts are (None: a dense model)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def hparams(self, config: dict) -> Hparams:
        return read_hparams(config)

    def text_config(self, config: dict) -> dict:
        """The text model's config.json: the checkpoint's own, or a vision-language one's text_config with what
        transformers' config class assumes for the keys it leaves out (the Hub's Gemma 3 configs give only what
        differs from the defaults)."""
        if not self.text_class:
            return config
        from transformers import AutoConfig

        text = dict(config.get("text_config") or {})
        if "model_type" not in text:
            raise UserError("config.json: a vision-language model without text_config.model_type")
        return {**AutoConfig.for_model(**text).to_dict(), "architectures": [self.text_class]}

    def transformers_config(self, config):
        """The transformers config the calibration passes build their model from (the text model's)."""
        if not self.text_class:
            return config
        text = config.get_text_config()
        text.architectures = [self.text_class]
        return text

    def text_name(self, name: str) -> str | None:
        """A checkpoint tensor's name in the text model, None where it is not the text model's."""
        if not self.text_class:
            return name
        return next((text + name[len(ckpt):] for ckpt, text in self.text_tower if name.startswith(ckpt)), None)

    # --- tensors -----------------------------------------------------------------------------------------------

    def tensor_map(self, n_layers: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layers)

    def skips(self, hf_name: str, hp: Hparams) -> bool:
        """Checkpoint tensors llama.cpp does not use: the skip globs, and the head when it is the embeddings."""
        if hp.tied_embeddings and hf_name == f"{self.layout.head}.weight":
            return True
        return any(fnmatch.fnmatchcase(hf_name, p) for p in self.skip)

    def gguf_name(self, hf_name: str, names: gguf.TensorNameMap) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no GGUF name for architecture {self.name}")
        return name

    def transform(self, hf_name: str) -> Transform:
        return next((t for pattern, t in self.transforms if fnmatch.fnmatchcase(hf_name, pattern)), IDENTITY)

    def check(self, hp: Hparams) -> None:
        """UserError for a config llama.cpp would run differently from transformers (before any work is done)."""

    def extra_tensors(self, hp: Hparams) -> list[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not store (rope_freqs, LongRoPE factors)."""
        return []

    # --- metadata ----------------------------------------------------------------------------------------------

    def metadata(self, w: gguf.GGUFWriter, hp: Hparams) -> None:
        """Keys this architecture's llama.cpp loader reads beyond the common ones (edgequant.metadata)."""
        if self.experts is not None:  # as llama.cpp's converter writes them, from the same config keys
            w.add_expert_count(self.experts.n_expert(hp))
            w.add_expert_used_count(int(hp.config[self.experts.used]))

    def n_expert(self, hp: Hparams) -> int:
        """Routed experts per MoE layer (0: dense), which llama.cpp's recipes look at."""
        return 0 if self.experts is None else self.experts.n_expert(hp)

    # --- the model's structure ---------------------------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        return f"{self.layout.layers}.{i}."

    def head_weight(self, hp: Hparams) -> str:
        """The checkpoint tensor the output head multiplies with: the embeddings when they are tied."""
        return f"{self.layout.embed if hp.tied_embeddings else self.layout.head}.weight"

    def embedding_scale(self, hp: Hparams) -> float:
        return math.sqrt(hp.n_embd) if self.embed_scale else 1.0

    def buffers(self, hp: Hparams) -> dict[str, float]:
        """Scalar buffers the model computes at init, by module path (built on the meta device, they are set after)."""
        return {}

    def logit_softcap(self, hp: Hparams) -> float | None:
        """The model's final logits are cap·tanh(logits/cap) (Gemma's final soft-capping), or None."""
        return None


def read_hparams(c: dict) -> Hparams:
    """Both config styles: classic (`rope_theta`/`rope_scaling` at top level) and `rope_parameters` (transformers 5)."""
    try:
        n_head = c["num_attention_heads"]
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        partial = rope.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor") or 1.0
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        head_dim = c.get("head_dim") or c["hidden_size"] // n_head
        return Hparams(
            n_layers=c["num_hidden_layers"],
            n_embd=c["hidden_size"],
            n_ff=c["intermediate_size"],
            n_head=n_head,
            n_head_kv=c.get("num_key_value_heads") or n_head,
            head_dim=head_dim,
            n_vocab=c["vocab_size"],
            n_ctx=c.get("max_position_embeddings", 2048),
            rms_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            explicit_head_dim="head_dim" in c,
            rope_dim=int(partial * head_dim),
            config=c,
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which llama.cpp needs") from None


ARCHES: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    for cls in arch.hf_classes:
        ARCHES[cls] = arch
    return arch


def for_class(hf_class: str) -> Arch:
    try:
        return ARCHES[hf_class]
    except KeyError:
        raise UserError(f"unsupported architecture {hf_class}; supported: {', '.join(sorted(ARCHES))}") from None

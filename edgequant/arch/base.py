"""What every architecture adapter is made of (Arch, Hparams, the rotary permutation), and the registry the
adapters add themselves to by HF class name."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Arch:
    hf_classes: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # HF LLaMA stores rotary halves; llama.cpp's LLaMA rope wants interleaved pairs
    write_vocab_size: bool = False  # llama.cpp's LLaMA loader reads <arch>.vocab_size

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def hparams(self, config: dict) -> Hparams:
        return read_hparams(config)

    def tensor_map(self, n_layers: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layers)

    def to_gguf(self, hf_name: str, tensor: np.ndarray, hp: Hparams, names: gguf.TensorNameMap) -> tuple[str, np.ndarray] | None:
        """HF tensor -> (GGUF name, array as llama.cpp expects it), or None for tensors llama.cpp does not use."""
        if hf_name.endswith("rotary_emb.inv_freq") or (hp.tied_embeddings and hf_name == "lm_head.weight"):
            return None
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no GGUF name for architecture {self.name}")
        if self.permute_qk and tensor.size and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rotary(tensor, hp.n_head if "q_proj" in hf_name else hp.n_head_kv)
        return name, tensor

    def extra_tensors(self, hp: Hparams) -> list[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not store (e.g. rope_freqs)."""
        return []

    def from_gguf(self, gguf_name: str, tensor: np.ndarray, hp: Hparams) -> np.ndarray:
        """Undo `to_gguf`'s layout change for one tensor (used to load GGUF weights back into the HF model)."""
        if self.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            return unpermute_rotary(tensor, hp.n_head if "attn_q" in gguf_name else hp.n_head_kv)
        return tensor


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Per head, rows [x0..x(d/2-1), y0..] (HF's rotate_half layout) -> [x0, y0, x1, y1, ...] (llama.cpp's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_hparams(c: dict) -> Hparams:
    """Both config styles: classic (`rope_theta`/`rope_scaling` at top level) and `rope_parameters` (transformers 5)."""
    try:
        n_head = c["num_attention_heads"]
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        return Hparams(
            n_layers=c["num_hidden_layers"],
            n_embd=c["hidden_size"],
            n_ff=c["intermediate_size"],
            n_head=n_head,
            n_head_kv=c.get("num_key_value_heads") or n_head,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
            n_vocab=c["vocab_size"],
            n_ctx=c.get("max_position_embeddings", 2048),
            rms_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            explicit_head_dim="head_dim" in c,
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

"""A source model as llama.cpp will see it: checkpoint + architecture adapter + hyperparameters, tensors by GGUF name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import arch as archs
from .checkpoint import Checkpoint, resolve
from .errors import UserError

LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(gguf_name: str) -> int | None:
    m = LAYER.match(gguf_name)
    return int(m.group(1)) if m else None


@dataclass
class SourceTensor:
    gguf_name: str
    hf_name: str | None  # None for tensors edgequant computes (rope_freqs); an expert stack: its ExpertStack.name
    shape: tuple[int, ...]
    stack: archs.ExpertStack | None = field(default=None, repr=False)  # a 3-D expert tensor: what it is made of


class SourceModel:
    def __init__(self, model: str, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.dir: Path = resolve(model)
        self.checkpoint = Checkpoint(self.dir, allow_pickle, trust_remote_code)
        self.arch = archs.for_class(self.checkpoint.architecture)
        self.checkpoint.rename(self.arch.text_name)
        self.hp = self.arch.hparams(self.arch.text_config(self.checkpoint.config))
        self.arch.check(self.hp)
        if not ((self.dir / "tokenizer.model").is_file() or (self.dir / "tokenizer.json").is_file()):
            raise UserError(f"{self.dir}: no tokenizer (neither tokenizer.model nor tokenizer.json)")
        self.name = self.dir.name
        self._extra = dict(self.arch.extra_tensors(self.hp))
        self.tensor_names = self.arch.tensor_map(self.hp.n_layers)
        self.tensors: dict[str, SourceTensor] = {n: SourceTensor(n, None, a.shape) for n, a in self._extra.items()}
        stacked: set[str] = set()  # checkpoint tensors that are parts of expert stacks
        if self.arch.experts is not None:
            shapes = {n: e.shape for n, e in self.checkpoint.tensors.items()}
            n_expert = self.arch.n_expert(self.hp)
            for i in range(self.hp.n_layers):
                for st in self.arch.experts.stacks(self.arch.layer_prefix(i), i, shapes, n_expert):
                    self.tensors[st.gguf_name] = SourceTensor(st.gguf_name, st.name, st.shape, st)
                    stacked.update(st.parts)
        for hf_name, entry in self.checkpoint.tensors.items():
            if hf_name not in stacked and not self.arch.skips(hf_name, self.hp):
                name = self.arch.gguf_name(hf_name, self.tensor_names)
                self.tensors[name] = SourceTensor(name, hf_name, entry.shape)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors.values() if t.hf_name is not None)

    @property
    def n_expert(self) -> int:
        return self.arch.n_expert(self.hp)

    def load(self, gguf_name: str) -> np.ndarray:
        """float32 array of one tensor, laid out as llama.cpp expects (the adapter's transform applied)."""
        t = self.tensors[gguf_name]
        if t.hf_name is None:
            return self._extra[gguf_name]
        if t.stack is not None:
            return self.load_stack(t.stack)
        return self.to_gguf(t.hf_name, self.checkpoint.load_array(t.hf_name))

    def load_stack(self, st: archs.ExpertStack) -> np.ndarray:
        """An expert stack (n_expert, rows, cols): the experts' matrices in expert order (llama.cpp's converter
        stacks them so), or the rows of a fused tensor."""
        if st.rows is None and len(st.parts) == st.shape[0]:
            out = np.empty(st.shape, dtype=np.float32)
            for e, part in enumerate(st.parts):
                out[e] = self.checkpoint.load_array(part)
            return out
        w = self.checkpoint.load_array(st.parts[0])
        return np.ascontiguousarray(w if st.rows is None else w[:, st.rows[0] : st.rows[1]])

    def param(self, name: str):
        """A parameter of transformers' model (module path + name) as a float32 torch tensor: the checkpoint's tensor
        of that name, or, for a mixture of experts, what transformers 5 builds from the checkpoint's layout (the
        fused experts.gate_up_proj / down_proj from the expert stacks; the router under its other block name)."""
        import torch

        if name in self.checkpoint:
            return self.checkpoint.load(name)
        spec = self.arch.experts
        if spec is not None:
            stacks = {t.hf_name: t.stack for t in self.tensors.values() if t.stack is not None}
            base = name.rpartition(".")[0]
            if name.endswith(".experts.gate_up_proj") and f"{base}.gate_proj" in stacks:
                return torch.from_numpy(np.concatenate([self.load_stack(stacks[f"{base}.gate_proj"]),
                                                        self.load_stack(stacks[f"{base}.up_proj"])], axis=1))
            if name.endswith(".experts.down_proj") and f"{base}.down_proj" in stacks:
                return torch.from_numpy(self.load_stack(stacks[f"{base}.down_proj"]))
            router = name.replace(f".{spec.fused}.gate.", f".{spec.module}.gate.")
            if router in self.checkpoint:
                return self.checkpoint.load(router)
        raise UserError(f"checkpoint: no tensor for {name}")

    def module_weights(self, weights: dict) -> dict:
        """Tensors by checkpoint name (expert stacks by their ExpertStack.name) -> by transformers' parameter names
        (param's inverse): a layer's gate and up stacks fused into experts.gate_up_proj, the router under the fused
        layout's block."""
        spec = self.arch.experts
        if spec is None:
            return weights
        import torch

        out = dict(weights)
        for name in [n for n in weights if n.endswith(".experts.gate_proj")]:
            base = name.rpartition(".")[0]
            out[f"{base}.gate_up_proj"] = torch.cat([out.pop(name), out.pop(f"{base}.up_proj")], dim=1)
        for name in [n for n in out if f".{spec.module}.gate." in n]:
            out[name.replace(f".{spec.module}.gate.", f".{spec.fused}.gate.")] = out.pop(name)
        return out

    def to_gguf(self, hf_name: str, w):
        """A checkpoint tensor (numpy or torch) as llama.cpp stores it."""
        return self.arch.transform(hf_name).to_gguf(w, self.hp)

    def from_gguf(self, gguf_name: str, w):
        """Undo to_gguf for the tensor stored as `gguf_name` (GGUF weights back into the HF model)."""
        return self.arch.transform(self.tensors[gguf_name].hf_name).from_gguf(w, self.hp)


def hf_to_gguf(m: SourceModel) -> dict[str, str]:
    """Checkpoint tensor name -> GGUF tensor name, for the tensors read from the checkpoint."""
    return {t.hf_name: t.gguf_name for t in m.tensors.values() if t.hf_name is not None}

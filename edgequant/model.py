"""A source model as llama.cpp will see it: checkpoint + architecture adapter + hyperparameters, tensors by GGUF name."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
    hf_name: str | None  # None for tensors edgequant computes (rope_freqs)
    shape: tuple[int, ...]


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
        for hf_name, entry in self.checkpoint.tensors.items():
            if not self.arch.skips(hf_name, self.hp):
                name = self.arch.gguf_name(hf_name, self.tensor_names)
                self.tensors[name] = SourceTensor(name, hf_name, entry.shape)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors.values() if t.hf_name is not None)

    def load(self, gguf_name: str) -> np.ndarray:
        """float32 array of one tensor, laid out as llama.cpp expects (the adapter's transform applied)."""
        t = self.tensors[gguf_name]
        if t.hf_name is None:
            return self._extra[gguf_name]
        return self.to_gguf(t.hf_name, self.checkpoint.load_array(t.hf_name))

    def to_gguf(self, hf_name: str, w):
        """A checkpoint tensor (numpy or torch) as llama.cpp stores it."""
        return self.arch.transform(hf_name).to_gguf(w, self.hp)

    def from_gguf(self, gguf_name: str, w):
        """Undo to_gguf for the tensor stored as `gguf_name` (GGUF weights back into the HF model)."""
        return self.arch.transform(self.tensors[gguf_name].hf_name).from_gguf(w, self.hp)


def hf_to_gguf(m: SourceModel) -> dict[str, str]:
    """Checkpoint tensor name -> GGUF tensor name, for the tensors read from the checkpoint."""
    return {t.hf_name: t.gguf_name for t in m.tensors.values() if t.hf_name is not None}

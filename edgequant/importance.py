"""llama-imatrix's importance from our own calibration pass: per input column of every linear, the mean of its squared
full-precision activations (what `--method imatrix` rounds with, as llama-quantize --imatrix does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .model import SourceModel, hf_to_gguf

if TYPE_CHECKING:
    import torch


def collect_importance(m: SourceModel, ids: torch.Tensor, device: torch.device, progress=None) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF tensor name -> (Σ x² per input column, number of activation rows), from full-precision activations."""
    from . import layerwise

    names = hf_to_gguf(m)
    out: dict[str, tuple[np.ndarray, int]] = {}

    def on_layer(_index, weights):
        for hf_name, (_w, stats) in weights.items():
            out[names[hf_name]] = (stats.s.diagonal().double().cpu().numpy(), stats.n)
        return {}

    layerwise.run(m, ids, on_layer, device, progress=progress)
    return out


def mean_importance(sums: dict[str, tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    return {k: (s / n).astype(np.float32) for k, (s, n) in sums.items()}

"""llama-imatrix's importance from our own calibration pass: per input column of every linear, the mean of its squared
full-precision activations (what `--method imatrix` rounds with, as llama-quantize --imatrix does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .model import SourceModel, hf_to_gguf

if TYPE_CHECKING:
    import torch


def collect_importance(m: SourceModel, ids: torch.Tensor, device: torch.device, progress=None) -> dict[str, tuple[np.ndarray, np.ndarray | int]]:
    """GGUF tensor name -> (Σ x² per input column, number of activation rows), from full-precision activations.
    An expert stack, as llama-imatrix counts it: per expert, over the tokens routed to it (n_expert · cols sums,
    n_expert counts)."""
    from . import layerwise

    names = hf_to_gguf(m)
    out: dict[str, tuple[np.ndarray, np.ndarray | int]] = {}

    def on_layer(_index, weights):
        for hf_name, (_w, stats) in weights.items():
            if isinstance(stats, layerwise.ExpertStats):
                out[names[hf_name]] = (stats.sq.double().cpu().numpy().reshape(-1), stats.counts.numpy())
            else:
                out[names[hf_name]] = (stats.s.diagonal().double().cpu().numpy(), stats.n)
        return {}

    layerwise.run(m, ids, on_layer, device, progress=progress)
    return out


def mean_importance(sums: dict[str, tuple[np.ndarray, np.ndarray | int]]) -> dict[str, np.ndarray]:
    """Σ x² / rows, per matrix (per expert for a stack); a matrix no row reached gets ones, as llama-quantize reads an
    imatrix entry of count 0."""
    out = {}
    for k, (s, n) in sums.items():
        n = np.asarray(n, dtype=np.float64).reshape(-1, 1)
        per = s.reshape(len(n), -1)
        out[k] = np.divide(per, n, out=np.ones_like(per), where=n > 0).reshape(-1).astype(np.float32)
    return out

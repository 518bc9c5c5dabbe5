"""What a build was asked for, as every stage reads it: the method, the calibration options, GPTQ's settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

METHODS = ("gptq", "imatrix", "rtn")


@dataclass
class GptqSettings:
    block_size: int = 128
    damp: float = 0.01
    # Column order: "off" (as stored), "on" (descending Hessian diagonal), or "auto": both, per row the one whose
    # Ŵ has the lower calibration loss.  auto by default: twice the solves, for what act-order gives a real model
    # without what it costs bench-a at some ftypes (docs/BENCHMARKS.md, "act-order").
    act_order: str = "auto"
    refine: int = 2  # rounds of edgequant.gptq.refine after GPTQ
    # Calibration forward passes and Hessian sums on a GPU (layerwise.PRECISIONS).  bf16: 2.1x faster than tf32 per 8B
    # layer with the GPU's defaults, bench-a's KLD the same within noise (docs/BENCHMARKS.md).
    calib_precision: str = "bf16"
    # Aiming at the full-precision model (layerwise's docstring): sequential solves a layer's linears group by group,
    # each on inputs through the quantized ones; asymmetric is the strength of the full-precision target
    # (gptq.target.asymmetric_target), 0: off.  Both on by default on every device: on a real pretrained model they
    # take Q4_K_M's KLD to half of plain GPTQ's (docs/BENCHMARKS.md).
    sequential: bool = True
    asymmetric: float = 0.5


@dataclass
class CalibOptions:
    sources: list[str] = field(default_factory=list)  # calibration.calibrate's; empty: its DEFAULT
    samples: int = 256
    seqlen: int = 512
    seed: int = 0
    imatrix: Path | None = None
    device: str = "auto"
    gptq: GptqSettings = field(default_factory=GptqSettings)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(self.device)
            except RuntimeError as e:
                raise UserError(f"--device {self.device}: {e}") from None
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # one GPU per rank
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return device

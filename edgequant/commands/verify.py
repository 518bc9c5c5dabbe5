"""`edgequant verify MODEL GGUF [--calib TEXT]`: every quantized tensor through llama.cpp's CPU arithmetic, checked.

For each quantized tensor that edgequant.native has a kernel for, products with the same activation rows X (that
linear's real inputs from a layer-by-layer pass over --calib text; Gaussian rows without --calib, and for tensors no
linear reads, such as token_embd and the output head):

    Y_kernel = X · Ŵᵀ    edgequant.native on the GGUF's blocks: X quantized to Q8 and dotted as llama.cpp's CPU does
    Y_q8     = X̃ · Ŵᵀ    torch (float64): X̃ = those Q8 activations dequantized, Ŵ = gguf.quants.dequantize(blocks)
                         (for Q4_1/Q5_1, the offsets meet the activations' f16 block sums, as in the kernels)
    Y_deq    = X · Ŵᵀ    torch (float64)
    Y_src    = X · Wᵀ    torch (float64) on MODEL's weights, laid out as the GGUF stores them

Errors are per output column (one weight row), relative, and the worst column is reported:

    kernel  |Y_kernel - Y_q8| / |Y_q8|: float rounding only (~1e-6).  More means the blocks do not compute what
            they dequantize to: non-finite scales, a layout or kernel fault.
    q8      |Y_q8 - Y_deq| / |Y_deq|: llama.cpp's activation quantization noise (~1e-2), shown, not checked.
    source  |Y_deq - Y_src| / |Y_src|: the weight quantization error, checked against a per-type tolerance (about
            twice the worst row of round-to-nearest on a real model); a corrupted or misplaced block is O(1).

Exit status 1 names every tensor beyond either tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
from rich.console import Console
from rich.table import Table

from ..errors import UserError

KERNEL_TOL = 1e-3
# Worst-row source error allowed per type: about twice the worst row of round-to-nearest on bench-a with real
# activations (Q2_K 0.75, Q3_K 0.36, Q4_K 0.19, Q6_K 0.03).
SOURCE_TOL = {"Q2_K": 1.0, "Q3_K": 0.6, "Q4_0": 0.5, "Q4_1": 0.5, "Q4_K": 0.4, "Q5_0": 0.3, "Q5_1": 0.3, "Q5_K": 0.25,
              "Q6_K": 0.15, "Q8_0": 0.1, "IQ4_NL": 0.4, "IQ4_XS": 0.4,
              # the lattice i-quants at ~2.5x their worst row on a bench-a ffn_down (Gaussian X, as Q2_K's 1.0 is to its 0.39)
              "IQ3_XXS": 0.7, "IQ3_S": 0.5, "IQ2_XXS": 1.2, "IQ2_XS": 1.1, "IQ2_S": 1.0, "IQ1_S": 1.6, "IQ1_M": 1.5}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a quantized GGUF with llama.cpp's CPU arithmetic against its model")
    p.add_argument("model", help="the Hugging Face model directory (or hub id) the GGUF was built from")
    p.add_argument("gguf", type=Path, help="the quantized GGUF to check")
    p.add_argument("--calib", metavar="TEXT", help="calibration source (self, builtin, a file or dataset, as for build): real activation rows")
    p.add_argument("--rows", type=int, default=256, metavar="N", help="activation rows per tensor (default 256)")
    p.add_argument("--seqlen", type=int, default=128, metavar="L", help="tokens per calibration window (default 128)")
    p.add_argument("--kernel-tol", type=float, default=KERNEL_TOL, help=f"worst-row kernel error allowed (default {KERNEL_TOL})")
    p.add_argument("--source-tol", type=float, metavar="TOL", help="worst-row source error allowed, all types (default per type: "
                   + ", ".join(f"{k} {v}" for k, v in SOURCE_TOL.items()) + ")")
    p.add_argument("--threads", type=int, default=0, help="threads for the kernels (default: all cores)")
    p.add_argument("--device", default="cpu", help="torch device for the calibration pass (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON list of per-tensor results")
    p.set_defaults(func=run)


@dataclass
class Result:
    name: str
    type: str
    shape: tuple[int, int]  # (rows, columns) of the weight matrix
    activations: str  # "calib" or "gauss"
    kernel_error: float
    kernel_row: int
    q8_error: float
    source_error: float
    source_row: int
    source_tol: float
    ok: bool


def run(args: argparse.Namespace) -> int:
    from .. import native
    from ..convert.gguf_in import open_gguf
    from ..model import SourceModel

    if args.rows < 1:
        raise UserError("--rows must be at least 1")
    reader = open_gguf(args.gguf)
    m = SourceModel(args.model)
    tensors = [t for t in reader.tensors if t.tensor_type in native.DOT_TYPES]
    if not tensors:
        raise UserError(f"{args.gguf}: no tensor of a type the kernels cover ({', '.join(t.name for t in native.DOT_TYPES)})")
    missing = [t.name for t in tensors if t.name not in m.tensors]
    if missing:
        raise UserError(f"{args.gguf} has tensors {args.model} does not: {', '.join(missing[:5])}")
    for t in tensors:  # GGUF shapes list the row length first
        if tuple(int(d) for d in reversed(t.shape)) != tuple(m.tensors[t.name].shape):
            raise UserError(f"{t.name}: {args.gguf} stores it as {'×'.join(map(str, reversed(t.shape.tolist())))}, "
                            f"{args.model} as {'×'.join(map(str, m.tensors[t.name].shape))}: not built from this model")
    inputs = calibration_inputs(m, args) if args.calib else {}

    results = []
    for t in tensors:
        raw = np.asarray(t.data, dtype=np.uint8).reshape(int(np.prod(t.shape[1:])), -1)
        cols = int(t.shape[0])
        x, source = (inputs[t.name], "calib") if t.name in inputs else (gaussian_rows(args.rows, cols), "gauss")
        results.append(check(t.name, t.tensor_type, raw, x, source, m.load(t.name), args))

    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        show(results, args)
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"edgequant verify: {r.name} ({r.type}): kernel error {r.kernel_error:.3g} (row {r.kernel_row}, "
              f"tolerance {args.kernel_tol}), source error {r.source_error:.3g} (row {r.source_row}, tolerance "
              f"{r.source_tol})", file=sys.stderr)
    return 1 if bad else 0


def calibration_inputs(m, args) -> dict[str, np.ndarray]:
    """GGUF name -> the first `rows` input rows of that linear in a full-precision layer-by-layer pass."""
    from ..calibration import draw
    from ..settings import CalibOptions

    calib = CalibOptions(sources=[args.calib], samples=-(-args.rows // args.seqlen), seqlen=args.seqlen, device=args.device)
    return capture_linear_inputs(m, draw(calib, m).ids, args.rows, calib.torch_device())


def capture_linear_inputs(m, ids, rows: int, device) -> dict[str, np.ndarray]:
    """Run layerwise's pass with a global forward pre-hook that keeps each nn.Linear's first `rows` input rows,
    keyed by the weight's identity, which on_layer then maps to a name (no second pass: on_layer changes nothing)."""
    import torch

    from .. import layerwise
    from ..model import hf_to_gguf

    names = hf_to_gguf(m)
    kept: dict[int, list[torch.Tensor]] = {}
    out: dict[str, np.ndarray] = {}

    def keep(module, args):
        if isinstance(module, torch.nn.Linear):
            chunks = kept.setdefault(id(module.weight), [])
            have = sum(len(c) for c in chunks)
            if have < rows:
                chunks.append(args[0].reshape(-1, args[0].shape[-1])[: rows - have].detach().float().cpu())

    def on_layer(_index, weights):
        for hf_name, (w, _stats) in weights.items():
            chunks = kept.pop(id(w), None)
            if chunks:
                out[names[hf_name]] = torch.cat(chunks).numpy()
        return {}

    handle = torch.nn.modules.module.register_module_forward_pre_hook(keep)
    try:
        layerwise.run(m, ids, on_layer, device)
    finally:
        handle.remove()
    return out


def gaussian_rows(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)


def check(name: str, qtype: gguf.GGMLQuantizationType, raw: np.ndarray, x: np.ndarray, source: str,
          w_src: np.ndarray, args) -> Result:
    import torch

    from .. import native

    y_kernel = native.matmul(raw, x, qtype, n_threads=args.threads).astype(np.float64)
    x64 = torch.from_numpy(x).double()
    w_deq = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double()
    y_deq = (x64 @ w_deq.T).numpy()
    y_src = (x64 @ torch.from_numpy(np.ascontiguousarray(w_src, dtype=np.float32)).double().T).numpy()
    y_q8 = kernel_reference(raw, qtype, x)
    k_err, s_err = column_errors(y_kernel, y_q8), column_errors(y_deq, y_src)
    k_row, s_row = int(np.argmax(k_err)), int(np.argmax(s_err))
    tol = args.source_tol if args.source_tol is not None else SOURCE_TOL[qtype.name]
    return Result(name, qtype.name, (raw.shape[0], x.shape[1]), source, float(k_err[k_row]), k_row,
                  float(column_errors(y_q8, y_deq).max()), float(s_err[s_row]), s_row, tol,
                  bool(k_err[k_row] <= args.kernel_tol and s_err[s_row] <= tol))


def kernel_reference(raw: np.ndarray, qtype: gguf.GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """What the kernels compute, in float64: X quantized as they do it, dequantized, times the dequantized weights.

    Q4_1/Q5_1 blocks are d*q + m; ggml dots the offset m with the activation block's stored sum s = f16(d_y * sum q_y)
    rather than with its elements, so the reference splits those weights the same way (all-zero m gives d*q exactly).
    """
    import torch

    from .. import native

    act = native.activation_type(qtype)
    x_blocks = native.quantize_activations(x, act)
    x_q8 = torch.from_numpy(native.dequantize(x_blocks, act)).double()
    if act != gguf.GGMLQuantizationType.Q8_1:
        return (x_q8 @ torch.from_numpy(gguf.quants.dequantize(raw, qtype)).double().T).numpy()
    size = native.block_layout(qtype)[1]
    blocks = raw.reshape(raw.shape[0], -1, size).copy()
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # (rows, blocks): d, m, ... layout
    blocks[:, :, 2:4] = 0
    s = x_blocks.reshape(x.shape[0], -1, native.block_layout(act)[1])[:, :, 2:4].copy().view(np.float16)[..., 0]
    scaled = torch.from_numpy(gguf.quants.dequantize(blocks.reshape(raw.shape), qtype)).double()
    return (x_q8 @ scaled.T + torch.from_numpy(s.astype(np.float64)) @ torch.from_numpy(m).T).numpy()


def column_errors(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|y[:, r] - ref[:, r]| / |ref[:, r]| per column r; columns far below the typical norm are measured against a
    floor of 1e-3 times the RMS column norm (so all-zero weight rows do not divide by zero); NaN/inf count as inf."""
    diff = np.linalg.norm(y - ref, axis=0)
    norm = np.linalg.norm(ref, axis=0)
    floor = 1e-3 * float(np.sqrt(np.mean(norm**2))) + np.finfo(np.float64).tiny
    err = diff / np.maximum(norm, floor)
    return np.where(np.isfinite(err), err, np.inf)


def show(results: list[Result], args) -> None:
    def cell(value: float, tol: float | None = None) -> str:
        return f"[red]{value:.1e}[/red]" if tol is not None and not value <= tol else f"{value:.1e}"

    table = Table(title=str(args.gguf))
    table.add_column("tensor", overflow="fold")
    for col in ("type", "rows×cols", "X", "kernel", "q8", "source"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name if r.ok else f"[red]{r.name}[/red]", r.type, f"{r.shape[0]}×{r.shape[1]}",
                      r.activations, cell(r.kernel_error, args.kernel_tol), cell(r.q8_error), cell(r.source_error, r.source_tol))
    bad = sum(not r.ok for r in results)
    table.caption = (f"{len(results)} tensors, {bad} beyond tolerance.  Relative error of the worst output column: "
                     "kernel vs float64 on the same Q8 activations, q8 = activation quantization, source vs the model")
    Console(stderr=True).print(table)

"""GPTQ (Frantar et al. 2022) onto a llama.cpp block codec's grid: one linear layer, as a pure function.

For a layer y = x Wᵀ with calibration inputs X, GPTQ minimizes ‖X (W - Ŵ)ᵀ‖² column by column: it rounds
column i onto the grid, then spreads that column's error over the columns not yet quantized, using the
upper Cholesky factor U of H⁻¹ (H = 2XᵀX).  Columns are processed in lazy blocks of `block_size`: inside a
block the updates are rank-1, the rest of the matrix gets one GEMM per block.

The grid is llama.cpp's.  Each codec block (256 columns for K-quants and IQ4_XS, 32 for Q4_0/Q8_0/IQ4_NL...) has
its scales chosen by `codec.fit` exactly when GPTQ reaches its first column, from the weights as updated by the
errors of all earlier columns, with llama.cpp's imatrix-style importance; its columns are then rounded onto that
fixed grid: to the nearest level scale·q + offset, or for the table types (IQ4_*) to the nearest of the 16 scaled
table values scale·levels[q] + offset.  With `act_order` the columns go by descending diag(H) instead, which GGUF
cannot record (no g_idx): the grid is then fitted once, up front, from the original weights, and codes are stored
back in the original column order.

Choices (measured in tests/test_gptq_solver.py, scripts/bench_gptq_cpu.py and on bench-a's own H):
  - damping λ = damp · mean(diag H), ×10 (up to 4 times) while a Cholesky fails;
  - importance for `fit` = diag(H + λI), the diagonal of the matrix actually solved: λ keeps a floor under
    columns the calibration data never touches (with importance 0 a whole sub-block would collapse to 0);
  - dead columns (diag(H) = 0) keep their weights, where the paper's code zeroes them: they cannot change
    the calibration loss, but they do change other inputs' outputs (zeroing them made held-out error 10-500x
    worse on bench-a matrices, at 1% lower calibration loss).  H[i, i] = 1 decouples them, so they get plain
    round-to-nearest on their block's grid;
  - act_order is a per-matrix call, left to the caller (compare the two losses): on bench-a (layers 0, 3, 7
    and output, held-out error) it wins up to 30% on layer 0 and attn_output and loses 1-3% on most other
    matrices, as its static grid cannot follow the updated weights; geometric mean 0.96x of in-order for
    Q3_K..Q6_K, 1.00x for Q2_K; keeping the lower-loss of the two gives 0.95-0.99x.

The in-block sweep has two backends with the same arithmetic: `torch_sweep`, small tensor ops per column (the
reference and the CPU path: run with torch.set_num_threads(1) on a busy machine, OpenMP threads spinning against
other work made it 7x slower here), and on CUDA one Triton kernel per block (triton_solver): the column loop,
trailing GEMMs included, 40-130x faster on an H200 (scripts/bench_gptq.py).  Everything else (factorization, fits, the
trailing GEMMs) is shared, the fits too (fitter.fit: on CUDA the K-quants' run on the GPU, bit-identical to
codec.fit).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from edgequant.convert.codecs import Codec

from .fitter import Fit, fit
from .refine import refine as refine_blocks
from .refine import dequantized, torch_polish, torch_refit

CHOLESKY_TRIES = 5  # damp, 10·damp, ..., 10⁴·damp


@dataclasses.dataclass(frozen=True)
class Solution:
    """A quantized layer.  loss = Σ over rows and columns of (w - q)² / U_ii² / 2 = ½ tr(E (H + λI) Eᵀ),
    E = W - w_hat; column_loss is its split over input columns (original order)."""

    blocks: object  # the codec's Blocks, ready for codec.pack
    w_hat: torch.Tensor  # float32 (rows, cols) on the solve's device, == codec.dequantize(blocks) bit for bit
    loss: float
    column_loss: np.ndarray  # float32 (cols,)
    damp: float  # relative damping actually used (>= the one asked for)


@torch.no_grad()
def solve(W, H, codec: Codec, *, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
          backend: str = "auto", refine: int = 0, refine_damp: float = 0.1) -> Solution:
    """GPTQ of W (rows = output features, cols = input features) given H = 2XᵀX (cols, cols).

    W and H are numpy arrays or torch tensors; the work runs on H's device (CPU for numpy).  `backend` picks the
    in-block sweep: "torch" (the reference, and the CPU path), "triton" (edgequant.gptq.triton_solver), or "auto":
    Triton on a CUDA device when it imports, torch otherwise.  `refine` rounds of edgequant.gptq.refine follow
    GPTQ, on H + λ'I with λ' = refine_damp · mean(diag H) (or GPTQ's λ if larger).
    """
    device = H.device if isinstance(H, torch.Tensor) else torch.device("cpu")
    W = torch.as_tensor(W, dtype=torch.float32).detach().to(device)
    H = torch.as_tensor(H, dtype=torch.float32).detach().to(device, copy=True)
    rows, cols = W.shape
    S = codec.block_size
    codec.check_shape(cols)
    if not codec.scalar_grid:  # groups of weights are codebook points: vector GPTQ, in groups of columns
        from .vector import solve_lattice
        return solve_lattice(W, H, codec, block_size=block_size, damp=damp, act_order=act_order, refine=refine,
                             refine_damp=refine_damp)
    if block_size % S and S % block_size:
        raise ValueError(f"block_size {block_size} must be a multiple or a divisor of {codec.name}'s {S}")
    sweep, polish, refit_loop = pick_sweeps(backend, device)

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=device)
    U, lam, damp = inverse_cholesky(H[perm][:, perm] if act_order else H, damp)
    importance = H.diagonal() + lam
    # Everything per column is held transposed, (cols, rows), so that a column is a contiguous row and the
    # in-block rank-1 updates touch one contiguous slab.  Rows are columns in processing order.
    Wt = W.T[perm].contiguous()
    if act_order:
        fitted = fit(codec, W, importance)
        grids, refit = ColumnGrids(rows, cols, device, order=perm), None
        grids.put(0, fitted)
    else:
        grids, fits = ColumnGrids(rows, cols, device), []

        def refit(c: int) -> None:  # entering a codec block: all its columns are up to date
            fits.append(fit(codec, Wt[c:c + S].T, importance[c:c + S]))
            grids.put(c, fits[-1])

    Qt, Losses = quantize_columns(Wt, U, grids, sweep, block_size, refit, S)
    inverse = torch.argsort(perm)
    q = Qt[inverse].T.float().contiguous()  # original column order, as the grids of `fitted`
    if not act_order:
        fitted = Fit.concat(fits)
    scale, offset, levels, blocks = fitted.scale, fitted.offset, fitted.levels, fitted.blocks()
    if not bool(torch.isfinite(scale).all() & torch.isfinite(offset).all()):
        raise ValueError(f"{codec.name}: block scales overflow float16 (weights too large for this type)")
    if refine:
        mean = float(H.diagonal().mean())
        blocks, scale, offset = refine_blocks(W, damped(H, max(refine_damp * mean, lam)), codec, blocks, q, scale,
                                              offset, refine, block_size, polish, refit_loop)
    w_hat = dequantized(q, scale, offset, levels)  # codec.dequantize(blocks) bit for bit, computed where the codes are
    if refine:
        E = w_hat - W
        Losses = ((E @ damped(H, lam)) * E).sum(0).div_(2)
    else:
        Losses = Losses[inverse]
    column_loss = Losses.cpu().numpy()
    # Only the codes leave the device, as bytes: Ŵ stays where the caller goes on with it (pageable copies to the
    # host ran at ~1 GB/s on an H200 machine, most of a solve's time when Ŵ and int32 codes went too).
    blocks = codec.with_codes(blocks, q.to(torch.int8 if fitted.qmin < 0 else torch.uint8).cpu().numpy())
    return Solution(blocks, w_hat, float(column_loss.sum(dtype=np.float64)), column_loss, damp)


def damped(H: torch.Tensor, lam: float) -> torch.Tensor:
    """H + λI as a new matrix (without an identity matrix's worth of memory: 0.8 GB for an 8B's down_proj)."""
    out = H.clone()
    out.diagonal().add_(lam)
    return out


class ColumnGrids:
    """The codec's grid as the sweeps read it, on the solver's device: per group, scale and offset transposed to
    (n_groups, rows), so that one column's grid is one contiguous row; `group_of[c]` is the group of the c-th
    processed column (c // group in order, perm[c] // group with act_order), on the device and as host ints;
    `levels`, the table of a table type (None: the level is the code)."""

    def __init__(self, rows: int, cols: int, device, order: torch.Tensor | None = None):
        self.rows, self.cols, self.device, self.order = rows, cols, device, order
        self.scale = self.offset = self.group_of = self.groups = self.levels = None

    def put(self, first: int, grid: Fit) -> None:
        """The grid fitted for original columns first.. (a codec block, or the whole matrix)."""
        if self.scale is None:  # the group size is known at the first fit
            self.scale = torch.empty(self.cols // grid.group, self.rows, device=self.device)
            self.offset = torch.empty_like(self.scale)
            order = torch.arange(self.cols) if self.order is None else self.order.cpu()
            self.groups = (order // grid.group).tolist()
            self.group_of = torch.tensor(self.groups, dtype=torch.int32, device=self.device)
            self.qmin, self.qmax, self.levels = grid.qmin, grid.qmax, grid.levels
        g = first // grid.group
        self.scale[g:g + grid.scale.shape[1]] = grid.scale.T
        self.offset[g:g + grid.scale.shape[1]] = grid.offset.T


def quantize_columns(Wt: torch.Tensor, U: torch.Tensor, grids: ColumnGrids, sweep, block_size: int,
                     refit=None, S: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over Wt (cols, rows, updated in place), in lazy blocks of `block_size` columns: `sweep`
    rounds the columns of a block one by one with rank-1 updates inside the block, then one GEMM carries the
    block's errors to all later columns.  refit(c) is called on entering each codec block of S columns (None: the
    grids are fixed), so a sweep stops at codec-block boundaries.  Returns codes (cols, rows) int32 and the loss
    per column, both in processing order."""
    cols, rows = Wt.shape
    step = min(S, block_size) if refit is not None else block_size
    Qt = torch.empty(cols, rows, dtype=torch.int32, device=Wt.device)
    Losses = torch.empty(cols, device=Wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Err1 = torch.empty(i2 - i1, rows, device=Wt.device)
        for c0 in range(i1, i2, step):
            if refit is not None and c0 % S == 0:
                refit(c0)
            sweep(Wt[i1:i2], U[i1:i2, i1:i2], Qt[i1:i2], Err1, grids, i1, c0 - i1, min(c0 + step, i2) - i1)
        Losses[i1:i2] = Err1.square().sum(1) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    return Qt, Losses


def torch_sweep(W1, U1, Q1, E1, grids: ColumnGrids, first: int, j0: int, j1: int) -> None:
    """Columns j0..j1 of the lazy block W1 = Wt[first:first + n] (views, updated in place): round each onto its
    grid into Q1, its error over U_jj into E1, and subtract the error's rank-1 update from the block's later
    columns.  Small tensor ops per column: the reference, and the CPU path."""
    for j in range(j0, j1):
        g = grids.groups[first + j]
        w, s, o = W1[j], grids.scale[g], grids.offset[g]
        q, v = nearest_level(w, s, o, grids.qmin, grids.qmax, grids.levels)
        Q1[j] = q
        E1[j] = (w - (s * v + o)) / U1[j, j]
        W1[j + 1:].addr_(U1[j, j + 1:], E1[j], alpha=-1)


def pick_sweeps(backend: str, device: torch.device):
    """The in-block loops for `solve`'s backend argument: (GPTQ's sweep, refine's polish, refine's refit)."""
    if backend == "auto":
        backend = "torch"
        if device.type == "cuda":
            try:
                from . import triton_solver  # noqa: F401
                backend = "triton"
            except ImportError:
                pass
    if backend == "triton":
        from .triton_solver import polish, refit, sweep
        return sweep, polish, refit
    if backend == "torch":
        return torch_sweep, torch_polish, torch_refit
    raise ValueError(f"backend {backend!r}: choose auto, torch or triton")


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), escalating damp ×10 until both
    factorizations succeed.  Returns (U, λ, damp used)."""
    mean = float(H.diagonal().mean())
    for _ in range(CHOLESKY_TRIES):
        lam = damp * mean
        L, info = torch.linalg.cholesky_ex(damped(H, lam))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U.contiguous(), lam, damp  # row-major: the sweeps read rows of U
        damp *= 10
    raise ValueError(f"H is not positive definite even with damping {damp / 10:g}")


def nearest_level(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                  levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AffineGrid.quantize in torch: the code (float) of the level nearest to x = (w - offset) / scale, x = 0 where
    scale == 0, and that level.  Uniform grids: rint(x) clipped to [qmin, qmax], the level is the code; a table:
    nearest_index's rule (a tie goes up)."""
    x = (w - offset) / scale
    if levels is None:
        q = torch.where(scale == 0, 0.0, torch.round(x)).clamp_(qmin, qmax)
        return q, q
    x = torch.where(scale == 0, 0.0, x)
    mu = torch.searchsorted(levels, x, right=True).clamp_(1, len(levels) - 1)
    lo, hi = levels[mu - 1], levels[mu]
    below = x - lo < hi - x
    return torch.where(below, mu - 1, mu).float(), torch.where(below, lo, hi)


def concat_blocks(parts: list, axis: int = 1):
    """Blocks (same dataclass) -> one, concatenating every array field along `axis`: 1 joins codec blocks of columns,
    0 parts of rows."""
    if len(parts) == 1:
        return parts[0]
    return dataclasses.replace(parts[0], **{f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=axis)
                                             for f in dataclasses.fields(parts[0])})


def pick_rows(mask: np.ndarray, a, b):
    """Blocks (same dataclass, rows first) -> one with row i from `a` where mask[i], else from `b`."""
    def take(x, y):
        return np.where(mask.reshape(-1, *[1] * (x.ndim - 1)), x, y)
    return dataclasses.replace(a, **{f.name: take(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})

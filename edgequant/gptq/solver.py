"""GPTQ (Frantar et al. 2022) onto a llama.cpp block codec's grid: one linear layer, as a pure function.

For a layer y = x Wᵀ with calibration inputs X, GPTQ minimizes ‖X (W - Ŵ)ᵀ‖² column by column: it rounds
column i onto the grid, then spreads that column's error over the columns not yet quantized, using the
upper Cholesky factor U of H⁻¹ (H = 2XᵀX).  Columns are processed in lazy blocks of `block_size`: inside a
block the updates are rank-1, the rest of the matrix gets one GEMM per block.

The grid is llama.cpp's.  Each codec block (256 columns for K-quants, 32 for Q4_0/Q8_0...) has its scales
chosen by `codec.fit` exactly when GPTQ reaches its first column, from the weights as updated by the errors
of all earlier columns, with llama.cpp's imatrix-style importance; its columns are then rounded onto that
fixed grid.  With `act_order` the columns go by descending diag(H) instead, which GGUF cannot record
(no g_idx): the grid is then fitted once, up front, from the original weights, and codes are stored back
in the original column order.

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

On CPU the per-column steps are small tensor ops: run with torch.set_num_threads(1) on a busy machine
(OpenMP threads spinning against other work made it 7x slower here).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from edgequant.convert.codecs import Codec

CHOLESKY_TRIES = 5  # damp, 10·damp, ..., 10⁴·damp


@dataclasses.dataclass(frozen=True)
class Solution:
    """A quantized layer.  loss = Σ over rows and columns of (w - q)² / U_ii² / 2 = ½ tr(E (H + λI) Eᵀ),
    E = W - w_hat; column_loss is its split over input columns (original order)."""

    blocks: object  # the codec's Blocks, ready for codec.pack
    w_hat: np.ndarray  # float32 (rows, cols), == codec.dequantize(blocks)
    loss: float
    column_loss: np.ndarray  # float32 (cols,)
    damp: float  # relative damping actually used (>= the one asked for)


@torch.no_grad()
def solve(W, H, codec: Codec, *, block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> Solution:
    """GPTQ of W (rows = output features, cols = input features) given H = 2XᵀX (cols, cols).

    W and H are numpy arrays or torch tensors; the work runs on H's device (CPU for numpy).
    """
    device = H.device if isinstance(H, torch.Tensor) else torch.device("cpu")
    W = torch.as_tensor(W, dtype=torch.float32).detach().to(device)
    H = torch.as_tensor(H, dtype=torch.float32).detach().to(device, copy=True)
    rows, cols = W.shape
    S = codec.block_size
    codec.check_shape(cols)
    if block_size % S and S % block_size:
        raise ValueError(f"block_size {block_size} must be a multiple or a divisor of {codec.name}'s {S}")

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=device)
    U, lam, damp = inverse_cholesky(H[perm][:, perm] if act_order else H, damp)
    importance = (H.diagonal() + lam).cpu().numpy()
    # Everything per column is held transposed, (cols, rows), so that a column is a contiguous row and the
    # in-block rank-1 updates touch one contiguous slab.  Rows are columns in processing order.
    Wt = W.T[perm].contiguous()
    if act_order:
        fitted = codec.fit(np.ascontiguousarray(W.cpu().numpy()), importance)
        scale_t, offset_t, qmin, qmax = grid_columns(codec.grid(fitted), device)
        scale_t, offset_t = scale_t[perm], offset_t[perm]
    else:
        scale_t, offset_t = torch.empty_like(Wt), torch.empty_like(Wt)
        fits = []

    Qt = torch.empty_like(Wt)  # codes
    Losses = torch.empty(cols, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updated in place
        Err1 = torch.empty(i2 - i1, rows, device=device)
        for i in range(i2 - i1):
            c = i1 + i
            if not act_order and c % S == 0:  # entering a codec block: all its columns are up to date
                block = codec.fit(np.ascontiguousarray(Wt[c:c + S].T.cpu().numpy()), importance[c:c + S])
                scale_t[c:c + S], offset_t[c:c + S], qmin, qmax = grid_columns(codec.grid(block), device)
                fits.append(block)
            w, s, o = W1[i], scale_t[c], offset_t[c]
            q = nearest_level(w, s, o, qmin, qmax)
            Qt[c] = q
            Err1[i] = (w - (s * q + o)) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], Err1[i], alpha=-1)
        Losses[i1:i2] = Err1.square().sum(1) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)

    inverse = torch.argsort(perm)
    codes = Qt[inverse].T.contiguous().to(torch.int32).cpu().numpy()
    blocks = codec.with_codes(fitted if act_order else concat_blocks(fits), codes)
    column_loss = Losses[inverse].cpu().numpy()
    return Solution(blocks, codec.dequantize(blocks), float(column_loss.sum(dtype=np.float64)), column_loss, damp)


def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H), escalating damp ×10 until both
    factorizations succeed.  Returns (U, λ, damp used)."""
    mean = float(H.diagonal().mean())
    for _ in range(CHOLESKY_TRIES):
        lam = damp * mean
        L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(len(H), device=H.device))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U, lam, damp
        damp *= 10
    raise ValueError(f"H is not positive definite even with damping {damp / 10:g}")


def grid_columns(grid, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """An AffineGrid as per-column scale and offset, transposed to (n, rows) tensors on device, and its code range."""
    scale, offset = grid.columns(None, grid.scale.shape[1] * grid.group)
    return torch.from_numpy(scale.T.copy()).to(device), torch.from_numpy(offset.T.copy()).to(device), grid.qmin, grid.qmax


def nearest_level(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """AffineGrid.quantize in torch: rint((w - offset) / scale) clipped to [qmin, qmax], 0 where scale == 0."""
    q = torch.round((w - offset) / scale)
    return torch.where(scale == 0, 0.0, q).clamp_(qmin, qmax)


def concat_blocks(parts: list):
    """Per-codec-block Blocks (same dataclass) -> one, concatenating every array field along axis 1."""
    return dataclasses.replace(parts[0], **{f.name: np.concatenate([getattr(p, f.name) for p in parts], axis=1)
                                             for f in dataclasses.fields(parts[0])})

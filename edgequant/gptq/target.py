"""The weights GPTQ should aim at when a layer's inputs already carry the earlier layers' quantization error.

GPTQ minimizes ‖X Wᵀ − X Ŵᵀ‖² over the quantized model's own inputs X: each layer matches the full-precision
layer *on the already-degraded inputs*, and errors accumulate from layer to layer.  Asymmetric calibration (as in
GPTQv2, Li et al. 2025) matches the full-precision model's output instead, ‖X_fp Wᵀ − X Ŵᵀ‖², X_fp being the
full-precision model's inputs for the same tokens.  That objective is GPTQ's own quadratic around another point:

    ‖X_fp Wᵀ − X Ŵᵀ‖² = ‖X (W* − Ŵ)ᵀ‖² + const,   W* = W · X_fpᵀX · (XᵀX)⁻¹   (least squares)

so the solver stays as it is and only its target moves from W to W*.  With the damping λ (the solver's relative
one) the solve is a ridge toward W: W* = W (X_fpᵀX + λI)(XᵀX + λI)⁻¹, which is W exactly when X_fp = X.  A strength
α < 1 takes W + α(W* − W), the partial correction GPTQv2 found better on small calibration sets.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def asymmetric_target(W: torch.Tensor, S: torch.Tensor, cross: torch.Tensor, damp: float = 0.01,
                      strength: float = 1.0) -> torch.Tensor:
    """W + strength·(W* − W) for W (rows, cols), S = XᵀX and cross = X_fpᵀX (cols, cols), all on one device;
    solved in float64 (a Cholesky of S + λI, λ = damp · mean(diag S)), returned in float32."""
    lam = damp * float(S.diagonal().double().mean())
    # W* = W (C + λI) (S + λI)⁻¹  <=>  (S + λI) W*ᵀ = (C + λI)ᵀ Wᵀ; the right side is a float32 GEMM, the solve
    # float64, one 1.6 GB matrix alive at a time for an 8B's down_proj (the GPU build's peak was here)
    rhs = torch.addmm(W.T, cross.T, W.T, alpha=1.0, beta=lam).double()
    A = S.double()
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info != 0:  # S too ill-conditioned for this λ even in float64: no correction rather than a wild one
        return W
    W64 = W.double()
    return (W64 + strength * (torch.cholesky_solve(rhs, L).T - W64)).float()

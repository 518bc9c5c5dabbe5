"""The GPTQ solver (edgequant.gptq.solve) on llama.cpp's grids, against independent references.

The loss checks use an identity of the OBS updates: with U the upper Cholesky factor of (H + λI)⁻¹ and
E = W - Ŵ, the solver's Σ (w - q)² / U_ii² / 2 (w: the error-updated weight when its column is rounded)
equals ½ tr(E (H + λI) Eᵀ).  It holds only if every update is the exact OBS one, and it only needs the
original W and the final Ŵ, so it checks both the bookkeeping and the algorithm.
"""

from __future__ import annotations

import dataclasses

import ggml_oracle
import gguf
import numpy as np
import pytest
import torch

from edgequant.convert.codecs import CODECS, codec
from edgequant.gptq import solve

F32 = np.float32


def correlated_inputs(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """n samples of cols features, mixed so that the features correlate, with uneven magnitudes as in LLMs."""
    mix = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    return (rng.standard_normal((n, cols)) @ mix * rng.lognormal(0, 0.5, cols)).astype(F32)


def problem(seed: int = 0, rows: int = 16, cols: int = 512, n: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, n, cols)
    W = (0.05 * rng.standard_normal((rows, cols))).astype(F32)
    return W, X, (2 * X.T @ X).astype(F32)


def output_error(X: np.ndarray, W: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.sum((X.astype(np.float64) @ (W - w_hat).T.astype(np.float64)) ** 2))


def solved_matrix(H: np.ndarray, damp: float) -> np.ndarray:
    """H + λI as the solver factorizes it: dead columns get H[i, i] = 1, λ = damp · mean(diag)."""
    H = H.astype(np.float64).copy()
    d = np.diagonal(H).copy()
    d[d == 0] = 1
    np.fill_diagonal(H, d)
    return H + damp * d.mean() * np.eye(len(H))


def obs_loss(W: np.ndarray, w_hat: np.ndarray, H: np.ndarray, damp: float) -> float:
    E = (W - w_hat).astype(np.float64)
    return 0.5 * float(np.einsum("ri,ij,rj->", E, solved_matrix(H, damp), E))


def assert_exact(c, sol) -> None:
    """The packed bytes dequantize, in libggml and in gguf-py, to w_hat bit for bit."""
    raw = c.pack(sol.blocks)
    assert np.array_equal(ggml_oracle.dequantize_row(c.qtype, raw).view(np.uint32), sol.w_hat.cpu().numpy().view(np.uint32))
    if c.qtype != gguf.GGMLQuantizationType.Q8_K:  # gguf-py does not dequantize Q8_K
        assert np.array_equal(gguf.quants.dequantize(raw, c.qtype).view(np.uint32), sol.w_hat.cpu().numpy().view(np.uint32))


def gptq_views(W: np.ndarray, w_hat: np.ndarray, H: np.ndarray, damp: float, S: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights as GPTQ saw them, recovered from its result alone: when rounding each column, and when
    entering each codec block of S columns (before the errors of that block's own columns).

    Each row's error is E = W - Ŵ = δ U, δ_j = (w_j - ŵ_j) / U_jj the scaled rounding errors; so δ = E U⁻¹,
    the weights at rounding are Ŵ + δ · diag(U), and a block's columns at its entry lack δ_i U_ij, i in the block.
    """
    U = np.linalg.cholesky(np.linalg.inv(solved_matrix(H, damp))).T
    delta = np.linalg.solve(U.T, (W - w_hat).astype(np.float64).T).T
    at_rounding = w_hat + delta * np.diagonal(U)
    at_entry = at_rounding.copy()
    for b in range(0, W.shape[1], S):
        blk = slice(b, b + S)
        at_entry[:, blk] += delta[:, blk] @ np.triu(U[blk, blk], 1)
    return at_rounding.astype(F32), at_entry.astype(F32)


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q6_K", "Q5_0", "IQ4_XS", "IQ4_NL"])
@pytest.mark.parametrize("block_size", [64, 128, 256])
def test_grids_fit_the_updated_weights(name, block_size):
    """Each codec block's grid is the codec's fit of the weights as updated when GPTQ entered it, and each code
    is the nearest level of its weight as updated when rounded.  (Block by block: float rounding may flip a fit.)"""
    c = codec(name)
    S = c.block_size
    W, _, H = problem(seed=9)
    sol = solve(W, H, c, block_size=block_size)
    at_rounding, at_entry = gptq_views(W, sol.w_hat.cpu().numpy(), H, 0.01, S)
    importance = np.diagonal(solved_matrix(H, 0.01)).astype(F32)
    grid = c.grid(sol.blocks)
    fits = [c.grid(c.fit(at_entry[:, i:i + S].copy(), importance[i:i + S])) for i in range(0, 512, S)]
    assert np.mean(np.concatenate([g.scale for g in fits], axis=1) == grid.scale) > 0.9
    assert np.mean(np.concatenate([g.offset for g in fits], axis=1) == grid.offset) > 0.9
    assert np.mean(c.codes(sol.blocks) == grid.quantize(at_rounding)) > 0.99


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_0", "IQ4_XS", "IQ4_NL"])
def test_uncorrelated_inputs_give_round_to_nearest(name):
    """H = I: no error to spread, so each block's grid is the codec's own fit and codes are its nearest levels."""
    c = codec(name)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 512)).astype(F32)
    sol = solve(W, np.eye(512, dtype=F32), c)
    importance = np.full(512, 1.01, dtype=F32)  # diag(H + λI), λ = 0.01 · mean(diag H)
    S = c.block_size
    reference = [c.grid(c.fit(W[:, i:i + S].copy(), importance[i:i + S])) for i in range(0, 512, S)]
    grid = c.grid(sol.blocks)
    assert np.array_equal(grid.scale, np.concatenate([g.scale for g in reference], axis=1))
    assert np.array_equal(grid.offset, np.concatenate([g.offset for g in reference], axis=1))
    assert np.array_equal(c.codes(sol.blocks), grid.quantize(W))


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q2_K", "Q6_K", "Q5_0", "IQ4_XS", "IQ4_NL"])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_importance_weighted_rtn(name, act_order):
    c = codec(name)
    W, X, H = problem()
    rtn = c.dequantize(c.fit(W, np.diagonal(H).copy()))
    sol = solve(W, H, c, act_order=act_order)
    assert output_error(X, W, sol.w_hat.cpu().numpy()) < 0.9 * output_error(X, W, rtn)


@pytest.mark.parametrize("qtype", [q for q, c in CODECS.items() if c.scalar_grid], ids=lambda t: t.name)
def test_packed_blocks_dequantize_to_w_hat(qtype):
    c = CODECS[qtype]
    W, _, H = problem(rows=4)
    sol = solve(W, H, c)
    assert np.array_equal(c.dequantize(sol.blocks).view(np.uint32), sol.w_hat.cpu().numpy().view(np.uint32))
    assert_exact(c, sol)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q2_K", "Q5_0", "IQ4_XS", "IQ4_NL"])
@pytest.mark.parametrize("act_order", [False, True])
def test_loss_is_the_obs_loss(name, act_order):
    c = codec(name)
    W, _, H = problem(seed=2)
    sol = solve(W, H, c, act_order=act_order)
    assert sol.loss == pytest.approx(obs_loss(W, sol.w_hat.cpu().numpy(), H, 0.01), rel=1e-4)
    assert sol.column_loss.shape == (512,) and sol.column_loss.sum() == pytest.approx(sol.loss, rel=1e-5)
    assert_exact(c, sol)


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_XS"])
def test_dead_columns_keep_their_weights(name):
    """Inputs that are always 0 in calibration: the weights stay (rounded on their grid), even a whole sub-block."""
    c = codec(name)
    W, X, _ = problem(seed=3)
    dead = np.zeros(512, dtype=bool)
    dead[[5, 300, 511]] = True
    dead[64:96] = True  # one whole sub-block of 32
    X[:, dead] = 0
    H = (2 * X.T @ X).astype(F32)
    sol = solve(W, H, c)
    # Dead columns neither receive nor spread error, so they are plain round-to-nearest of the original weights.
    assert np.array_equal(c.codes(sol.blocks)[:, dead], c.grid(sol.blocks).quantize(W)[:, dead])
    rel = np.linalg.norm(sol.w_hat.cpu().numpy()[:, dead] - W[:, dead]) / np.linalg.norm(W[:, dead])
    assert rel < 0.15
    assert sol.loss == pytest.approx(obs_loss(W, sol.w_hat.cpu().numpy(), H, 0.01), rel=1e-4)
    rtn = c.dequantize(c.fit(W, np.diagonal(H).copy()))
    assert output_error(X, W, sol.w_hat.cpu().numpy()) < 0.9 * output_error(X, W, rtn)


def test_indefinite_h_escalates_damping():
    c = codec("Q4_K")
    W, _, H = problem(seed=4)
    shift = 0.05 * np.diagonal(H).mean()  # smallest eigenvalue about -5% of the mean diagonal: 1% damping fails
    H = (H - shift * np.eye(512)).astype(F32)
    sol = solve(W, H, c)
    assert sol.damp == pytest.approx(0.1)
    assert sol.loss == pytest.approx(obs_loss(W, sol.w_hat.cpu().numpy(), H, 0.1), rel=1e-4)
    assert_exact(c, sol)


def test_hopeless_h_is_an_error():
    W, _, _ = problem(rows=2)
    with pytest.raises(ValueError, match="positive definite"):
        solve(W, -np.eye(512, dtype=F32), codec("Q4_K"))


@pytest.mark.parametrize("name, sizes", [("Q4_K", (64, 128, 256, 512)), ("Q4_0", (16, 32, 128)),
                                         ("IQ4_XS", (64, 256, 512))])
def test_lazy_block_size_does_not_change_the_result(name, sizes):
    """Lazy batching is exact: only float rounding may differ.  (A fit on weights that missed a trailing
    update, e.g. the second half of a 256-column block with block_size 128, would change the grid.)"""
    c = codec(name)
    W, _, H = problem(seed=5)
    first, *others = [solve(W, H, c, block_size=b) for b in sizes]
    for sol in others:  # a fit flipped by rounding changes the rest of its row, hence 95%
        assert sol.loss == pytest.approx(first.loss, rel=2e-3)
        assert np.mean(c.codes(sol.blocks) == c.codes(first.blocks)) > 0.95


def test_block_size_must_align_with_the_codec():
    W, _, H = problem(rows=2)
    with pytest.raises(ValueError, match="block_size"):
        solve(W, H, codec("Q4_K"), block_size=96)


@pytest.mark.parametrize("name", ["Q6_K", "IQ4_XS"])
def test_act_order_stores_codes_in_original_column_order(name):
    """The grid is the plain importance-weighted fit of W; only codes change, and they line up with W's columns."""
    c = codec(name)
    W, X, H = problem(seed=6)
    importance = np.diagonal(H) + 0.01 * np.diagonal(H).mean()
    sol = solve(W, H, c, act_order=True)
    fitted = c.fit(W, importance.astype(F32))
    assert np.array_equal(c.grid(sol.blocks).scale, c.grid(fitted).scale)
    assert np.array_equal(c.grid(sol.blocks).offset, c.grid(fitted).offset)
    assert output_error(X, W, sol.w_hat.cpu().numpy()) < 0.9 * output_error(X, W, c.dequantize(fitted))


def test_torch_inputs_and_fields():
    c = codec("Q4_K")
    W, _, H = problem(seed=7, rows=4)
    a = solve(W, H, c)
    b = solve(torch.from_numpy(W), torch.from_numpy(H), c)
    assert np.array_equal(a.w_hat.cpu().numpy(), b.w_hat.cpu().numpy()) and a.loss == b.loss
    assert [f.name for f in dataclasses.fields(a.blocks)] == [f.name for f in dataclasses.fields(c.fit(W))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    c = codec("Q4_K")
    W, _, H = problem(seed=8, rows=64)
    cpu = solve(W, H, c)
    gpu = solve(torch.from_numpy(W).cuda(), torch.from_numpy(H).cuda(), c)
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-3)
    assert np.mean(c.codes(gpu.blocks) == c.codes(cpu.blocks)) > 0.99
    assert_exact(c, gpu)


# IQ4_XS at 1e30: the squares in ggml's scale search overflow float32, its NaN sub-block scales never win the
# super-block's, and ggml writes d = 0 (so does the codec, byte for byte): 1e10 overflows only float16.
@pytest.mark.parametrize("qtype, magnitude", [("Q4_K", 1e30), ("Q6_K", 1e30), ("Q8_0", 1e30), ("IQ4_NL", 1e30),
                                              ("IQ4_XS", 1e10)])
def test_weights_whose_block_scales_overflow_float16_are_refused(qtype, magnitude):
    """Finite weights too large for float16 scales: a ValueError that says so, not NaN weights."""
    X = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="overflow float16"):
        solve(np.full((8, 256), magnitude, np.float32), 2 * X.T @ X / 512, codec(qtype))

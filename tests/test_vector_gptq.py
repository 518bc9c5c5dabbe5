"""Vector GPTQ (edgequant.gptq.vector, through edgequant.gptq.solve) on the lattice i-quants' codebooks.

Every check compares the solver with something it does not compute itself: libggml's and gguf-py's dequantization
of the packed bytes, the OBS identity (the solver's Σ err²/2 equals ½ tr(E (H + λI) Eᵀ) only if every group's
update is the exact one, test_gptq_solver's docstring), and the codec's own importance-weighted fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant.convert.codecs import CODECS, codec
from edgequant.gptq import solve
from test_gptq_solver import assert_exact, obs_loss, problem

LATTICE = [c.name for c in CODECS.values() if not c.scalar_grid]
F32 = np.float32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_loss(c, W, H, damp=0.01):
    """The loss of what llama-quantize --imatrix would write with the solver's importance, diag(H + λI)."""
    importance = (np.diagonal(H) + damp * np.diagonal(H).mean()).astype(F32)
    return obs_loss(W, c.dequantize(c.fit(W, importance)), H, damp)


def test_every_lattice_type_is_covered():
    from edgequant.gptq.vector import LATTICES
    assert sorted(LATTICE) == sorted(LATTICES)


@pytest.mark.parametrize("name", LATTICE)
def test_bytes_exact_and_loss_below_the_fit(name):
    c = codec(name)
    W, _, H = problem(seed=1, rows=24, cols=512, n=2048)
    sol = solve(W, H, c, refine=0)
    assert np.array_equal(c.dequantize(c.unpack(c.pack(sol.blocks))).view(np.uint32),
                          sol.w_hat.numpy().view(np.uint32))
    assert_exact(c, sol)
    exact = obs_loss(W, sol.w_hat.numpy(), H, 0.01)
    assert sol.loss == pytest.approx(exact, rel=1e-4)  # the OBS identity: every group's update was exact
    # measured 0.51 (IQ3_S) to 0.66 (IQ3_XXS, IQ1_S) of the fit's loss on 64 rows
    assert exact < 0.8 * fit_loss(c, W, H)


@pytest.mark.parametrize("name", LATTICE)
def test_uncorrelated_h_is_about_the_fit(name):
    """With a diagonal H nothing propagates: the scales are the fit's, and only the point choice can differ (the
    exact metric's own, given the signs, against ggml's search)."""
    c = codec(name)
    rng = np.random.default_rng(3)
    W = (0.05 * rng.standard_normal((16, 512))).astype(F32)
    H = np.diag(rng.lognormal(0, 0.5, 512) * 100).astype(F32)
    sol = solve(W, H, c, refine=0)
    assert_exact(c, sol)
    ratio = obs_loss(W, sol.w_hat.numpy(), H, 0.01) / fit_loss(c, W, H)
    assert 0.8 < ratio < 1.02, ratio


@pytest.mark.parametrize("name", LATTICE)
def test_act_order_in_runs_of_8_columns(name):
    """act_order for a lattice type: runs of 8 columns (whole groups) by descending Σ diag(H), on scales fitted once
    from the original weights (GGUF cannot record a permutation).  The bytes dequantize to Ŵ exactly, the scales are
    the codec's fit of W, and the OBS identity holds: every group's update was exact in the permuted order."""
    c = codec(name)
    W, _, H = problem(seed=4, rows=24, cols=512, n=2048)
    d = np.repeat(np.random.default_rng(5).lognormal(0, 1, 64), 8) ** 0.5  # runs of 8 of unequal importance
    H = (H * d[:, None] * d[None, :]).astype(F32)
    sol = solve(W, H, c, act_order=True, refine=0)
    assert_exact(c, sol)
    static = c.fit(W, (np.diagonal(H) + 0.01 * np.diagonal(H).mean()).astype(F32))
    assert np.array_equal(sol.blocks.d, static.d) and np.array_equal(sol.blocks.scales, static.scales)
    exact = obs_loss(W, sol.w_hat.numpy(), H, 0.01)
    assert sol.loss == pytest.approx(exact, rel=1e-4)
    assert exact < 0.8 * fit_loss(c, W, H)
    assert not np.array_equal(sol.w_hat.numpy(), solve(W, H, c, refine=0).w_hat.numpy())


@pytest.mark.parametrize("name", ["IQ3_S", "IQ2_S", "IQ2_XXS", "IQ2_XS"])
def test_refine_sign_moves_lower_the_loss(name, monkeypatch):
    """Refine's second candidate per group, the signs of its continuous optimum (free-sign types, and the parity
    types of 8): lower loss than refining with GPTQ's signs kept, and some signs do change."""
    from edgequant.gptq import vector
    c = codec(name)
    W, _, H = problem(seed=1, rows=24, cols=512, n=2048)
    with_moves = solve(W, H, c, refine=2)
    monkeypatch.setattr(vector, "SIGN_MOVES", False)
    kept = solve(W, H, c, refine=2)
    assert_exact(c, with_moves)
    assert not np.array_equal(with_moves.blocks.signs, kept.blocks.signs)
    assert obs_loss(W, with_moves.w_hat.numpy(), H, 0.01) < 0.99 * obs_loss(W, kept.w_hat.numpy(), H, 0.01)


@pytest.mark.parametrize("name", LATTICE)
def test_refine_scale_model_is_the_codecs(name):
    """refine_lattice steps the stored integer l of scale = unit·d·(l + ½): equal, bit for bit, to the multiplier
    the codec's dequantization uses (Lattice.scale, itself checked by the bytes tests above), for every l."""
    from edgequant.gptq.vector import LATTICES
    lat, c = LATTICES[name], codec(name)
    W, _, H = problem(seed=2, rows=8, cols=512, n=512)
    blocks = c.fit(W, np.diagonal(H).astype(F32))
    for l in range(2 ** lat.scale_bits):
        b = type(blocks)(**{**blocks.__dict__, "scales": np.full_like(blocks.scales, l)})
        ours = F32(lat.unit) * b.d.astype(F32)[..., None] * (F32(l) + F32(0.5))
        theirs = lat.scale(b)
        ours = np.repeat(ours, theirs.shape[-1] // ours.shape[-1], axis=-1)
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), l


@pytest.mark.parametrize("name", LATTICE)
def test_refine_only_lowers_the_loss(name):
    """--refine for lattice types: coordinate descent on the damped loss it works on (H + 0.1·mean(diag H)·I) never
    goes up round by round, the bytes still dequantize to Ŵ exactly, and the solution's loss is its Ŵ's."""
    c = codec(name)
    W, _, H = problem(seed=1, rows=24, cols=512, n=2048)
    sols = [solve(W, H, c, refine=r) for r in (0, 1, 2)]
    refined = [obs_loss(W, s.w_hat.numpy(), H, 0.1) for s in sols]
    assert refined[1] <= refined[0] * (1 + 1e-6) and refined[2] <= refined[1] * (1 + 1e-6), refined
    for s in sols[1:]:
        assert_exact(c, s)
        assert s.loss == pytest.approx(obs_loss(W, s.w_hat.numpy(), H, 0.01), rel=1e-4)
    # measured 0.77 (IQ1_S) to 0.90 (IQ3_S) of GPTQ's loss after 2 rounds on this problem
    assert obs_loss(W, sols[2].w_hat.numpy(), H, 0.01) < 0.97 * obs_loss(W, sols[0].w_hat.numpy(), H, 0.01)

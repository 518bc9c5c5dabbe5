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


def test_act_order_and_refine_are_refused():
    W, _, H = problem(rows=4)
    for kw in ({"act_order": True}, {"refine": 1}):
        with pytest.raises(ValueError, match="lattice"):
            solve(W, H, codec("IQ3_S"), **kw)

"""edgequant.gptq.refine: coordinate descent on the stored integers after GPTQ, against float64 references."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from edgequant.convert.codecs import codec
from edgequant.gptq import solve
from edgequant.gptq.refine import polish_codes, refit_scales, torch_polish, torch_refit

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # fp16 scales, refit as integer steps of their ulp
TABLE_TYPES = ["IQ4_NL", "IQ4_XS"]  # codes index a table; IQ4_XS's 6-bit scales, IQ4_NL's fp16 scale as steps


def problem(rows: int, cols: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4 * cols, cols)) @ (np.eye(cols) + 0.2 * rng.standard_normal((cols, cols)))
    X *= rng.lognormal(0, 0.7, cols)
    W = 0.05 * rng.standard_normal((rows, cols))
    return torch.from_numpy(W.astype(np.float32)), torch.from_numpy((2 * X.T @ X / len(X)).astype(np.float32))


def loss64(W, w_hat, H) -> float:
    E = np.asarray(w_hat, dtype=np.float64) - W.double().numpy()
    return float(np.einsum("ij,jk,ik->", E, H.double().numpy(), E))


@pytest.mark.parametrize("name", K_TYPES + ["Q4_0", "Q5_1", "Q8_0"] + TABLE_TYPES)
def test_each_round_lowers_the_loss_and_blocks_stay_exact(name):
    c = codec(name)
    W, H = problem(24, 512)
    losses = [solve(W, H, c, refine=r).loss for r in (0, 1, 2, 3)]
    assert losses[1] < losses[0] and all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    sol = solve(W, H, c, refine=2)
    assert np.array_equal(c.dequantize(c.unpack(c.pack(sol.blocks))), sol.w_hat.cpu().numpy())
    assert sol.loss == pytest.approx(0.5 * loss64(W, sol.w_hat.cpu().numpy(), H + H.diagonal().mean() * sol.damp * torch.eye(512)), rel=1e-4)


def polish_reference(W, H, q, scale, offset, qmin, qmax, levels=None):
    """One greedy pass over the codes in column order, each ±1 move judged on the full float64 loss."""
    q = q.copy()
    group = q.shape[1] // scale.shape[1]
    level = (lambda c: c) if levels is None else (lambda c: levels[c.astype(int)])  # noqa: E731
    for j in range(q.shape[1]):
        for r in range(q.shape[0]):
            best, best_q = None, q[r, j]
            for cand in (q[r, j], q[r, j] + 1, q[r, j] - 1):
                if not qmin <= cand <= qmax:
                    continue
                q[r, j] = cand
                e = scale[r] .repeat(group) * level(q[r]) + offset[r].repeat(group) - W[r]
                val = e @ H @ e
                if best is None or val < best - 1e-12 * abs(best):
                    best, best_q = val, cand
            q[r, j] = best_q
    return q


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL"])
def test_polish_is_the_greedy_pass_of_the_exact_loss(name):
    c = codec(name)
    W, H = problem(6, 64, seed=3)
    blocks = c.fit(W.numpy())
    g = c.grid(blocks)
    q = c.codes(blocks).astype(np.float64)
    levels = None if g.levels is None else g.levels.astype(np.float64)
    want = polish_reference(W.double().numpy(), H.double().numpy(), q, g.scale.astype(np.float64),
                            g.offset.astype(np.float64), g.qmin, g.qmax, levels)
    got = torch.from_numpy(q.astype(np.float32))
    polish_codes(W, H, got, torch.from_numpy(g.scale), torch.from_numpy(g.offset), g.qmin, g.qmax, 16, torch_polish,
                 None if g.levels is None else torch.from_numpy(g.levels))
    assert (got.numpy() != q).any()  # the round-to-nearest fit is not optimal under a correlated H
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", K_TYPES + LEGACY_TYPES + TABLE_TYPES)
def test_refit_keeps_scales_in_range_and_lowers_the_loss(name):
    c = codec(name)
    W, H = problem(16, 512, seed=2)
    blocks = c.fit(W.numpy(), H.diagonal().numpy())
    ints = c.integer_scales(blocks)
    d, sc = torch.from_numpy(ints.d), torch.from_numpy(ints.scale).float()
    dmin, mn = (torch.from_numpy(ints.dmin), torch.from_numpy(ints.min).float()) if ints.min is not None else (None, None)
    q = torch.from_numpy(c.grid(blocks).level(c.codes(blocks)))  # Ŵ is linear in the level, the refit's variable
    refit_scales(W, H, q, d, sc, dmin, mn, ints.lo, ints.hi, torch.from_numpy(c.grid(blocks).offset), 128, torch_refit)
    new = c.with_integer_scales(blocks, sc.int().numpy(), None if mn is None else mn.int().numpy())
    new_ints = c.integer_scales(new)
    assert ints.lo <= new_ints.scale.min() and new_ints.scale.max() <= ints.hi
    assert (new_ints.scale != ints.scale).any()
    assert loss64(W, c.dequantize(new), H) < loss64(W, c.dequantize(blocks), H)
    # the grid is rebuilt from the integers exactly as refine does it on the device
    assert np.array_equal(c.grid(new).scale, (d * sc).numpy())
    if mn is not None:
        assert np.array_equal(c.grid(new).offset, (-(dmin * mn)).numpy())


@pytest.mark.parametrize("name", K_TYPES + LEGACY_TYPES + TABLE_TYPES)
def test_integer_scales_round_trip_and_range_errors(name):
    c = codec(name)
    W, _ = problem(4, 256)
    blocks = c.fit(W.numpy())
    ints = c.integer_scales(blocks)
    same = c.with_integer_scales(blocks, ints.scale, ints.min)
    assert c.pack(same).tobytes() == c.pack(blocks).tobytes()
    with pytest.raises(ValueError, match="outside"):
        c.with_integer_scales(blocks, np.full_like(ints.scale, ints.hi + 1), ints.min)


@pytest.mark.parametrize("name", LEGACY_TYPES + ["IQ4_NL"])
def test_fp16_scales_move_over_fp16_values(name):
    """A 32-wide type's fp16 scale (and min) as integer steps: every step in range lands on an fp16 value that
    dequantizes as scale * step count, and a refit on a Hessian that wants larger scales takes them."""
    c = codec(name)
    W, H = problem(4, 64, seed=5)
    blocks = c.fit(W.numpy())
    ints = c.integer_scales(blocks)
    for k in (ints.lo, ints.hi, ints.scale + 1):
        k = np.broadcast_to(k, ints.scale.shape)
        mins = None if ints.min is None else np.broadcast_to(k, ints.min.shape)
        moved = c.with_integer_scales(blocks, k, mins)
        assert np.array_equal(c.grid(moved).scale, ints.d * k.astype(np.float32))
        assert np.array_equal(c.unpack(c.pack(moved)).d.view(np.uint16), moved.d.view(np.uint16))
    degenerate = dataclasses.replace(blocks, d=np.full_like(blocks.d, np.inf))
    assert c.integer_scales(degenerate) is None  # no refit of a block that overflowed


def test_iq4_xs_scales_are_the_stored_six_bits_less_32():
    """IQ4_XS's integer scales are l = ls - 32 under d: every l in [-32, 31] is stored as it is, and the grid's scale
    is d * l in float32, as ggml dequantizes it."""
    c = codec("IQ4_XS")
    W, _ = problem(4, 512, seed=6)
    blocks = c.fit(W.numpy())
    ints = c.integer_scales(blocks)
    assert (ints.lo, ints.hi, ints.min) == (-32, 31, None)
    np.testing.assert_array_equal(ints.scale, blocks.scales.reshape(4, -1).astype(np.int32) - 32)
    for l in (-32, 31, 0, -7):
        moved = c.with_integer_scales(blocks, np.full_like(ints.scale, l))
        np.testing.assert_array_equal(c.unpack(c.pack(moved)).scales, np.full_like(blocks.scales, l + 32))
        np.testing.assert_array_equal(c.grid(moved).scale, ints.d * np.float32(l))
        raw = c.pack(moved)
        np.testing.assert_array_equal(c.dequantize(moved).view(np.uint32),
                                      gguf.quants.dequantize(raw, c.qtype).reshape(4, -1).view(np.uint32))

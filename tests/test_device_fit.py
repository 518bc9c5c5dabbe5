"""edgequant.gptq.device_fit against the codecs' numpy `fit` (itself bit-exact with libggml), bit for bit: every
Blocks field, the packed bytes and the grid, with torch on the CPU and, where there is one, on a CUDA device (eager
and replayed from CUDA graphs, which several calls of one shape reuse)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgequant.convert.codecs import codec
from edgequant.convert.codecs.search_affine import make_qkx3_quants, make_qp_quants
from edgequant.convert.codecs.search_symmetric import make_qx_quants
from edgequant.gptq import device_fit as df
from test_codecs_affine import adversarial_rows  # zero, -0.0, constant, subnormal, fp16-limit, tie rows (512 wide)

TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
F32 = np.float32


def importances(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    holes = (rng.random(n) + 0.01).astype(F32)
    holes[rng.random(n) < 0.2] = 0
    holes[32:64] = 0  # a whole sub-block without importance
    return {
        "random": (rng.random(n) * 10 + 1e-3).astype(F32),
        "zeros": holes,
        "skewed": np.exp(3 * rng.standard_normal(n)).astype(F32),
    }


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool((a.view(np.uint8) == b.view(np.uint8)).all())


def check(name: str, w: np.ndarray, importance: np.ndarray, device: str, w_t: torch.Tensor | None = None) -> None:
    """device_fit == codec.fit, field by field, and its bytes are codec.quantize's."""
    c = codec(name)
    with np.errstate(all="ignore"):
        ref = c.fit(w, importance)
        raw = c.quantize(w, importance)
    w_t = torch.from_numpy(w).to(device) if w_t is None else w_t
    grid = c.grid(ref)
    for graph in (False, True) if device == "cuda" else (False,):  # eager, and replayed from a CUDA graph
        fit = df.device_fit(c, w_t, torch.from_numpy(importance).to(device), graph=graph)
        assert fit.scale.device.type == device
        got = fit.blocks()
        for field in dataclasses.fields(ref):
            assert same_bits(getattr(got, field.name), getattr(ref, field.name)), (field.name, graph)
        assert np.array_equal(c.pack(got), raw)
        assert same_bits(fit.scale.cpu().numpy(), grid.scale) and same_bits(fit.offset.cpu().numpy(), grid.offset)
        assert (fit.group, fit.qmin, fit.qmax) == (grid.group, grid.qmin, grid.qmax)
        assert same_bits(fit.dequantize().cpu().numpy(), c.dequantize(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (7, 2), (33, 3)])
def test_gaussian_rows_with_outliers(name, rows, blocks, device):
    rng = np.random.default_rng(rows * 10 + blocks)
    n = 256 * blocks
    w = (rng.standard_normal((rows, n)) * np.exp(rng.standard_normal((rows, 1)))).astype(F32)
    hit = rng.random((rows, n)) < 0.01
    w[hit] = (rng.standard_normal(hit.sum()) * 40).astype(F32)
    for importance in importances(rng, n).values():
        check(name, w, importance, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TYPES)
def test_adversarial_rows(name, device):
    rng = np.random.default_rng(5)
    w = adversarial_rows(rng)
    for importance in importances(rng, w.shape[1]).values():
        check(name, w, importance, device)


@pytest.mark.parametrize("device", DEVICES)
def test_solver_layout_and_concat(device):
    """The solver hands a transposed view (Wt[c:c + 256].T); fits of consecutive super-blocks concatenate to the
    fit of the whole matrix."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 768)).astype(F32)
    importance = importances(rng, 768)["zeros"]
    c = codec("Q4_K")
    wt = torch.from_numpy(w.T.copy()).to(device)
    check("Q4_K", w[:, 256:512], importance[256:512], device, w_t=wt[256:512].T)
    imp = torch.from_numpy(importance).to(device)
    parts = [df.device_fit(c, wt[i:i + 256].T, imp[i:i + 256]) for i in range(0, 768, 256)]
    whole, ref = df.DeviceFit.concat(parts), c.fit(w, importance)
    for field in dataclasses.fields(ref):
        assert same_bits(getattr(whole.blocks(), field.name), getattr(ref, field.name)), field.name
    assert same_bits(whole.scale.cpu().numpy(), c.grid(ref).scale)


@pytest.mark.parametrize("device", DEVICES)
def test_searches_match_numpy(device):
    """The searches alone, on inputs the block types rarely produce: negative values (make_qp_quants wraps them
    into uint8), groups whose refinement stops at different passes, flat and all-zero groups."""
    rng = np.random.default_rng(11)
    groups = 4000
    x = (rng.standard_normal((8, groups)) * np.exp(2 * rng.standard_normal(groups))).astype(F32)
    x[:, :groups // 2] = np.abs(x[:, :groups // 2])
    x[:, 10:20] = 0
    x[:, 20:30] = 1.5
    weights = (rng.random((8, groups)) * (rng.random((8, groups)) > 0.1)).astype(F32)
    t = {k: torch.from_numpy(v).to(device) for k, v in dict(x=x, w=weights).items()}
    with np.errstate(all="ignore"):
        for nmax in (15, 63):
            scale, codes = make_qp_quants(x, weights, nmax)
            got = df.make_qp_quants(t["x"], t["w"], nmax)
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].cpu().numpy(), codes)
        for nmax in (3, 15):
            expected = make_qkx3_quants(x, weights, nmax, -0.9, 0.05, 36, use_mad=False)
            got = df.make_qkx3_quants(t["x"], t["w"], nmax, -0.9, 0.05, 36)
            for a, b in zip(got, expected):
                assert same_bits(a.cpu().numpy(), b)
        for nmax in (4, 32):
            scale, codes = make_qx_quants(x.T, nmax, weights.T)
            got = df.make_qx_quants(t["x"], t["w"], nmax)
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].T.cpu().numpy(), codes)


def test_uncovered_codecs_and_no_importance():
    w = torch.zeros(2, 256)
    imp = torch.ones(256)
    assert df.device_fit(codec("Q8_0"), w, imp) is None
    assert df.fit_on_device(codec("Q4_0"), w, imp) is None
    assert df.fit_on_device(codec("Q4_K"), w, None) is None
    with pytest.raises(ValueError):
        df.device_fit(codec("Q4_K"), torch.zeros(2, 128), imp[:128])


def test_large_slices_go_in_chunks_of_rows(monkeypatch):
    """Above MAX_WEIGHTS the fit runs on chunks of rows (an output head of 128K rows would need ~75 GB at once)."""
    monkeypatch.setattr(df, "MAX_WEIGHTS", 5 * 512)
    rng = np.random.default_rng(9)
    w = rng.standard_normal((23, 512)).astype(F32)
    check("Q6_K", w, importances(rng, 512)["skewed"], "cpu")

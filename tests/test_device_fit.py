"""edgequant.gptq.device_fit against the codecs' numpy `fit` (itself bit-exact with libggml), bit for bit: every
Blocks field, the packed bytes and the grid, with torch on the CPU and, where there is one, on a CUDA device (eager
and replayed from CUDA graphs, which several calls of one shape reuse), there both with the Triton kernels
(edgequant.gptq.triton_fit, the default on CUDA) and with torch.

The Triton kernels are also checked without a GPU, twice: run by the interpreter on the CPU (TRITON_INTERPRET=1,
which must be set before triton is imported, so in a child process: this file run as a script, printing one JSON
line), and compiled to sm_90 PTX, whose float32 instructions must all be correctly rounded ones (what the
interpreter, computing in numpy, cannot show).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import traceback

import numpy as np
import pytest
import torch

from edgequant.convert.codecs import codec
from edgequant.convert.codecs.search_affine import in_order_sum, make_qkx3_quants, make_qp_quants
from edgequant.convert.codecs.search_symmetric import make_qx_quants
from edgequant.gptq import device_fit as df
from interpreted import run_interpreted
from test_codecs_affine import adversarial_rows  # zero, -0.0, constant, subnormal, fp16-limit, tie rows (512 wide)

TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
# "cuda": the Triton kernels (device_fit's default there), "cuda-torch": torch's
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA), pytest.param("cuda-torch", marks=CUDA)]
F32 = np.float32
# The interpreter's fits (codec, importance): one matrix of adversarial and Gaussian rows each, a few seconds per
# make_qkx3_quants (37 trials x 2 passes x 32 elements, each step a few numpy calls).
INTERPRETED_FITS = [("Q4_K", "zeros"), ("Q5_K", "skewed"), ("Q2_K", "random"), ("Q6_K", "zeros"), ("Q6_K", "skewed"),
                    ("Q3_K", "zeros"), ("Q3_K", "skewed")]
INTERPRETED = ["in_order_sum", "searches"] + [f"{name}-{imp}" for name, imp in INTERPRETED_FITS]


def on(device: str, monkeypatch) -> str:
    """The torch device of a DEVICES entry, device_fit's KERNELS set for it."""
    monkeypatch.setattr(df, "KERNELS", "torch" if device.endswith("-torch") else "auto")
    return device.removesuffix("-torch")


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


def gaussian_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Gaussian rows of uneven magnitudes with 1 % outliers."""
    w = (rng.standard_normal((rows, n)) * np.exp(rng.standard_normal((rows, 1)))).astype(F32)
    hit = rng.random((rows, n)) < 0.01
    w[hit] = (rng.standard_normal(hit.sum()) * 40).astype(F32)
    return w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (7, 2), (33, 3)])
def test_gaussian_rows_with_outliers(name, rows, blocks, device, monkeypatch):
    device = on(device, monkeypatch)
    rng = np.random.default_rng(rows * 10 + blocks)
    n = 256 * blocks
    w = gaussian_rows(rng, rows, n)
    for importance in importances(rng, n).values():
        check(name, w, importance, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TYPES)
def test_adversarial_rows(name, device, monkeypatch):
    device = on(device, monkeypatch)
    rng = np.random.default_rng(5)
    w = adversarial_rows(rng)
    for importance in importances(rng, w.shape[1]).values():
        check(name, w, importance, device)


@pytest.mark.parametrize("device", DEVICES)
def test_solver_layout_and_concat(device, monkeypatch):
    """The solver hands a transposed view (Wt[c:c + 256].T); fits of consecutive super-blocks concatenate to the
    fit of the whole matrix."""
    device = on(device, monkeypatch)
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
def test_searches_match_numpy(device, monkeypatch):
    check_searches(on(device, monkeypatch), 4000, [(3, -0.9, 0.05, 36), (15, -0.9, 0.05, 36)])


def check_searches(device: str, groups: int, qkx3_grids: list[tuple]) -> None:
    """The searches alone, on inputs the block types rarely produce: negative values (make_qp_quants wraps them
    into uint8), groups whose refinement stops at different passes, flat and all-zero groups; make_qkx3_quants
    with each (nmax, rmin, rdelta, nstep) of qkx3_grids."""
    rng = np.random.default_rng(11)
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
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].cpu().numpy(), codes), nmax
        for grid in qkx3_grids:
            expected = make_qkx3_quants(x, weights, *grid, use_mad=False)
            got = df.make_qkx3_quants(t["x"], t["w"], *grid)
            for a, b in zip(got, expected):
                assert same_bits(a.cpu().numpy(), b), grid
        for nmax in (4, 32):
            scale, codes = make_qx_quants(x.T, nmax, weights.T)
            got = df.make_qx_quants(t["x"], t["w"], nmax)
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].T.cpu().numpy(), codes), nmax


@pytest.mark.parametrize("device", DEVICES)
def test_in_order_sum(device, monkeypatch):
    check_sums(on(device, monkeypatch))


def check_sums(device: str) -> None:
    """in_order_sum == search_affine.in_order_sum over dim 0 of any shape, from zero or from the first term: an all
    -0.0 column stays -0.0 only from the first term; magnitudes spread enough that another order rounds otherwise."""
    rng = np.random.default_rng(2)
    t = (rng.standard_normal((37, 5, 70)) * np.exp(4 * rng.standard_normal((37, 1, 70)))).astype(F32)
    t[:, 0] = -0.0
    t[:, 1, :10] = 0.0
    t[::2, 1, 10:20] = -0.0
    t[:, 2, :5] = rng.standard_normal((37, 5)).astype(F32) * F32(1e-41)  # subnormal terms and sums
    tensor = torch.from_numpy(t).to(device)
    for from_zero in (True, False):
        expected = in_order_sum(t, from_zero)
        assert not same_bits(expected, t.sum(0, dtype=np.float64).astype(F32))  # (the order shows)
        assert same_bits(df.in_order_sum(tensor, from_zero).cpu().numpy(), expected), from_zero
        view = tensor.transpose(1, 2)  # not contiguous
        assert same_bits(df.in_order_sum(view, from_zero).cpu().numpy(), expected.T), from_zero
    assert same_bits(in_order_sum(t, True)[0], np.zeros(70, F32))
    assert same_bits(in_order_sum(t, False)[0], np.full(70, -0.0, F32))


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


# --- the Triton kernels without a GPU ------------------------------------------------------------------------


def interpreted_cases() -> dict:
    """INTERPRETED's checks, each a function that raises AssertionError on a mismatch (run in the child process)."""
    rng = np.random.default_rng(21)
    w = np.concatenate([adversarial_rows(rng), gaussian_rows(rng, 8, 512)])
    weights = importances(rng, 512)
    cases = {"in_order_sum": functools.partial(check_sums, "cpu"),
             "searches": functools.partial(check_searches, "cpu", 600, [(3, -0.5, 0.1, 10)])}
    for name, imp in INTERPRETED_FITS:
        cases[f"{name}-{imp}"] = functools.partial(check, name, w, weights[imp], "cpu")
    return cases


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", INTERPRETED)
def test_triton_kernels_interpreted(interpreted, case):
    """device_fit with KERNELS = "triton" on the CPU, under TRITON_INTERPRET=1: bit for bit the numpy codecs."""
    assert interpreted[case] is None, interpreted[case]


class _Recorder:
    """Stands for a Triton kernel: records each launch (kernel, args, kwargs) instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


# float32 instructions that round once, to nearest (or are exact): anything else (fma, div.full, .approx, .ftz, ...)
# would break bit-exactness on the GPU.  min/max are exact (Triton 3.6 emits max.f32 for tl.maximum; inputs are finite)
EXACT_F32 = re.compile(r"(add|sub|mul|div)\.rn\.f32|abs\.f32|(min|max)(\.NaN)?\.f32|setp\.[a-z]+\.f32|selp\.f32"
                       r"|cvt\.rn\.f32\.[su]32")


def test_triton_kernels_compile_to_correctly_rounded_ptx(monkeypatch):
    """Each kernel device_fit launches (for every type), compiled for sm_90 as launched: its float32 instructions
    are all EXACT_F32 ones, with divisions among them (the kernels' own `div_rn`)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels are interpreted functions here")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from edgequant.gptq import triton_fit

    launches = []
    for name in ("_sum_kernel", "_qkx3_kernel", "_qp_kernel", "_qx_kernel"):
        monkeypatch.setattr(triton_fit, name, _Recorder(getattr(triton_fit, name), launches))
    monkeypatch.setattr(df, "KERNELS", "triton")
    with np.errstate(all="ignore"):
        for name in TYPES:  # on the CPU: nothing runs, the searches hand back uninitialized memory
            df.device_fit(codec(name), torch.zeros(2, 256), torch.ones(256))
    types = {torch.float32: "*fp32", torch.uint8: "*u8", int: "i32", float: "fp32"}
    compiled, divisions = set(), 0
    for kernel, args, kwargs in launches:
        constexprs = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
        signature = {p: types[a.dtype if isinstance(a, torch.Tensor) else type(a)]
                     for p, a in zip(kernel.arg_names, args)}
        key = (kernel.fn.__name__, tuple(constexprs.items()))
        if key in compiled:
            continue
        compiled.add(key)
        assert kwargs["enable_fp_fusion"] is False
        options = {k: kwargs[k] for k in ("num_warps", "enable_fp_fusion")}
        ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M)
        inexact = {op for op in ops if re.search(r"f32|f64|f16|fma|mad\.f|approx|ftz|rcp|sqrt", op)
                   and not EXACT_F32.fullmatch(op)}
        assert not inexact, (key, inexact)
        divisions += ops.count("div.rn.f32")
    assert {k[0] for k in compiled} == {"_sum_kernel", "_qkx3_kernel", "_qp_kernel", "_qx_kernel"} and divisions


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from edgequant.gptq import triton_fit

    torch.set_num_threads(1)  # small ops: threads only spin against each other
    triton_fit.BLOCK_G = 1024  # the interpreter runs programs one after another: few wide ones (same kernels)
    df.KERNELS = "triton"
    results = {}
    for case, run in interpreted_cases().items():
        try:
            run()
            results[case] = None
        except AssertionError:
            results[case] = traceback.format_exc(limit=-2)
    assert list(results) == INTERPRETED
    print(json.dumps(results))

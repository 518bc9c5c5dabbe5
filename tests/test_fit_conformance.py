"""Every fit backend (edgequant.gptq.fitter) against the specification, the numpy codecs, and against libggml.

The matrix: backend x every codec it covers x {plain, importance} x {random, adversarial, overflowing rows}, each
fit checked for every Blocks field, the packed bytes, the grid and the dequantized weights against numpy's, and
its bytes against ggml_quantize_chunk's (not on overflowing rows: there squares overflow float32, and the numpy
codecs, which every backend follows, can differ from ggml for Q3_K/Q6_K, and ggml aborts on the lattice types when
no codebook neighbour's distance is finite; no trained checkpoint comes near).  The lattice types (IQ3_XXS, IQ3_S, IQ2_*)
have no per-weight grid: their fits are checked for the fields, the bytes and the dequantized weights.
A new codec or backend is added here.

Backends: numpy itself (then the libggml check is what counts), C in every build this CPU runs, Triton on CUDA
where there is one and on the CPU under the interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, so in a child process: this file run as a script, printing one JSON line).  The Triton kernels are also
compiled to sm_90 PTX, whose float32 instructions must all be correctly rounded ones (what the interpreter,
computing in numpy, cannot show).
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

import ggml_oracle
from edgequant.convert.codecs import CODECS, codec
from edgequant.convert.codecs.search_affine import in_order_sum, make_qkx3_quants, make_qp_quants
from edgequant.convert.codecs.search_symmetric import make_qx_quants
from edgequant.gptq import fitter
from edgequant.gptq.fitter import Fit, NativeFit, NumpyFit
from interpreted import run_interpreted
from test_codecs_affine import adversarial_rows as affine_rows
from test_codecs_iquant import table_rows
from test_codecs_symmetric import adversarial_rows as symmetric_rows

try:
    from edgequant.gptq import triton_fit
except ImportError:
    triton_fit = None

F32 = np.float32
N = 512  # two super-blocks per row
TYPES = sorted(t.name for t in CODECS)
C_TYPES = [t for t in TYPES if t != "Q8_K"]  # the types native/fit.c writes
KINDS = ["random", "adversarial", "overflowing"]
WEIGHTINGS = ["plain", "importance"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
try:
    from edgequant.native import available_isas

    ISAS = available_isas()  # the portable build ("scalar": SSE2/NEON vectors) and, where the CPU has it, AVX2
except ImportError:
    ISAS = []


def gaussian_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Gaussian rows of uneven magnitudes with 1 % outliers."""
    w = (rng.standard_normal((rows, n)) * np.exp(rng.standard_normal((rows, 1)))).astype(F32)
    hit = rng.random((rows, n)) < 0.01
    w[hit] = (rng.standard_normal(hit.sum()) * 40).astype(F32)
    return w


def overflow_rows(rng: np.random.Generator) -> np.ndarray:
    """Magnitudes whose squares overflow float32 (inf and NaN inside the searches), and random finite bit patterns."""
    g = rng.standard_normal((4, N)).astype(F32)
    spread = rng.standard_normal(N) * 10.0 ** rng.integers(-40, 38, N)
    bits = rng.integers(0, 2**32, (4, N), dtype=np.uint64).astype(np.uint32).view(F32)
    rows = [g[0] * 1e20, g[1] * 1e37, np.full(N, 3e38), -np.abs(g[2]) * 1e30, spread, *np.where(np.isfinite(bits), bits, 0)]
    # one weight per 32 whose square is finite but twice it is not: a sum of squares scaled in another order overflows
    rows.append(np.where(np.arange(N) % 32 == 7, np.float32(1.5e19), g[3]))
    return np.stack(rows).astype(F32)


def problem() -> tuple[np.ndarray, dict[str, slice], np.ndarray]:
    """The matrix every backend fits (all kinds of rows, stacked: rows are fitted independently), each kind's rows,
    and the importance: skewed, with holes and a whole sub-block of zeros.  The adversarial rows include ones on and
    midway between the IQ4 table's values (their tie rule), from a generator of their own so that the other rows
    stay as they were."""
    rng = np.random.default_rng(2024)
    adversarial = [affine_rows, symmetric_rows, lambda _: table_rows(np.random.default_rng(2025))]
    parts = {"random": gaussian_rows(rng, 6, N), "adversarial": np.concatenate([rows(rng) for rows in adversarial]),
             "overflowing": overflow_rows(rng)}
    ends = np.cumsum([len(p) for p in parts.values()])
    importance = np.exp(3 * rng.standard_normal(N)).astype(F32)
    importance[rng.random(N) < 0.2] = 0
    importance[32:64] = 0
    return np.concatenate(list(parts.values())), {k: slice(e - len(p), e) for (k, p), e in zip(parts.items(), ends)}, importance


MATRIX, ROWS, IMPORTANCE = problem()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool((a.view(np.uint8) == b.view(np.uint8)).all())


def same_values(t: torch.Tensor | np.ndarray, expected: np.ndarray) -> bool:
    """Bit for bit, but any NaN for a NaN.  A NaN's sign and payload are the hardware's (x86's default NaN is
    negative, CUDA's positive) and no file holds one: a solve whose block scales overflow is refused
    (test_gptq_solver), so overflowing rows check that the NaNs fall where the specification's do."""
    a = t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if not np.issubdtype(a.dtype, np.floating):
        return same_bits(a, expected)
    return np.array_equal(np.isnan(a), np.isnan(expected)) and same_bits(np.nan_to_num(a), np.nan_to_num(expected))


def check(got: Fit, name: str, w: np.ndarray, importance: np.ndarray | None, against_ggml: bool = True) -> None:
    """got == codec.fit(w, importance) in every field, grid and dequantized weight; bytes == libggml's."""
    c = codec(name)
    with np.errstate(all="ignore"):
        ref = c.fit(w, importance)
    blocks = got.blocks()
    for field in dataclasses.fields(ref):
        assert same_values(getattr(blocks, field.name), getattr(ref, field.name)), field.name
    assert same_values(got.dequantize(), c.dequantize(ref))
    if against_ggml:
        assert np.array_equal(c.pack(blocks), ggml_oracle.ggml_bytes(c.qtype, w, importance))
    if not c.scalar_grid:  # a lattice type: codebook points, no per-weight grid
        assert got.scale is None and got.offset is None
        return
    grid = c.grid(ref)
    assert same_values(got.scale, grid.scale) and same_values(got.offset, grid.offset)
    assert (got.levels is None) == (grid.levels is None) and (grid.levels is None or same_values(got.levels, grid.levels))
    assert (got.group, got.qmin, got.qmax) == (grid.group, grid.qmin, grid.qmax)


def rows_of(f: Fit, rows: slice) -> Fit:
    part = lambda t: None if t is None else t[rows]  # noqa: E731
    return dataclasses.replace(f, fields={k: v[rows] for k, v in f.fields.items()}, scale=part(f.scale),
                               offset=part(f.offset), w_hat=part(f.w_hat))


def check_matrix(backend, device: str, name: str, weighting: str, kind: str) -> None:
    """One cell of the matrix (the backend's fit of MATRIX, made once, then checked one kind of rows at a time)."""
    got = matrix_fit(backend, device, name, weighting)
    importance = IMPORTANCE if weighting == "importance" else None
    check(rows_of(got, ROWS[kind]), name, MATRIX[ROWS[kind]], importance, against_ggml=kind != "overflowing")


@functools.lru_cache(maxsize=None)
def matrix_fit(backend, device: str, name: str, weighting: str) -> Fit:
    importance = torch.from_numpy(IMPORTANCE).to(device) if weighting == "importance" else None
    with np.errstate(all="ignore"):
        return backend.fit(codec(name), torch.from_numpy(MATRIX).to(device), importance)


def cells(backend, device: str, marks=()) -> list:
    return [pytest.param(backend, device, name, weighting, kind, marks=marks, id=f"{backend.name}-{device}-{name}-{weighting}-{kind}")
            for name in TYPES for weighting in WEIGHTINGS if backend.covers(codec(name), weighting == "importance")
            for kind in KINDS]


TRITON = triton_fit.TritonFit() if triton_fit else None
HOST_BACKENDS = [NumpyFit()] + [NativeFit(isa) for isa in ISAS]
MATRIX_CELLS = [cell for b in HOST_BACKENDS for cell in cells(b, "cpu") + cells(b, "cuda", CUDA)]
MATRIX_CELLS += cells(TRITON, "cuda", CUDA) if TRITON else []
INTERPRETED = [p.id for p in cells(TRITON, "cpu")] + ["in_order_sum", "searches", "layout", "chunks"] if TRITON else []


@pytest.mark.parametrize("backend, device, name, weighting, kind", MATRIX_CELLS)
def test_matrix(backend, device, name, weighting, kind):
    check_matrix(backend, device, name, weighting, kind)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", INTERPRETED)
def test_triton_interpreted(interpreted, case):
    """The Triton backend on the CPU under TRITON_INTERPRET=1: the matrix's cells and the checks below."""
    assert interpreted[case] is None, interpreted[case]


def interpreted_cases() -> dict:
    """INTERPRETED's checks, each a function that raises AssertionError on a mismatch (run in the child process)."""
    cases = {p.id: functools.partial(check_matrix, *p.values) for p in cells(TRITON, "cpu")}
    cases |= {"in_order_sum": functools.partial(check_sums, "cpu"), "layout": functools.partial(check_layout, TRITON, "cpu"),
              "searches": functools.partial(check_searches, "cpu", 600, [(3, -0.5, 0.1, 10)]),
              "chunks": functools.partial(check_chunks, "cpu")}
    return cases


# --- the contract's plumbing ----------------------------------------------------------------------------------


def check_layout(backend, device: str, name: str = "Q6_K") -> None:
    """The solver hands a transposed view (Wt[c:c + 256].T); fits of consecutive super-blocks concatenate to the fit
    of the whole matrix."""
    w = MATRIX[ROWS["random"]]
    wt, imp = torch.from_numpy(w.T.copy()).to(device), torch.from_numpy(IMPORTANCE).to(device)
    check(Fit.concat([backend.fit(codec(name), wt[j:j + 256].T, imp[j:j + 256]) for j in (0, 256)]), name, w, IMPORTANCE)


def check_chunks(device: str) -> None:
    """Above MAX_WEIGHTS an eager Triton fit runs on chunks of rows (an output head of 128K rows would need ~75 GB)."""
    w = MATRIX[ROWS["adversarial"]]
    old = triton_fit.MAX_WEIGHTS, triton_fit.GRAPH_ROWS
    triton_fit.MAX_WEIGHTS, triton_fit.GRAPH_ROWS = 12 * N, 0
    try:
        got = TRITON.fit(codec("Q6_K"), torch.from_numpy(w).to(device), torch.from_numpy(IMPORTANCE).to(device))
        check(got, "Q6_K", w, IMPORTANCE)
    finally:
        triton_fit.MAX_WEIGHTS, triton_fit.GRAPH_ROWS = old


@pytest.mark.parametrize("backend", HOST_BACKENDS, ids=lambda b: b.name)
def test_layout(backend):
    check_layout(backend, "cpu", "Q4_K")


@pytest.mark.parametrize("name", ["Q4_K", "Q5_0", "IQ4_XS"])
def test_slabs_and_threads(monkeypatch, name):
    """Large inputs are fitted in slabs of rows (fitter.fit) and, in C, in row chunks on host threads: the bytes of
    one call."""
    monkeypatch.setattr(fitter, "SLAB_ELEMENTS", 7 * N)
    monkeypatch.setattr(fitter, "THREAD_ELEMENTS", 2 * N)
    monkeypatch.setattr(fitter, "host_threads", lambda: 3)
    w, imp = torch.from_numpy(MATRIX), torch.from_numpy(IMPORTANCE)
    assert len(MATRIX) > 7
    check(fitter.fit(codec(name), w, imp), name, MATRIX, IMPORTANCE)
    if fitter.native_fit is not None:
        check(NativeFit().fit(codec(name), w, imp), name, MATRIX, IMPORTANCE)


def test_dispatch():
    """The first backend that covers a codec, device and weighting runs it; the numpy spec covers everything ggml
    quantizes."""
    cpu, host = torch.device("cpu"), ["c"] if fitter.native_fit else []
    assert fitter.backend(codec("Q4_K"), cpu, True).name == (host + ["numpy"])[0]
    assert fitter.backend(codec("Q8_K"), cpu, False).name == "numpy"
    with pytest.raises(ValueError, match="only with an importance"):  # ggml asserts one for IQ2_XXS/IQ2_XS
        fitter.backend(codec("IQ2_XXS"), cpu, False)
    if TRITON:
        assert [b.name for b in fitter.backends("cuda")] == ["triton", *host, "numpy"]
        assert TRITON.covers(codec("Q6_K"), True) and not TRITON.covers(codec("Q6_K"), False)
        assert not TRITON.covers(codec("Q4_0"), True) and not TRITON.covers(codec("Q8_0"), True)
        for name in ("IQ4_NL", "IQ4_XS"):  # the table types, weighted or not
            for weighted in (True, False):
                assert fitter.backend(codec(name), torch.device("cuda"), weighted).name == "triton"
    w = torch.from_numpy(MATRIX[:3])
    assert fitter.fit(codec("Q8_0"), w).blocks().q.shape == (3, N // 32, 32)
    for backend in HOST_BACKENDS + ([TRITON] if TRITON else []):  # before any kernel runs
        with pytest.raises(ValueError):
            backend.fit(codec("Q4_K"), torch.zeros(2, 128), torch.ones(128))


@pytest.mark.parametrize("backend, device, name", [
    pytest.param(b, device, name, marks=marks, id=f"{b.name}-{device}-{name}")
    for b, device, marks in [*((b, "cpu", ()) for b in HOST_BACKENDS), *([(TRITON, "cuda", CUDA)] if TRITON else [])]
    for name in TYPES if b.covers(codec(name), True)])
def test_overflowing_importance(backend, device, name):
    """Importance around 1e30 on overflowing rows: the numpy codecs' bytes still."""
    w, imp = MATRIX[ROWS["overflowing"]], (np.random.default_rng(11).random(N) * 1e30).astype(F32)
    with np.errstate(all="ignore"):
        got = backend.fit(codec(name), torch.from_numpy(w).to(device), torch.from_numpy(imp).to(device))
    check(got, name, w, imp, against_ggml=False)


# --- the Triton backend: searches, sums, graphs, PTX ----------------------------------------------------------


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
            got = triton_fit.make_qp_quants(t["x"], t["w"], nmax)
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].cpu().numpy(), codes), nmax
        for grid in qkx3_grids:
            expected = make_qkx3_quants(x, weights, *grid, use_mad=False)
            got = triton_fit.make_qkx3_quants(t["x"], t["w"], *grid)
            for a, b in zip(got, expected):
                assert same_bits(a.cpu().numpy(), b), grid
        for nmax in (4, 32):
            scale, codes = make_qx_quants(x.T, nmax, weights.T)
            got = triton_fit.make_qx_quants(t["x"], t["w"], nmax)
            assert same_bits(got[0].cpu().numpy(), scale) and same_bits(got[1].T.cpu().numpy(), codes), nmax


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
        assert same_bits(triton_fit.in_order_sum(tensor, from_zero).cpu().numpy(), expected), from_zero
        view = tensor.transpose(1, 2)  # not contiguous
        assert same_bits(triton_fit.in_order_sum(view, from_zero).cpu().numpy(), expected.T), from_zero


@CUDA
def test_triton_on_cuda_searches_sums_layout_chunks():
    check_searches("cuda", 4000, [(3, -0.9, 0.05, 36), (15, -0.9, 0.05, 36)])
    check_sums("cuda")
    check_layout(TRITON, "cuda", "Q4_K")
    check_chunks("cuda")


@CUDA
def test_cuda_graphs_replay_and_eager(monkeypatch):
    """Fits replayed from CUDA graphs (several calls of one shape reuse one) and eager ones (rows > GRAPH_ROWS)."""
    w, imp = MATRIX[ROWS["random"]], torch.from_numpy(IMPORTANCE).cuda()
    for graph_rows in (triton_fit.GRAPH_ROWS, triton_fit.GRAPH_ROWS, 0):
        monkeypatch.setattr(triton_fit, "GRAPH_ROWS", graph_rows)
        check(TRITON.fit(codec("Q5_K"), torch.from_numpy(w).cuda(), imp), "Q5_K", w, IMPORTANCE)


class _Recorder:
    """Stands for a Triton kernel: records each launch (kernel, args, kwargs) instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


# float32 instructions that round once, to nearest (or are exact): anything else (fma, div.full, .approx, .ftz, ...)
# would break bit-exactness on the GPU.  min/max are exact (Triton 3.6 emits max.f32 for tl.maximum; inputs are finite),
# abs and neg only touch the sign bit.
EXACT_F32 = re.compile(r"(add|sub|mul|div)\.rn\.f32|(abs|neg)\.f32|(min|max)(\.NaN)?\.f32|setp\.[a-z]+\.f32|selp\.f32"
                       r"|cvt\.rn\.f32\.[su]32")


def test_triton_kernels_compile_to_correctly_rounded_ptx(monkeypatch):
    """Each kernel the Triton backend launches (for every type), compiled for sm_90 as launched: its float32
    instructions are all EXACT_F32 ones, with divisions among them (the kernels' own `div_rn`)."""
    if TRITON is None or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("no Triton, or its kernels are interpreted functions here")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = []
    kernels = ("_sum_kernel", "_qkx3_kernel", "_qp_kernel", "_qx_kernel", "_iq4_scale_kernel", "_iq4_codes_kernel")
    for name in kernels:
        monkeypatch.setattr(triton_fit, name, _Recorder(getattr(triton_fit, name), launches))
    with np.errstate(all="ignore"):
        for name in TYPES:  # on the CPU: nothing runs, the searches hand back uninitialized memory
            for importance in (torch.ones(256), None):
                if TRITON.covers(codec(name), importance is not None):
                    TRITON.fit(codec(name), torch.zeros(2, 256), importance)
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
    assert {k[0] for k in compiled} == set(kernels) and divisions


# --- the C backend: what encoding in chunks of rows relies on, the API, the NEON build -------------------------

native = pytest.mark.skipif(fitter.native_fit is None, reason="the C extension is not built")


@native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", C_TYPES)
def test_c_rows_are_independent(name, isa):
    """A row's bytes do not depend on its neighbours; wide rows too, and rows whose 32-weight blocks do not fill
    the last batch of lanes."""
    c, fit = codec(name), fitter.native_fit
    rng = np.random.default_rng(5)
    n = 4096 + 256 + (32 if c.block_size == 32 else 0)
    w = rng.standard_normal((6, n)).astype(F32)
    imp = rng.random(n).astype(F32)
    whole = fit.quantize(w, c.qtype, imp, isa=isa)
    out = np.zeros_like(whole)
    for r in range(len(w)):
        fit.quantize(w[r:r + 1], c.qtype, imp, out[r:r + 1], isa=isa)
    assert np.array_equal(out, whole)
    assert np.array_equal(whole, ggml_oracle.quantize_chunk(c.qtype, w, imp))


@native
def test_c_supported_types_and_errors():
    Q, fit = codec("Q4_K").qtype.__class__, fitter.native_fit
    assert all(fit.supports(Q[name]) for name in C_TYPES)
    assert not fit.supports(Q.Q8_K) and not fit.supports(Q.F16)
    with pytest.raises(ValueError, match="no native fit"):
        fit.quantize(np.zeros((2, 96), F32), Q.Q4_K)  # 96 is not a multiple of 256
    with pytest.raises(ValueError, match="importance"):
        fit.quantize(np.zeros((2, 256), F32), Q.Q4_K, np.ones(128, F32))
    with pytest.raises(ValueError, match="only with an importance"):
        fit.quantize(np.zeros((2, 256), F32), Q.IQ2_XXS)  # ggml asserts; the codecs refuse
    with pytest.raises(ValueError, match="out must be"):
        fit.quantize(np.zeros((2, 256), F32), Q.Q4_K, out=np.zeros((2, 100), np.uint8))


LATTICE_C_TYPES = [t for t in C_TYPES if not codec(t).scalar_grid]


def lattice_edge_rows(rng: np.random.Generator) -> np.ndarray:
    """Rows at scales from 1e-30 to 1e10, zero rows and zero sub-blocks (IQ3_S's shifted slots; the skip thresholds
    1e-8 and 1e-15), tiny values just around those thresholds, one weight per sub-block, all-negative groups and
    odd counts of negatives (the even-sign flip), ties in magnitude."""
    g = rng.standard_normal((8, N)).astype(F32)
    rows = [g[0] * F32(s) for s in (1e-30, 1e-12, 1e-6, 1e-2, 1.0, 1e3, 1e10)]
    rows.append(np.zeros(N, F32))
    holes = g[1].copy()
    holes[(np.arange(N) // 32) % 3 == 1] = 0  # every third 32-weight sub-block empty
    rows.append(holes)
    tiny = g[2].copy()
    tiny[(np.arange(N) // 16) % 4 == 0] *= F32(1e-9)  # sub-blocks straddling the 1e-8 skip threshold
    tiny[(np.arange(N) // 16) % 4 == 1] *= F32(1e-16)  # ... and 1e-15
    rows.append(tiny)
    one = np.zeros(N, F32)
    one[::16] = g[3, ::16]
    rows.append(one)
    rows.append(-np.abs(g[4]))
    odd = np.abs(g[5])
    odd[::8] *= -1  # one negative per 8: the even-sign rule flips the least weighted one
    rows.append(odd)
    rows.append(np.sign(g[6]).astype(F32) * F32(0.75))  # every magnitude tied
    rows.append(np.round(g[7] * 4).astype(F32))  # small integers: exact lattice points at some trial scales
    return np.stack(rows).astype(F32)


@native
@pytest.mark.parametrize("name", LATTICE_C_TYPES)
def test_c_lattice_edge_rows(name):
    """The lattice fits in C on lattice_edge_rows: the numpy codec's bytes and libggml's, every build, with and
    without importance where the type allows none, and with importance that is zero on whole sub-blocks."""
    c, fit = codec(name), fitter.native_fit
    w = lattice_edge_rows(np.random.default_rng(19))
    holey = IMPORTANCE.copy()
    holey[256 + 16:256 + 48] = 0
    for importance in (None, IMPORTANCE, holey, np.ones(N, F32)):
        if importance is None and c.needs_importance:
            continue
        with np.errstate(all="ignore"):
            expected = c.quantize(w, importance)
        for isa in ISAS:
            assert np.array_equal(fit.quantize(w, c.qtype, importance, isa=isa), expected), (isa, importance is None)
        assert np.array_equal(expected.reshape(-1), ggml_oracle.quantize_chunk(c.qtype, w, importance).reshape(-1))

def test_c_neon_build_under_qemu(tmp_path):
    """The portable build as AArch64 compiles it (NEON vectors) writes the numpy codecs' bytes too: native/tests/
    fit_bytes.c with the package's sources and flags, run under qemu-user, every type, with and without importance,
    on the random and adversarial rows (on overflowing ones its NaNs may take other paths)."""
    import runpy
    import shutil
    import subprocess
    from pathlib import Path

    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    root = Path(__file__).resolve().parents[1]
    build = runpy.run_path(str(root / "native" / "build_native.py"))
    sources = [root / "native" / "tests" / "fit_bytes.c", *(root / s for s in build["SOURCES"])]
    objects = []
    for src in sources:
        objects.append(str(tmp_path / (src.stem + ".o")))
        subprocess.run([cc, *build["COMPILE_ARGS"], "-march=armv8-a", f"-I{root / 'native'}", "-c", str(src), "-o",
                        objects[-1]], check=True, capture_output=True, text=True)
    exe = tmp_path / "fit_bytes"
    subprocess.run([cc, "-static", *objects, "-o", str(exe), "-lm", "-pthread"], check=True, capture_output=True, text=True)
    weights, imp_path = tmp_path / "w.f32", tmp_path / "imp.f32"
    w = MATRIX[:ROWS["overflowing"].start]
    w.tofile(weights)
    IMPORTANCE.tofile(imp_path)
    for name in C_TYPES:
        c = codec(name)
        for importance, arg in ((None, "-"), (IMPORTANCE, str(imp_path))):
            if importance is None and c.needs_importance:
                continue
            run = subprocess.run([qemu, str(exe), str(int(c.qtype)), str(len(w)), str(N), str(weights), arg],
                                 capture_output=True, timeout=300)
            assert run.returncode == 0, run.stderr
            with np.errstate(all="ignore"):
                assert np.array_equal(np.frombuffer(run.stdout, np.uint8), c.quantize(w, importance).reshape(-1)), name


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)  # small ops: threads only spin against each other
    triton_fit.BLOCK_G = 2048  # the interpreter runs programs one after another: few wide ones (same kernels)
    results = {}
    for case, run in interpreted_cases().items():
        try:
            run()
            results[case] = None
        except AssertionError:
            results[case] = traceback.format_exc(limit=-2)
    assert sorted(results) == sorted(INTERPRETED)
    print(json.dumps(results))

"""The Triton sweep and polish (edgequant.gptq.triton_solver) against the torch reference, on CPU under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so the solves run in a child process (this file run
as a script) that prints one JSON line; the tests read it.  Both backends share everything but the in-block sweep
(factorization, fits, trailing GEMMs), so their codes may differ only where float rounding moves a weight across a
rounding boundary: each differing code is checked to be one, from the weight the torch sweep rounded, recovered
from its result through E = W - Ŵ = δ U (as in test_gptq_solver.gptq_views).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")

# (codec, rows, cols, lazy block size, act_order): K-quant blocks spanning two lazy blocks (the grid is fitted for
# columns the sweep has not reached), lazy blocks spanning several Q4_0 blocks (the sweep stops at each for the
# fit and hands back the updated columns), rows that do not fill the last program's tile, act_order's permuted
# groups; the table types' nearest value (IQ4_*).
CASES = [
    ("Q4_K", 32, 256, 128, False),
    ("Q6_K", 64, 512, 128, False),
    ("Q4_0", 40, 256, 128, False),
    ("Q3_K", 64, 512, 256, False),
    ("Q4_K", 32, 512, 128, True),
    ("IQ4_XS", 32, 512, 128, False),
    ("IQ4_NL", 40, 256, 128, False),
    ("IQ4_XS", 24, 256, 128, True),
]
# (codec, rows, cols): solve(..., refine=2), whose polish runs as Triton's `polish` kernel on that backend.
REFINE_CASES = [("Q4_K", 40, 512), ("Q6_K", 32, 256), ("Q2_K", 24, 512), ("Q4_0", 40, 256), ("Q5_1", 24, 256),
                ("IQ4_XS", 24, 512), ("IQ4_NL", 24, 256)]
BOUNDARY = 1e-3  # how close to a half-integer (in grid steps) a weight must be for a differing code to be rounding


def problem(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated inputs with uneven magnitudes (as in LLMs), a few dead columns; W and H = 2XᵀX/n."""
    rng = np.random.default_rng(seed)
    mix = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    X = rng.standard_normal((1024, cols)) @ mix * rng.lognormal(0, 0.5, cols)
    X[:, [3, cols // 2]] = 0
    W = 0.05 * rng.standard_normal((rows, cols))
    return W.astype(np.float32), (2 * X.T @ X / len(X)).astype(np.float32)


def distance_to_boundary(W: np.ndarray, H: np.ndarray, c, sol, act_order: bool) -> np.ndarray:
    """Per weight, how far (in grid steps) the value the torch sweep rounded was from a rounding boundary: a
    half-integer, or on a table the midpoint of two values (in gaps between them)."""
    import torch

    from edgequant.gptq.solver import inverse_cholesky

    H = torch.from_numpy(H.copy())
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True, stable=True).numpy() if act_order else np.arange(len(H))
    U = inverse_cholesky(H[perm][:, perm], sol.damp)[0].double().numpy()
    E = (W - sol.w_hat.cpu().numpy())[:, perm].astype(np.float64)
    delta = np.linalg.solve(U.T, E.T).T
    grid = c.grid(sol.blocks)
    scale, offset = grid.columns(None, W.shape[1])
    x = np.empty_like(E)
    x[:, perm] = (sol.w_hat.cpu().numpy()[:, perm] + delta * np.diagonal(U) - offset[:, perm]) / scale[:, perm]
    if grid.levels is None:
        return np.abs(x - np.floor(x) - 0.5)
    levels = grid.levels.astype(np.float64)
    mids, gaps = (levels[1:] + levels[:-1]) / 2, np.diff(levels)
    return (np.abs(x[..., None] - mids) / gaps).min(-1)


def compare(name: str, rows: int, cols: int, block_size: int, act_order: bool) -> dict:
    from edgequant.convert.codecs import codec
    from edgequant.gptq import solve

    c = codec(name)
    W, H = problem(rows, cols)
    ref, tri = (solve(W, H, c, block_size=block_size, act_order=act_order, backend=b) for b in ("torch", "triton"))
    differ = c.codes(ref.blocks) != c.codes(tri.blocks)
    near = distance_to_boundary(W, H, c, ref, act_order)[differ] < BOUNDARY
    same_grid = np.array_equal(c.grid(ref.blocks).scale, c.grid(tri.blocks).scale)
    return {"differ": int(differ.sum()), "near_boundary": int(near.sum()), "codes": int(differ.size),
            "loss_torch": ref.loss, "loss_triton": tri.loss, "same_grid": same_grid,
            "column_loss_sum": float(tri.column_loss.sum(dtype=np.float64)),
            "w_hat_is_dequantized": bool(np.array_equal(tri.w_hat.cpu().numpy(), c.dequantize(tri.blocks)))}


def compare_refined(name: str, rows: int, cols: int) -> dict:
    from edgequant.convert.codecs import codec
    from edgequant.gptq import solve

    c = codec(name)
    W, H = problem(rows, cols, seed=1)
    ref, tri = (solve(W, H, c, refine=2, backend=b) for b in ("torch", "triton"))
    return {"differ": int((c.codes(ref.blocks) != c.codes(tri.blocks)).sum()), "codes": int(W.size),
            "same_grid": bool(np.array_equal(c.grid(ref.blocks).scale, c.grid(tri.blocks).scale)),
            "loss_torch": ref.loss, "loss_triton": tri.loss, "loss_gptq": solve(W, H, c, backend="torch").loss}


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda k: "-".join(map(str, k)))
def test_triton_sweep_matches_torch(results, case):
    r = results["-".join(map(str, case))]
    print(f"{case}: {r['differ']} of {r['codes']} codes differ ({r['differ'] / r['codes']:.1e}), "
          f"{r['near_boundary']} of them within {BOUNDARY} of a rounding boundary")
    assert r["differ"] / r["codes"] <= 1e-4
    assert r["near_boundary"] == r["differ"]
    assert r["same_grid"]
    assert r["loss_triton"] == pytest.approx(r["loss_torch"], rel=1e-3)
    assert r["column_loss_sum"] == pytest.approx(r["loss_triton"], rel=1e-5)
    assert r["w_hat_is_dequantized"]


@pytest.mark.parametrize("case", REFINE_CASES, ids=lambda k: "-".join(map(str, k)))
def test_triton_polish_matches_torch(results, case):
    r = results["refine-" + "-".join(map(str, case))]
    print(f"refine {case}: {r['differ']} of {r['codes']} codes differ; loss {r['loss_triton']:.6g} "
          f"(torch {r['loss_torch']:.6g}, GPTQ alone {r['loss_gptq']:.6g})")
    assert r["differ"] / r["codes"] <= 1e-4 and r["same_grid"]
    assert r["loss_triton"] == pytest.approx(r["loss_torch"], rel=1e-3)
    assert r["loss_triton"] < r["loss_gptq"]


# Exact float32 conversions the solver's kernels add to test_fit_conformance.EXACT_F32's: floor (its .ftz only turns
# floor of a negative subnormal from -1 into -0, and either rounds to the code 0), and integral floats to int32.
SOLVER_EXACT = re.compile(r"cvt\.rmi(\.ftz)?\.f32\.f32|cvt\.rzi\.s32\.f32")


def test_sweep_and_polish_compile_to_correctly_rounded_ptx(monkeypatch):
    """The sweep and polish kernels, on uniform and table grids, compiled for sm_90 as a CUDA launch makes them (no
    explicit fma there: torch's addr_ rounds twice on CUDA): every float32 instruction rounds once, to nearest.  The
    interpreter computes in numpy, so it can show neither a contraction nor an approximate division; nor does it
    compile the kernels."""
    import types

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from edgequant.gptq import triton_solver
    from test_fit_conformance import EXACT_F32, _Recorder

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels are interpreted functions here")
    launches = []
    for name in ("_sweep_kernel", "_polish_kernel"):
        monkeypatch.setattr(triton_solver, name, _Recorder(getattr(triton_solver, name), launches))
    rows, n = 32, 128
    for levels in (None, torch.arange(-8, 8, dtype=torch.float32)):  # on the CPU: recorded, not run
        grids = types.SimpleNamespace(scale=torch.ones(4, rows), offset=torch.zeros(4, rows), qmin=0, qmax=15,
                                      group_of=torch.zeros(n, dtype=torch.int32), levels=levels)
        triton_solver.sweep(torch.zeros(n, rows), torch.eye(n), torch.zeros(n, rows, dtype=torch.int32),
                            torch.zeros(n, rows), grids, 0, 0, n)
        triton_solver.polish(torch.zeros(n, rows), torch.zeros(n, rows), torch.zeros(n, rows), torch.eye(n),
                             torch.ones(4, rows), 32, 0, 0, 15, levels)
    types_of = {torch.float32: "*fp32", torch.int32: "*i32", int: "i32", float: "fp32"}
    compiled = set()
    for kernel, args, kwargs in launches:
        kwargs = {**kwargs, "FMA": triton_solver.fused_addr(torch.device("cuda"))}
        assert kwargs["enable_fp_fusion"] is False
        constexprs = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
        signature = {p: types_of[a.dtype if isinstance(a, torch.Tensor) else type(a)]
                     for p, a in zip(kernel.arg_names, args)}
        options = {k: kwargs[k] for k in ("num_warps", "enable_fp_fusion")}
        ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M)
        inexact = {op for op in ops if re.search(r"f32|f64|f16|fma|mad\.f|approx|ftz|rcp|sqrt", op)
                   and not (EXACT_F32.fullmatch(op) or SOLVER_EXACT.fullmatch(op))}
        assert not inexact, (kernel.fn.__name__, kwargs["N_LEVELS"], inexact)
        compiled.add((kernel.fn.__name__, kwargs["N_LEVELS"]))
    assert compiled == {("_sweep_kernel", 0), ("_polish_kernel", 0), ("_sweep_kernel", 16), ("_polish_kernel", 16)}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CASES + [("Q4_K", 4096, 1024, 128, False), ("Q6_K", 1024, 4096, 128, False)],
                         ids=lambda k: "-".join(map(str, k)))
def test_triton_sweep_equals_torch_on_cuda(case):
    """On a GPU the kernel rounds the rank-1 update as torch's CUDA addr_ does: the same codes, bit for bit, and
    after refine's polish too."""
    import torch

    from edgequant.convert.codecs import codec
    from edgequant.gptq import solve

    name, rows, cols, block_size, act_order = case
    c = codec(name)
    W, H = (torch.from_numpy(a).cuda() for a in problem(rows, cols))
    for refine in (0, 2):
        ref, tri = (solve(W, H, c, block_size=block_size, act_order=act_order, refine=refine, backend=b)
                    for b in ("torch", "triton"))
        assert np.array_equal(c.codes(ref.blocks), c.codes(tri.blocks)), refine
        assert torch.equal(ref.w_hat, tri.w_hat)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from edgequant.gptq import triton_solver

    torch.set_num_threads(1)  # small ops: threads only spin against each other
    # The interpreter runs programs one after another, so fewer, taller tiles than the GPU's 8 or 16 rows: the same kernel
    # (the tile is a compile-time constant), 40 rows leave the last tile part empty, and 64 rows take the other tile.
    triton_solver.TILES = [(64, (16, 1)), (0, (32, 1))]
    out = {"-".join(map(str, case)): compare(*case) for case in CASES}
    out.update({"refine-" + "-".join(map(str, case)): compare_refined(*case) for case in REFINE_CASES})
    print(json.dumps(out))

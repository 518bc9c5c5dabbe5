"""Every tensor's type under a byte budget (`--size`, `--bpw`, `--target auto:FTYPE`): measure, then choose.

1. Cost: for each tensor and each type on its menu (convert.type_menu), the estimated KL divergence the tensor adds
   to the model's output when stored in that type: its error there (the importance-weighted fit that llama-quantize
   --imatrix writes, the grid GPTQ then starts from) through edgequant.sensitivity's per-row and per-column weights.
   Costs are taken as additive over tensors (llama.cpp's rounded tensors are, within 2 % on SmolLM2:
   docs/BENCHMARKS.md, kld_attribution).
2. Choice: minimum total cost with the bytes within the budget, one type per tensor — a multiple-choice knapsack,
   solved exactly by dynamic programming over the bytes (in units fine enough that rounding them costs at most a
   few hundred thousandths of the budget), the rest of the bytes then spent on the best upgrades that still fit.

`choose` is a pure function of the options; `allocate_plan` measures them for a model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from .convert.codecs import codec
from .convert.gguf_out import GGUFLayout, TensorPlan
from .convert.type_menu import menu
from .errors import UserError
from .model import SourceModel
from .sensitivity import Sensitivity

Q = gguf.GGMLQuantizationType

# Weights per tensor whose errors are measured: larger tensors are measured on a sample of their rows (those with the
# largest row weight, and an even spread of the rest).
MEASURED_WEIGHTS = 1 << 24


@dataclass(frozen=True)
class Option:
    qtype: Q
    nbytes: int  # in the file, alignment padding included
    kl: float  # estimated KL divergence added


def choose(options: dict[str, list[Option]], budget: int, resolution: int = 1 << 18) -> dict[str, Option]:
    """One option per tensor with Σ nbytes ≤ budget and the least Σ kl: exact dynamic programming over the bytes
    above each tensor's smallest option, counted in units of 1/resolution of what the budget leaves above them
    (sizes rounded up, so the choice always fits; exact whenever the sizes are whole units), then what the rounding
    left spent on the best single upgrades that still fit.  ValueError if the smallest options do not fit."""
    names = list(options)
    floor = {n: min(o.nbytes for o in options[n]) for n in names}
    spare = budget - sum(floor.values())
    if spare < 0:
        raise ValueError(f"the smallest options take {budget - spare} bytes, over the budget of {budget}")
    unit = max(1, -(-spare // resolution))
    cap = spare // unit
    units = {n: [-(-(o.nbytes - floor[n]) // unit) for o in options[n]] for n in names}
    best = np.zeros(cap + 1)  # least Σ kl of the tensors so far, using at most c units
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, np.inf)
        for k, (o, w) in enumerate(zip(options[n], units[n])):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + o.kl
            better = cand < new
            new[better], picks[i, better] = cand[better], k
        best = new
    picked, c = {}, cap
    for i in reversed(range(len(names))):
        k = int(picks[i, c])
        picked[names[i]] = options[names[i]][k]
        c -= units[names[i]][k]
    left = budget - sum(o.nbytes for o in picked.values())
    while True:  # what the rounding left: the largest saving among the options that fit
        gain, name, o = max(((p.kl - o.kl, n, o) for n in names for p in [picked[n]] for o in options[n]
                             if o.kl < p.kl and o.nbytes - p.nbytes <= left), default=(0.0, None, None),
                            key=lambda t: t[0])
        if name is None:
            return {n: picked[n] for n in names}
        left -= o.nbytes - picked[name].nbytes
        picked[name] = o


@dataclass
class Allocation:
    """What the allocation chose and why, for the summary and the report."""

    budget: int
    what: str
    file_bytes: int
    predicted_kl: float
    recipe_kl: float  # the same estimate for the recipe the allocation started from
    recipe_bytes: int
    options: dict[str, list[Option]]
    chosen: dict[str, Q]
    seconds: float
    frontier: list[tuple[int, float]]  # (file bytes, predicted KLD) of allocations at other budgets
    ftypes: dict[str, tuple[int, float]]  # llama.cpp's recipes on the same estimate: ftype -> (file bytes, KLD)

    def summary(self) -> dict:
        return {"budget": self.budget, "what": self.what, "file_bytes": self.file_bytes,
                "predicted_kld": self.predicted_kl, "recipe_predicted_kld": self.recipe_kl,
                "recipe_bytes": self.recipe_bytes, "seconds": round(self.seconds, 3),
                "frontier": self.frontier, "ftypes": self.ftypes,
                "options": {name: [[o.qtype.name, o.nbytes, o.kl] for o in opts] for name, opts in self.options.items()}}


# llama.cpp's ftypes marked on the frontier, where every type of their recipe is on the tensors' menus
FRONTIER_FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


def frontier(options: dict[str, list[Option]], fixed: int, points: int = 16) -> list[tuple[int, float]]:
    """(file bytes, least predicted KLD) at `points` budgets from the smallest to the largest file."""
    lo = fixed + sum(min(o.nbytes for o in opts) for opts in options.values())
    hi = fixed + sum(max(o.nbytes for o in opts) for opts in options.values())
    out = []
    for budget in np.linspace(lo, hi, points).astype(np.int64):
        picked = choose(options, int(budget) - fixed, resolution=1 << 12)
        out.append((fixed + sum(o.nbytes for o in picked.values()), sum(o.kl for o in picked.values())))
    return out


def recipe_point(options: dict[str, list[Option]], plan: list[TensorPlan], fixed: int) -> tuple[int, float] | None:
    """(file bytes, predicted KLD) of a recipe's plan, None if a type it uses is not on a tensor's menu."""
    size, kl = fixed, 0.0
    for t in plan:
        if t.name not in options:
            continue
        o = next((o for o in options[t.name] if o.qtype == t.qtype), None)
        if o is None:
            return None
        size, kl = size + o.nbytes, kl + o.kl
    return size, kl


def allocate_plan(m: SourceModel, plan: list[TensorPlan], budget: int, what: str, layout: GGUFLayout,
                  ids: torch.Tensor, device: torch.device, weighted: bool, recipe_of=None,
                  progress=None) -> tuple[list[TensorPlan], Allocation]:
    """`plan` with each allocatable tensor's type chosen within `budget` bytes for the whole file, from sensitivities
    measured on calibration windows `ids`.  weighted: the method fits with importance (imatrix, GPTQ's grids).
    recipe_of(ftype): llama.cpp's plan for an ftype, to mark the ftypes on the reported frontier."""
    from . import sensitivity

    t0 = time.perf_counter()
    sens = sensitivity.measure(m, ids, device, progress=progress)
    options = measure_options(m, plan, sens, layout, device, weighted, progress)
    fixed = layout.padded(layout.header) + sum(layout.padded(t.nbytes) for t in plan if t.name not in options)
    try:
        chosen = choose(options, budget - fixed)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    new = [dataclasses.replace(t, qtype=chosen[t.name].qtype) if t.name in chosen else t for t in plan]
    recipe_kl = (recipe_point(options, plan, fixed) or (0, float("nan")))[1]
    ftypes = {f: point for f in FRONTIER_FTYPES if recipe_of is not None
              and (point := recipe_point(options, recipe_of(f), fixed)) is not None}
    return new, Allocation(budget, what, layout.file_bytes(new), sum(o.kl for o in chosen.values()), recipe_kl,
                           layout.file_bytes(plan), options, {n: o.qtype for n, o in chosen.items()},
                           time.perf_counter() - t0, frontier(options, fixed), ftypes)


def measure_options(m: SourceModel, plan: list[TensorPlan], sens: dict[str, list[Sensitivity]], layout: GGUFLayout,
                    device: torch.device, weighted: bool, progress=None) -> dict[str, list[Option]]:
    """Tensor name -> an Option per type on its menu, for every tensor with a menu and a measured sensitivity."""
    hf = {t.gguf_name: t.hf_name for t in m.tensors.values()}
    todo = [t for t in plan if menu(t.name, t.shape) and t.name in sens]
    task = progress.add_task("costing types", total=len(todo)) if progress is not None else None
    options = {}
    for t in todo:
        # HF's row order: the sensitivities' (GGUF may permute rows, as llama's q/k; rows are fitted independently)
        w = m.checkpoint.load(hf[t.name]).float()
        uses = sens[t.name]
        rows = sample_rows(uses, w.shape)
        w = w[rows].to(device)
        importance = next((torch.from_numpy(u.cols).float().to(device) for u in uses if u.linear), None) if weighted else None
        cols = [torch.from_numpy(u.cols).to(device) for u in uses]
        options[t.name] = []
        for q in menu(t.name, t.shape):
            e2 = error2(w, q, importance)  # each row's squared errors, weighted per column for each use, on the device
            kl = sum(use_kl(u, rows, (e2.double() @ c).cpu().numpy()) for u, c in zip(uses, cols))
            options[t.name].append(Option(q, layout.padded(dataclasses.replace(t, qtype=q).nbytes), kl))
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return options


def error2(w: torch.Tensor, q: Q, importance: torch.Tensor | None) -> torch.Tensor:
    """Squared error of w stored as q, as the importance-weighted fit stores it, on w's device."""
    from .gptq.fitter import fit

    if q == Q.F16:
        w_hat = w.half().float()
    else:
        with np.errstate(all="ignore"):
            w_hat = fit(codec(q), w, importance).dequantize()
    return (w - w_hat) ** 2


def sample_rows(uses: list[Sensitivity], shape: tuple[int, ...]) -> np.ndarray:
    """The rows measured: all, or for a large tensor those with the largest weight (half the sample) and an even
    spread of the rest."""
    n, cols = shape
    take = max(1, MEASURED_WEIGHTS // cols)
    if n <= take:
        return np.arange(n)
    weight = sum(u.rows for u in uses)
    top = np.sort(np.argsort(-weight, kind="stable")[: take // 2])
    rest = np.setdiff1d(np.arange(n), top)
    return np.concatenate([top, rest[np.linspace(0, len(rest) - 1, take - len(top)).round().astype(int)]])


def use_kl(u: Sensitivity, rows: np.ndarray, row_err: np.ndarray) -> float:
    """u's estimate ½ Σ_r rows_r · row_err_r over the measured `rows` (row_err: each row's squared errors weighted
    by u.cols): the rows with the largest weight exactly, the rest scaled by their share of the row weight."""
    per_row = 0.5 * row_err * u.rows[rows]
    if len(rows) == len(u.rows):
        return float(per_row.sum())
    k = len(rows) // 2  # sample_rows' top half
    weight_rest, sampled_rest = u.rows.sum() - u.rows[rows[:k]].sum(), u.rows[rows[k:]].sum()
    return float(per_row[:k].sum() + (per_row[k:].sum() * weight_rest / sampled_rest if sampled_rest > 0 else 0.0))

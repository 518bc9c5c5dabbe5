"""Every tensor's type under a byte budget (`--size`, `--bpw`, `--target auto:FTYPE`): measure, then choose.

1. Cost: for each tensor and each type on its menu (convert.type_menu), the estimated KL divergence the tensor adds
   to the model's output when stored in that type: its error there (the importance-weighted fit that llama-quantize
   --imatrix writes, the grid GPTQ then starts from) through edgequant.sensitivity's per-row and per-column weights.
   Costs are taken as additive over tensors (llama.cpp's rounded tensors are, within 2 % on SmolLM2:
   docs/BENCHMARKS.md, kld_attribution).
2. Choice: minimum total cost with the bytes within the budget, one type per tensor — a multiple-choice knapsack,
   solved exactly by dynamic programming over the bytes (in units fine enough that rounding them costs at most a
   few hundred thousandths of the budget), the rest of the bytes then spent on the best upgrades that still fit.
3. Speed: a file is as fast as its types compute, not only as its bytes (Q5_K's dot product is slower per weight than
   Q4_K's, Q4_1's matrix multiply than Q5_0's: docs/BENCHMARKS.md).  Each option also carries the seconds per token
   its tensor's multiply takes in llama.cpp's CPU backend, in generation and in prompt processing
   (edgequant.compute_cost, measured on this machine), and the choice keeps both sums within the recipe's / the
   speed floor (0.95 by default): `choose_within`.

`choose` and `choose_within` are pure functions of the options; `allocate_plan` measures them for a model.
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
from .compute_cost import ComputeCost, compute_cost
from .convert.type_menu import menu
from .errors import UserError
from .model import SourceModel
from .sensitivity import Sensitivity

Q = gguf.GGMLQuantizationType

# Weights per tensor whose errors are measured: larger tensors are measured on a sample of their rows (those with the
# largest row weight, and an even spread of the rest).  2^22 is every row of bench-a's tensors and of most of a 1-2B
# model's, and a quarter to a sixteenth of an 8B model's: its types are compared on the same rows, which is what the
# choice needs, at a cost that stays a small part of the GPU build.
MEASURED_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class Option:
    qtype: Q
    nbytes: int  # in the file, alignment padding included
    kl: float  # estimated KL divergence added
    gen: float = 0.0  # seconds per generated token of the tensor's multiply in llama.cpp (0: not multiplied)
    prompt: float = 0.0  # seconds per prompt token, in a batch of edgequant.compute_cost.PROMPT_TOKENS


def choose(options: dict[str, list[Option]], budget: int, resolution: int = 1 << 18) -> dict[str, Option]:
    """One option per tensor with Σ nbytes ≤ budget and the least Σ kl: exact dynamic programming over the bytes
    above each tensor's smallest option, counted in units of 1/resolution of what the budget leaves above them
    (sizes rounded up, so the choice always fits; exact whenever the sizes are whole units), then what the rounding
    left spent on the best single upgrades that still fit.  ValueError if the smallest options do not fit."""
    picked = _least(options, budget, resolution, lambda o: o.kl)
    return _fill(options, picked, budget, None)


@dataclass(frozen=True)
class SpeedLimit:
    """The most Σ Option.gen and Σ Option.prompt may be (seconds per token)."""

    generation: float
    prompt: float

    def allows(self, picked) -> bool:
        gen, prompt = _times(picked)
        return gen <= self.generation * (1 + 1e-12) and prompt <= self.prompt * (1 + 1e-12)


@dataclass(frozen=True)
class Choice:
    picked: dict[str, Option]
    feasible: bool  # within the speed limit (False: no choice within the budget is; `picked` is the fastest found)
    bound: float  # a lower bound on the least Σ kl within budget and limit (Lagrangian dual; -inf when unknown)
    unconstrained: dict[str, Option]  # choose()'s choice, without the limit


# DP resolution while searching the multipliers: coarse, 32x faster than choose's; the final choice is solved at
# choose's resolution
SEARCH_RESOLUTION = 1 << 13
MIXES = (1.0, 0.0, 0.5, 0.25, 0.75)  # weights of the generation time against the prompt time in the penalty


def choose_within(options: dict[str, list[Option]], budget: int, limit: SpeedLimit | None,
                  resolution: int = 1 << 18) -> Choice:
    """One option per tensor with Σ nbytes ≤ budget, Σ gen ≤ limit.generation, Σ prompt ≤ limit.prompt and, near
    enough, the least Σ kl.

    choose() when its choice is within the limit.  Otherwise a Lagrangian relaxation of the two time constraints: the
    byte DP (exact) minimizes kl + μ·(θ·gen/limit.generation + (1-θ)·prompt/limit.prompt); for each mix θ in MIXES
    the least μ whose choice keeps both limits is found by bisection, and the mix with the least kl wins; the bytes
    and time then left are spent on the best single upgrades that keep all three limits.  Every such relaxation's
    value is a lower bound on the true optimum (weak duality: any choice within the limits has the penalty's
    bracket ≤ 0), so `bound` says how far from optimal the choice can be; with sizes in whole DP units the gap is
    that of the dual alone, typically a fraction of one tensor's step between two types.  When no μ reaches the
    limits (they are below the fastest choice within the budget), `feasible` is False and `picked` is the fastest
    choice found.  ValueError if the smallest options do not fit the budget."""
    unconstrained = choose(options, budget, resolution)
    if limit is None or limit.allows(unconstrained):
        return Choice(unconstrained, True, -np.inf if limit is None else sum(o.kl for o in unconstrained.values()),
                      unconstrained)
    scale = sum(max(o.kl for o in opts) - min(o.kl for o in opts) for opts in options.values()) or 1.0
    fastest = None

    def solve(theta: float, mu: float, res: int) -> tuple[dict[str, Option], float]:
        """The relaxation's choice and its value (a lower bound when res makes the DP exact)."""
        def penalized(o: Option) -> float:
            return o.kl + mu * scale * (theta * o.gen / limit.generation + (1 - theta) * o.prompt / limit.prompt)

        picked = _least(options, budget, res, penalized)
        gen, prompt = _times(picked)
        value = sum(o.kl for o in picked.values()) + mu * scale * (
            theta * (gen / limit.generation - 1) + (1 - theta) * (prompt / limit.prompt - 1))
        return picked, value

    def least_mu(theta: float, res: int, lo: float, hi: float) -> tuple[float, float] | None:
        """(lo, hi): μ beyond the limits and μ within them, 1e-3 apart, for mix theta; None if no μ gets within."""
        while not limit.allows(solve(theta, hi, res)[0]):
            if hi > 2.0 ** 40:
                return None
            lo, hi = hi, hi * 4
        while hi - lo > 1e-3 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if limit.allows(solve(theta, mid, res)[0]) else (mid, hi)
        return lo, hi

    found = {}  # mix -> (μ beyond, μ within the limits, Σ kl of the filled choice), on the coarse DP
    for theta in MIXES:
        if (theta == 1.0 and limit.generation <= 0) or (theta == 0.0 and limit.prompt <= 0):
            continue
        if (mus := least_mu(theta, SEARCH_RESOLUTION, 0.0, 1.0)) is None:
            picked = solve(theta, 2.0 ** 40, SEARCH_RESOLUTION)[0]
            if fastest is None or _slowness(picked, limit) < _slowness(fastest, limit):
                fastest = picked
            continue
        coarse = _fill(options, solve(theta, mus[1], SEARCH_RESOLUTION)[0], budget, limit)
        found[theta] = (*mus, sum(o.kl for o in coarse.values()))
    if not found:  # no relaxation reaches the limits, which a choice off their convex hull may still do
        picked = _repair(options, fastest or unconstrained, budget, limit)
        if limit.allows(picked):
            return Choice(_improve(options, _fill(options, picked, budget, limit), budget, limit), True, -np.inf,
                          unconstrained)
        return Choice(picked, False, -np.inf, unconstrained)
    # the best mix at full resolution, where the coarse DP's μ may fall short of the limits (finer units fit more
    # bytes, and so slower types): the search then goes on from there
    theta = min(found, key=lambda t: found[t][2])
    lo, hi = found[theta][:2]
    if not limit.allows(solve(theta, hi, resolution)[0]):
        lo, hi = least_mu(theta, resolution, hi, hi * 2) or (lo, hi)
    picked, value = solve(theta, hi, resolution)
    if not limit.allows(picked):
        return Choice(fastest or unconstrained, False, -np.inf, unconstrained)
    # each relaxation's value bounds the optimum from below (exactly when the sizes are whole DP units)
    bound = max(value, solve(theta, lo, resolution)[1] if lo > 0 else -np.inf)
    return Choice(_improve(options, _fill(options, picked, budget, limit), budget, limit), True, bound, unconstrained)


def _improve(options: dict[str, list[Option]], picked: dict[str, Option], budget: int,
             limit: SpeedLimit) -> dict[str, Option]:
    """Local search after the relaxation, whose choice lies on the convex hull of (time, kl) and may miss a better
    one off it: the best change of one or two tensors' types that lowers Σ kl within the budget and both limits,
    again and again (all pairs at once in numpy: a few hundred options give a few hundred thousand pairs)."""
    names = list(options)
    flat = [(i, o) for i, n in enumerate(names) for o in options[n]]
    owner = np.array([i for i, _ in flat])
    attrs = np.array([[o.nbytes, o.kl, o.gen, o.prompt] for _, o in flat], dtype=np.float64)
    picked = dict(picked)
    for _ in range(10 * len(flat)):
        now = np.array([[picked[n].nbytes, picked[n].kl, picked[n].gen, picked[n].prompt] for n in names])
        delta = attrs - now[owner]  # each option's change against its tensor's current pick
        total = now.sum(axis=0)
        room = np.array([budget - total[0], np.inf, limit.generation * (1 + 1e-12) - total[2],
                         limit.prompt * (1 + 1e-12) - total[3]])
        single = (delta[:, [0, 2, 3]] <= room[[0, 2, 3]]).all(axis=1) & (delta[:, 1] < 0)
        pair = delta[:, None, :] + delta[None, :, :]
        ok = ((pair[..., 0] <= room[0]) & (pair[..., 2] <= room[2]) & (pair[..., 3] <= room[3])
              & (owner[:, None] < owner[None, :]) & (pair[..., 1] < 0))
        best_single = delta[single, 1].min() if single.any() else 0.0
        best_pair = pair[..., 1][ok].min() if ok.any() else 0.0
        if min(best_single, best_pair) >= -1e-15 * max(total[1], 1e-300):
            break
        if best_single <= best_pair:
            k = int(np.flatnonzero(single)[np.argmin(delta[single, 1])])
            picked[names[owner[k]]] = flat[k][1]
        else:
            a, b = np.unravel_index(np.argmin(np.where(ok, pair[..., 1], np.inf)), ok.shape)
            picked[names[owner[a]]], picked[names[owner[b]]] = flat[a][1], flat[b][1]
    return picked


def _repair(options: dict[str, list[Option]], picked: dict[str, Option], budget: int,
            limit: SpeedLimit) -> dict[str, Option]:
    """Single swaps that fit the budget, each the one that takes the most time off the excess over the limits per KL
    it adds, until the choice is within the limits or no swap takes time off."""
    picked = dict(picked)

    def excess(gen: float, prompt: float) -> float:
        return (max(0.0, gen / limit.generation - 1) if limit.generation > 0 else 0.0) + \
               (max(0.0, prompt / limit.prompt - 1) if limit.prompt > 0 else 0.0)

    while not limit.allows(picked):
        left = budget - sum(o.nbytes for o in picked.values())
        gen, prompt = _times(picked)
        now = excess(gen, prompt)
        best, swap = 0.0, None
        for n, opts in options.items():
            p = picked[n]
            for o in opts:
                if o is p or o.nbytes - p.nbytes > left:
                    continue
                saved = now - excess(gen - p.gen + o.gen, prompt - p.prompt + o.prompt)
                if saved > 1e-12 * now and (rate := saved / max(o.kl - p.kl, 1e-300)) > best:
                    best, swap = rate, (n, o)
        if swap is None:
            return picked
        picked[swap[0]] = swap[1]
    return picked


def _times(picked) -> tuple[float, float]:
    values = picked.values() if isinstance(picked, dict) else picked
    return sum(o.gen for o in values), sum(o.prompt for o in values)


def _slowness(picked: dict[str, Option], limit: SpeedLimit) -> float:
    gen, prompt = _times(picked)
    return max(gen / limit.generation if limit.generation > 0 else 0.0,
               prompt / limit.prompt if limit.prompt > 0 else 0.0)


def _least(options: dict[str, list[Option]], budget: int, resolution: int, cost) -> dict[str, Option]:
    """The exact byte DP of choose() with cost(option) for kl, before the rounding's leftovers are spent."""
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
            cand = best[: cap + 1 - w] + cost(o)  # option k at c units: the best of the others at c - w
            into, chosen = new[w:], picks[i, w:]  # views: the updates land in new and picks
            better = cand < into
            into[better], chosen[better] = cand[better], k
        best = new
    picked, c = {}, cap
    for i in reversed(range(len(names))):
        k = int(picks[i, c])
        picked[names[i]] = options[names[i]][k]
        c -= units[names[i]][k]
    return {n: picked[n] for n in names}


def _fill(options: dict[str, list[Option]], picked: dict[str, Option], budget: int,
          limit: SpeedLimit | None) -> dict[str, Option]:
    """What the rounding (or the relaxation) left spent: the largest saving among the options that fit, again and
    again, within the budget and the limit."""
    picked = dict(picked)
    left = budget - sum(o.nbytes for o in picked.values())
    gen, prompt = _times(picked)
    slack_gen, slack_prompt = (np.inf, np.inf) if limit is None else (limit.generation - gen, limit.prompt - prompt)
    while True:
        gain, name, o = max(((p.kl - o.kl, n, o) for n, opts in options.items() for p in [picked[n]] for o in opts
                             if o.kl < p.kl and o.nbytes - p.nbytes <= left
                             and o.gen - p.gen <= slack_gen and o.prompt - p.prompt <= slack_prompt),
                            default=(0.0, None, None), key=lambda t: t[0])
        if name is None:
            return {n: picked[n] for n in options}
        p = picked[name]
        left -= o.nbytes - p.nbytes
        slack_gen -= o.gen - p.gen
        slack_prompt -= o.prompt - p.prompt
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
    speed: dict | None = None  # the speed floor's reference, predicted speeds and what the floor cost (speed_summary)

    def summary(self) -> dict:
        return {"budget": self.budget, "what": self.what, "file_bytes": self.file_bytes,
                "predicted_kld": self.predicted_kl, "recipe_predicted_kld": self.recipe_kl,
                "recipe_bytes": self.recipe_bytes, "seconds": round(self.seconds, 3),
                "frontier": self.frontier, "ftypes": self.ftypes, **({"speed": self.speed} if self.speed else {}),
                "options": {name: [[o.qtype.name, o.nbytes, o.kl, o.gen, o.prompt] for o in opts]
                            for name, opts in self.options.items()}}


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
                  progress=None, speed_floor: float = 0.95,
                  reference: str | None = None) -> tuple[list[TensorPlan], Allocation]:
    """`plan` with each allocatable tensor's type chosen within `budget` bytes for the whole file, from sensitivities
    measured on calibration windows `ids`.  weighted: the method fits with importance (imatrix, GPTQ's grids).
    recipe_of(ftype): llama.cpp's plan for an ftype, to mark the ftypes on the reported frontier and to find the
    speed floor's reference.  speed_floor: the chosen types' predicted speed in llama.cpp (generation and prompt,
    edgequant.compute_cost) is kept at least this fraction of the reference recipe's (0: no floor); reference: the
    ftype whose recipe that is (--target auto:FTYPE), else speed_reference's."""
    from . import sensitivity

    t0 = time.perf_counter()
    sens = sensitivity.measure(m, ids, device, progress=progress)
    options = measure_options(m, plan, sens, layout, device, weighted, progress)
    fixed = layout.padded(layout.header) + sum(layout.padded(t.nbytes) for t in plan if t.name not in options)
    limit = speed = None
    if speed_floor > 0:
        reference, reference_plan = speed_reference(options, plan, fixed, budget, recipe_of, reference)
        cost = compute_cost([(q, t.shape[-1]) for t in [*plan, *reference_plan] if t.name in options
                             for q in {*(o.qtype for o in options[t.name]), t.qtype}])
        options = with_times(options, plan, cost)
        ref_gen, ref_prompt = plan_times(reference_plan, options, cost)
        limit = SpeedLimit(ref_gen / speed_floor, ref_prompt / speed_floor)
    try:
        choice = choose_within(options, budget - fixed, limit)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    chosen = choice.picked
    if limit is not None:
        speed = speed_summary(choice, speed_floor, reference, ref_gen, ref_prompt, cost)
    new = [dataclasses.replace(t, qtype=chosen[t.name].qtype) if t.name in chosen else t for t in plan]
    recipe_kl = (recipe_point(options, plan, fixed) or (0, float("nan")))[1]
    ftypes = {f: point for f in FRONTIER_FTYPES if recipe_of is not None
              and (point := recipe_point(options, recipe_of(f), fixed)) is not None}
    return new, Allocation(budget, what, layout.file_bytes(new), sum(o.kl for o in chosen.values()), recipe_kl,
                           layout.file_bytes(plan), options, {n: o.qtype for n, o in chosen.items()},
                           time.perf_counter() - t0, frontier(options, fixed), ftypes, speed)


def speed_reference(options: dict[str, list[Option]], plan: list[TensorPlan], fixed: int, budget: int, recipe_of,
                    reference: str | None) -> tuple[str, list[TensorPlan]]:
    """(ftype, its plan): the recipe whose speed the allocation must keep.  --target auto:FTYPE: FTYPE's, the file
    the user would otherwise build at that size.  --size and --bpw: the largest of llama.cpp's K-quant ftypes
    (FRONTIER_FTYPES) whose file fits the budget — the file a user holding that budget would pick from llama.cpp's
    list, so the allocation gives its bytes more quality without taking that file's speed — or, when none fits,
    the smallest of them (the budget is then below every recipe; the floor is met where the bytes allow)."""
    if reference is not None:
        return reference, plan if recipe_of is None else recipe_of(reference)
    if recipe_of is None:
        return "the recipe", plan
    sized = [(point[0], f) for f in FRONTIER_FTYPES if (point := recipe_point(options, recipe_of(f), fixed))]
    if not sized:
        return "the recipe", plan
    fits = [(size, f) for size, f in sized if size <= fixed + budget]
    ftype = max(fits)[1] if fits else min(sized)[1]
    return ftype, recipe_of(ftype)


def multiplied(name: str, names) -> tuple[bool, bool]:
    """(in generation, in prompt processing): is the tensor a weight llama.cpp multiplies by, per token?
    token_embd is looked up (get_rows), not multiplied, unless it is also the output (tied embeddings); the output
    projection is multiplied for the last token of a prompt batch only (llama-bench's and `edgequant bench`'s pp),
    a share of the prompt's time that vanishes with the batch."""
    if name == "token_embd.weight":
        tied = "output.weight" not in names
        return tied, False
    return True, name != "output.weight"


def with_times(options: dict[str, list[Option]], plan: list[TensorPlan], cost: ComputeCost) -> dict[str, list[Option]]:
    """options with each one's seconds per token in generation and prompt processing, by `cost`."""
    names = {t.name for t in plan}
    out = {}
    for t in plan:
        if t.name not in options:
            continue
        gen, prompt = multiplied(t.name, names)
        n, k = int(np.prod(t.shape)), t.shape[-1]
        out[t.name] = [dataclasses.replace(o, gen=n * cost.generation[o.qtype, k] if gen else 0.0,
                                           prompt=n * cost.prompt[o.qtype, k] if prompt else 0.0)
                       for o in options[t.name]]
    return out


def plan_times(plan: list[TensorPlan], options: dict[str, list[Option]], cost: ComputeCost) -> tuple[float, float]:
    """Σ seconds per token (generation, prompt) of `plan`'s allocatable tensors in their planned types."""
    names = {t.name for t in plan}
    gen = prompt = 0.0
    for t in plan:
        if t.name in options:
            g, p = multiplied(t.name, names)
            n, k = int(np.prod(t.shape)), t.shape[-1]
            gen += n * cost.generation[t.qtype, k] if g else 0.0
            prompt += n * cost.prompt[t.qtype, k] if p else 0.0
    return gen, prompt


def speed_summary(choice: Choice, floor: float, reference: str, ref_gen: float, ref_prompt: float,
                  cost: ComputeCost) -> dict:
    """Predicted speeds (the reference recipe's time over the choice's: 1.0 is as fast, higher is faster) of the
    choice and of the choice without the floor, and the predicted KLD the floor cost."""
    def ratios(picked) -> dict:
        gen, prompt = _times(picked)
        return {"generation": ref_gen / gen if gen > 0 else 1.0, "prompt": ref_prompt / prompt if prompt > 0 else 1.0}

    return {"floor": floor, "reference": reference, "met": choice.feasible, **ratios(choice.picked),
            "limit_seconds": {"generation": ref_gen / floor, "prompt": ref_prompt / floor},
            "predicted_kld_bound": choice.bound if np.isfinite(choice.bound) else None,
            "without_floor": {**ratios(choice.unconstrained),
                              "predicted_kld": sum(o.kl for o in choice.unconstrained.values())},
            "compute_cost": cost.as_dict()}


def measure_options(m: SourceModel, plan: list[TensorPlan], sens: dict[str, list[Sensitivity]], layout: GGUFLayout,
                    device: torch.device, weighted: bool, progress=None) -> dict[str, list[Option]]:
    """Tensor name -> an Option per type on its menu, for every tensor with a menu and a measured sensitivity."""
    hf = {t.gguf_name: t.hf_name for t in m.tensors.values()}
    todo = [t for t in plan if menu(t.name, t.shape) and t.name in sens]
    task = progress.add_task("costing types", total=len(todo)) if progress is not None else None
    options = {}
    for t in todo:
        # HF's row order: the sensitivities' (GGUF may permute rows, as llama's q/k; rows are fitted independently)
        w = m.checkpoint.load(hf[t.name])
        uses = sens[t.name]
        rows = sample_rows(uses, w.shape)
        w = w[torch.from_numpy(rows)].to(device).float()  # only the measured rows converted (exactly, from bf16/f16)
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

"""`edgequant build`, stage by stage, each in its module, each handing the next a typed result:

    plan        edgequant.plan       tensor -> type from llama.cpp's recipe for the target   list[TensorPlan]
    calibrate   edgequant.calibration  token windows (kept in the work directory for GPTQ)    Calibration
    allocate    edgequant.allocate   with a size budget: every tensor's type chosen by what it costs this model
    solve       edgequant.solve      scales and codes by the method: packed tensors + an Encoder   Solved
    write       edgequant.write      metadata, then each tensor, into one GGUF, atomically

Tensors stream one at a time from the checkpoint into the output file; the file appears only when complete.
GPTQ's finished layers are kept in a work directory until then, so that a killed build resumes (edgequant.workdir).
"""

from __future__ import annotations

import glob
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .budget import Budget, BudgetSpec, budget_bytes
from .convert.gguf_out import GGUFLayout, TensorPlan, check_output_path
from .distributed import SINGLE, World
from .errors import UserError
from .model import SourceModel
from .plan import calibrates, check_plan, parse_target, plan_tensors
from .progress import Progress
from .settings import CalibOptions
from .solve import Solved, solve_plan
from .write import Encoder, gguf_layout, write_gguf

if TYPE_CHECKING:
    from .calibration import Calibration
    from .workdir import WorkDir

FREE_SPACE_MARGIN = 64 * 2**20  # metadata (vocabularies reach a few MiB), filesystem overhead


@dataclass
class BuildResult:
    path: Path
    plan: list[TensorPlan]
    n_params: int
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: load, sampling, allocation, calibration, solve, write
    report: dict = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)  # rss_bytes, cuda_bytes

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.plan)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.n_params, 1)


def build(model: str, target: str, out: Path, method: str = "rtn", calib: CalibOptions | None = None,
          encoder: Encoder | None = None, verify: bool = False, quiet: bool = False,
          work_dir: Path | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
          budget: BudgetSpec | None = None, speed_floor: float = 0.95, world: World = SINGLE) -> BuildResult | None:
    """`encoder` overrides `method` (tests use it to inject failures).  `verify`: re-read the written file and check
    that gguf-py dequantizes every GPTQ tensor to exactly the weights the solver produced.  `work_dir` (default
    OUT.work next to the output) keeps GPTQ's finished layers: a killed build run again resumes from them, and
    writes the same bytes; it is removed once the GGUF is written.  `allow_pickle`, `trust_remote_code`: see
    edgequant.checkpoint.  `budget` (edgequant.budget.budget_request): the file's size, within which the tensors'
    types are chosen; `target`'s recipe is then only the plan the allocation starts from.  `speed_floor`: with a
    budget, the least predicted speed in llama.cpp against the recipe of that size (edgequant.allocate; 0: none).
    world: the processes a GPTQ build is spread over (edgequant.distributed; every rank calls build() alike); the
    writer (rank 0) writes the file and returns the result, the others None."""
    quiet = quiet or not world.writer
    with Progress(quiet) as progress:
        t0 = time.perf_counter()
        loading = progress.add_task(f"loading {model}", total=None)
        ftype = parse_target(target)
        check_output_path(out)
        for partial in () if not world.writer else out.parent.glob(f".{glob.escape(out.name)}.*.partial"):  # atomic_output's, left by a killed build
            partial.unlink(missing_ok=True)
        m = SourceModel(model, allow_pickle, trust_remote_code)
        # plan
        plan = plan_tensors(m, ftype, has_imatrix=method != "rtn")
        if encoder is None and budget is None:  # with a budget, the types the allocation chooses are checked
            check_plan(plan, ftype, method)
        allowed = layout = None
        if budget is not None and m.n_expert:  # the sensitivity pass has no expert stacks yet
            raise UserError("--size/--bpw/--target auto: are not supported for mixtures of experts yet: use a fixed "
                            "--target such as Q4_K_M")
        if budget is not None:  # before anything heavy: a budget out of range fails at once
            layout = gguf_layout(m, ftype, plan)
            allowed = budget_bytes(budget, layout, plan, lambda f: plan_tensors(m, f, has_imatrix=method != "rtn"))
            if method == "rtn" and encoder is None:
                raise UserError(f"{allowed.what}: types are chosen by what they cost this model, measured on calibration "
                                f"text: use --method gptq (the default) or imatrix")
        result = BuildResult(out, plan, sum(int(np.prod(t.shape)) for t in plan))
        calib = calib or CalibOptions()
        if world.size > 1 and (encoder is not None or method != "gptq" or not calibrates(method, plan) or allowed):
            raise UserError(f"{world.size} processes spread GPTQ's calibration and solves over them: only a --method "
                            f"gptq build to a fixed quantized --target (no --size/--bpw/auto:) can use them; run this "
                            f"one as one process")
        work = None
        if encoder is None and method == "gptq" and calibrates(method, plan):
            from .workdir import WorkDir, build_identity  # torch: only GPTQ builds need it

            identity = build_identity(m, ftype if allowed is None else f"{ftype} {allowed.what}", method, calib)
            work = WorkDir(work_dir or out.with_name(out.name + ".work"), identity)
        check_free_space(out, result.nbytes if allowed is None else allowed.total_bytes, work, calib, m)
        progress.remove_task(loading)
        result.seconds["load"] = time.perf_counter() - t0
        try:
            # calibrate
            windows = None
            if encoder is None and (allowed is not None or (calibrates(method, plan) and calib.imatrix is None)):
                t0 = time.perf_counter()
                windows = calibration_windows(m, calib, work, progress, world)
                sampling = sum(p.get("seconds", 0.0) for p in windows.parts)  # self-calibration's generation
                result.seconds["calibration"] = time.perf_counter() - t0 - sampling
                if sampling:
                    result.seconds["sampling"] = sampling
            # allocate
            if allowed is not None:
                t0 = time.perf_counter()
                plan, allocation = allocate_types(m, plan, allowed, layout, calib, windows, progress, speed_floor)
                result.plan, result.seconds["allocation"] = plan, time.perf_counter() - t0
                if encoder is None:
                    check_plan(plan, ftype, method)
            # solve
            if encoder is not None:
                solved = Solved(encoder)
            else:
                t0 = time.perf_counter()
                solved = solve_plan(method, m, plan, calib, windows, work, progress, digests=verify, world=world)
                solve = solved.report["gptq"].seconds.get("solve", 0.0) if "gptq" in solved.report else 0.0
                if method != "rtn":
                    result.seconds["calibration"] = (result.seconds.get("calibration", 0.0)
                                                     + time.perf_counter() - t0 - solve)
                if solve:
                    result.seconds["solve"] = solve
            result.report = solved.report
            if allowed is not None:
                result.report["allocation"] = allocation
            if not world.writer:
                return None
            # write
            t0 = time.perf_counter()
            digests = None
            if verify and "gptq" in result.report:
                gptq = result.report["gptq"]
                digests = gptq.digest
                if unchecked := len(gptq.loss) - len(digests):
                    print(f"edgequant: --verify: {unchecked} tensors solved by an earlier run without --verify are not "
                          f"checked", file=sys.stderr)
            write_gguf(out, m, ftype, plan, solved.encoder, progress, digests, solved.packed, mixed=allowed is not None)
        except UserError:  # bad input: what is in the work directory would not help a rerun
            if work is not None and world.writer:
                work.remove()
            raise
        if work is not None:
            work.remove()
        result.seconds["write"] = time.perf_counter() - t0
    result.peak_memory = peak_memory()
    return result


def calibration_windows(m: SourceModel, calib: CalibOptions, work: WorkDir | None, progress,
                        world: World = SINGLE) -> Calibration:
    """The build's calibration windows: drawn once (by the writer, handed to the other ranks), and for GPTQ kept in
    `work`, where a rerun finds them."""
    from .calibration import draw

    make = lambda: draw(calib, m, progress)  # noqa: E731
    windows = (work.calibration(make) if work is not None else make()) if world.writer else None
    return world.agree(windows)


def allocate_types(m: SourceModel, plan: list[TensorPlan], budget: Budget, layout: GGUFLayout, calib: CalibOptions,
                   windows: Calibration, progress, speed_floor: float = 0.95):
    """(plan with its types chosen within the budget, the edgequant.allocate.Allocation)."""
    from .allocate import allocate_plan

    return allocate_plan(m, plan, budget.total_bytes, budget.what, layout, windows.ids, calib.torch_device(),
                         weighted=True, progress=progress, recipe_of=lambda f: plan_tensors(m, f, has_imatrix=True),
                         speed_floor=speed_floor, reference=budget.ftype)


def peak_memory() -> dict[str, int]:
    """This process's peak resident memory (getrusage) and, if CUDA was used, torch's peak allocated GPU memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux
    peak = {"rss_bytes": rss}
    torch = sys.modules.get("torch")  # not imported by an RTN build that needs no torch
    if torch is not None and torch.cuda.is_initialized():
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def check_free_space(out: Path, out_bytes: int, work: WorkDir | None, calib: CalibOptions, m: SourceModel) -> None:
    """UserError up front when the disk cannot take the output (tensors + metadata margin), plus for GPTQ its work
    directory (packed layers ≈ the output, and the current and next layers' inputs)."""
    needs = [(out.parent, out_bytes)]
    if work is not None:
        hidden = calib.samples * min(calib.seqlen, m.hp.n_ctx) * m.hp.n_embd * 4
        needs.append((next(p for p in (work.path, *work.path.parents) if p.exists()), out_bytes + 2 * hidden))
    by_device: dict[int, tuple[Path, int]] = {}
    for path, n in needs:
        device = path.stat().st_dev
        first, total = by_device.get(device, (path, 0))
        by_device[device] = (first, total + n)
    for path, n in by_device.values():
        need, free = n + FREE_SPACE_MARGIN, shutil.disk_usage(path).free
        if free < need:
            raise UserError(f"not enough free disk space in {path}: this build needs about {need / 2**20:,.0f} MiB, "
                            f"{free / 2**20:,.0f} MiB are free")



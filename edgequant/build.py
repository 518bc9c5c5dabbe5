"""`edgequant build`: source model -> per-tensor types from llama.cpp's recipe -> encoded tensors -> one GGUF.

Tensors stream one at a time from the checkpoint into the output file; the file appears only when complete.
GPTQ's finished layers are kept in a work directory until then, so that a killed build resumes (edgequant.workdir).
"""

from __future__ import annotations

import contextlib
import glob
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import gguf
import numpy as np

from .budget import Budget, BudgetSpec, budget_bytes
from .convert.encode import worker_count
from .convert.gguf_out import GGUFLayout, StreamingGGUF, TensorPlan, atomic_output, check_output_path
from .convert.recipes import FTYPES, ArchFacts, tensor_type
from .errors import UserError
from .metadata import write_metadata
from .methods import CalibOptions, Encoder, Packed, calibrates, make_encoder
from .model import SourceModel, layer_of
from .progress import Progress

if TYPE_CHECKING:
    from .workdir import WorkDir

FREE_SPACE_MARGIN = 64 * 2**20  # metadata (vocabularies reach a few MiB), filesystem overhead


@dataclass
class BuildResult:
    path: Path
    plan: list[TensorPlan]
    n_params: int
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: load, calibration, solve, write
    report: dict = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)  # rss_bytes, cuda_bytes

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.plan)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.n_params, 1)


def parse_target(target: str) -> str:
    name = target.upper()
    if name not in FTYPES:
        raise UserError(f"unknown --target {target!r}; choose one of: {', '.join(FTYPES)}")
    return name


def plan_tensors(m: SourceModel, ftype: str, has_imatrix: bool = False) -> list[TensorPlan]:
    facts = ArchFacts(n_head=m.hp.n_head, n_head_kv=m.hp.n_head_kv, has_output=not m.hp.tied_embeddings, name=m.arch.name)
    return [
        TensorPlan(t.gguf_name, t.shape, tensor_type(t.gguf_name, layer_of(t.gguf_name), m.hp.n_layers, ftype, t.shape, facts, has_imatrix=has_imatrix))
        for t in m.tensors.values()
    ]


def build(model: str, target: str, out: Path, method: str = "rtn", calib: CalibOptions | None = None,
          encoder: Encoder | None = None, verify: bool = False, quiet: bool = False,
          work_dir: Path | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
          budget: BudgetSpec | None = None) -> BuildResult:
    """`encoder` overrides `method` (tests use it to inject failures).  `verify`: re-read the written file and check
    that gguf-py dequantizes every GPTQ tensor to exactly the weights the solver produced.  `work_dir` (default
    OUT.work next to the output) keeps GPTQ's finished layers: a killed build run again resumes from them, and
    writes the same bytes; it is removed once the GGUF is written.  `allow_pickle`, `trust_remote_code`: see
    edgequant.checkpoint.  `budget` (edgequant.budget.budget_request): the file's size, within which the tensors'
    types are chosen; `target`'s recipe is then only the plan the allocation starts from."""
    with Progress(quiet) as progress:
        t0 = time.perf_counter()
        loading = progress.add_task(f"loading {model}", total=None)
        ftype = parse_target(target)
        check_output_path(out)
        for partial in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):  # atomic_output's, left by a killed build
            partial.unlink(missing_ok=True)
        m = SourceModel(model, allow_pickle, trust_remote_code)
        plan = plan_tensors(m, ftype, has_imatrix=method != "rtn")
        allowed = None
        if budget is not None:  # before anything heavy: a budget out of range fails at once
            layout = gguf_layout(m, ftype, plan)
            allowed = budget_bytes(budget, layout, plan, lambda f: plan_tensors(m, f, has_imatrix=method != "rtn"))
            if method == "rtn" and encoder is None:
                raise UserError(f"{allowed.what}: types are chosen by what they cost this model, measured on calibration "
                                f"text: use --method gptq (the default) or imatrix")
        result = BuildResult(out, plan, sum(int(np.prod(t.shape)) for t in plan))
        calib = calib or CalibOptions()
        work = None
        if encoder is None and method == "gptq" and calibrates(method, plan):
            from .workdir import WorkDir, build_identity  # torch: only GPTQ builds need it

            identity = build_identity(m, ftype if allowed is None else f"{ftype} {allowed.what}", method, calib)
            work = WorkDir(work_dir or out.with_name(out.name + ".work"), identity)
        check_free_space(out, result.nbytes if allowed is None else allowed.total_bytes, work, calib, m)
        progress.remove_task(loading)
        result.seconds["load"] = time.perf_counter() - t0
        packed = {}
        try:
            windows, sampled = None, 0.0
            if allowed is not None:
                t0 = time.perf_counter()
                plan, allocation, windows = allocate_types(m, plan, allowed, layout, calib, work, progress)
                sampled = sum(p.get("seconds", 0.0) for p in (windows.parts if windows is not None else []))  # self-calibration ran here
                result.plan, result.seconds["allocation"] = plan, time.perf_counter() - t0 - sampled
            if encoder is None:
                t0 = time.perf_counter()
                encoder, result.report, packed = make_encoder(method, m, plan, calib, progress, work, digests=verify,
                                                              windows=windows)
                if method != "rtn":
                    solve = result.report["gptq"].seconds.get("solve", 0.0) if "gptq" in result.report else 0.0
                    sampling = sum(p.get("seconds", 0.0) for p in result.report.get("calibration", []))
                    result.seconds["calibration"] = time.perf_counter() - t0 - solve - (sampling - sampled)
                    for phase, seconds in (("sampling", sampling), ("solve", solve)):
                        if seconds:
                            result.seconds[phase] = seconds
            if allowed is not None:
                result.report["allocation"] = allocation
            t0 = time.perf_counter()
            digests = None
            if verify and "gptq" in result.report:
                gptq = result.report["gptq"]
                digests = gptq.digest
                if unchecked := len(gptq.loss) - len(digests):
                    print(f"edgequant: --verify: {unchecked} tensors solved by an earlier run without --verify are not "
                          f"checked", file=sys.stderr)
            write_gguf(out, m, ftype, plan, encoder, progress, digests, packed, mixed=allowed is not None)
        except UserError:  # bad input: what is in the work directory would not help a rerun
            if work is not None:
                work.remove()
            raise
        if work is not None:
            work.remove()
        result.seconds["write"] = time.perf_counter() - t0
    result.peak_memory = peak_memory()
    return result


def allocate_types(m: SourceModel, plan: list[TensorPlan], budget: Budget, layout: GGUFLayout, calib: CalibOptions,
                   work: WorkDir | None, progress):
    """(plan with its types chosen within the budget, the edgequant.allocate.Allocation, the calibration windows it
    measured on: the build's own, kept in `work` for GPTQ)."""
    from .allocate import allocate_plan
    from .methods import token_windows

    make = lambda: token_windows(calib, m, progress)  # noqa: E731
    windows = work.calibration(make) if work is not None else make()
    plan, allocation = allocate_plan(m, plan, budget.total_bytes, budget.what, layout, windows.ids,
                                     calib.torch_device(), weighted=True, progress=progress,
                                     recipe_of=lambda f: plan_tensors(m, f, has_imatrix=True))
    return plan, allocation, windows


def write_gguf(out: Path, m: SourceModel, ftype: str, plan: list[TensorPlan], encoder: Encoder, progress,
               digests: dict[str, str] | None = None, packed: Packed | None = None, mixed: bool = False) -> None:
    """Metadata, then each planned tensor as `encoder` makes it (or as `packed` has it, without loading its
    weights), into `out` atomically; then, given the solver's digests, check that the file dequantizes to them.

    With more than one worker (convert.encode.worker_count) this is a pipeline: a reader thread loads up to
    LOAD_AHEAD tensors ahead (the first ones while the metadata is written) and a writer thread writes the previous
    tensor's bytes, while this thread encodes (the C fits, the reads and the widening run without the GIL).  With
    one worker every step runs in turn on this thread."""
    packed = packed or {}
    load = lambda name: packed[name]() if name in packed else m.load(name)  # noqa: E731
    with atomic_output(out) as tmp, pipeline_threads(worker_count() > 1) as (reader, writer):
        loads = deque(reader.submit(load, t.name) for t in plan[:LOAD_AHEAD])
        stream = start_gguf(tmp, m, ftype, plan, mixed)
        task = progress.add_task(f"writing {out.name}", total=len(plan))
        written = None
        for i, t in enumerate(plan):
            w = loads.popleft().result()
            if i + LOAD_AHEAD < len(plan):
                loads.append(reader.submit(load, plan[i + LOAD_AHEAD].name))
            progress.update(task, description=f"writing {t.name} → {t.qtype.name}")
            raw = w if t.name in packed else encoder(t.name, w, t.qtype)
            del w
            if written is not None:
                written.result()  # one tensor's bytes in flight: writes stay in plan order, errors surface here
            written = writer.submit(stream.write, t.name, raw)
            progress.advance(task)
        if written is not None:
            written.result()
        stream.close()
        if digests is not None:
            verify_digests(tmp, digests)


def start_gguf(path: Path, m: SourceModel, ftype: str, plan: list[TensorPlan], mixed: bool = False) -> StreamingGGUF:
    """`path` with everything before the tensor data written: the metadata and `plan`'s tensor directory.  mixed:
    the types are not `ftype`'s recipe (a size budget chose them), so general.file_type carries llama.cpp's
    "guessed" flag: llama.cpp then names the file "<ftype> (guessed)"."""
    writer = gguf.GGUFWriter(path, m.arch.name)
    write_metadata(writer, m, FTYPES[ftype] | (gguf.LlamaFileType.GUESSED if mixed else 0))
    return StreamingGGUF(writer, plan)


def gguf_layout(m: SourceModel, ftype: str, plan: list[TensorPlan]) -> GGUFLayout:
    """The header size and alignment of the GGUF `write_gguf` writes for `m` and `plan`'s tensors (in any types):
    the header is written once by the same code, without tensor data, to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="edgequant-header-") as d:
        path = Path(d) / "header.gguf"
        writer = start_gguf(path, m, ftype, plan).writer
        writer.close()
        return GGUFLayout(path.stat().st_size, writer.data_alignment)


LOAD_AHEAD = 2  # tensors loaded ahead of the one encoding: a large one (the output head) after small ones is ready


@contextlib.contextmanager
def pipeline_threads(threaded: bool) -> Iterator[tuple[Executor, Executor]]:
    """(reader, writer): one thread each, or both running every call at once on the caller's thread."""
    if not threaded:
        yield InCallerThread(), InCallerThread()
        return
    with ThreadPoolExecutor(1, "edgequant-load") as reader, ThreadPoolExecutor(1, "edgequant-write") as writer:
        try:
            yield reader, writer
        except BaseException:
            reader.shutdown(cancel_futures=True)  # a failed build does not wait for loads it will not use
            raise


class InCallerThread(Executor):
    """An executor that runs each call at once, in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


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


def verify_digests(path: Path, digests: dict[str, str]) -> None:
    from .methods import digest

    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name in digests:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            if digest(w) != digests[t.name]:
                raise UserError(f"--verify: {t.name} in the written file does not dequantize to the solver's weights")

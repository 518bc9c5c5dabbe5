"""The solve stage of a build: how every quantized tensor's block scales and codes are chosen, by method:

  rtn      round to nearest, exactly llama-quantize (no calibration)
  imatrix  importance-weighted fitting, exactly llama-quantize --imatrix (importance from --imatrix FILE, or from our
           own calibration pass, defined as llama-imatrix defines it: per input column, mean of squared activations)
  gptq     GPTQ on the tensor's llama.cpp grid, layer by layer with the quantized layers feeding the next

It takes the plan (tensor -> type) and the calibration windows, and hands the writer a Solved: the tensors it
packed itself (GPTQ's) and an Encoder for the rest.  GPTQ's packed layers are saved to the work directory as each
layer finishes, because a killed build resumes from them; the writer reads them back from there (the page cache,
in practice) rather than holding a whole file's bytes in memory beside the layer pass's.

Reproducibility: on the CPU the same inputs and seed give a byte-identical GGUF, even with another thread count.
Measured with torch's MKL build: its GEMMs (the calibration forward, the Σ xᵀx sums) split the output, not the sum,
over threads, so they do not depend on the thread count at these shapes; its LAPACK Cholesky does, so each GPTQ
solve runs on one thread (its per-column steps are faster so anyway; its per-block GEMM loses the other cores).  MKL itself promises this only
per thread count (MKL_CBWR), so the guarantee we test is: same machine, same torch, same inputs -> same bytes.
On a GPU, cuBLAS promises bit-identical GEMMs run to run only on the same GPU architecture and SM count with
the same toolkit (and one stream); kernels that accumulate with atomics (scatter/index_add, some attention backends)
promise nothing, nor does anything hold across GPUs or software versions: GPU builds repeat in practice, not by
guarantee.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .convert.codecs import codec
from .convert.encode import FLOAT_TYPES
from .convert.gguf_out import TensorPlan
from .convert.imatrix_file import read_imatrix
from .distributed import SINGLE, World
from .errors import UserError
from .model import SourceModel, hf_to_gguf
from .plan import calibrates
from .settings import METHODS, CalibOptions, GptqSettings
from .write import Encoder, Packed, digest, rtn_encoder

# torch and layerwise (torch, transformers) are imported only where a method starts calibrating: an RTN or float
# build needs neither, and importing torch alone takes longer than a small RTN build.
if TYPE_CHECKING:
    import torch

    from .calibration import Calibration
    from .workdir import WorkDir


@dataclass
class Solved:
    """What the solve stage hands the writer: the tensors it packed (GPTQ's, GGUF name -> a reader of their bytes),
    an Encoder for every other tensor, and its report for the summary (per method: "gptq" a GptqReport,
    "calibration" the windows' sources, "imatrix" the file used)."""

    encoder: Encoder
    packed: Packed = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def solve_plan(method: str, m: SourceModel, plan: list[TensorPlan], calib: CalibOptions, windows: Calibration | None,
               work: WorkDir | None = None, progress=None, digests: bool = False, world: World = SINGLE) -> Solved:
    """Solve `plan` by `method` on the calibration `windows` (None where the method needs none: rtn, an imatrix
    file).  GPTQ needs `work`, where its finished layers stay for a rerun to resume from.  digests: record a digest
    of each solved Ŵ (for --verify)."""
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if not calibrates(method, plan):
        return Solved(rtn_encoder())
    if method == "imatrix":
        if calib.imatrix is not None:
            return Solved(rtn_encoder(read_imatrix(calib.imatrix)), report={"imatrix": str(calib.imatrix)})
        from .importance import collect_importance, mean_importance

        sums = collect_importance(m, windows.ids, calib.torch_device(), progress)
        return Solved(rtn_encoder(mean_importance(sums)), report={"calibration": windows.parts})
    report = gptq_layers(m, plan, windows.ids, calib.torch_device(), calib.gptq, work, progress, digests, world)
    return Solved(rtn_encoder(), {name: functools.partial(work.packed, name) for name in report.loss},
                  {"gptq": report, "calibration": windows.parts})


# Rows of one matrix solved at a time: rows are independent given H, and a solve holds several float32 copies of its
# rows.  An 8B's 128256-row head in one piece set the build's GPU peak: 19.25 GiB with the GPU defaults, 17.23 without
# the second stream; in parts the layers do, at 17.02 and 11.16 GiB.
ROWS_PER_SOLVE = 32768


@dataclass
class GptqReport:
    """Per tensor: GPTQ's loss ½·tr(E H Eᵀ) (E = W − Ŵ, on the calibration Hessian), the same loss for the
    importance-weighted round-to-nearest fit (what llama-quantize --imatrix would write), and with --verify a digest
    of Ŵ, so that the written file can be checked against what the solver produced."""

    loss: dict[str, float] = field(default_factory=dict)
    fit_loss: dict[str, float] = field(default_factory=dict)
    digest: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    act_order: dict[str, float] = field(default_factory=dict)  # share of the rows solved in act-order
    # expert stacks: per expert, the calibration tokens routed to it, "gptq" or "fit" (too few tokens: the
    # importance-weighted fit) and how many rows kept GPTQ's solution (solve_experts)
    experts: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, entries: dict[str, dict]) -> None:
        for name, e in entries.items():
            self.loss[name], self.fit_loss[name] = e["loss"], e["fit_loss"]
            if "experts" in e:
                self.experts[name] = e["experts"]
            self.act_order[name] = e.get("act_order", 0.0)  # layers saved by a build before it recorded this
            if "digest" in e:
                self.digest[name] = e["digest"]


def hessian_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    return float(row_losses(w, w_hat, h).sum())


def row_losses(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """½·(e H eᵀ) of every row's error e: rows are independent given H, so the loss of a matrix is their sum."""
    e = w.to(h) - w_hat.to(h)
    return 0.5 * ((e @ h) * e).sum(1)


def solve_in_order(target: torch.Tensor, h: torch.Tensor, c, settings: GptqSettings) -> tuple[object, torch.Tensor, int]:
    """GPTQ of `target` in settings.act_order's column order: (blocks, Ŵ, rows solved in act-order).  With "auto" both
    orders are solved and every row keeps the one with its lower loss: rows are independent given H (each has its
    own blocks), so the choice per row is exact, and the same however the rows are split into solves."""
    import torch

    from .gptq import solve
    from .gptq.solver import pick_rows

    orders = {"off": (False,), "on": (True,), "auto": (False, True)}[settings.act_order]
    sols = [solve(target, h, c, block_size=settings.block_size, damp=settings.damp, act_order=a, refine=settings.refine)
            for a in orders]
    if len(sols) == 1:
        return sols[0].blocks, sols[0].w_hat, len(target) if orders[0] else 0
    in_order, act = sols
    pick = row_losses(target, act.w_hat, h) < row_losses(target, in_order.w_hat, h)
    w_hat = torch.where(pick[:, None], act.w_hat, in_order.w_hat)
    return pick_rows(pick.cpu().numpy(), act.blocks, in_order.blocks), w_hat, int(pick.sum())


def importance_weighted_fit(c, w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Ŵ of codec.fit(w, importance) (what llama-quantize --imatrix writes), on w's device."""
    from .gptq.fitter import fit

    return fit(c, w, importance).dequantize()


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Pin torch to one thread on the CPU: MKL's Cholesky rounds differently with 1 and 2 threads."""
    import torch

    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# An expert is solved by GPTQ only when the calibration sent it at least as many tokens as its matrix has input
# columns: below that its Hessian has rank < cols, held up only by damping, and GPTQ fits those few tokens rather
# than the expert.  Such an expert gets the importance-weighted fit instead, i.e. exactly what --method imatrix (and
# llama-quantize --imatrix with the same importance) writes for it.
MIN_EXPERT_TOKENS_PER_COLUMN = 1.0


def solve_experts(w: torch.Tensor, stats, c, settings: GptqSettings, device: torch.device, what: str,
                  which: range | None = None):
    """An expert stack (n_expert, rows, cols) solved expert by expert, each on its own Hessian (layerwise.ExpertStats:
    the tokens routed to it, weighted by the router weight squared): GPTQ where enough tokens reached it
    (MIN_EXPERT_TOKENS_PER_COLUMN), and then per row whichever of GPTQ and the importance-weighted fit has the lower
    loss on that Hessian (rows are independent given H, so the choice is exact), so no expert is solved worse than
    --method imatrix would on its calibration tokens; else the importance-weighted fit alone.  Only one expert's
    Hessian is formed at a time.  (Ŵ stack, the codec's blocks of all experts' rows in order, the report entry:
    loss, fit_loss, act_order, rows and ordered (the rows solved in act-order), and per expert its tokens and what
    was done.)  which: the experts to solve (default all; the
    others' Ŵ are left unset, and the blocks are None if it is empty)."""
    import torch

    from .gptq.solver import concat_blocks, pick_rows
    from .gptq.fitter import fit

    w_hat, parts, ordered = torch.empty_like(w), [], 0
    experts = []
    # per expert (loss, fit's loss) as 0-d tensors on the device, read back once at the end: a host sync per value
    # would stall the GPU 2 x 384 times a layer of Qwen3-30B-A3B
    losses: list[tuple[torch.Tensor, torch.Tensor]] = []
    cols = w.shape[-1]
    which = range(w.shape[0]) if which is None else which
    for e in which:
        rows, n = w[e].contiguous(), int(stats.counts[e])
        imp = stats.importance(e).to(rows.device)
        fitted = fit(c, rows, imp)
        fit_hat = fitted.dequantize().to(rows)
        if n < MIN_EXPERT_TOKENS_PER_COLUMN * cols:
            h = stats.weighted[e].hessian if stats.weighted[e] is not None else None
            parts.append(fitted.blocks())
            w_hat[e] = fit_hat
            if h is not None:
                e_loss = row_losses(rows, fit_hat, h).sum()
                losses.append((e_loss, e_loss))
            experts.append({"tokens": n, "solve": "fit", "gptq_rows": 0})
            continue
        h = stats.weighted[e].hessian
        try:
            with one_cpu_thread(device):
                blocks, g_hat, e_ordered = solve_in_order(rows, h, c, settings)
        except ValueError as err:
            raise UserError(f"{what}, expert {e}, cannot be quantized to {c.qtype.name}: {err}") from None
        fit_rows = row_losses(rows, fit_hat, h)
        better_here = row_losses(rows, g_hat, h) <= fit_rows
        better = better_here.cpu().numpy()
        # the fit's blocks go to the host only where some row keeps them (GPTQ's rows nearly always win)
        parts.append(blocks if better.all() else pick_rows(better, blocks, fitted.blocks()))
        w_hat[e] = torch.where(better_here[:, None], g_hat.to(rows), fit_hat)
        losses.append((row_losses(rows, w_hat[e], h).sum(), fit_rows.sum()))
        ordered += e_ordered
        experts.append({"tokens": n, "solve": "gptq", "gptq_rows": int(better.sum())})
    loss = fit_loss = 0.0
    if losses:  # summed in expert order in float64, as Python floats
        for e_loss, e_fit in torch.stack([torch.stack(p) for p in losses]).double().cpu().tolist():
            loss, fit_loss = loss + e_loss, fit_loss + e_fit
    entry = {"loss": loss, "fit_loss": fit_loss, "act_order": ordered / max(len(which) * w.shape[1], 1),
             "experts": experts, "rows": len(which) * w.shape[1], "ordered": ordered}
    return w_hat, concat_blocks(parts, axis=0) if parts else None, entry


def solve_rows(w: torch.Tensor, mine: slice, stats, c, settings: GptqSettings, device: torch.device, what: str,
               qtype: str):
    """Rows `mine` of w (GGUF orientation) solved on their Hessian, ROWS_PER_SOLVE at a time: (Ŵ of w's shape, its
    rows `mine` set; their blocks, None if there are none; the report entry: loss, fit_loss, rows, and ordered, the
    rows solved in act-order).  Rows are independent given H, so how they are split changes no bits."""
    import torch

    from .gptq.solver import concat_blocks
    from .gptq.target import asymmetric_target

    h = stats.hessian
    w_hat, parts, loss, fit_loss, act_ordered = torch.empty_like(w), [], 0.0, 0.0, 0
    for r in range(mine.start, mine.stop, ROWS_PER_SOLVE):
        rows = w[r : min(r + ROWS_PER_SOLVE, mine.stop)]
        target = rows
        if settings.asymmetric and stats.cross is not None:
            target = asymmetric_target(rows, stats.s, stats.cross, settings.damp, settings.asymmetric)
        try:
            with one_cpu_thread(device):
                blocks, w_rows, ordered = solve_in_order(target, h, c, settings)
        except ValueError as e:  # H beyond any damping, or weights whose block scales overflow float16
            raise UserError(f"{what} cannot be quantized to {qtype}: {e} "
                            f"(largest |weight| {float(w.abs().max()):.3g})") from None
        parts.append(blocks)
        w_hat[r : r + len(rows)] = w_rows
        loss += hessian_loss(target, w_rows, h)
        act_ordered += ordered
        del w_rows
        fit_loss += hessian_loss(target, importance_weighted_fit(c, rows, h.diagonal()), h)
        del target
    entry = {"loss": loss, "fit_loss": fit_loss, "rows": mine.stop - mine.start, "ordered": act_ordered}
    return w_hat, concat_blocks(parts, axis=0) if parts else None, entry


def gptq_layers(m: SourceModel, plan: list[TensorPlan], ids: torch.Tensor, device: torch.device,
                settings: GptqSettings, work: WorkDir, progress=None, digests: bool = False,
                world: World = SINGLE) -> GptqReport:
    """Run GPTQ over the whole model now (the layers not already in `work`), each layer's packed blocks saved to
    `work` as it finishes.  digests: record a digest of each solved Ŵ (for --verify).  world: the processes the
    windows and every matrix's rows are spread over (edgequant.distributed); the writer keeps `work`, and its
    report is the build's."""
    import numpy as np

    from . import layerwise

    types = {t.name: t.qtype for t in plan}
    names = hf_to_gguf(m)
    report = GptqReport()
    host = ThreadPoolExecutor(max_workers=8)

    # the layer being solved (sequential: in groups): this rank's packed rows and report entries, the writer's digests
    pending: dict[str, dict] = {"packed": {}, "entries": {}, "digests": {}}

    def on_layer(index, weights):
        new = {}
        for hf_name, (w, stats) in weights.items():
            name = names[hf_name]
            qtype = types[name]
            if qtype in FLOAT_TYPES:
                continue
            c = codec(qtype)
            if isinstance(stats, layerwise.ExpertStats):
                n_expert = w.shape[0]
                mine = world.share_of(n_expert)
                w_hat, blocks, entry = solve_experts(w.detach().float(), stats, c, settings, device,
                                                     f"{hf_name} (layer {index})", range(mine.start, mine.stop))
                del entry["act_order"]  # joined over the ranks from rows and ordered
                world.share_rows(w_hat)
                new[hf_name] = w_hat
            else:
                w_here = m.to_gguf(hf_name, w.detach().float()).contiguous()  # on the device
                mine = world.share_of(len(w_here))
                w_hat, blocks, entry = solve_rows(w_here, mine, stats, c, settings, device,
                                                  f"{hf_name} (layer {index})", qtype.name)
                world.share_rows(w_hat)
                new[hf_name] = m.from_gguf(name, w_hat)
            # packing and hashing on host threads (both release the GIL), while the GPU goes on
            pending["packed"][name] = host.submit(lambda c=c, b=blocks: None if b is None else c.pack(b).reshape(-1))
            pending["entries"][name] = entry
            if digests and world.writer:  # Ŵ to the host only for --verify
                pending["digests"][name] = host.submit(digest, w_hat.cpu().numpy())
        return new

    def on_done(index):
        mine = {k: (f.result(), pending["entries"][k]) for k, f in pending["packed"].items()}
        every = world.gather_objects(mine)  # rank order: each rank's rows, in order
        if world.writer:
            packed, entries = {}, {}
            for k in mine:
                parts = [got[k] for got in every]
                packed[k] = np.concatenate([p for p, _ in parts if p is not None])
                entries[k] = joined = {"loss": sum(e["loss"] for _, e in parts),
                                       "fit_loss": sum(e["fit_loss"] for _, e in parts),
                                       "act_order": sum(e["ordered"] for _, e in parts) / max(sum(e["rows"] for _, e in parts), 1)}
                if any("experts" in e for _, e in parts):
                    joined["experts"] = [x for _, e in parts for x in e["experts"]]
                if k in pending["digests"]:
                    joined["digest"] = pending["digests"][k].result()
            work.save_layer(index, packed, entries)
            report.add(entries)
        pending["packed"], pending["entries"], pending["digests"] = {}, {}, {}
        if task is not None:
            loss, fit = sum(report.loss.values()), sum(report.fit_loss.values())
            progress.update(task, advance=1, description=f"GPTQ (done: {index}, loss {loss:.4g} = {loss / fit if fit else 1:.3f}× fit)")

    def on_hidden(index, hidden):
        """A checkpoint of the layer's outputs, all windows in one file, when the writer finds one due."""
        if world.agree(work.checkpoint_due() if world.writer else None):
            every = world.gather_windows(hidden, len(ids), batch)
            if world.writer:
                work.save_hidden_later(index, every)
        if world.writer:
            work.test_kill(index)

    batch = layerwise.batch_of(ids)
    if world.writer:
        work.open()
        report.add(work.report())  # layers finished by an earlier, killed run
        resume = work.resume_point(hidden=False)
    resume = world.agree(resume if world.writer else None)
    if resume is not None:
        start, _ = resume
        hidden = work.hidden(start - 1, world.windows(len(ids), batch)) if start else None
        task = (progress.add_task("GPTQ", total=m.hp.n_layers + 1, completed=start)
                if progress is not None and world.writer else None)
        with host:
            report.seconds = layerwise.run(m, ids, on_layer, device, start=start, hidden=hidden, batch=batch,
                                           on_hidden=on_hidden, on_done=on_done, precision=settings.calib_precision,
                                           requantize=True, sequential=settings.sequential,
                                           asymmetric=settings.asymmetric > 0, world=world)
    if world.writer:
        work.flush()  # the last layers' files, written in the background
    return report

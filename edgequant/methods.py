"""How block scales and codes are chosen, as encoders for `build`:

  rtn      round to nearest, exactly llama-quantize (no calibration)
  imatrix  importance-weighted fitting, exactly llama-quantize --imatrix (importance from --imatrix FILE, or from our
           own calibration pass, defined as llama-imatrix defines it: per input column, mean of squared activations)
  gptq     GPTQ on the tensor's llama.cpp grid, layer by layer with the quantized layers feeding the next

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
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import gguf
import numpy as np

from .convert.codecs import codec
from .convert.encode import FLOAT_TYPES, encode
from .convert.gguf_out import TensorPlan
from .convert.imatrix_file import read_imatrix
from .errors import UserError
from .model import SourceModel

# torch, layerwise (torch, transformers) and the calibration text loaders are imported only where a method starts
# calibrating: an RTN or float build needs none of them, and importing torch alone takes longer than a small RTN build.
if TYPE_CHECKING:
    import torch

    from .workdir import WorkDir

# Encoder for one tensor: (GGUF name, float32 weights, planned type) -> bytes.
Encoder = Callable[[str, np.ndarray, gguf.GGMLQuantizationType], np.ndarray]
# Tensors encoded already (GPTQ's), GGUF name -> a reader of their bytes: written without loading their weights.
Packed = Mapping[str, Callable[[], np.ndarray]]
METHODS = ("gptq", "imatrix", "rtn")


# Rows of one matrix solved at a time: rows are independent given H, and a solve holds several float32 copies of its
# rows.  An 8B's 128256-row head in one piece set the build's GPU peak: 19.25 GiB with the GPU defaults, 17.23 without
# the second stream; in parts the layers do, at 17.02 and 11.16 GiB.
ROWS_PER_SOLVE = 32768


@dataclass
class GptqSettings:
    block_size: int = 128
    damp: float = 0.01
    # Column order: "off" (as stored), "on" (descending Hessian diagonal), or "auto": both, per matrix the one whose
    # Ŵ has the lower calibration loss ½·tr(E H Eᵀ).  auto by default: twice the solves, for what act-order gives a
    # real model without what it costs bench-a at some ftypes (docs/BENCHMARKS.md, "act-order").
    act_order: str = "auto"
    refine: int = 2  # rounds of edgequant.gptq.refine after GPTQ
    # Calibration forward passes and Hessian sums on a GPU (layerwise.PRECISIONS).  bf16: 2.1x faster than tf32 per 8B
    # layer with the GPU's defaults, bench-a's KLD the same within noise (docs/BENCHMARKS.md).
    calib_precision: str = "bf16"
    # Aiming at the full-precision model (layerwise's docstring): sequential solves a layer's linears group by group,
    # each on inputs through the quantized ones; asymmetric is the strength of the full-precision target
    # (gptq.target.asymmetric_target), 0: off.  Both on by default on every device: on a real pretrained model they
    # take Q4_K_M's KLD to half of plain GPTQ's (docs/BENCHMARKS.md).
    sequential: bool = True
    asymmetric: float = 0.5


@dataclass
class CalibOptions:
    sources: list[str] = field(default_factory=list)  # calibration.calibrate's; empty: its DEFAULT
    samples: int = 256
    seqlen: int = 512
    seed: int = 0
    imatrix: Path | None = None
    device: str = "auto"
    gptq: GptqSettings = field(default_factory=GptqSettings)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError as e:
            raise UserError(f"--device {self.device}: {e}") from None


def rtn_encoder(importance: dict[str, np.ndarray] | None = None) -> Encoder:
    """Round-to-nearest fitting as llama-quantize does it, importance-weighted when an imatrix is given."""

    def enc(name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        return encode(w, qtype, None if importance is None else importance.get(name))

    return enc


def calibrates(method: str, plan: list[TensorPlan]) -> bool:
    """Whether `method` needs calibration for `plan`: not for rtn, nor when every tensor stays a float type."""
    return method != "rtn" and any(t.qtype not in FLOAT_TYPES for t in plan)


def make_encoder(method: str, m: SourceModel, plan: list[TensorPlan], calib: CalibOptions, progress=None,
                 work: WorkDir | None = None, digests: bool = False, windows=None) -> tuple[Encoder, dict, Packed]:
    """The encoder for `method`, after whatever calibration it needs; a report dict for the summary; and the tensors
    already encoded (GPTQ's: kept in `work`, which a rerun resumes from).  digests: see gptq_layers.  windows: the
    calibration windows if already drawn (a calibration.Calibration)."""
    if not calibrates(method, plan):
        return rtn_encoder(), {}, {}
    if method == "imatrix":
        if calib.imatrix is not None:
            return rtn_encoder(read_imatrix(calib.imatrix)), {"imatrix": str(calib.imatrix)}, {}
        windows = windows if windows is not None else token_windows(calib, m, progress)
        sums = collect_importance(m, windows.ids, calib.torch_device(), progress)
        return (rtn_encoder({k: (s / n).astype(np.float32) for k, (s, n) in sums.items()}),
                {"calibration": windows.parts}, {})
    if method == "gptq":
        windows = work.calibration(lambda: token_windows(calib, m, progress))
        report = gptq_layers(m, plan, windows.ids, calib.torch_device(), calib.gptq, work, progress, digests)
        return (rtn_encoder(), {"gptq": report, "calibration": windows.parts},
                {name: functools.partial(work.packed, name) for name in report.loss})
    raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


def token_windows(calib: CalibOptions, m: SourceModel, progress=None):
    """calibration.calibrate for these options (a Calibration)."""
    from .calibration import calibrate

    task = progress.add_task(f"calibration: {calib.samples} windows", total=None) if progress is not None else None
    windows = calibrate(m, calib.sources, calib.samples, calib.seqlen, calib.seed, calib.torch_device(), progress)
    if task is not None:
        progress.remove_task(task)
    return windows


def hf_to_gguf(m: SourceModel) -> dict[str, str]:
    return {t.hf_name: t.gguf_name for t in m.tensors.values() if t.hf_name is not None}


def collect_importance(m: SourceModel, ids: torch.Tensor, device: torch.device, progress=None) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF tensor name -> (Σ x² per input column, number of activation rows), from full-precision activations."""
    from . import layerwise

    names = hf_to_gguf(m)
    out: dict[str, tuple[np.ndarray, int]] = {}

    def on_layer(_index, weights):
        for hf_name, (_w, stats) in weights.items():
            out[names[hf_name]] = (stats.s.diagonal().double().cpu().numpy(), stats.n)
        return {}

    layerwise.run(m, ids, on_layer, device, progress=progress)
    return out


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

    def add(self, entries: dict[str, dict]) -> None:
        for name, e in entries.items():
            self.loss[name], self.fit_loss[name] = e["loss"], e["fit_loss"]
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


def digest(w_hat: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(w_hat, dtype=np.float32).tobytes()).hexdigest()


def gptq_layers(m: SourceModel, plan: list[TensorPlan], ids: torch.Tensor, device: torch.device,
                settings: GptqSettings, work: WorkDir, progress=None, digests: bool = False) -> GptqReport:
    """Run GPTQ over the whole model now (the layers not already in `work`), each layer's packed blocks saved to
    `work` as it finishes.  digests: record a digest of each solved Ŵ (for --verify)."""
    import torch

    from . import layerwise
    from .gptq.solver import concat_blocks
    from .gptq.target import asymmetric_target

    types = {t.name: t.qtype for t in plan}
    names = hf_to_gguf(m)
    report = GptqReport()
    host = ThreadPoolExecutor(max_workers=8)

    pending: dict[str, dict] = {"packed": {}, "entries": {}}  # the layer being solved (sequential: in groups)

    def on_layer(index, weights):
        new = {}
        for hf_name, (w, stats) in weights.items():
            name = names[hf_name]
            qtype = types[name]
            if qtype in FLOAT_TYPES:
                continue
            c = codec(qtype)
            w_here = m.arch.to_gguf(hf_name, w.detach().float(), m.hp, m.tensor_names)[1].contiguous()  # on the device
            h = stats.hessian
            w_hat, parts, loss, fit_loss, act_ordered = torch.empty_like(w_here), [], 0.0, 0.0, 0
            for r in range(0, len(w_here), ROWS_PER_SOLVE):
                rows = w_here[r : r + ROWS_PER_SOLVE]
                target = rows
                if settings.asymmetric and stats.cross is not None:
                    target = asymmetric_target(rows, stats.s, stats.cross, settings.damp, settings.asymmetric)
                try:
                    with one_cpu_thread(device):
                        blocks, w_rows, ordered = solve_in_order(target, h, c, settings)
                except ValueError as e:  # H beyond any damping, or weights whose block scales overflow float16
                    raise UserError(f"{hf_name} (layer {index}) cannot be quantized to {qtype.name}: {e} "
                                    f"(largest |weight| {float(w_here.abs().max()):.3g})") from None
                parts.append(blocks)
                w_hat[r : r + len(rows)] = w_rows
                loss += hessian_loss(target, w_rows, h)
                act_ordered += ordered
                del w_rows
                fit_loss += hessian_loss(target, importance_weighted_fit(c, rows, h.diagonal()), h)
                del target
            blocks = concat_blocks(parts, axis=0)
            # packing and hashing on host threads (both release the GIL), while the GPU goes on
            pending["packed"][name] = host.submit(lambda c=c, b=blocks: c.pack(b).reshape(-1))
            pending["entries"][name] = entry = {"loss": loss, "fit_loss": fit_loss,
                                                "act_order": act_ordered / len(w_here)}
            if digests:  # Ŵ to the host only for --verify
                entry["digest"] = host.submit(digest, w_hat.cpu().numpy())
            new[hf_name] = m.arch.from_gguf(name, w_hat, m.hp)
        return new

    def on_done(index):
        packed = {k: f.result() for k, f in pending["packed"].items()}
        entries = pending["entries"]
        for e in entries.values():
            if "digest" in e:
                e["digest"] = e["digest"].result()
        work.save_layer(index, packed, entries)
        report.add(entries)
        pending["packed"], pending["entries"] = {}, {}
        if task is not None:
            loss, fit = sum(report.loss.values()), sum(report.fit_loss.values())
            progress.update(task, advance=1, description=f"GPTQ (done: {index}, loss {loss:.4g} = {loss / fit if fit else 1:.3f}× fit)")

    work.open()
    report.add(work.report())  # layers finished by an earlier, killed run
    resume = work.resume_point()
    if resume is not None:
        start, hidden = resume
        task = progress.add_task("GPTQ", total=m.hp.n_layers + 1, completed=start) if progress is not None else None
        with host:
            report.seconds = layerwise.run(m, ids, on_layer, device, start=start, hidden=hidden,
                                           on_hidden=work.checkpoint_hidden, on_done=on_done, precision=settings.calib_precision,
                                           requantize=True, sequential=settings.sequential,
                                           asymmetric=settings.asymmetric > 0)
    work.flush()  # the last layers' files, written in the background
    return report

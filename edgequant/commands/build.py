"""`edgequant build MODEL --target FTYPE -o OUT.gguf`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..budget import UNITS_HELP
from ..convert.recipes import FTYPES
from ..errors import UserError

ACT_ORDERS = ("off", "on", "auto")
DEFAULT_TARGET = "Q4_K_M"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="convert (and quantize) a Hugging Face model to GGUF")
    p.add_argument("model", help="local Hugging Face model directory, or a hub id")
    p.add_argument("--target", "-t", metavar="FTYPE",
                   help=f"llama.cpp file type: {', '.join(FTYPES)} (default {DEFAULT_TARGET}); auto:FTYPE chooses each "
                        f"tensor's type for the file size of FTYPE's file")
    p.add_argument("--size", metavar="SIZE",
                   help=f"choose each tensor's type for a file of at most SIZE, such as 6GB or 5.5GiB: {UNITS_HELP}, "
                        f"as GNU ls -h, du and truncate read them (6G is 6 GiB)")
    p.add_argument("--bpw", metavar="BITS",
                   help="choose each tensor's type for at most BITS bits per weight, as the summary reports them "
                        "(tensor bytes over all weights, metadata left out)")
    p.add_argument("--speed-floor", type=float, metavar="RATIO",
                   help="with --size, --bpw or auto:FTYPE: keep the file's predicted speed in llama.cpp (prompt and "
                        "generation, CPU, from each type's measured compute cost) at least RATIO times that of "
                        "llama.cpp's recipe of that size (default 0.95; 0: choose types for quality alone)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .gguf path")
    p.add_argument("--method", choices=["gptq", "imatrix", "rtn"], default="gptq",
                   help="gptq (default): GPTQ on llama.cpp's grids; imatrix: importance-weighted fit as llama-quantize --imatrix; rtn: as llama-quantize")
    cal = p.add_argument_group("calibration (gptq, imatrix)")
    cal.add_argument("--calib", metavar="SOURCE", action="append",
                     help="self (text sampled from the model), builtin (edgequant's mixed-domain text), a text or JSONL file "
                          "(\"text\" or chat \"messages\" records), or a dataset: wikitext2, c4, DATASET[:CONFIG]:SPLIT:COLUMN; "
                          "repeat to mix, the windows split evenly (default: self and builtin, half each; builtin alone "
                          "where the model cannot be sampled on the device)")
    cal.add_argument("--calib-samples", type=int, default=256, metavar="N", help="calibration windows (default 256)")
    cal.add_argument("--calib-seqlen", type=int, default=512, metavar="L",
                     help="tokens per window (default 512, as llama-imatrix's chunks; clipped to the model's context)")
    cal.add_argument("--seed", type=int, default=0, help="which windows (0: the first N, as llama-imatrix)")
    cal.add_argument("--imatrix", type=Path, metavar="FILE", help="importance matrix from llama-imatrix (GGUF or legacy .dat) for --method imatrix")
    cal.add_argument("--device", default="auto", help="torch device for calibration and GPTQ (auto: cuda if available)")
    g = p.add_argument_group("gptq")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of mean diagonal (default 0.01)")
    g.add_argument("--block-size", type=int, default=128, help="lazy-batch block of columns (default 128)")
    g.add_argument("--act-order", nargs="?", choices=ACT_ORDERS, const="on", default="auto",
                   help="column order: on = by descending Hessian diagonal, off = as stored, auto = both, per matrix the "
                        "lower calibration loss (twice the solves; default)")
    g.add_argument("--no-act-order", dest="act_order", action="store_const", const="off", help="the same as --act-order off")
    g.add_argument("--refine", type=int, default=2, metavar="N",
                   help="rounds of coordinate descent on the stored scales and codes after GPTQ (default 2, 0: plain GPTQ)")
    g.add_argument("--calib-precision", choices=("fp32", "tf32", "bf16"), default="bf16",
                   help="on a GPU, the calibration forward passes and Hessian sums: bf16 (default; autocast, float32 sums), "
                        "tf32 or fp32; the solver stays float32, the CPU fp32")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="inside a layer too: q/k/v, then o, then gate/up, then down, each on inputs through the ones before, "
                        "quantized (default: on)")
    g.add_argument("--asymmetric", type=float, default=0.5, metavar="ALPHA",
                   help="aim each layer at the full-precision model's outputs with strength ALPHA in [0, 1] (default 0.5; 0 = off, "
                        "half the activation memory)")
    g.add_argument("--work-dir", type=Path, metavar="DIR",
                   help="finished layers are kept here so that a killed build resumes when run again (default OUTPUT.work)")
    d = p.add_argument_group("several processes (GPTQ; see README, \"Several GPUs\")")
    d.add_argument("--gpus", type=int, metavar="N",
                   help="spread the build over N GPUs of this machine, one process each (torch.distributed, nccl); "
                        "under torchrun, leave it out")
    d.add_argument("--processes", type=int, metavar="N",
                   help="spread the build over N processes on the CPU (torch.distributed, gloo): the same code path as "
                        "--gpus, for CPU machines and tests")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin when there are no safetensors (torch.load with weights_only=True)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model whose config has auto_map: transformers then imports the model's own Python code")
    p.add_argument("--verify", action="store_true", help="re-read the output and check it dequantizes exactly to GPTQ's weights")
    p.add_argument("--report", type=Path, metavar="FILE.html",
                   help="write a self-contained HTML page: type map of the recipe, GPTQ vs fit loss per tensor")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..budget import budget_request
    from ..build import build
    from ..convert.gguf_out import check_output_path

    ranks = ranks_option(args)
    if distributed.launched() and ranks not in (1, int(os.environ["WORLD_SIZE"])):
        raise UserError(f"--gpus/--processes {ranks} in one of {os.environ['WORLD_SIZE']} processes started by torchrun: "
                        f"leave the option out")
    if ranks > 1 and not distributed.launched():
        return distributed.spawn(ranks, args.argv)
    target, budget = budget_request(args.target, args.size, args.bpw, DEFAULT_TARGET)
    speed_floor = speed_floor_option(args.speed_floor, budget)
    if args.report is not None:  # before the build, not after it
        check_output_path(args.report)
        try:
            tempfile.NamedTemporaryFile(dir=args.report.parent).close()
        except OSError as e:
            raise UserError(f"--report: cannot write to {args.report.parent}: {e.strerror}") from None
    calib = calib_options(args)
    # only a launched rank resolves its device here: a build that needs no torch (rtn, F16, --imatrix FILE) imports none
    world = distributed.init(calib.torch_device().type) if distributed.launched() else distributed.SINGLE
    result = build(args.model, target, args.output, method=args.method, calib=calib,
                   verify=args.verify, quiet=args.quiet or args.json, work_dir=args.work_dir,
                   allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, budget=budget,
                   speed_floor=speed_floor, world=world)
    world.agree(None)  # every rank waits for the writer's file
    distributed.finish()
    if result is None:  # not the writer
        return 0
    if args.report is not None:
        from ..report import render

        try:
            args.report.write_text(render(summary(result), f"{args.model} → {budget or target} ({args.method})"), encoding="utf-8")
        except OSError as e:
            raise UserError(f"--report {args.report}: {e.strerror}") from None
    if args.json:
        print(json.dumps(summary(result)))
    elif not args.quiet:
        show(result)
    return 0


def speed_floor_option(value: float | None, budget) -> float:
    """--speed-floor, checked: a ratio from 0 to 2, and only where types are chosen."""
    if value is None:
        return 0.95
    if budget is None:
        raise UserError(f"--speed-floor {value:g}: types are chosen (and kept fast) only for a file size: give --size, "
                        f"--bpw or --target auto:FTYPE")
    if not 0 <= value <= 2:  # also NaN
        raise UserError(f"--speed-floor {value:g}: give a ratio of the recipe's speed from 0 (no floor) to 2")
    return value


def ranks_option(args: argparse.Namespace) -> int:
    """How many processes --gpus or --processes asks for (1: this one), checked; --processes builds on the CPU,
    --gpus on CUDA (args.device set so)."""
    if args.gpus is not None and args.processes is not None:
        raise UserError("--gpus and --processes: give one (--gpus N for N GPUs, --processes N for N CPU processes)")
    n = args.gpus if args.gpus is not None else args.processes
    if n is None:
        return 1
    option = "--gpus" if args.gpus is not None else "--processes"
    if n < 1:
        raise UserError(f"{option} {n}: give at least 1")
    wanted = "cuda" if args.gpus is not None else "cpu"
    if args.device not in ("auto", wanted):
        raise UserError(f"{option} {n} --device {args.device}: {option} builds on {'CUDA GPUs' if wanted == 'cuda' else 'the CPU'}")
    args.device = wanted
    if wanted == "cuda":
        import torch

        if torch.cuda.device_count() < n:
            raise UserError(f"--gpus {n}: this machine has {torch.cuda.device_count()} CUDA GPUs; --processes N spreads "
                            f"a build over N processes on the CPU")
    return n


def calib_options(args: argparse.Namespace):
    from ..settings import CalibOptions, GptqSettings

    if not 0 <= args.asymmetric <= 1:
        raise UserError(f"--asymmetric {args.asymmetric:g}: the strength must be between 0 and 1")
    return CalibOptions(sources=args.calib or [], samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                        imatrix=args.imatrix, device=args.device,
                        gptq=GptqSettings(block_size=args.block_size, damp=args.damp, act_order=args.act_order,
                                          refine=args.refine, calib_precision=args.calib_precision, sequential=args.sequential,
                                          asymmetric=args.asymmetric))


def summary(r) -> dict:
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    for t in r.plan:
        e = by_type[t.qtype.name]
        e["tensors"] += 1
        e["params"] += int(np.prod(t.shape))
        e["bytes"] += t.nbytes
    gptq = r.report.get("gptq")
    tensors = ({n: {"gptq_loss": gptq.loss[n], "fit_loss": gptq.fit_loss[n], "act_order": gptq.act_order.get(n, 0.0),
                    **({"experts": gptq.experts[n]} if n in gptq.experts else {})}
                for n in gptq.loss} if gptq else {})
    return {"output": str(r.path), "tensors": len(r.plan), "gptq": tensors, "gptq_layers": by_layer(tensors),
            "params": r.n_params, "tensor_bytes": r.nbytes, "file_bytes": r.path.stat().st_size,
            "bits_per_weight": round(r.bits_per_weight, 4), "types": dict(by_type),
            "recipe": {t.name: t.qtype.name for t in r.plan}, "calibration": r.report.get("calibration", []),
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()}, "peak_memory": r.peak_memory,
            **({"allocation": allocation_summary(r.report["allocation"], gptq)} if "allocation" in r.report else {})}


def allocation_summary(a, gptq) -> dict:
    """The allocation's summary; after GPTQ also its prediction with each tensor's estimate scaled by how much GPTQ
    lowered that tensor's calibration loss below the importance-weighted fit's (the estimate's own error model)."""
    out = a.summary()
    if gptq and gptq.loss:
        kl = {n: next(o.kl for o in a.options[n] if o.qtype == q) for n, q in a.chosen.items()}
        out["predicted_kld_after_gptq"] = sum(
            k * (gptq.loss[n] / gptq.fit_loss[n] if gptq.fit_loss.get(n, 0) > 0 and n in gptq.loss else 1.0)
            for n, k in kl.items())
    return out


def speed_line(v: dict) -> str:
    """The allocation's predicted speed against the reference recipe, for people."""
    w = v["without_floor"]
    state = "" if v["met"] else "; not reachable within the budget: the fastest choice found"
    return (f"predicted speed in llama.cpp vs {v['reference']}'s recipe: generation {v['generation']:.2f}x, prompt "
            f"{v['prompt']:.2f}x (floor {v['floor']:g}{state}); without the floor {w['generation']:.2f}x and "
            f"{w['prompt']:.2f}x, predicted KLD {w['predicted_kld']:.4g}")


def by_layer(tensors: dict[str, dict]) -> dict[str, dict]:
    """Per-tensor GPTQ and fit losses summed per decoder layer (blk.N), the head on its own."""
    from ..model import layer_of

    layers: dict[str, dict] = {}
    for name, e in tensors.items():
        i = layer_of(name)
        row = layers.setdefault(f"blk.{i}" if i is not None else name.removesuffix(".weight"),
                                {"tensors": 0, "gptq_loss": 0.0, "fit_loss": 0.0})
        row["tensors"] += 1
        row["gptq_loss"] += e["gptq_loss"]
        row["fit_loss"] += e["fit_loss"]
    return layers


def show(r) -> None:
    s = summary(r)
    console = Console(stderr=True)
    table = Table(title=f"{r.path}  ({s['file_bytes'] / 2**20:.1f} MiB, {s['bits_per_weight']:.3f} bits/weight)")
    for col in ("type", "tensors", "params", "MiB", "bits/weight"):
        table.add_column(col, justify="right" if col != "type" else "left")
    for name, e in sorted(s["types"].items()):
        table.add_row(name, str(e["tensors"]), f"{e['params']:,}", f"{e['bytes'] / 2**20:.2f}", f"{8 * e['bytes'] / e['params']:.3f}")
    console.print(table)
    if s["gptq_layers"]:
        layers = Table(title="calibration loss ½·tr(E H Eᵀ): GPTQ vs importance-weighted fit")
        for col in ("layer", "tensors", "GPTQ", "fit", "GPTQ / fit"):
            layers.add_column(col, justify="right" if col != "layer" else "left")
        rows = list(s["gptq_layers"].items())
        total = {k: sum(e[k] for _, e in rows) for k in ("tensors", "gptq_loss", "fit_loss")}
        for i, (name, e) in enumerate([*rows, ("total", total)]):
            layers.add_row(name, str(e["tensors"]), f"{e['gptq_loss']:.4g}", f"{e['fit_loss']:.4g}",
                           f"{e['gptq_loss'] / e['fit_loss']:.3f}" if e["fit_loss"] > 0 else "-", end_section=i == len(rows) - 1)
        console.print(layers)
        ratios = [v["gptq_loss"] / v["fit_loss"] for v in s["gptq"].values() if v["fit_loss"] > 0]
        console.print(f"per tensor, GPTQ / fit: median {np.median(ratios):.3f}, worst {max(ratios):.3f} over {len(ratios)} tensors")
        act = sum(v["act_order"] for v in s["gptq"].values())
        if act:
            console.print(f"act-order: {act:.4g} of {len(s['gptq'])} tensors solved in descending-Hessian order")
        experts = [e for v in s["gptq"].values() for e in v.get("experts", [])]
        if experts:
            tokens = [e["tokens"] for e in experts]
            fitted = sum(e["solve"] == "fit" for e in experts)
            console.print(f"experts: {len(experts)} expert matrices, calibration tokens per expert min {min(tokens):,}, "
                          f"median {int(np.median(tokens)):,}, max {max(tokens):,}; {fitted} with too few tokens got the "
                          f"importance-weighted fit; GPTQ's rows kept where they beat it: "
                          f"{sum(e['gptq_rows'] for e in experts):,} (per expert in the --json summary)")
    if "allocation" in s:
        a = s["allocation"]
        after = f" ({a['predicted_kld_after_gptq']:.4g} after GPTQ)" if "predicted_kld_after_gptq" in a else ""
        console.print(f"allocation ({a['what']}): {a['file_bytes']:,} of {a['budget']:,} bytes; predicted KLD "
                      f"{a['predicted_kld']:.4g}{after}, against {a['recipe_predicted_kld']:.4g} for the recipe's "
                      f"types ({a['recipe_bytes']:,} bytes)")
        if "speed" in a:
            console.print(speed_line(a["speed"]))
    if s["calibration"]:
        from ..report import describe_calibration

        console.print("calibration: " + describe_calibration(s["calibration"]))
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["seconds"].items())
                  + f" (total {sum(s['seconds'].values()):.1f}s)")
    console.print("peak memory: " + ", ".join(f"{v / 2**30:.2f} GiB {k.removesuffix('_bytes').upper()}"
                                              for k, v in s["peak_memory"].items()))

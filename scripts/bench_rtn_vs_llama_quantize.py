#!/usr/bin/env python
"""Wall time of a round-to-nearest Q4_K_M build: edgequant against llama-quantize, on the same machine.

  edgequant build MODEL --method rtn --target Q4_K_M -o out.gguf    EDGEQUANT_THREADS=T OMP_NUM_THREADS=T
  llama-quantize MODEL-F16.gguf out.gguf Q4_K_M T                   (its F16 input made once by edgequant --target F16)

With --imatrix FILE both build importance-weighted: `edgequant build ... --method imatrix --imatrix FILE` against
`llama-quantize --imatrix FILE ...` (the lattice i-quants' ftypes need it).

Each command is a whole process (edgequant's Python/torch start-up included, the inputs in the page cache after an
untimed first read).  For every model and thread count T the two tools run in turn, REPS times each, the first of
each pair alternating; the table gives the median and the spread of the wall time, the ratio of the fastest runs,
the least CPU time (user + system) of each tool, and the load average before the runs.  On a machine shared with
other work the fastest run and the CPU time are the numbers least moved by it.

Models: the given checkpoint directories, and with --synthetic-layers L1 L2: Llama-3.1-8B's shapes with L1 and L2
decoder layers and random values (scripts/make_synthetic_model.py, made once under --work).  From those two, one
layer costs (T(L2) - T(L1)) / (L2 - L1), and the 32-layer model T(L1) + (32 - L1) * layer, with T the median and,
less moved by other work on a shared machine, the fastest run.  --table re-prints the tables of a saved --json.

    python scripts/bench_rtn_vs_llama_quantize.py ../shared/models/bench-a --synthetic-layers 1 2 --json rtn.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUANTIZE = ROOT / ".cache" / "llama-tools" / "bin" / "llama-quantize"
LAYERS_8B = 32


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def edgequant(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgequant.cli", "build", *args, "--quiet"]


def synthetic(work: Path, layers: int) -> Path:
    """Llama-3.1-8B's shapes with `layers` layers, made once (seed 0, on the CPU)."""
    out = work / f"llama-3.1-8b-{layers}L"
    if not (out / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_model.py"), str(out),
                        "--config", "llama-3.1-8b", "--layers", str(layers), "--device", "cpu"], check=True)
    return out


def read_through(*dirs: Path) -> None:
    """Untimed: bring the inputs into the page cache, so that no run pays for the disk."""
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")) if d.is_dir() else [d]:
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass


def bench_model(model: Path, work: Path, threads: list[int], reps: int, target: str, log,
                imatrix: Path | None = None) -> dict:
    f16 = work / f"{model.name}-F16.gguf"
    if not f16.is_file():
        run(edgequant(str(model), "--target", "F16", "-o", str(f16)))
    read_through(model, f16)
    ours, theirs = work / "edgequant.gguf", work / "llama-quantize.gguf"
    result = {"model": str(model), "target": target, "imatrix": str(imatrix) if imatrix else None, "runs": {}}
    # with an imatrix: the importance-weighted round-to-nearest build (edgequant's `--method imatrix`, which is
    # llama-quantize --imatrix's fit), the only kind the lattice i-quants allow
    method = ["--method", "imatrix", "--imatrix", str(imatrix)] if imatrix else ["--method", "rtn"]
    theirs_flags = ["--imatrix", str(imatrix)] if imatrix else []
    for t in threads:
        env = {**os.environ, "EDGEQUANT_THREADS": str(t), "OMP_NUM_THREADS": str(t)}
        cmds = {"edgequant": (edgequant(str(model), *method, "--target", target, "-o", str(ours)), env),
                "llama-quantize": ([str(QUANTIZE), *theirs_flags, str(f16), str(theirs), target, str(t)], None)}
        times: dict[str, list[float]] = {k: [] for k in cmds}
        cpu: dict[str, list[float]] = {k: [] for k in cmds}
        loads = []
        for rep in range(reps):
            for name in (list(cmds) if rep % 2 == 0 else list(cmds)[::-1]):
                loads.append(os.getloadavg()[0])
                wall, cpu_s = run(*cmds[name])
                times[name].append(wall)
                cpu[name].append(cpu_s)
                log(f"{model.name} T={t} {name}: {wall:.2f} s, CPU {cpu_s:.2f} s (load {loads[-1]:.2f})")
        result["runs"][t] = {"seconds": times, "cpu_seconds": cpu,
                             "median": {k: statistics.median(v) for k, v in times.items()},
                             "load_1min": loads, "bytes": {"edgequant": ours.stat().st_size,
                                                           "llama-quantize": theirs.stat().st_size}}
    ours.unlink(missing_ok=True)
    theirs.unlink(missing_ok=True)
    return result


def extrapolate(small: dict, large: dict, l1: int, l2: int) -> dict:
    """Per layer and 32-layer seconds, per statistic (median, fastest run), thread count and tool, from the L1- and
    L2-layer models.  The fastest run is the estimate least moved by other work on a shared machine."""
    out = {}
    for stat, f in (("median", statistics.median), ("fastest", min)):
        for t, r in small["runs"].items():
            for tool, runs in r["seconds"].items():
                s1, s2 = f(runs), f(large["runs"][t]["seconds"][tool])
                layer = (s2 - s1) / (l2 - l1)
                out.setdefault(stat, {}).setdefault(t, {})[tool] = {
                    "per_layer": layer, f"{LAYERS_8B}_layers": s1 + (LAYERS_8B - l1) * layer}
    return out


def table(results: list[dict], extrapolated: dict | None, layers: tuple[int, int] | None) -> str:
    lines = ["| model | threads | edgequant s (median, range) | llama-quantize s (median, range) | ratio | fastest ratio "
             "| CPU s edgequant / llama-quantize (least) | load 1 min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for t, run_ in r["runs"].items():
            e, q = run_["seconds"]["edgequant"], run_["seconds"]["llama-quantize"]
            me, mq = run_["median"]["edgequant"], run_["median"]["llama-quantize"]
            cpu = run_.get("cpu_seconds")
            cpu_cell = f"{min(cpu['edgequant']):.1f} / {min(cpu['llama-quantize']):.1f}" if cpu else "–"
            lines.append(f"| {Path(r['model']).name} | {t} | {me:.1f} ({min(e):.1f}–{max(e):.1f}) | {mq:.1f} "
                         f"({min(q):.1f}–{max(q):.1f}) | {me / mq:.2f} | {min(e) / min(q):.2f} | {cpu_cell} | "
                         f"{min(run_['load_1min']):.1f}–{max(run_['load_1min']):.1f} |")
    if extrapolated:
        lines += ["", f"| 8B shapes, from {layers[0]} and {layers[1]} layers | threads | edgequant per layer s | "
                  f"llama-quantize per layer s | edgequant {LAYERS_8B} layers s | llama-quantize {LAYERS_8B} layers s "
                  f"| ratio |", "| --- " * 7 + "|"]
        key = f"{LAYERS_8B}_layers"
        for stat, by_threads in extrapolated.items():
            for t, x in by_threads.items():
                e, q = x["edgequant"], x["llama-quantize"]
                lines.append(f"| {stat} | {t} | {e['per_layer']:.1f} | {q['per_layer']:.1f} | {e[key]:.0f} | "
                             f"{q[key]:.0f} | {e[key] / q[key]:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="*", help="Hugging Face checkpoint directories")
    p.add_argument("--synthetic-layers", type=int, nargs=2, metavar=("L1", "L2"),
                   help="also Llama-3.1-8B's shapes with L1 and L2 layers (random values), extrapolated to 32")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--target", default="Q4_K_M")
    p.add_argument("--imatrix", type=Path, help="an imatrix file: importance-weighted builds on both sides "
                   "(edgequant --method imatrix --imatrix FILE, llama-quantize --imatrix FILE)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-rtn-vs-llama-quantize"),
                   help="F16 inputs and synthetic models are kept here between runs")
    p.add_argument("--json", type=Path, help="write all runs here")
    p.add_argument("--table", type=Path, metavar="JSON", help="only print the tables of an earlier run's --json")
    a = p.parse_args()
    if a.table:
        saved = json.loads(a.table.read_text())
        print(table(saved["results"], saved["extrapolated"], saved["layers"]))
        return 0
    if not QUANTIZE.exists():
        sys.exit(f"{QUANTIZE} missing: run scripts/build_llama_tools.sh first")
    a.work.mkdir(parents=True, exist_ok=True)

    def log(s: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)

    results = [bench_model(m.resolve(), a.work, a.threads, a.reps, a.target, log, a.imatrix) for m in a.models]
    extrapolated = layers = None
    if a.synthetic_layers:
        layers = l1, l2 = sorted(a.synthetic_layers)
        small, large = [bench_model(synthetic(a.work, n), a.work, a.threads, a.reps, a.target, log, a.imatrix)
                        for n in layers]
        results += [small, large]
        extrapolated = extrapolate(small, large, l1, l2)
    print(table(results, extrapolated, layers))
    if a.json:
        a.json.write_text(json.dumps({"results": results, "extrapolated": extrapolated, "layers": layers}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

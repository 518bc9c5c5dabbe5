#!/usr/bin/env python
"""Mutation fuzzing of GGUF reading: mutated files through `edgequant inspect`, each under a CPU-time and memory limit.

Seeds: tests/fixtures/tiny-llama built as Q4_K_M (edgequant build --method rtn), and a small hand-made GGUF with every
metadata value type and a few tensor types, written both little- and big-endian by gguf.GGUFWriter.  Case i of run
seed S (random.Random(f"{S}:{i}"), so `--seed S --case i` replays it) applies 1-3 mutations, mostly inside the header:

    flip      1-8 random bits
    smash     1-8 bytes set to 0x00 / 0xFF / 0x7F / 0x80 / random
    field     a count, length, type, dim or offset (found with GGUFReader on the seed) set to an extreme value
              or to a valid ggml / metadata type
    truncate  cut the file
    dup       copy a region (up to 256 bytes) somewhere else, inserting it
    cut       delete a region

and runs `edgequant inspect FILE --json` (one case in eight: the rich table) in-process.  Outcomes:

    ok     exit 0 (and with --json, stdout is one JSON document)
    error  exit 2 and exactly one stderr line "edgequant inspect: error: ...", no traceback
    crash  anything else, an exception (MemoryError when RLIMIT_AS is hit) included
    hang   more than --cpu-seconds of CPU time

    python scripts/fuzz_gguf.py --cases 10000 --seed 1 --workers 2
Exits 1 on any crash or hang; those cases' files are kept in --keep.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import faulthandler
import io
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HEADER_BIAS = 0.85  # share of mutations aimed inside the header (metadata + tensor infos), where the parsing is
MEMORY_HEADROOM = 1 << 30  # address space a case may add to the process
WATCHDOG_S = 60  # wall-clock backstop per case: the worker dies (and the run fails) past it
VALID_TYPES = [*map(int, gguf.GGMLQuantizationType), *map(int, gguf.GGUFValueType)]  # for type fields
EXTREMES = (0, 1, 2, 3, 4, 5, 7, 8, 31, 32, 63, 64, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**62, 2**63 - 1, 2**63, 2**64 - 1)


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fields: tuple[tuple[int, int], ...]  # (offset, size) of every integer count, length, type, dim and offset
    header_end: int  # where tensor data starts
    byteorder: str


def handmade_gguf(path: Path, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    """Every metadata value type, arrays of numbers and strings, and tensors of plain and block types."""
    w = gguf.GGUFWriter(path, arch="llama", endianess=endian)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.5)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "[/INST] <|im_end|> ü")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.25, -1.0])
    w.add_array("t.strs", ["a", "bb", "[bold]"])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("i32", np.arange(4, dtype=np.int32))
    for qtype in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K):
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (2, 256 // block * type_bytes), dtype=np.uint8)
        w.add_tensor(qtype.name.lower(), raw, raw_dtype=qtype)  # byte shape: 2 rows of 256 weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def built_gguf(path: Path) -> Path:
    """tiny-llama as Q4_K_M: a real tokenizer, K-quant tensors, our writer's layout (built in a subprocess, so that
    torch stays out of the fuzzing processes)."""
    subprocess.run([sys.executable, "-m", "edgequant.cli", "build", str(ROOT / "tests" / "fixtures" / "tiny-llama"),
                    "--target", "Q4_K_M", "--method", "rtn", "-o", str(path), "--quiet"], check=True)
    return path


def load_seed(path: Path) -> Seed:
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    fields = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        array_items = set(field.data) if field.types[:1] == [gguf.GGUFValueType.ARRAY] else set()
        for i, part in enumerate(field.parts):
            if i in array_items or part.dtype.kind not in "ui" or part.itemsize not in (4, 8):
                continue
            start = part.__array_interface__["data"][0] - base
            fields += [(start + k * part.itemsize, part.itemsize) for k in range(part.size)]
    byteorder = "big" if reader.endianess == gguf.GGUFEndian.BIG else "little"
    return Seed(path.name, path.read_bytes(), tuple(fields), reader.data_offset, byteorder)


def mutate(seed: Seed, rng: random.Random) -> bytes:
    data = bytearray(seed.data)

    def spot() -> int:
        end = seed.header_end if rng.random() < HEADER_BIAS else len(data)
        return rng.randrange(max(1, min(end, len(data))))

    for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
        op = rng.choice(("flip", "smash", "field", "field", "truncate", "dup", "cut"))
        if op == "flip":
            for _ in range(rng.randint(1, 8)):
                data[spot()] ^= 1 << rng.randrange(8)
        elif op == "smash":
            at, n = spot(), rng.randint(1, 8)
            fill = rng.choice((0x00, 0xFF, 0x7F, 0x80, None))
            data[at:at + n] = bytes(rng.randrange(256) if fill is None else fill for _ in range(n))
        elif op == "field":
            at, size = rng.choice(seed.fields)
            old = int.from_bytes(data[at:at + size], seed.byteorder)
            value = rng.choice((*EXTREMES, old + 1, old - 1, old * 2, old + len(data), len(data) - at,
                                rng.randrange(2 ** (8 * size)), *rng.sample(VALID_TYPES, 4)))
            data[at:at + size] = (value % 2 ** (8 * size)).to_bytes(size, seed.byteorder)
        elif op == "truncate":
            del data[spot():]
        elif op == "dup":
            src, n, at = spot(), rng.randint(1, 256), spot()
            data[at:at] = data[src:src + n]
        else:
            at = spot()
            del data[at:at + rng.randint(1, 256)]
        if not data:
            break
    return bytes(data)


class CaseTimeout(BaseException):
    """BaseException, so that no `except Exception` on the way swallows it."""


def _on_timer(signum, frame):
    raise CaseTimeout


@contextlib.contextmanager
def limits(cpu_seconds: float, memory_headroom: int = MEMORY_HEADROOM):
    """CPU-time alarm and an address-space cap of (current size + headroom), both undone on exit."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + memory_headroom
    if old_as[1] != resource.RLIM_INFINITY:
        cap = min(cap, old_as[1])
    old_handler = signal.signal(signal.SIGPROF, _on_timer)
    resource.setrlimit(resource.RLIMIT_AS, (cap, old_as[1]))
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_PROF, 0)
        finally:  # a timeout landing right here must not leave the limits behind
            resource.setrlimit(resource.RLIMIT_AS, old_as)
            signal.signal(signal.SIGPROF, old_handler)


def run_inspect(path: Path, as_json: bool = True, cpu_seconds: float = 2.0) -> tuple[str, str]:
    """(outcome, detail) of `edgequant inspect path` under `limits`; outcome is ok, error, crash or hang."""
    from edgequant.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = ["inspect", str(path)] + (["--json"] if as_json else [])
    try:
        with limits(cpu_seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except CaseTimeout:
        return "hang", f"over {cpu_seconds} s of CPU time"
    except BaseException as e:  # noqa: BLE001 - what a crash is, is the point here
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return "crash", f"{type(e).__name__}: {str(e)[:200]} at {Path(frame.filename).name}:{frame.lineno}"
    lines = err.getvalue().strip().splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith("edgequant inspect: error: "):
        return "error", lines[0]
    if code == 0 and not lines:
        if as_json:
            try:
                json.loads(out.getvalue())
            except ValueError as e:
                return "crash", f"exit 0 but not JSON: {e}"
        return "ok", ""
    return "crash", f"exit {code}, stderr {err.getvalue()[-300:]!r}"


def run_case(seeds: list[Seed], run_seed: int, case: int, workdir: Path,
             cpu_seconds: float = 2.0) -> tuple[str, str, str, bytes]:
    """(outcome, detail, seed file name, file bytes) of case `case`."""
    rng = random.Random(f"{run_seed}:{case}")
    origin = rng.choice(seeds)
    data = mutate(origin, rng)
    path = workdir / f"current-{os.getpid()}.gguf"  # left behind if the worker dies on it
    path.write_bytes(data)
    outcome, detail = run_inspect(path, as_json=rng.random() >= 1 / 8, cpu_seconds=cpu_seconds)
    return outcome, detail, origin.name, data


_WORKER: dict = {}  # seeds, workdir, cpu_seconds of this worker process


def _worker_init(seeds: list[Seed], workdir: Path, cpu_seconds: float) -> None:
    _WORKER.update(seeds=seeds, workdir=workdir, cpu_seconds=cpu_seconds)


def _worker_batch(run_seed: int, cases: range) -> list[tuple[int, str, str, str, bytes | None]]:
    results = []
    for case in cases:
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a case stuck where the CPU alarm cannot reach
        outcome, detail, origin, data = run_case(run_seed=run_seed, case=case, **_WORKER)
        results.append((case, outcome, detail, origin, data if outcome in ("crash", "hang") else None))
    faulthandler.cancel_dump_traceback_later()
    return results


def make_seeds(directory: Path) -> list[Path]:
    return [built_gguf(directory / "tiny-llama-Q4_K_M.gguf"), handmade_gguf(directory / "handmade-le.gguf"),
            handmade_gguf(directory / "handmade-be.gguf", gguf.GGUFEndian.BIG)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpu-seconds", type=float, default=2.0, help="CPU time a case may take before it counts as a hang")
    p.add_argument("--case", type=int, help="replay this one case (prints its outcome, keeps its file)")
    p.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "gguf-fuzz-failures")
    args = p.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = [load_seed(p) for p in make_seeds(tmp)]
        if args.case is not None:
            outcome, detail, origin, data = run_case(seeds, args.seed, args.case, tmp, args.cpu_seconds)
            (args.keep / f"case-{args.seed}-{args.case}.gguf").write_bytes(data)
            print(f"case {args.case} ({origin}): {outcome} {detail}")
            return 0 if outcome in ("ok", "error") else 1
        counts: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        failures = []
        start = time.time()
        batches = [range(i, min(i + 100, args.cases)) for i in range(0, args.cases, 100)]
        with concurrent.futures.ProcessPoolExecutor(args.workers, initializer=_worker_init,
                                                    initargs=(seeds, args.keep, args.cpu_seconds)) as pool:
            for batch in concurrent.futures.as_completed([pool.submit(_worker_batch, args.seed, b) for b in batches]):
                try:
                    results = batch.result()
                except concurrent.futures.process.BrokenProcessPool:
                    print(f"a worker died (crash or watchdog, traceback above); its case is {args.keep}/current-*.gguf")
                    return 1
                for case, outcome, detail, origin, data in results:
                    counts[outcome] += 1
                    if outcome == "error":
                        errors[_error_kind(detail)] += 1
                    if data is not None:
                        failures.append((case, outcome, detail, origin))
                        (args.keep / f"case-{args.seed}-{case}.gguf").write_bytes(data)
        elapsed = time.time() - start
    total = sum(counts.values())
    print(f"{total} cases (seed {args.seed}, {args.workers} workers) in {elapsed:.0f} s: "
          + ", ".join(f"{k} {counts[k]}" for k in ("ok", "error", "crash", "hang")))
    print("clean errors, most common kinds:")
    for kind, n in errors.most_common(15):
        print(f"  {n:6d}  {kind}")
    for case, outcome, detail, origin in sorted(failures)[:50]:
        print(f"  {outcome} case {case} ({origin}): {detail}")
    if failures:
        print(f"failing files in {args.keep}; replay one with --seed {args.seed} --case N")
    for leftover in args.keep.glob("current-*.gguf"):
        leftover.unlink()
    return 1 if failures else 0


def _error_kind(line: str) -> str:
    """The message after the file name with names as K and numbers as N, to count errors by kind."""
    text = line.split(": ", 3)[-1].removeprefix("not a valid GGUF file: ")
    text = re.sub(r"'(?:[^'\\]|\\.)*'…?|\"(?:[^\"\\]|\\.)*\"…?", "K", text)
    return re.sub(r"(?<![\w-])\d+(?:,\d{3})*", "N", text)


if __name__ == "__main__":
    sys.exit(main())

"""Prompt-processing and generation speed of a GGUF, measured the way llama-bench measures them.

  pp N: N random tokens (BOS first when the model adds one) decoded from an empty cache in batches of up to 512,
        logits for the last token only;                                             rate = N / seconds
  tg N: N tokens decoded one at a time from an empty cache, logits for each;        rate = N / seconds

Every rep starts from a cleared cache, after one untimed warm-up of each test. Each model runs in its own Python
process, so its peak RSS (ru_maxrss) is its own, and two models can be measured rep by rep in alternation: drifts in
machine load then hit both alike and their ratio stays fair.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from edgequant.errors import UserError

MAX_BATCH = 512  # llama-bench's default micro-batch


@dataclass
class Rate:
    """tokens/s over reps."""

    n_tokens: int
    samples: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def as_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "mean": self.mean, "std": self.std, "samples": self.samples}


@dataclass
class BenchResult:
    model: dict  # LlamaCppModel.describe()
    pp: Rate | None
    tg: Rate | None
    peak_rss_bytes: int  # of the whole worker process
    model_rss_bytes: int  # peak RSS minus the worker's RSS just before the model was opened

    def as_dict(self) -> dict:
        return {"model": self.model, "pp": self.pp and self.pp.as_dict(), "tg": self.tg and self.tg.as_dict(),
                "peak_rss_bytes": self.peak_rss_bytes, "model_rss_bytes": self.model_rss_bytes}


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # kilobytes on Linux


def _rss_bytes() -> int:
    """Resident memory now (Linux); elsewhere the peak so far, which can only understate the model's share."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss_bytes()


def _time_prompt(model, tokens: np.ndarray) -> float:
    model.clear()
    t0 = time.perf_counter()
    for start in range(0, len(tokens), model.n_batch):
        part = tokens[start:start + model.n_batch]
        model.decode(part, start, len(part) - 1)
    return time.perf_counter() - t0


def _time_generation(model, tokens: np.ndarray) -> float:
    model.clear()
    t0 = time.perf_counter()
    for pos, token in enumerate(tokens):
        model.decode(tokens[pos:pos + 1], pos, 0)
    return time.perf_counter() - t0


def _serve(path: str, n_prompt: int, n_gen: int, opts: dict) -> None:
    """Worker process: open one model, then answer "pp" / "tg" / "result" lines on stdin with JSON lines."""
    from edgequant.errors import UserError

    from .llama import LlamaCppModel

    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever native code prints must not mix into the replies
    answer = lambda obj: print(json.dumps(obj), file=reply, flush=True)  # noqa: E731
    rss_before = _rss_bytes()
    try:
        model = LlamaCppModel(path, n_ctx=max(n_prompt, n_gen, 1), n_batch=min(max(n_prompt, 1), MAX_BATCH), **opts)
    except UserError as e:
        answer({"error": str(e)})
        return
    rng = np.random.default_rng(0)

    def random_tokens(n: int) -> np.ndarray:
        tokens = rng.integers(0, model.n_vocab, n, dtype=np.int32)
        if model.add_bos and n:
            tokens[0] = model.bos
        return tokens

    timers = {"pp": (_time_prompt, n_prompt), "tg": (_time_generation, n_gen)}
    if n_prompt:
        _time_prompt(model, random_tokens(n_prompt))  # warm-up, as llama-bench
    if n_gen:
        _time_generation(model, random_tokens(1))
    answer({"ready": True})
    for line in sys.stdin:
        request = line.strip()
        if request == "result":
            answer({"model": model.describe(), "peak": _max_rss_bytes(), "own": _max_rss_bytes() - rss_before})
            model.close()
            return
        timer, n = timers[request]
        answer({"seconds": timer(model, random_tokens(n))})


class _Worker:
    """One model in its own Python process (python -m edgequant.runners.bench)."""

    def __init__(self, path: str, n_prompt: int, n_gen: int, opts: dict):
        args = json.dumps({"path": path, "n_prompt": n_prompt, "n_gen": n_gen, "opts": opts})
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, request: str | None = None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker exited with {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise UserError(reply["error"])
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(paths: list[str], *, n_prompt: int = 512, n_gen: int = 128, reps: int = 5, **opts) -> list[BenchResult]:
    """Measure each model in `paths`, rep by rep in alternation; opts go to LlamaCppModel (n_threads, n_gpu_layers)."""
    workers: list[_Worker] = []
    try:
        for path in paths:
            workers.append(_Worker(path, n_prompt, n_gen, opts))
            workers[-1].ask()  # loaded and warmed up; the next one starts on a quiet machine
        rates = [(Rate(n_prompt) if n_prompt else None, Rate(n_gen) if n_gen else None) for _ in paths]
        for _ in range(reps):
            for worker, per_model in zip(workers, rates):
                for name, rate in zip(("pp", "tg"), per_model):
                    if rate is not None:
                        rate.samples.append(rate.n_tokens / worker.ask(name)["seconds"])
        results = []
        for worker, (pp, tg) in zip(workers, rates):
            r = worker.ask("result")
            results.append(BenchResult(r["model"], pp, tg, r["peak"], r["own"]))
        return results
    finally:
        for worker in workers:
            worker.close()


if __name__ == "__main__":
    _serve(**json.loads(sys.argv[1]))

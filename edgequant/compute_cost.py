"""What llama.cpp's CPU backend takes to multiply by a weight of each ggml type: seconds per weight, measured here.

A file's speed depends on its types as well as its bytes: per weight, Q5_K's dot product is slower than Q4_K's, and
Q4_1's matrix multiply slower than Q5_0's (docs/BENCHMARKS.md, "Speed in llama.cpp of the allocated files").  So the
allocator (edgequant.allocate) needs each type's compute cost on the machine the build runs on, in two regimes:

  generation  one token: a mul_mat with one activation column, which llama.cpp runs through the weight type's
              vec_dot against its activation type (q8_K for the K-quants and IQ4_XS, q8_0/q8_1 for the 32-wide
              types), or through the repacked gemv where ggml's CPU backend repacks the type (on AVX2: Q4_0, Q4_K,
              IQ4_NL in ggml-cpu/repack.cpp's interleaved layouts).
  prompt      a batch of PROMPT_TOKENS tokens: a mul_mat with that many columns, which takes llamafile's tinyBLAS
              (F16, Q8_0, Q4_0, Q5_0, IQ4_NL on AVX2), the repacked gemm, or else vec_dot over tiles of rows and
              columns; per weight and per token.

Rather than copy those dispatch rules (they change between llama.cpp versions and ISAs), `measure` times ggml_mul_mat
graphs through the CPU backend of the libggml that llama-cpp-python ships (the library `edgequant run/bench` load),
with each weight placed in the buffer type llama.cpp would place it in: CPU_REPACK when that buffer supports the op
for the weight, the plain CPU buffer otherwise (llama-model.cpp puts the extra buffer types first in its CPU list).
One thread, weights that stay in the last-level cache: what is measured is the compute, the part of the cost the
byte budget does not already fix (a model larger than the cache is bound by memory in generation, where equal bytes
give equal speed, so a constraint on compute is then conservative).  Each type is timed in rounds, its best time of
each round's repetitions kept, the rounds interleaved across types so that a burst of load on a shared machine hits
one round of every type rather than all rounds of one; well under a second in all.

`compute_cost()` measures once per process and keeps the result on disk (user cache dir, keyed by the libggml
binary and the CPU), so that rebuilding on one machine chooses the same types; FALLBACK is used where libggml cannot
be loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import time
from dataclasses import dataclass

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# Columns of the prompt multiply: llama.cpp's micro-batch (n_ubatch, 512 by default in llama-bench, llama-cli and
# `edgequant bench`).  It matters: with 512 columns the activations leave the L2 cache, and per weight and token the
# repacked Q4_K gemm and tinyBLAS's Q8_0 then take twice what they take at 32 columns while the vec_dot types hold
# their speed, which turns Q5_K from 1.2x Q4_K's time to 0.8x.
PROMPT_TOKENS = 512
GEN_COPIES = 8  # mul_mats of one token per timed graph, so that the graph call's own overhead is spread thin


def rows_for(cols: int, regime: str) -> int:
    """Rows of the timed matrix, whose rows stand for the tensor's (the time per row does not depend on their count,
    past the activations' quantization: each mul_mat first quantizes its activations, once for all its rows, which
    llama.cpp's matrices of hundreds of rows and more spread thin).  Generation: 512 rows or more, about 2^19 weights,
    a few tenths of a millisecond per call, well inside a scheduler slice of a shared machine, so that the best of
    many calls is a call nobody interrupted.  Prompt: 64 to 256 rows, so that one call stays within about 2^25
    multiply-adds (a millisecond or two), for the same reason.  Multiples of 16: ggml's repacked layouts interleave 4 or 8 rows."""
    if regime == "generation":
        return max(512, (1 << 19) // cols // 16 * 16)
    return max(64, min(256, (1 << 25) // (cols * PROMPT_TOKENS) // 16 * 16))


# Measuring time per regime, spread over rounds of every case, and the rounds' least and most; a timed generation
# call is the best of a few back to back (short, so likely uninterrupted), a prompt call is long enough alone.
SECONDS = {"generation": 0.3, "prompt": 0.6}
ROUNDS = {"generation": (5, 100), "prompt": (3, 20)}
CALLS = {"generation": 3, "prompt": 1}
SCHEMA = 2  # bump when what is measured changes: the disk cache is keyed by it

# ps per weight (generation) and per weight and token (prompt), on an AMD EPYC with AVX2 (no AVX-512) and
# llama-cpp-python 0.3.36's libggml, one thread, the machine shared: the 256-wide types and F16 and Q8_0 from
# `measure` on rows of 512 for 6 s (docs/BENCHMARKS.md's table), the 32-wide ones from an earlier prototype of it
# (rows of 2048 and 4096, a 128-token batch).  Used only where libggml cannot be loaded, as a guess that keeps the
# types' order on x86.
FALLBACK_PS = {
    Q.F16: (62.8, 33.8), Q.Q8_0: (59.1, 37.6), Q.Q6_K: (60.7, 39.2), Q.Q5_K: (75.2, 37.6), Q.Q4_K: (36.7, 30.1),
    Q.Q3_K: (68.2, 39.3), Q.Q2_K: (46.8, 40.7), Q.IQ4_XS: (73.5, 41.3), Q.IQ4_NL: (45.0, 36.0),
    Q.Q4_0: (44.0, 35.0), Q.Q4_1: (80.0, 90.0), Q.Q5_0: (85.0, 58.0), Q.Q5_1: (90.0, 100.0),
}

Case = tuple  # (ggml type, row length): what a weight costs depends on both (short rows pay each dot's overhead)


@dataclass(frozen=True)
class ComputeCost:
    generation: dict[Case, float]  # seconds per weight for one token
    prompt: dict[Case, float]  # seconds per weight per token, in a batch of PROMPT_TOKENS
    source: str  # where the numbers come from, for the summary

    def as_dict(self) -> dict:
        return {"source": self.source, "ps_per_weight": {f"{q.name}:{k}": [round(self.generation[q, k] * 1e12, 2),
                                                                            round(self.prompt[q, k] * 1e12, 2)]
                                                          for q, k in self.generation}}

    @staticmethod
    def from_dict(d: dict) -> ComputeCost:
        ps = {(Q[name], int(k)): v for key, v in d["ps_per_weight"].items() for name, k in [key.split(":")]}
        return ComputeCost({c: g * 1e-12 for c, (g, _) in ps.items()}, {c: p * 1e-12 for c, (_, p) in ps.items()},
                           d["source"])

    def subset(self, cases) -> ComputeCost:
        return ComputeCost({c: self.generation[c] for c in cases}, {c: self.prompt[c] for c in cases}, self.source)


class GgmlUnavailable(RuntimeError):
    pass


def fallback(cases) -> ComputeCost:
    """FALLBACK_PS for each (type, row length), whatever the row length."""
    missing = sorted({q.name for q, _ in cases if q not in FALLBACK_PS})
    if missing:
        raise GgmlUnavailable(f"no fallback compute cost for {', '.join(missing)}")
    return ComputeCost({(q, k): FALLBACK_PS[q][0] * 1e-12 for q, k in cases},
                       {(q, k): FALLBACK_PS[q][1] * 1e-12 for q, k in cases}, "fallback table (libggml not loaded)")


def compute_cost(cases) -> ComputeCost:
    """The costs of `cases`, (ggml type, row length) pairs: from this process's measurements, else the disk cache's,
    else measured now (and cached), else FALLBACK_PS."""
    cases = frozenset((Q(q), int(k)) for q, k in cases)
    return _cached(cases).subset(cases)


@functools.lru_cache(maxsize=None)
def _cached(cases: frozenset) -> ComputeCost:
    try:
        lib = _library_dir()
    except GgmlUnavailable:
        return fallback(cases)
    path = cache_dir() / f"{_machine_key(lib)}.json"
    known = None
    try:
        known = ComputeCost.from_dict(json.loads(path.read_text()))
        if cases <= set(known.generation):
            return known
    except (OSError, ValueError, KeyError):
        pass
    try:
        cost = measure(sorted(cases - set(known.generation) if known else cases))
    except GgmlUnavailable:
        return fallback(cases)
    if known is not None:  # the cases measured before keep their numbers: a build's choice stays what it was
        cost = ComputeCost({**known.generation, **cost.generation}, {**known.prompt, **cost.prompt}, cost.source)
    cost = ComputeCost.from_dict(cost.as_dict())  # rounded as stored: this build chooses as a rerun reading it will
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cost.as_dict()))
        tmp.replace(path)
    except OSError:  # a read-only home: measure again next time
        pass
    return cost


def cache_dir() -> pathlib.Path:
    """EDGEQUANT_CACHE_DIR (the tests point it at a temporary folder), else the user's cache folder."""
    if os.environ.get("EDGEQUANT_CACHE_DIR"):
        return pathlib.Path(os.environ["EDGEQUANT_CACHE_DIR"]) / "compute_cost"
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "edgequant" / "compute_cost"


def _machine_key(lib: pathlib.Path) -> str:
    """The libggml-cpu binary (path, size, time) and the CPU: a new build or another machine measures anew."""
    so = next(iter(sorted(lib.glob("libggml-cpu.*"))), lib)
    st = so.stat()
    cpu = platform.processor()
    try:
        cpu += "".join(line for line in open("/proc/cpuinfo") if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return hashlib.sha256(f"{SCHEMA} {so.resolve()} {st.st_size} {st.st_mtime_ns} {cpu}".encode()).hexdigest()[:16]


def _library_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise GgmlUnavailable("llama_cpp is not installed")
    lib = pathlib.Path(spec.origin).parent / "lib"
    if not any(lib.glob("libggml-cpu.*")):
        raise GgmlUnavailable(f"no libggml-cpu in {lib}")
    return lib


def measure(cases, seconds: dict[str, float] | None = None) -> ComputeCost:
    """Time each (type, row length)'s mul_mat in both regimes now (GgmlUnavailable if libggml cannot be loaded or
    run)."""
    ggml = _Ggml(_library_dir())
    rng = np.random.default_rng(0)
    cases = [(Q(q), int(k)) for q, k in cases]
    seconds = seconds or SECONDS
    best, rounds, buffers = {}, {}, {}
    with ggml.quiet():
        for regime, tokens, copies in (("generation", 1, GEN_COPIES), ("prompt", PROMPT_TOKENS, 1)):
            timed = {}
            try:
                for q, k in cases:
                    timed[q, k] = ggml.matmul(q, rows_for(k, regime), k, tokens, copies, rng)
                    buffers[q] = timed[q, k].buffer
                times = {c: np.inf for c in cases}
                t0, n = time.perf_counter(), 0
                low, high = ROUNDS[regime]
                while n < low or (n < high and time.perf_counter() - t0 < seconds[regime]):
                    for c, mm in timed.items():  # interleaved: a burst of load hits one round of every case
                        times[c] = min(times[c], mm.best_of(CALLS[regime]))
                    n += 1
            finally:
                for mm in timed.values():
                    mm.free()
            best[regime] = {(q, k): times[q, k] / (rows_for(k, regime) * k * copies * tokens) for q, k in cases}
            rounds[regime] = n
    repacked = sorted(q.name for q, b in buffers.items() if b != "CPU")
    return ComputeCost(best["generation"], best["prompt"],
                       f"measured: {ggml.path.name} in {ggml.path.parent}, 1 thread, {rounds['generation']} and "
                       f"{rounds['prompt']} rounds{', repacked: ' + ' '.join(repacked) if repacked else ''}")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_P = ctypes.c_void_p
_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Ggml:
    """The few functions of libggml-base and libggml-cpu a timed mul_mat needs, through ctypes."""

    def __init__(self, lib: pathlib.Path):
        try:
            base = ctypes.CDLL(str(sorted(lib.glob("libggml-base.*"))[0]), mode=ctypes.RTLD_GLOBAL)
            cpu = ctypes.CDLL(str(sorted(lib.glob("libggml-cpu.*"))[0]), mode=ctypes.RTLD_GLOBAL)
            self.path = pathlib.Path(cpu._name)
            f = self._bind
            self.init = f(base, "ggml_init", _P, _InitParams)
            self.free_ctx = f(base, "ggml_free", None, _P)
            self.new_2d = f(base, "ggml_new_tensor_2d", _P, _P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            self.mul_mat = f(base, "ggml_mul_mat", _P, _P, _P, _P)
            self.new_graph = f(base, "ggml_new_graph", _P, _P)
            self.expand = f(base, "ggml_build_forward_expand", None, _P, _P)
            self.tensor_overhead = f(base, "ggml_tensor_overhead", ctypes.c_size_t)
            self.graph_overhead = f(base, "ggml_graph_overhead", ctypes.c_size_t)
            self.alloc = f(base, "ggml_backend_alloc_ctx_tensors_from_buft", _P, _P, _P)
            self.free_buffer = f(base, "ggml_backend_buffer_free", None, _P)
            self.set = f(base, "ggml_backend_tensor_set", None, _P, _P, ctypes.c_size_t, ctypes.c_size_t)
            self.compute = f(base, "ggml_backend_graph_compute", ctypes.c_int, _P, _P)
            self.supports = f(base, "ggml_backend_dev_supports_op", ctypes.c_bool, _P, _P)
            self.cpu_buffer = f(base, "ggml_backend_cpu_buffer_type", _P)()
            self.buft_name = f(base, "ggml_backend_buft_name", ctypes.c_char_p, _P)
            self.quantize = f(base, "ggml_quantize_chunk", ctypes.c_size_t, ctypes.c_int, _P, _P, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_int64, _P)
            self.quantize_init = f(base, "ggml_quantize_init", None, ctypes.c_int)
            self.log_get = f(base, "ggml_log_get", None, ctypes.POINTER(_P), ctypes.POINTER(_P))
            self.log_set = f(base, "ggml_log_set", None, _P, _P)
            reg = f(cpu, "ggml_backend_cpu_reg", _P)()
            self.dev = f(base, "ggml_backend_reg_dev_get", _P, _P, ctypes.c_size_t)(reg, 0)
            proc = f(base, "ggml_backend_reg_get_proc_address", _P, _P, ctypes.c_char_p)(reg, b"ggml_backend_dev_get_extra_bufts")
            self.extra = []  # the CPU's extra buffer types (CPU_REPACK, ...), in llama.cpp's order of preference
            if proc:
                listed = ctypes.CFUNCTYPE(ctypes.POINTER(_P), _P)(proc)(self.dev)
                while listed and listed[len(self.extra)]:
                    self.extra.append(listed[len(self.extra)])
            self.backend = f(cpu, "ggml_backend_cpu_init", _P)()
            f(cpu, "ggml_backend_cpu_set_n_threads", None, _P, ctypes.c_int)(self.backend, 1)
        except (OSError, AttributeError, IndexError) as e:
            raise GgmlUnavailable(f"libggml in {lib}: {e}") from None
        if not self.backend:
            raise GgmlUnavailable(f"libggml in {lib}: no CPU backend")

    @staticmethod
    def _bind(lib, name, restype, *argtypes):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn

    def quiet(self):
        """ggml's log silenced (the repack buffer logs every tensor it repacks), and restored after."""
        ggml = self

        class Quiet:
            def __enter__(self):
                self.saved = (_P(), _P())
                ggml.log_get(ctypes.byref(self.saved[0]), ctypes.byref(self.saved[1]))
                self.hook = _LOG(lambda level, text, user: None)
                ggml.log_set(ctypes.cast(self.hook, _P), None)

            def __exit__(self, *exc):
                ggml.log_set(self.saved[0], self.saved[1])

        return Quiet()

    def weights(self, q: Q, rows: int, cols: int, rng) -> np.ndarray:
        """rows x cols weights stored as q: 16 Gaussian rows quantized by ggml, repeated (the kernels' time does not
        depend on the values; quantizing a whole matrix would take longer than timing it)."""
        w = rng.standard_normal((16, cols)).astype(np.float32)
        if q == Q.F16:
            block = w.astype(np.float16).view(np.uint8)
        elif q == Q.F32:
            block = w.view(np.uint8)
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[q]
            block = np.zeros((16, cols // block_size * type_size), np.uint8)
            self.quantize_init(int(q))
            self.quantize(int(q), w.ctypes.data, block.ctypes.data, 0, 16, cols, None)
        return np.ascontiguousarray(np.tile(block, (rows // 16, 1)))

    def matmul(self, q: Q, rows: int, cols: int, tokens: int, copies: int, rng) -> _Matmul:
        """A graph of `copies` products of one rows x cols weight of type q with tokens x cols activations."""
        data = self.weights(q, rows, cols, rng)
        for buft in [*self.extra, self.cpu_buffer]:
            # the weight in a context of its own, the activations and the product in another, as llama.cpp's weights
            # live in the model's buffers and the activations in the compute graph's
            wctx = self.init(_InitParams(self.tensor_overhead() * 2, None, True))
            xctx = self.init(_InitParams(self.tensor_overhead() * (2 * copies + 2) + self.graph_overhead(), None, True))
            w = self.new_2d(wctx, int(q), cols, rows)
            xs = [self.new_2d(xctx, int(Q.F32), cols, tokens) for _ in range(copies)]
            ys = [self.mul_mat(xctx, w, x) for x in xs]
            wbuf = self.alloc(wctx, buft)
            if buft == self.cpu_buffer or self.supports(self.dev, ys[0]):  # the first buffer type that runs it, as llama.cpp
                break
            self.free_buffer(wbuf)
            self.free_ctx(wctx)
            self.free_ctx(xctx)
        xbuf = self.alloc(xctx, self.cpu_buffer)
        if not wbuf or not xbuf:
            raise GgmlUnavailable(f"{q.name}: ggml could not allocate the buffers")
        self.set(w, data.ctypes.data, 0, data.nbytes)  # the repack buffer repacks here
        for x in xs:
            values = rng.standard_normal((tokens, cols)).astype(np.float32)
            self.set(x, values.ctypes.data, 0, values.nbytes)
        graph = self.new_graph(xctx)
        for y in ys:
            self.expand(graph, y)
        return _Matmul(self, graph, (wbuf, xbuf), (wctx, xctx), self.buft_name(buft).decode())


class _Matmul:
    def __init__(self, ggml: _Ggml, graph, buffers, contexts, buffer: str):
        self.ggml, self.graph, self.buffers, self.contexts, self.buffer = ggml, graph, buffers, contexts, buffer
        self.run()  # warm: the weights into the cache, the backend's work buffer allocated

    def run(self) -> None:
        if self.ggml.compute(self.ggml.backend, self.graph) != 0:
            raise GgmlUnavailable("ggml_backend_graph_compute failed")

    def best_of(self, n: int) -> float:
        self.run()  # back into the cache after the other types' turns
        best = np.inf
        for _ in range(n):
            t0 = time.perf_counter()
            self.run()
            best = min(best, time.perf_counter() - t0)
        return best

    def free(self) -> None:
        for b in self.buffers:
            self.ggml.free_buffer(b)
        for c in self.contexts:
            self.ggml.free_ctx(c)

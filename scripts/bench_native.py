"""Throughput of edgequant.native's dot kernels next to libggml's own, on the same blocks in the same run.

    python scripts/bench_native.py [--json] [--types Q4_K IQ4_XS] [--rows 512] [--cols 4096] [--repeat 21]

For every weight type (by default all of native.DOT_TYPES: Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS and the lattice
i-quants IQ3_XXS..IQ1_M, those quantized with a random importance vector) and ISA: `rows` weight rows (ggml_quantize_chunk of Gaussian weights) dotted with one
activation row quantized by ggml's own quantizer for that ISA.  Both sides run the same C loop over the rows
(ours: eq_dot_rows; ggml: a loop compiled here with cffi calling ggml's function), one thread, timed
alternately; the median of `repeat` timings is reported as weight bytes per second.  `bit_exact` compares the
two outputs bit for bit.  Pairings: isa "avx2" runs against ggml-cpu's dispatched vec_dot (its AVX2 build),
"scalar" against ggml's exported *_generic functions.

    python scripts/bench_native.py --fits [--types IQ4_NL IQ4_XS] [--rows 512] [--cols 4096] [--repeat 21] [--numpy]

--fits times the block fits instead: edgequant.native.fit.quantize (each ISA's build) against libggml's
ggml_quantize_chunk (its one-threaded quantizer), plain and with an importance vector, on the same Gaussian rows
(per-row magnitudes, 1 % outliers), alternately; the median is reported as ns per weight, `bit_exact` compares the
bytes.  --numpy adds the numpy codec's fit (the specification; timed once, it is slow).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
from cffi import FFI
from gguf import GGMLQuantizationType

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import ggml_oracle  # noqa: E402
import edgequant.native as native  # noqa: E402
from edgequant.native import ffi as eq_ffi, lib as eq_lib  # noqa: E402

LOOP_CDEF = """
typedef void (*vec_dot_t)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
typedef void (*from_float_t)(const float *, void *, int64_t);
struct traits { from_float_t from_float; vec_dot_t vec_dot; int vec_dot_type; int64_t nrows; };
void dot_rows(vec_dot_t f, int n, int64_t rows, const char *w, size_t stride, const void *a, float *out);
"""
LOOP_SOURCE = """
#include <stddef.h>
#include <stdint.h>
typedef void (*vec_dot_t)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
typedef void (*from_float_t)(const float *, void *, int64_t);
struct traits { from_float_t from_float; vec_dot_t vec_dot; int vec_dot_type; int64_t nrows; };
void dot_rows(vec_dot_t f, int n, int64_t rows, const char *w, size_t stride, const void *a, float *out) {
    for (int64_t r = 0; r < rows; ++r) f(n, out + r, 0, w + r * stride, 0, a, 0, 1);
}
"""


def compile_loop():
    """The ggml-side row loop, built once into a temporary directory."""
    ffi = FFI()
    ffi.cdef(LOOP_CDEF)
    ffi.set_source("_ggml_loop", LOOP_SOURCE, extra_compile_args=["-O2"])
    tmp = tempfile.mkdtemp(prefix="bench_native_")
    path = ffi.compile(tmpdir=tmp)
    spec = importlib.util.spec_from_file_location("_ggml_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Ggml:
    """libggml-cpu's kernels as cffi function pointers: dispatched (type traits) and *_generic ones."""

    def __init__(self, loop):
        self.ffi, self.lib = loop.ffi, loop.lib
        self.cpu = ggml_oracle._load("ggml-cpu")
        self.cpu.ggml_cpu_init()  # fills the fp16 table the kernels read
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.c_void_p
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    def _traits(self, qtype):
        return self.ffi.cast("struct traits *", self.cpu.ggml_get_type_traits_cpu(int(qtype)))

    def _symbol(self, name: str, ctype: str):
        return self.ffi.cast(ctype, ctypes.cast(getattr(self.cpu, name), ctypes.c_void_p).value)

    def kernels(self, qtype, isa: str):
        """(activation quantizer, vec_dot) of the ggml path that our `isa` reproduces."""
        act = native.activation_type(qtype)
        if isa == "scalar":
            w, a = (t.name.lower().replace("_k", "_K") for t in (qtype, act))
            return (self._symbol(f"quantize_row_{a}_generic", "from_float_t"),
                    self._symbol(f"ggml_vec_dot_{w}_{a}_generic", "vec_dot_t"))
        return self._traits(act).from_float, self._traits(qtype).vec_dot


def bench_one(ggml: Ggml, qtype, isa: str, rows: int, cols: int, repeat: int, rng) -> dict:
    ffi = ggml.ffi
    # the lattice i-quants with an importance vector, as they are built (ggml aborts on IQ2_XXS/IQ2_XS/IQ1_S without)
    importance = rng.gamma(0.5, 2.0, cols).astype(np.float32) if qtype in native.LATTICE_TYPES else None
    w = ggml_oracle.quantize_chunk(qtype, rng.standard_normal((rows, cols)).astype(np.float32), importance)
    x = rng.standard_normal(cols).astype(np.float32)
    act_block, act_size = native.block_layout(native.activation_type(qtype))
    act = np.zeros(cols // act_block * act_size, dtype=np.uint8)
    from_float, vec_dot = ggml.kernels(qtype, isa)
    from_float(ffi.cast("float *", x.ctypes.data), ffi.cast("void *", act.ctypes.data), cols)
    ours_out, ggml_out = np.empty(rows, np.float32), np.empty(rows, np.float32)
    code = native.ISAS[isa]

    def ours():
        eq_lib.eq_dot_rows(code, int(qtype), cols, rows, eq_ffi.cast("void *", w.ctypes.data), w.shape[1],
                           eq_ffi.cast("void *", act.ctypes.data), eq_ffi.cast("float *", ours_out.ctypes.data))

    def theirs():
        ggml.lib.dot_rows(vec_dot, cols, rows, ffi.cast("char *", w.ctypes.data), w.shape[1],
                          ffi.cast("void *", act.ctypes.data), ffi.cast("float *", ggml_out.ctypes.data))

    times = interleaved_times((ours, theirs), repeat)
    gbps = {fn: w.nbytes / statistics.median(t) / 1e9 for fn, t in times.items()}
    return {
        "type": qtype.name,
        "isa": isa,
        "bit_exact": bool(np.array_equal(ours_out.view(np.uint32), ggml_out.view(np.uint32))),
        "ours_gbps": round(gbps[ours], 3),
        "ggml_gbps": round(gbps[theirs], 3),
        "ratio": round(gbps[ours] / gbps[theirs], 3),
    }


def interleaved_times(fns, repeat: int) -> dict:
    """Each function's run times, the functions taking turns so that a busy machine slows them alike."""
    times = {fn: [] for fn in fns}
    for _ in range(repeat):
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return times


def bench_fit(qtype, isa: str, weighted: bool, rows: int, cols: int, repeat: int, with_numpy: bool, rng) -> dict:
    from edgequant.convert.codecs import codec
    from edgequant.native import fit

    w = (rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, 1)))).astype(np.float32)
    hit = rng.random(w.shape) < 0.01
    w[hit] *= 40
    importance = np.exp(2 * rng.standard_normal(cols)).astype(np.float32) if weighted else None
    outputs = {}

    def ours():
        outputs["ours"] = fit.quantize(w, qtype, importance, isa=isa)

    def theirs():
        outputs["ggml"] = ggml_oracle.quantize_chunk(qtype, w, importance)

    times = interleaved_times((ours, theirs), repeat)
    ns = {fn: statistics.median(t) / w.size * 1e9 for fn, t in times.items()}
    result = {
        "type": qtype.name,
        "isa": isa,
        "importance": weighted,
        "bit_exact": bool(np.array_equal(outputs["ours"], outputs["ggml"])),
        "ours_ns_per_weight": round(ns[ours], 2),
        "ggml_ns_per_weight": round(ns[theirs], 2),
        "speedup": round(ns[theirs] / ns[ours], 3),
    }
    if with_numpy:
        t0 = time.perf_counter()
        codec(qtype).quantize(w, importance)
        result["numpy_ns_per_weight"] = round((time.perf_counter() - t0) / w.size * 1e9, 1)
    return result


def main_fits(args) -> None:
    from edgequant.convert.codecs import codec
    from edgequant.native import fit

    rng = np.random.default_rng(0)
    types = [GGMLQuantizationType[t] for t in args.types if fit.supports(GGMLQuantizationType[t])]
    # IQ2_XXS, IQ2_XS and IQ1_S only weighted: ggml aborts without an importance vector, and our fits refuse
    results = [bench_fit(t, isa, weighted, args.rows, args.cols, args.repeat, args.numpy, rng)
               for isa in args.isas for t in types for weighted in (False, True)
               if weighted or not codec(t).needs_importance]
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'type':6} {'isa':6} {'imatrix':7} {'exact':5} {'ours ns/w':>9} {'ggml ns/w':>9} {'speedup':>7}"
          + (f" {'numpy ns/w':>10}" if args.numpy else ""))
    for r in results:
        print(f"{r['type']:6} {r['isa']:6} {str(r['importance']):7} {str(r['bit_exact']):5}"
              f" {r['ours_ns_per_weight']:9.2f} {r['ggml_ns_per_weight']:9.2f} {r['speedup']:7.3f}"
              + (f" {r['numpy_ns_per_weight']:10.1f}" if args.numpy else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--types", nargs="*", default=[t.name for t in native.DOT_TYPES])
    p.add_argument("--isas", nargs="*", default=[i for i in ("avx2", "scalar") if i in native.available_isas()])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--fits", action="store_true", help="time the block fits against ggml_quantize_chunk instead")
    p.add_argument("--numpy", action="store_true", help="with --fits: also time the numpy codecs' fit")
    args = p.parse_args()
    if args.fits:
        main_fits(args)
        return

    ggml = Ggml(compile_loop())
    rng = np.random.default_rng(0)
    results = [bench_one(ggml, GGMLQuantizationType[t], isa, args.rows, args.cols, args.repeat, rng)
               for isa in args.isas for t in args.types]
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'type':6} {'isa':6} {'exact':5} {'ours GB/s':>9} {'ggml GB/s':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['type']:6} {r['isa']:6} {str(r['bit_exact']):5} {r['ours_gbps']:9.2f} {r['ggml_gbps']:9.2f} {r['ratio']:6.3f}")


if __name__ == "__main__":
    main()

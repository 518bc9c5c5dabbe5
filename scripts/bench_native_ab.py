"""Several builds of the native kernels next to libggml's dot, interleaved in one process, on the same blocks.

    python scripts/bench_native_ab.py before=/tmp/a/_kernels.abi3.so after=native/_kernels.abi3.so \
        [--types IQ2_XXS IQ1_M] [--isa avx2] [--rows 64] [--cols 4096] [--repeat 201]

For comparing kernel versions on a shared machine.  bench_native.py runs one build per process, and its ratio moves
from process to process and from minute to minute there: ggml's dot has been seen alternating between two speeds
(about 1.5x apart) on the shared cores while ours moved less, so two builds timed minutes apart disagree by more than
their difference.  Here every build (each copy of the extension loaded under its own module name) and ggml take turns
on the same blocks, so they share whatever state the machine is in; the minimum of `repeat` timings is the figure of
the least disturbed turns.  The ratio printed is ggml's time over the build's (above 1: faster than ggml), with the
median's in brackets; `NOT EXACT` marks a build whose outputs differ from ggml's in any bit.  The blocks are
bench_native.py's (ggml_quantize_chunk of Gaussian rows, a random importance for the lattice i-quants, one
activation row quantized by ggml's dispatched quantizer).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics

import numpy as np
from gguf import GGMLQuantizationType

import bench_native as bench
import ggml_oracle  # noqa: E402 (bench_native put tests/ on the path)
import edgequant.native as native


def load_build(name: str, path: str):
    """A copy of the cffi extension at `path`, as a module of its own (its init symbol is PyInit__kernels)."""
    module_name = f"eq_build_{name}._kernels"
    loader = importlib.machinery.ExtensionFileLoader(module_name, path)
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("builds", nargs="+", help="NAME=PATH of a built _kernels extension")
    p.add_argument("--types", nargs="*", default=[t.name for t in native.LATTICE_TYPES])
    p.add_argument("--isa", default="avx2", choices=["avx2", "scalar"])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=201)
    args = p.parse_args()
    builds = {name: load_build(name, path) for name, path in (b.split("=", 1) for b in args.builds)}
    ggml = bench.Ggml(bench.compile_loop())
    ffi, rows, cols = ggml.ffi, args.rows, args.cols
    rng = np.random.default_rng(0)
    for type_name in args.types:
        qtype = GGMLQuantizationType[type_name]
        importance = rng.gamma(0.5, 2.0, cols).astype(np.float32) if qtype in native.LATTICE_TYPES else None
        w = ggml_oracle.quantize_chunk(qtype, rng.standard_normal((rows, cols)).astype(np.float32), importance)
        x = rng.standard_normal(cols).astype(np.float32)
        act_block, act_size = native.block_layout(native.activation_type(qtype))
        act = np.zeros(cols // act_block * act_size, dtype=np.uint8)
        from_float, vec_dot = ggml.kernels(qtype, args.isa)
        from_float(ffi.cast("float *", x.ctypes.data), ffi.cast("void *", act.ctypes.data), cols)
        outputs = {name: np.empty(rows, np.float32) for name in ["ggml", *builds]}

        def ours(module, out):
            wp, ap, op = (module.ffi.cast(t, a.ctypes.data) for t, a in (("void *", w), ("void *", act), ("float *", out)))
            return lambda: module.lib.eq_dot_rows(native.ISAS[args.isa], int(qtype), cols, rows, wp, w.shape[1], ap, op)

        fns = {name: ours(module, outputs[name]) for name, module in builds.items()}
        wp, ap, op = ffi.cast("char *", w.ctypes.data), ffi.cast("void *", act.ctypes.data), ffi.cast("float *", outputs["ggml"].ctypes.data)
        fns["ggml"] = lambda: ggml.lib.dot_rows(vec_dot, cols, rows, wp, w.shape[1], ap, op)
        times = bench.interleaved_times(list(fns.values()), args.repeat)
        fastest = {name: min(times[fn]) for name, fn in fns.items()}
        median = {name: statistics.median(times[fn]) for name, fn in fns.items()}
        cells = []
        for name in builds:
            exact = np.array_equal(outputs[name].view(np.uint32), outputs["ggml"].view(np.uint32))
            cells.append(f"{name} {fastest['ggml'] / fastest[name]:.3f} ({median['ggml'] / median[name]:.3f})"
                         + ("" if exact else " NOT EXACT"))
        print(f"{type_name:8} ggml {fastest['ggml'] * 1e6:7.1f} us | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

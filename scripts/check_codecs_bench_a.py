"""Quantize every weight matrix of bench-a with our codecs and with libggml; report the % of identical blocks.

    python scripts/check_codecs_bench_a.py [--types Q4_K Q5_K ...] [--model ../shared/models/bench-a] [--native]

Each matrix is quantized without and with a random importance vector (one per matrix, fixed seed); IQ2_XXS and
IQ2_XS (and IQ1_S) only with one (ggml asserts it).  --native checks the C fits (edgequant.native.fit, the best build
this CPU runs) instead of the numpy codecs.
Exits 1 unless every block of every type is byte-identical.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import ggml_oracle  # noqa: E402
from edgequant.checkpoint import Checkpoint  # noqa: E402
from edgequant.convert.codecs import codec  # noqa: E402

DEFAULT_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_K", "IQ4_NL", "IQ4_XS",
                 "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=pathlib.Path, default=REPO.parent / "shared" / "models" / "bench-a")
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    ap.add_argument("--native", action="store_true", help="check native/fit.c's bytes instead of the numpy codecs'")
    args = ap.parse_args()
    if args.native:
        from edgequant.native import fit

    matrices = [(name, t.numpy()) for name, t in Checkpoint(args.model).items() if t.ndim == 2]
    print(f"{len(matrices)} matrices, {sum(w.size for _, w in matrices) / 1e6:.1f}M weights")
    all_same = True
    for qtype in args.types:
        c = codec(qtype)
        rng = np.random.default_rng(0)
        weightings = (True,) if c.needs_importance else (False, True) if c.uses_importance else (False,)
        for with_importance in weightings:  # ggml asserts an importance for IQ2_XXS/IQ2_XS
            same = total = 0
            t_ours = t_ggml = 0.0
            for name, w in matrices:
                importance = rng.random(w.shape[1]).astype(np.float32) if with_importance else None
                t = time.perf_counter()
                raw = ggml_oracle.ggml_bytes(c.qtype, w, importance)
                t_ggml += time.perf_counter() - t
                t = time.perf_counter()
                ours = fit.quantize(w, c.qtype, importance) if args.native else c.quantize(w, importance)
                t_ours += time.perf_counter() - t
                blocks_same = (ours.reshape(-1, c.type_size) == raw.reshape(-1, c.type_size)).all(axis=1)
                same += int(blocks_same.sum())
                total += blocks_same.size
                if not blocks_same.all():
                    print(f"  {qtype} {name}: {blocks_same.size - blocks_same.sum()} blocks differ")
            all_same &= same == total
            label = "imatrix" if with_importance else "plain  "
            print(f"{qtype:5} {label} {100 * same / total:8.4f}% identical of {total} blocks"
                  f"   ours {t_ours:6.1f}s  ggml {t_ggml:5.1f}s")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())

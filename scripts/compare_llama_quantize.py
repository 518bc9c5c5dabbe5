#!/usr/bin/env python
"""Byte-for-byte comparison of edgequant's builds with llama.cpp's own pipeline on one model.

  F16:  edgequant build --target F16   vs  convert_hf_to_gguf.py --outtype f16        (tensor names, shapes, types, bytes)
  FTYPE: edgequant build --method rtn   vs  llama-quantize OUR-F32.gguf FTYPE           (per-tensor type and bytes)
  FTYPE: edgequant build --method imatrix --imatrix I  vs  llama-quantize --imatrix I   (same, importance-weighted)

llama-quantize reads our F32 conversion (convert_hf_to_gguf.py refuses retrained BPE vocabularies such as the
Qwen2 fixture's; where it works its tensors equal ours, see the F16 row), the exact source values (bf16 -> f32 is lossless), as edgequant does; from
an F16 file the inputs differ wherever bf16 values fall outside fp16's range (tiny weights flush to zero), and so do
a few blocks.  llama.cpp's tools come from scripts/build_llama_tools.sh (.cache/llama-tools); the imatrix is made by llama-imatrix on
--calib (default: ../shared's WikiText-2 train text, 256 chunks of 512, as the anchors were).  Also times both
pipelines (wall clock, same machine) for the speed comparison in docs/BENCHMARKS.md.

    python scripts/compare_llama_quantize.py ../shared/models/bench-a --ftypes Q4_K_M Q3_K_M Q2_K Q5_K_M Q6_K Q8_0
    python scripts/compare_llama_quantize.py ../shared/models/bench-a --ftypes IQ3_M IQ3_S IQ3_XS --method imatrix --chunks 64
    python scripts/compare_llama_quantize.py ../shared/models/bench-a --ftypes IQ1_M --method imatrix --imatrix I.gguf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# ftypes with tensors llama-quantize will not write without an imatrix (edgequant.convert.recipes.requires_imatrix)
NEED_IMATRIX = {"Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"}
TOOLS = ROOT / ".cache" / "llama-tools"


def tool(name: str) -> str:
    path = TOOLS / "bin" / name
    if not path.exists():
        sys.exit(f"{path} missing: run scripts/build_llama_tools.sh first")
    return str(path)


def convert_script() -> Path:
    found = sorted(TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        sys.exit("llama.cpp sources missing: run scripts/build_llama_tools.sh first")
    return found[-1]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes()) for t in r.tensors}


def compare(ours: Path, ref: Path) -> dict:
    a, b = tensors(ours), tensors(ref)
    diff_type = [n for n in a.keys() & b.keys() if a[n][:2] != b[n][:2]]
    diff_bytes = [n for n in a.keys() & b.keys() if a[n][:2] == b[n][:2] and a[n][2] != b[n][2]]
    return {"tensors": len(b), "only_ours": sorted(a.keys() - b.keys()), "only_llama": sorted(b.keys() - a.keys()),
            "type_or_shape_differs": sorted(diff_type), "bytes_differ": sorted(diff_bytes),
            "identical": not (a.keys() ^ b.keys()) and not diff_type and not diff_bytes,
            "file_bytes": [ours.stat().st_size, ref.stat().st_size]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--ftypes", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_M", "Q6_K", "Q8_0"])
    p.add_argument("--calib", type=Path, default=ROOT.parent / "shared/data/wikitext-2/wiki.train.first1MB.txt")
    p.add_argument("--chunks", type=int, default=256)
    p.add_argument("--no-imatrix", action="store_true")
    p.add_argument("--imatrix", type=Path, help="an imatrix file to use instead of running llama-imatrix on --calib")
    p.add_argument("--method", choices=["both", "rtn", "imatrix"], default="both",
                   help="which quantizations to compare (rtn is skipped for ftypes llama.cpp writes only with an imatrix)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    edgequant = [sys.executable, "-m", "edgequant.cli", "build", str(args.model), "--quiet"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref16, ours16 = tmp / "ref-f16.gguf", tmp / "ours-f16.gguf"
        t_ours = run(edgequant + ["--target", "F16", "-o", str(ours16)])
        try:
            t_ref = run([sys.executable, str(convert_script()), str(args.model), "--outfile", str(ref16), "--outtype", "f16"])
            results.append({"ftype": "F16", "method": "convert_hf_to_gguf", **compare(ours16, ref16), "seconds": [t_ours, t_ref]})
        except subprocess.CalledProcessError:
            print("convert_hf_to_gguf.py failed on this model (F16 comparison skipped)", flush=True)
            ref16 = ours16
        ref32 = tmp / "ours-f32.gguf"
        run(edgequant + ["--target", "F32", "-o", str(ref32)])
        imatrix = None
        if args.imatrix:
            imatrix = args.imatrix
        elif not args.no_imatrix:
            imatrix = tmp / "imatrix.gguf"
            run([tool("llama-imatrix"), "-m", str(ref16), "-f", str(args.calib), "-c", "512", "--chunks", str(args.chunks),
                 "-t", str(args.threads), "-o", str(imatrix)])
        for ftype in args.ftypes:
            methods = {"both": [False, True], "rtn": [False], "imatrix": [True]}[args.method]
            for use_imatrix in methods if imatrix else [False]:
                if not use_imatrix and ftype in NEED_IMATRIX:
                    print(f"{ftype}: llama-quantize refuses it without an imatrix (rtn skipped)", flush=True)
                    continue
                ref, ours = tmp / f"ref-{ftype}.gguf", tmp / f"ours-{ftype}.gguf"
                extra = ["--imatrix", str(imatrix)] if use_imatrix else []
                t_ref = run([tool("llama-quantize"), *extra, str(ref32), str(ref), ftype, str(args.threads)])
                method = ["--method", "imatrix", "--imatrix", str(imatrix)] if use_imatrix else ["--method", "rtn"]
                t_ours = run(edgequant + ["--target", ftype, *method, "-o", str(ours)])
                r = {"ftype": ftype, "method": "imatrix" if use_imatrix else "rtn", **compare(ours, ref), "seconds": [t_ours, t_ref]}
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"{'ftype':8} {'method':18} {'identical':9} {'bytes ours/llama':>24} {'s ours':>7} {'s llama':>7}")
    for r in results:
        print(f"{r['ftype']:8} {r['method']:18} {str(r['identical']):9} {r['file_bytes'][0]:>11}/{r['file_bytes'][1]:<11} "
              f"{r['seconds'][0]:7.1f} {r['seconds'][1]:7.1f}")
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

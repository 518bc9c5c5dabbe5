"""`edgequant eval` next to llama-perplexity on the same GGUFs, text and chunks: PPL of a base (F16) and of a quant,
and the quant's KL divergence against the base.

    python scripts/compare_eval_llama_perplexity.py --base F16.gguf --quant Q4_K_M.gguf \
        --text ../shared/data/wikitext-2/wiki.test.raw [--ctx 512] [--chunks 20] [--threads 2]

llama-perplexity comes from .cache/llama-tools/bin (scripts/build_llama_tools.sh) unless --tools says otherwise.
It writes its base log-probs file first (--kl-divergence-base), then scores the quant against it. edgequant scores
the quant against the base GGUF in the same run, and once more against llama-perplexity's own base file, to show the
file formats agree. Exits 1 when PPL differs by more than 0.1% or mean KLD by more than 1%.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
PPL_TOLERANCE, KLD_TOLERANCE = 1e-3, 1e-2


def run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr, time.perf_counter() - t0


def grab(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if m is None:
        sys.exit(f"llama-perplexity output lacks {pattern!r}:\n{text[-3000:]}")
    return float(m.group(1))


def llama_perplexity(tool: pathlib.Path, a: argparse.Namespace, model: str, *extra: str,
                     until: str) -> tuple[str, float]:
    """Its logger thread often loses the last lines at exit (llama.cpp issue 22142): rerun until `until` shows."""
    for _ in range(5):
        out, seconds = run([str(tool), "-m", model, "-f", a.text, "-c", str(a.ctx), "--chunks", str(a.chunks),
                            "-t", str(a.threads), *extra])
        if until in out:
            return out, seconds
    sys.exit(f"llama-perplexity never printed {until!r}")


def edgequant_eval(a: argparse.Namespace, model: str, *extra: str) -> tuple[dict, float]:
    out, seconds = run([sys.executable, "-m", "edgequant.cli", "eval", model, "--text", a.text, "--ctx", str(a.ctx),
                        "--chunks", str(a.chunks), "--threads", str(a.threads), "--json", *extra])
    return json.loads(out[out.index("{"):]), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base GGUF (F16)")
    ap.add_argument("--quant", required=True, help="quantized GGUF")
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tools", default=str(REPO / ".cache" / "llama-tools" / "bin"))
    a = ap.parse_args()
    tool = pathlib.Path(a.tools) / "llama-perplexity"
    if not tool.is_file():
        sys.exit(f"{tool} missing: run scripts/build_llama_tools.sh")

    with tempfile.TemporaryDirectory() as tmp:
        kld_file = str(pathlib.Path(tmp) / "base.kld")
        ll_base, t_ll_base = llama_perplexity(tool, a, a.base, "--kl-divergence-base", kld_file, until="Final estimate")
        ll_quant, t_ll_quant = llama_perplexity(tool, a, a.quant, "--kl-divergence-base", kld_file, "--kl-divergence",
                                                until="Same top p:")
        eq_base, t_eq_base = edgequant_eval(a, a.base)
        eq_quant, t_eq_quant = edgequant_eval(a, a.quant, "--base", a.base)
        eq_file, _ = edgequant_eval(a, a.quant, "--base", kld_file)

    llama = {
        "PPL(base)": grab(rf"Final estimate: PPL = {NUMBER}", ll_base),
        "PPL(quant)": grab(rf"Mean PPL\(Q\)\s*:\s*{NUMBER}", ll_quant),
        "ln(PPL(Q)/PPL(base))": grab(rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{NUMBER}", ll_quant),
        "mean KLD": grab(rf"Mean    KLD:\s*{NUMBER}", ll_quant),
        "99.9% KLD": grab(rf"99\.9%   KLD:\s*{NUMBER}", ll_quant),
        "99% KLD": grab(rf"99\.0%   KLD:\s*{NUMBER}", ll_quant),
        "median KLD": grab(rf"Median  KLD:\s*{NUMBER}", ll_quant),
        "same top %": grab(rf"Same top p:\s*{NUMBER}", ll_quant),
    }
    ours = lambda r: {  # noqa: E731
        "PPL(base)": eq_base["ppl"], "PPL(quant)": r["ppl"], "ln(PPL(Q)/PPL(base))": r["ln_ppl_ratio"],
        "mean KLD": r["kld"]["mean"], "99.9% KLD": r["kld"]["p99.9"], "99% KLD": r["kld"]["p99"],
        "median KLD": r["kld"]["median"], "same top %": r["same_top_pct"],
    }
    gguf_base, file_base = ours(eq_quant), ours(eq_file)
    print(f"{eq_quant['n_chunks']} chunks x ctx {a.ctx} ({eq_quant['n_tokens']} scored tokens), {a.threads} threads")
    print(f"{'':22} {'llama-perplexity':>17} {'edgequant':>12} {'rel diff':>9}   {'edgequant, llama base file':>27}")
    for key, ref in llama.items():
        rel = (gguf_base[key] - ref) / abs(ref) if ref else float("nan")
        print(f"{key:22} {ref:17.6f} {gguf_base[key]:12.6f} {rel:+9.2e}   {file_base[key]:27.6f}")
    print(f"{'seconds base / quant':22} {t_ll_base:8.1f} /{t_ll_quant:7.1f} {t_eq_base:5.1f} /{t_eq_quant:5.1f}")

    ok = (abs(gguf_base["PPL(base)"] / llama["PPL(base)"] - 1) <= PPL_TOLERANCE
          and abs(gguf_base["PPL(quant)"] / llama["PPL(quant)"] - 1) <= PPL_TOLERANCE
          and abs(gguf_base["mean KLD"] / llama["mean KLD"] - 1) <= KLD_TOLERANCE)
    print("agreement:", "OK" if ok else "FAILED",
          f"(PPL within {PPL_TOLERANCE:.1%}, mean KLD within {KLD_TOLERANCE:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

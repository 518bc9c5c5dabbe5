"""Our float GGUF run by llama.cpp vs the checkpoint in transformers (fp32), on the same token ids: top-1 agreement
and mean KL divergence of the next-token distributions (issue 18's acceptance 1).

    python scripts/compare_transformers_llama_cpp.py tests/fixtures/tiny-gemma3 --target F16 --tokens 512
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgequant.cli import main as edgequant

TEXT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "text" / "eval.txt"


def compare(model: Path, target: str, tokens: int, text: Path) -> tuple[float, float, int]:
    import llama_cpp
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.gguf"
        assert edgequant(["build", str(model), "--target", target, "--method", "rtn", "-o", str(out), "--quiet"]) == 0
        llm = llama_cpp.Llama(str(out), n_ctx=tokens, logits_all=True, verbose=False, n_threads=2)
        ids = llm.tokenize(text.read_text(encoding="utf-8").encode(), add_bos=True)[:tokens]
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)], dtype=np.float64)
        llm.close()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    p, q = torch.log_softmax(torch.from_numpy(ref), -1), torch.log_softmax(torch.from_numpy(ours), -1)
    kld = float((p.exp() * (p - q)).sum(-1).mean())
    return float((ours.argmax(-1) == ref.argmax(-1)).mean()), kld, len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--target", default="F32", choices=["F32", "F16", "BF16"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--text", type=Path, default=TEXT)
    args = ap.parse_args()
    for model in args.models:
        top1, kld, n = compare(model, args.target, args.tokens, args.text)
        print(f"{model.name:12s} {args.target}  top-1 {top1:.4f}  KLD {kld:.3g}  ({n} tokens)", flush=True)


if __name__ == "__main__":
    main()

"""`edgequant parity` on tiny-llama GGUFs: healthy files pass, a shuffled tensor and a Q/K layout fault fail.

The reference row (a) is checked against transformers' own model (from_pretrained, fp32) on windows cut by hand from
SentencePiece's tokenization, so the torch side of parity is not only compared with itself.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgequant.cli import main

CTX, CHUNKS = 128, 4
SHUFFLED = "blk.0.ffn_down.weight"


def parity(model: Path, path: Path, text: Path, *extra) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["parity", str(model), str(path), "--text", str(text), "--ctx", str(CTX), "--chunks", str(CHUNKS),
                   "--threads", "2", "--device", "cpu", "--json", *map(str, extra)])
    return rc, json.loads(out.getvalue())


def build(tmp: Path, model: Path, target: str) -> Path:
    out = tmp / f"{model.name}-{target}.gguf"
    assert main(["build", str(model), "--target", target, "--method", "rtn", "-o", str(out), "--quiet"]) == 0
    return out


def shuffle_blocks(src: Path, dst: Path, name: str) -> None:
    """Copy src to dst with the quant blocks of tensor `name` in a random order (a valid file, a wrong tensor)."""
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == name)
    block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
    data = bytearray(src.read_bytes())
    span = slice(t.data_offset, t.data_offset + int(t.n_bytes))
    blocks = np.frombuffer(bytes(data[span]), dtype=np.uint8).reshape(-1, block_bytes)
    perm = np.random.default_rng(0).permutation(len(blocks))
    assert (perm != np.arange(len(blocks))).mean() > 0.9
    data[span] = blocks[perm].tobytes()
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("parity")
    files = {t: build(tmp, tiny_llama, t) for t in ("Q8_0", "Q4_K_M")}
    files["shuffled"] = tmp / "shuffled.gguf"
    shuffle_blocks(files["Q8_0"], files["shuffled"], SHUFFLED)
    return files


@pytest.fixture(scope="module")
def reports(ggufs, tiny_llama, fixture_text) -> dict[str, tuple[int, dict]]:
    return {k: parity(tiny_llama, p, fixture_text) for k, p in ggufs.items()}


@pytest.mark.parametrize("target", ["Q8_0", "Q4_K_M"])
def test_healthy_gguf_passes(reports, target):
    rc, r = reports[target]
    assert rc == 0 and r["pass"], r["checks"]
    c = r["comparisons"]
    assert c["source"]["kld"]["mean"] == 0 and c["source"]["ppl"] == c["torch"]["base_ppl"]
    # llama.cpp's own arithmetic on F16 is far below what quantization does
    assert c["f16"]["kld"]["mean"] < 0.01 * c["torch"]["kld"]["mean"]
    assert r["checks"]["kld"]["value"] == c["gap"]["kld"]["mean"] > 0
    assert r["noise_floor"]["kld"] == pytest.approx(c["f16"]["kld"]["mean"] + c["rounding"]["kld"]["mean"])
    assert r["checks"]["source"]["value"] < (0.01 if target == "Q8_0" else 0.1)


def test_json_keys(reports, ggufs, tiny_llama, fixture_text):
    rc, r = reports["Q8_0"]
    assert set(r) >= {"model", "gguf", "text", "device", "comparisons", "noise_floor", "checks", "source_errors",
                      "worst_tensor", "pass", "seconds"}
    assert set(r["comparisons"]) == {"source", "torch", "llama", "f16", "rounded", "gap", "rounding"}
    for c in r["comparisons"].values():
        assert {"label", "model", "base", "ppl", "ppl_err", "kld", "same_top_pct", "n_tokens"} <= set(c)
        assert c["ctx"] == CTX and c["n_chunks"] == CHUNKS and c["n_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    assert set(r["checks"]) == {"ppl", "kld", "source"}
    assert all({"value", "limit", "ok"} == set(c) for c in r["checks"].values())
    assert r["gguf"] == str(ggufs["Q8_0"]) and r["model"] == str(tiny_llama)


def test_shuffled_blocks_fail(reports):
    rc, r = reports["shuffled"]
    assert rc == 1 and not r["pass"]
    assert r["worst_tensor"] == SHUFFLED and not r["checks"]["source"]["ok"]
    assert r["checks"]["source"]["value"] > 1.2  # unrelated values of the same scale: about sqrt(2)
    # torch and llama.cpp read the same shuffled blocks, so they still agree: parity alone cannot see this
    assert r["checks"]["kld"]["ok"]
    assert r["comparisons"]["torch"]["kld"]["mean"] > 100 * reports["Q8_0"][1]["comparisons"]["torch"]["kld"]["mean"]


def test_layout_fault_fails(monkeypatch, ggufs, tiny_llama, fixture_text):
    """Torch given Q/K rows in llama.cpp's order (the un-permutation skipped): the gap is a fault, not noise."""
    monkeypatch.setattr("edgequant.arch.base.unpermute_rotary", lambda w, n_head: w)
    rc, r = parity(tiny_llama, ggufs["Q8_0"], fixture_text)
    assert rc == 1 and not r["checks"]["kld"]["ok"] and r["checks"]["source"]["ok"]
    assert r["checks"]["kld"]["value"] > 10 * r["checks"]["kld"]["limit"]


def test_reference_row_is_transformers(reports, tiny_llama, fixture_text):
    from transformers import AutoModelForCausalLM

    from edgequant.tokens import ReferenceTokenizer

    tokens = ReferenceTokenizer(tiny_llama).encode(fixture_text.read_text(encoding="utf-8").removesuffix("\n"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for i in range(CHUNKS):
            window = torch.tensor(tokens[i * CTX:(i + 1) * CTX])
            window[0] = 1  # BOS, as llama-perplexity
            logp = torch.log_softmax(model(window[None]).logits[0, CTX // 2:-1].double(), dim=-1)
            targets = torch.tensor(tokens[i * CTX + CTX // 2 + 1:(i + 1) * CTX])
            nll.append(-logp[torch.arange(len(targets)), targets])
    expected = torch.cat(nll).mean().exp().item()
    assert reports["Q8_0"][1]["comparisons"]["source"]["ppl"] == pytest.approx(expected, rel=1e-5)


def test_bad_input(capsys, tiny_llama, tiny_qwen2, ggufs, fixture_text, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for argv, fragment in [
        ([tiny_llama, ggufs["Q8_0"], "--text", short], "tokens"),
        ([tiny_qwen2, ggufs["Q8_0"], "--text", fixture_text], "not built from"),
        ([tiny_llama, tmp_path / "missing.gguf", "--text", fixture_text], "no such file"),
    ]:
        assert main(["parity", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and fragment in err, err

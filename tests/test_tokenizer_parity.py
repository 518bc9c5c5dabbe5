"""llama.cpp's tokenization of our GGUF equals the model's reference tokenizer, line by line.

The reference is sentencepiece itself for a SentencePiece vocabulary and the `tokenizers` library on tokenizer.json for
byte-level BPE — independent of our GGUF writer.
"""

from __future__ import annotations

import pytest

from edgequant.cli import main
from edgequant.tokens import ReferenceTokenizer

llama_cpp = pytest.importorskip("llama_cpp")


def mismatches(model_dir, text_file, tmp_path) -> tuple[int, list]:
    out = tmp_path / "vocab.gguf"
    assert main(["build", str(model_dir), "--target", "F16", "-o", str(out), "--quiet"]) == 0
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    ref = ReferenceTokenizer(model_dir)
    lines = text_file.read_text(encoding="utf-8").split("\n")
    bad = []
    for line in lines:
        ours = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
        if ours != ref.encode(line, add_bos=False):
            bad.append((line, ours, ref.encode(line, add_bos=False)))
    return len(lines), bad


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_phi3", "tiny_phi4_mini", "tiny_gemma2", "tiny_gemma3"])
def test_fixture_tokenization_matches_reference(model, request, fixture_text, tmp_path):
    n, bad = mismatches(request.getfixturevalue(model), fixture_text, tmp_path)
    assert n > 300
    assert not bad, bad[:3]


def test_bos_follows_the_tokenizer_config(tiny_llama, tiny_qwen2):
    assert ReferenceTokenizer(tiny_llama).add_bos and ReferenceTokenizer(tiny_llama).bos_id == 1
    assert not ReferenceTokenizer(tiny_qwen2).add_bos  # Qwen2 adds no BOS


@pytest.mark.shared
def test_bench_a_wikitext_tokenization_matches_sentencepiece(shared_dir, tmp_path):
    n, bad = mismatches(shared_dir / "models" / "bench-a", shared_dir / "data" / "wikitext-2" / "wiki.test.raw", tmp_path)
    assert n > 4000
    assert not bad, bad[:3]

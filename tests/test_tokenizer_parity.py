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



def test_o200k_split_decides_the_tokens_where_merges_cross_other_splits(tiny_phi4_mini, tmp_path):
    """tiny-phi4-mini's 605-token vocabulary has no merge across a boundary where o200k's split and Llama-3's
    (llama-bpe) differ, so its own tokenization would not notice the wrong pre-tokenizer. Here merges are added that
    join whole pieces of one split or the other (" baker's" and ".\n/" are one o200k piece, Llama-3 cuts them;
    "CamelCase" is one Llama-3 piece, o200k cuts it): llama.cpp must tokenize as the `tokenizers` library does."""
    import json
    import shutil

    from tokenizers import Tokenizer

    model = tmp_path / "merged"
    shutil.copytree(tiny_phi4_mini, model)
    tj = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = Tokenizer.from_file(str(tiny_phi4_mini / "tokenizer.json")).model
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    next_id = 1 + max(max(vocab.values()), *(t["id"] for t in tj["added_tokens"]))
    for piece in ["Ġbaker's", "CamelCase", ".Ċ/"]:  # byte-level spelling (Ġ: space, Ċ: newline)
        parts = [t.value for t in bpe.tokenize(piece)]
        assert len(parts) > 1, piece
        joined = parts[0]
        for part in parts[1:]:
            merges.append([joined, part])
            joined += part
            if joined not in vocab:
                vocab[joined], next_id = next_id, next_id + 1
    assert next_id <= json.loads((model / "config.json").read_text())["vocab_size"]
    (model / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "vocab.gguf"
    assert main(["build", str(model), "--target", "F16", "-o", str(out), "--quiet"]) == 0
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    ref = ReferenceTokenizer(model)
    for s in ["the baker's bread", "CamelCase", "x.\n/y", "HTTPServer it's a/b"]:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == ref.encode(s, add_bos=False), s
    assert len(ref.encode(" baker's", add_bos=False)) == 1 and len(ref.encode("CamelCase", add_bos=False)) > 1

def test_bos_follows_the_tokenizer_config(tiny_llama, tiny_qwen2):
    assert ReferenceTokenizer(tiny_llama).add_bos and ReferenceTokenizer(tiny_llama).bos_id == 1
    assert not ReferenceTokenizer(tiny_qwen2).add_bos  # Qwen2 adds no BOS


@pytest.mark.shared
def test_bench_a_wikitext_tokenization_matches_sentencepiece(shared_dir, tmp_path):
    n, bad = mismatches(shared_dir / "models" / "bench-a", shared_dir / "data" / "wikitext-2" / "wiki.test.raw", tmp_path)
    assert n > 4000
    assert not bad, bad[:3]

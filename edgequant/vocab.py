"""The tokenizer, written into GGUF metadata the way llama.cpp reads it.

Two families:
  * SentencePiece (`tokenizer.model`): pieces, scores and token types straight from sentencepiece (byte-fallback pieces
    become BYTE tokens); llama.cpp's "llama" tokenizer model.
  * byte-level BPE (`tokenizer.json`): vocabulary, merges and added tokens from the `tokenizers` file; llama.cpp's
    "gpt2" tokenizer model plus a pre-tokenizer name.  The pre-tokenizer is recognised from its definition (the split
    regex and byte-level settings), so a retrained or extended vocabulary with a standard pre-tokenizer converts too.
Special ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab.  The vocabulary is padded with
unused `[PADn]` tokens to the model's `vocab_size`, so the embedding rows and the token list agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from .errors import UserError

# Split regexes of the pre-tokenizers llama.cpp implements, as they appear in tokenizer.json -> llama.cpp's name.
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)": "gpt-2",
    # o200k (GPT-4o's; Phi-4-mini's tokenizer.json): case-aware words with their contraction, "/" kept after punctuation
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}


def add_vocab(writer: gguf.GGUFWriter, directory: Path, n_vocab: int) -> str:
    """Write the tokenizer of `directory` into `writer`; returns "spm" or "bpe"."""
    if (directory / "tokenizer.model").is_file():
        tokens, scores, types = sentencepiece_vocab(directory, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        if not adds_dummy_prefix(directory):  # Gemma's: llama.cpp's SentencePiece tokenizer prefixes a space unless told
            writer.add_add_space_prefix(False)
        kind, merges = "spm", False
    elif (directory / "tokenizer.json").is_file():
        tokens, types, pre = bpe_vocab(directory, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        kind, merges = "bpe", True
    else:
        raise UserError(f"{directory}: no tokenizer (neither tokenizer.model nor tokenizer.json)")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=merges, n_vocab=len(tokens))
    if merges and not special.merges:
        raise UserError(f"{directory / 'tokenizer.json'}: BPE tokenizer without merges")
    if merges and byte_level_post_processor(directory):
        # a ByteLevel post-processor adds no BOS/EOS: llama.cpp's converter (its gguf-py, newer than the gguf
        # package's) then writes add_bos/add_eos false where tokenizer_config.json says nothing
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return kind


def byte_level_post_processor(directory: Path) -> bool:
    """tokenizer.json's post-processor is (or, in a Sequence, has) a ByteLevel one."""
    try:
        post = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError):
        return False
    return any(p.get("type") == "ByteLevel" for p in post.get("processors", [post]))


def sentencepiece_vocab(directory: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(directory / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{directory / 'tokenizer.model'}: unreadable SentencePiece model ({e})") from None
    tokens, scores, types = padded(n_vocab)
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (
            gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else
            gguf.TokenType.CONTROL if sp.IsControl(i) else
            gguf.TokenType.UNUSED if sp.IsUnused(i) else
            gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL
        )
    for i, content, special in added_tokens_decoder(directory):
        if i < n_vocab:
            tokens[i], scores[i] = content.encode(), -1000.0
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def adds_dummy_prefix(directory: Path) -> bool:
    """Whether the SentencePiece model prefixes text with a space ("▁") before tokenizing (its normalizer's
    add_dummy_prefix, seen in what it does: the proto needs protobuf)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(directory / "tokenizer.model"))
    return sp.EncodeAsPieces("a")[0].startswith("\u2581")


def bpe_vocab(directory: Path, n_vocab: int) -> tuple[list[bytes], list[int], str]:
    tj = read_tokenizer_json(directory)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{directory / 'tokenizer.json'}: not a byte-level BPE tokenizer (model {model.get('type')})")
    tokens, _, types = padded(n_vocab)
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text.encode(), gguf.TokenType.NORMAL
    for t in tj.get("added_tokens") or []:
        i, content, special = t["id"], t["content"], bool(t.get("special"))
        if i < n_vocab:
            tokens[i] = content.encode()
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    return tokens, types, pre_tokenizer_name(tj.get("pre_tokenizer"), directory)


def pre_tokenizer_name(pre: dict | None, directory: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` definition."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [s["pattern"].get("Regex") or s["pattern"].get("String") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) == 1 and not splits and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and len(byte_level) == 1 and not byte_level[0].get("use_regex", True) and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    found = "; ".join(f"{s.get('type')}" + (f" {s['pattern']}" if "pattern" in s else "") for s in steps) or "none"
    raise UserError(f"{directory / 'tokenizer.json'}: unknown BPE pre-tokenizer ({found}); known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")


def added_tokens_decoder(directory: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the added tokens a SentencePiece model's tokenizer_config.json declares."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return []
    try:
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: unreadable ({e})") from None
    return [(int(i), t["content"], bool(t.get("special"))) for i, t in decoder.items()]


def read_tokenizer_json(directory: Path) -> dict:
    try:
        return json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{directory / 'tokenizer.json'}: unreadable ({e})") from None


def padded(n: int) -> tuple[list[bytes], list[float], list[int]]:
    return [f"[PAD{i}]".encode() for i in range(n)], [-10000.0] * n, [gguf.TokenType.UNUSED] * n

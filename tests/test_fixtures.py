"""The shipped tiny models (scripts/make_fixtures.py) load with transformers, are really trained, and have the shapes
the rest of the suite relies on."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

WINDOW = 128  # as in make_fixtures.py


def load(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def recorded(model_dir: Path) -> dict[str, str]:
    return dict(field.split("=", 1) for field in (model_dir / "TRAINING.txt").read_text().split())


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@torch.no_grad()
def windowed_loss(model, ids: torch.Tensor, bos: int | None) -> float:
    """Mean next-token loss over non-overlapping 128-token windows; with `bos`, each window starts with it."""
    n = len(ids) // WINDOW
    batch = ids[: n * WINDOW].view(n, WINDOW).clone()
    if bos is not None:
        batch[:, 0] = bos
    return model(batch, labels=batch).loss.item()


def unigram_entropy(ids: torch.Tensor) -> float:
    counts = torch.tensor(list(Counter(ids.tolist()).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("name,bos", [("tiny_llama", 1), ("tiny_qwen2", None), ("tiny_phi3", None),
                                           ("tiny_phi4_mini", None),
                                           ("tiny_gemma2", 2), ("tiny_gemma3", 2)])
def test_model_is_trained_and_matches_its_record(name, bos, request, fixture_text):
    model_dir = request.getfixturevalue(name)
    model, tok = load(model_dir)
    ids = torch.tensor(tok(fixture_text.read_text(encoding="utf-8"), add_special_tokens=False,
                           verbose=False)["input_ids"])
    logits = model(ids[None, :WINDOW]).logits
    assert logits.shape == (1, WINDOW, model.config.vocab_size)
    assert torch.isfinite(logits).all()

    loss = windowed_loss(model, ids, bos)
    # A real language model, not a unigram one: far below the entropy of the token distribution itself.
    assert loss < 0.5 * unigram_entropy(ids)
    # The weights on disk are the ones that were trained, and the config (rope theta, heads, ...) reads back right.
    assert loss == pytest.approx(float(recorded(model_dir)["eval_loss_bf16"]), abs=0.01)


def test_llama_shapes(tiny_llama):
    raw = json.loads((tiny_llama / "config.json").read_text())
    assert "rope_theta" in raw and "rope_parameters" not in raw  # classic config layout
    assert raw["torch_dtype"] == "bfloat16"
    cfg = AutoConfig.from_pretrained(tiny_llama)
    assert cfg.rope_parameters["rope_theta"] == raw["rope_theta"] == 500000.0
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    shapes = tensor_shapes(tiny_llama)
    assert "lm_head.weight" in shapes  # untied
    assert not any(name.endswith(".bias") for name in shapes)
    for name, shape in shapes.items():
        assert all(d % 256 == 0 for d in shape), (name, shape)
    assert shapes["model.layers.0.self_attn.k_proj.weight"][0] < shapes["model.layers.0.self_attn.q_proj.weight"][0]
    with safe_open(tiny_llama / "model.safetensors", "pt") as f:
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in f.keys())


def test_qwen2_shapes(tiny_qwen2):
    raw = json.loads((tiny_qwen2 / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw  # newer config layout
    model, tok = load(tiny_qwen2)
    cfg = model.config
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2
    assert cfg.hidden_size % 256 != 0 and cfg.hidden_size % 64 == 0
    assert cfg.intermediate_size % 256 == 0
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.vocab_size > len(tok)  # embedding padded past the tokenizer, as in real Qwen2 checkpoints
    shapes = tensor_shapes(tiny_qwen2)
    assert "lm_head.weight" not in shapes
    for layer in range(cfg.num_hidden_layers):
        for proj in "qkv":
            assert f"model.layers.{layer}.self_attn.{proj}_proj.bias" in shapes
        assert f"model.layers.{layer}.self_attn.o_proj.bias" not in shapes


def test_llama_tokenizer_json_agrees_with_tokenizer_model(tiny_llama, fixture_text):
    """Except on lines that begin with a space: transformers' Metaspace skips the dummy prefix there, SentencePiece
    does not (" = A =" -> "▁=" vs "▁", "▁="), exactly as in the bench-a checkpoint."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_llama / "tokenizer.model"))
    lines = [line for line in fixture_text.read_text(encoding="utf-8").split("\n") if not line.startswith(" ")]
    assert len(lines) > 50
    for line in lines:
        assert tok(line)["input_ids"] == [sp.bos_id()] + sp.encode(line), line
    assert sp.vocab_size() == len(tok) == 512
    assert sp.encode("🙂", out_type=str)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback


def test_qwen2_tokenizer_round_trips_and_has_chatml(tiny_qwen2, fixture_text):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    for line in fixture_text.read_text(encoding="utf-8").split("\n"):
        ids = tok(line)["input_ids"]
        assert tok.decode(ids) == unicodedata.normalize("NFC", line)
    assert tok("x")["input_ids"] == tok.convert_tokens_to_ids(["x"])  # no BOS
    specials = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert specials == list(range(len(tok) - 3, len(tok)))  # after the BPE vocabulary
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None


def test_texts_have_the_line_shapes_tokenizer_tests_need(fixture_text):
    lines = fixture_text.read_text(encoding="utf-8").split("\n")
    assert any(line == "" for line in lines) and any(line == " " for line in lines)
    assert any(line.startswith(" = ") for line in lines)  # WikiText-style heading
    assert any(line and not line[0].isspace() for line in lines)
    text = "\n".join(lines)
    assert all(s in text for s in ("café", "naïve", "—", "'s")) and any(c.isdigit() for c in text)


def test_phi3_shapes(tiny_phi3):
    """Phi-3's published config layout and fused tensors; the tokenizer's chat tokens after the SentencePiece pieces."""
    raw = json.loads((tiny_phi3 / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == "longrope" and "rope_parameters" not in raw  # as Phi-3-128k ships it
    assert raw["max_position_embeddings"] > raw["original_max_position_embeddings"]
    model, tok = load(tiny_phi3)
    cfg = model.config
    assert cfg.model_type == "phi3" and cfg.num_key_value_heads < cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotated = int(head_dim * cfg.partial_rotary_factor)
    assert rotated < head_dim and len(raw["rope_scaling"]["long_factor"]) == rotated // 2
    shapes = tensor_shapes(tiny_phi3)
    q_rows, kv_rows = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (q_rows + 2 * kv_rows, cfg.hidden_size)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (2 * cfg.intermediate_size, cfg.hidden_size)
    assert "lm_head.weight" in shapes and not any(n.endswith(".bias") for n in shapes)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_phi3 / "tokenizer.model"))
    chat = tok.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"])
    assert chat == list(range(sp.vocab_size(), sp.vocab_size() + 5)) and len(tok) < cfg.vocab_size
    assert tok("x")["input_ids"][0] != sp.bos_id() and tok.eos_token == "<|endoftext|>"  # no BOS added


def test_phi4_mini_shapes(tiny_phi4_mini):
    """Phi-4-mini's config layout (tied, 3:1 GQA, 3/4 rotary, LongRoPE 4k -> 128k, vocabulary padded past the
    tokenizer), no lm_head stored; its byte-level BPE splits as o200k does (worked out by hand from tiktoken's pattern:
    case-aware words keep their contraction, digits in threes, a lone space before digits, "/" joins the next word)."""
    raw = json.loads((tiny_phi4_mini / "config.json").read_text())
    assert raw["rope_scaling"]["type"] == "longrope" and "rope_parameters" not in raw
    assert (raw["original_max_position_embeddings"], raw["max_position_embeddings"]) == (4096, 131072)
    assert raw["tie_word_embeddings"] and raw["partial_rotary_factor"] == 0.75 and raw["sliding_window"] == 262144
    model, tok = load(tiny_phi4_mini)
    cfg = model.config
    assert cfg.model_type == "phi3" and cfg.num_attention_heads == 3 * cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert len(raw["rope_scaling"]["long_factor"]) == int(head_dim * 0.75) // 2
    shapes = tensor_shapes(tiny_phi4_mini)
    assert "lm_head.weight" not in shapes and shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.hidden_size)
    assert len(tok) < cfg.vocab_size
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert raw["bos_token_id"] == raw["eos_token_id"] == raw["pad_token_id"] == eot
    chat = tok.convert_tokens_to_ids(["<|endoftext|>", "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>",
                                      "<|system|>", "<|tool|>"])
    assert chat == list(range(eot, eot + 7))  # after the BPE vocabulary, <|endoftext|> first
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]  # no BOS
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("I'm CamelCase 12345 a/b\n")
    assert [p for p, _ in pieces] == ["I'm", "ĠCamel", "Case", "Ġ", "123", "45", "Ġa", "/b", "Ċ"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>hi<|end|><|assistant|>"


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_gemma3"])
def test_gemma_shapes(name, request):
    """Gemma's layer structure and published config layout; a sliding window a test window crosses, with sliding and
    global layers; Gemma's SentencePiece (no dummy prefix, specials at 0-3, BOS added)."""
    model_dir = request.getfixturevalue(name)
    raw = json.loads((model_dir / "config.json").read_text())
    assert "rope_theta" in raw and "rope_parameters" not in raw and "layer_types" not in raw
    model, tok = load(model_dir)
    cfg = model.config
    assert cfg.sliding_window < WINDOW
    assert {"sliding_attention", "full_attention"} == set(cfg.layer_types)
    assert "head_dim" in raw and cfg.query_pre_attn_scalar == cfg.head_dim
    shapes = tensor_shapes(model_dir)
    assert "lm_head.weight" not in shapes and model.lm_head.weight is model.model.embed_tokens.weight
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert all(f"model.layers.0.{n}.weight" in shapes for n in norms)
    assert (f"model.layers.0.self_attn.q_norm.weight" in shapes) == (cfg.model_type == "gemma3_text")
    if cfg.model_type == "gemma2":
        assert cfg.attn_logit_softcapping and cfg.final_logit_softcapping
    else:
        assert raw["rope_local_base_freq"] != raw["rope_theta"] and cfg.hidden_size % 256 != 0
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert [sp.IdToPiece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert not sp.EncodeAsPieces("a")[0].startswith("\u2581")  # no dummy prefix
    assert tok("x")["input_ids"][0] == sp.bos_id() == 2

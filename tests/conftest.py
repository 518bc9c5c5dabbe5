"""Shared pytest fixtures: paths to the shipped tiny models, their text, and the optional benchmark data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"  # built by scripts/make_fixtures.py


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory):
    """Builds under test (and the edgequant processes they start) keep what they cache, such as
    edgequant.compute_cost's timings, in a temporary folder, not in the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("edgequant-cache")))
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """LlamaForCausalLM, SentencePiece tokenizer, all dims multiples of 256, GQA, untied, classic config."""
    return FIXTURES / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    """Qwen2ForCausalLM, byte-level BPE + ChatML, hidden 320, q/k/v biases, tied, `rope_parameters` config."""
    return FIXTURES / "tiny-qwen2"


@pytest.fixture(scope="session")
def tiny_phi3() -> Path:
    """Phi3ForCausalLM: fused qkv_proj/gate_up_proj, GQA, partial rotary with LongRoPE, Phi-3's SentencePiece tokenizer
    with its chat tokens, no BOS, untied, classic config layout."""
    return FIXTURES / "tiny-phi3"


@pytest.fixture(scope="session")
def tiny_phi4_mini() -> Path:
    """Phi3ForCausalLM in Phi-4-mini's shape: byte-level BPE with o200k's split (llama.cpp's "gpt-4o") and its chat
    and tool tokens, tied embeddings, 3:1 GQA, 3/4 rotary with LongRoPE 4k -> 128k, vocabulary padded beyond the
    tokenizer's, its Hub config layout."""
    return FIXTURES / "tiny-phi4-mini"


@pytest.fixture(scope="session")
def tiny_gemma2() -> Path:
    """Gemma2ForCausalLM: pre/post norms, soft-capped attention and logits, alternating 32-token sliding window,
    scaled tied embeddings; Gemma's SentencePiece (no dummy prefix)."""
    return FIXTURES / "tiny-gemma2"


@pytest.fixture(scope="session")
def tiny_gemma3() -> Path:
    """Gemma3ForCausalLM: six layers (five sliding, one global on its own rope base), QK-norm, hidden 288; Gemma's
    SentencePiece."""
    return FIXTURES / "tiny-gemma3"


@pytest.fixture(scope="session")
def tiny_gemma3_vl() -> Path:
    """Gemma3ForConditionalGeneration in the Hub's layout (language_model.model.*, a SigLIP tower, a text_config of
    non-defaults only, linear rope scaling of the global layers): tiny-gemma3 as its text tower."""
    return FIXTURES / "tiny-gemma3-vl"


@pytest.fixture(scope="session")
def tiny_qwen3_moe() -> Path:
    """Qwen3MoeForCausalLM: 6 experts top-2 (renormalised), QK-norm, experts in transformers 5's fused layout
    (mlp.experts.gate_up_proj / down_proj); tiny-qwen2's byte-level BPE."""
    return FIXTURES / "tiny-qwen3-moe"


@pytest.fixture(scope="session")
def tiny_mixtral() -> Path:
    """MixtralForCausalLM: 8 experts top-2, GQA 8/2, one tensor per expert under Mixtral's published names
    (block_sparse_moe.experts.E.w1/w2/w3); tiny-llama's SentencePiece."""
    return FIXTURES / "tiny-mixtral"


@pytest.fixture(scope="session")
def odd_llama(tmp_path_factory, tiny_llama):
    """tiny-llama's tokenizer on a random one-layer model of three row lengths: 288 (32-blocks), 256 (attn_output:
    2 heads of 128) and 1000 (ffn_down: F16 only); 1000-row tensors in 18-byte blocks are no multiple of the GGUF
    alignment."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("odd-llama")
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, d)
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(hidden_size=288, intermediate_size=1000, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, torch_dtype="float16")
    (d / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (512, 288), "lm_head.weight": (512, 288), "model.norm.weight": (288,),
              "model.layers.0.input_layernorm.weight": (288,), "model.layers.0.post_attention_layernorm.weight": (288,),
              "model.layers.0.self_attn.q_proj.weight": (256, 288), "model.layers.0.self_attn.k_proj.weight": (128, 288),
              "model.layers.0.self_attn.v_proj.weight": (128, 288), "model.layers.0.self_attn.o_proj.weight": (288, 256),
              "model.layers.0.mlp.gate_proj.weight": (1000, 288), "model.layers.0.mlp.up_proj.weight": (1000, 288),
              "model.layers.0.mlp.down_proj.weight": (288, 1000)}
    save_file({n: (0.02 * rng.standard_normal(s)).astype(np.float16) for n, s in shapes.items()},
              str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="session")
def fixture_text() -> Path:
    """Held-out text (eval.txt) in the language both tiny models were trained on."""
    return FIXTURES / "text" / "eval.txt"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (benchmark models and data); tests using it are skipped on a fresh clone."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared (benchmark data) is not available")
    return path


def _build_gguf(tmp_path_factory, model: Path, target: str) -> Path:
    from edgequant.cli import main

    out = tmp_path_factory.mktemp("gguf") / f"{model.name}-{target}.gguf"
    assert main(["build", str(model), "--target", target, "--method", "rtn", "-o", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama) -> Path:
    """tiny-llama as an F16 GGUF, from `edgequant build`."""
    return _build_gguf(tmp_path_factory, tiny_llama, "F16")


@pytest.fixture(scope="session")
def tiny_gguf_q4(tmp_path_factory, tiny_llama) -> Path:
    """tiny-llama as a Q4_K_M GGUF (round-to-nearest, no calibration), from `edgequant build`."""
    return _build_gguf(tmp_path_factory, tiny_llama, "Q4_K_M")

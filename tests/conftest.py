"""Shared pytest fixtures: paths to the shipped tiny models, their text, and the optional benchmark data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"  # built by scripts/make_fixtures.py


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

"""Bad input to `edgequant build`: one line on stderr, exit code 2, no traceback, nothing left in the output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgequant.cli import main


def copy_model(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def listing(directory: Path) -> list[str] | None:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None


def expect_error(capsys, argv, *fragments):
    out_dir = Path(argv[argv.index("-o") + 1]).parent
    before = listing(out_dir)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert listing(out_dir) == before


def build_argv(model, tmp_path, target="F16"):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return ["build", str(model), "--target", target, "-o", str(out / "m.gguf"), "--quiet"]


def test_not_a_directory(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    expect_error(capsys, build_argv(f, tmp_path), "not a directory")


def test_missing_directory(capsys, tmp_path):
    expect_error(capsys, build_argv(tmp_path / "nope", tmp_path), "no such directory")


def test_no_config(capsys, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    expect_error(capsys, build_argv(d, tmp_path), "no config.json")


def test_unsupported_architecture(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, build_argv(d, tmp_path), "GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_missing_tokenizer(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.json").unlink()
    expect_error(capsys, build_argv(d, tmp_path), "no tokenizer")


def test_unreadable_tokenizer(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    (d / "tokenizer.model").write_bytes(b"\x00garbage")
    expect_error(capsys, build_argv(d, tmp_path), "tokenizer.model")


def test_unknown_pre_tokenizer(capsys, tmp_path, tiny_qwen2):
    d = copy_model(tiny_qwen2, tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    expect_error(capsys, build_argv(d, tmp_path), "unknown BPE pre-tokenizer", "[a-z]+")


def test_truncated_safetensors(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    expect_error(capsys, build_argv(d, tmp_path), "truncated")


def test_corrupt_safetensors_header(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    expect_error(capsys, build_argv(d, tmp_path), "corrupt safetensors header")


def test_unknown_target(capsys, tmp_path, tiny_llama):
    expect_error(capsys, build_argv(tiny_llama, tmp_path, target="Q9_K"), "unknown --target", "Q4_K_M")


def test_output_directory_missing(capsys, tmp_path, tiny_llama):
    argv = ["build", str(tiny_llama), "--target", "F16", "-o", str(tmp_path / "nope" / "m.gguf"), "--quiet"]
    expect_error(capsys, argv, "does not exist")


def test_output_directory_not_writable(capsys, tiny_llama):
    # /proc refuses new files even to root, so this holds whoever runs the tests
    argv = ["build", str(tiny_llama), "--target", "F16", "-o", "/proc/m.gguf", "--quiet"]
    expect_error(capsys, argv, "/proc")


def test_failure_midway_leaves_no_file(tmp_path, tiny_llama, monkeypatch):
    """An error while tensors are being written removes the partial file (atomic output)."""
    import edgequant.build as b

    def boom(name, w, qtype):
        raise RuntimeError("disk on fire")

    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError):
        b.build(str(tiny_llama), "F16", out, encoder=boom, quiet=True)
    assert list(tmp_path.iterdir()) == []

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
    """The directory's entries; under /proc without the per-process ones, which come and go with other processes."""
    if not directory.is_dir():
        return None
    names = (p.name for p in directory.iterdir())
    return sorted(n for n in names if not (directory == Path("/proc") and n.isdigit()))


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


REFUSED_LOW_BIT = [
    # llama-quantize refuses these without an importance matrix (IQ3_XS puts attn_q/attn_k at IQ3_XXS)
    (["--target", "IQ3_XS", "--method", "rtn"], "blk.0.", "is IQ3_XXS", "importance matrix", "--imatrix", "--calib"),
    (["--target", "Q2_K_S", "--method", "rtn"], "is Q2_K", "importance matrix"),
    (["--target", "IQ1_M", "--method", "rtn"], "IQ1_M", "importance matrix", "--imatrix"),
]


@pytest.mark.parametrize(("options", "fragments"), [(b[0], b[1:]) for b in REFUSED_LOW_BIT])
def test_refused_low_bit_targets(capsys, tmp_path, tiny_llama, options, fragments):
    out = tmp_path / "out"
    out.mkdir()
    expect_error(capsys, ["build", str(tiny_llama), *options, "-o", str(out / "m.gguf"), "--quiet"], *fragments)


def test_type_without_codec(capsys, tmp_path, monkeypatch, tiny_llama):
    """A target whose recipe names a type edgequant has no codec for is refused before any work (every type of
    every ftype has one now: take IQ1_M's away)."""
    from gguf import GGMLQuantizationType

    from edgequant.convert.codecs import CODECS

    monkeypatch.delitem(CODECS, GGMLQuantizationType.IQ1_M)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["build", str(tiny_llama), "--target", "IQ1_M", "--method", "imatrix", "-o", str(out / "m.gguf"), "--quiet"]
    expect_error(capsys, argv, "IQ1_M", "not implemented")


# --size / --bpw / --target auto: refused before calibration (the default method, GPTQ, never starts).  tiny-llama's
# smallest file is about 0.6 MB, its F16 file about 3.7 MB.
BAD_BUDGETS = [
    (["--size", "6XB"], "--size 6XB: not a size"),
    (["--size", "0"], "at least one byte"),
    (["--size=-5GB"], "at least one byte"),
    (["--bpw", "abc"], "--bpw abc: not a number"),
    (["--bpw", "nan"], "not a number"),
    (["--bpw", "inf"], "not a number"),
    (["--bpw", "-1"], "more than 0"),
    (["--bpw", "0"], "more than 0"),
    (["--target", "auto:NOPE"], "unknown file type 'NOPE'", "Q4_K_M"),
    (["--size", "100KB"], "less than the smallest file"),
    (["--bpw", "1"], "less than the smallest file"),
    (["--size", "1GB"], "more than the F16 file", "--target F16"),
    (["--bpw", "17"], "more than the F16 file"),
    (["--target", "auto:F32"], "more than the F16 file"),
    (["--size", "3MB", "--bpw", "4"], "give only one file size"),
    (["--size", "3MB", "--target", "auto:Q2_K"], "give only one file size"),
    (["--bpw", "4", "--target", "auto:Q2_K"], "give only one file size"),
    (["--size", "3MB", "--target", "Q4_K_M"], "fixes its recipe", "auto:Q4_K_M"),
    (["--bpw", "4", "--target", "Q2_K"], "fixes its recipe"),
    (["--bpw", "4", "--method", "rtn"], "--bpw 4: types are chosen by what they cost", "--method gptq"),
    (["--bpw", "4", "--speed-floor", "-0.5"], "--speed-floor -0.5: give a ratio", "from 0"),
    (["--bpw", "4", "--speed-floor", "nan"], "--speed-floor nan: give a ratio"),
    (["--bpw", "4", "--speed-floor", "3"], "to 2"),
    (["--target", "Q4_K_M", "--speed-floor", "0.9"], "only for a file size", "--target auto:FTYPE"),
]


@pytest.mark.parametrize(("options", "fragments"), [(b[0], b[1:]) for b in BAD_BUDGETS])
def test_bad_budget(capsys, tmp_path, tiny_llama, options, fragments):
    out = tmp_path / "out"
    out.mkdir()
    expect_error(capsys, ["build", str(tiny_llama), *options, "-o", str(out / "m.gguf"), "--quiet"], *fragments)


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


def write_weights(model_dir: Path, edit) -> None:
    """Rewrite model.safetensors with edit(state dict) applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors")


def gptq_argv(model, tmp_path, calib):
    argv = build_argv(model, tmp_path, target="Q4_K_M")
    return argv + ["--method", "gptq", "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]


@pytest.fixture
def train_text(repo_root):
    return repo_root / "tests" / "fixtures" / "text" / "train.txt"


def test_nan_in_weights(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    write_weights(d, lambda t: t["model.layers.1.mlp.down_proj.weight"].view(-1)[7].fill_(float("nan")))
    expect_error(capsys, build_argv(d, tmp_path), "model.layers.1.mlp.down_proj.weight (layer 1)", "NaN or Inf")


def test_overflowing_activations(capsys, tmp_path, tiny_llama, train_text):
    """Finite weights whose activations overflow float32: named at the first linear they reach (no work dir left)."""
    d = copy_model(tiny_llama, tmp_path)

    def blow_up(t):
        t["model.layers.0.post_attention_layernorm.weight"].fill_(1e30)

    write_weights(d, blow_up)
    expect_error(capsys, gptq_argv(d, tmp_path, train_text), "model.layers.0.mlp.gate_proj (layer 0)", "NaN or Inf")


def test_weights_too_large_for_the_block_scales(capsys, tmp_path, tiny_llama, train_text):
    """Finite weights whose float16 block scales overflow: one line naming the tensor, not the codec's traceback."""
    d = copy_model(tiny_llama, tmp_path)

    def blow_up(t):
        t["model.layers.0.mlp.up_proj.weight"].fill_(1e30)

    write_weights(d, blow_up)
    # --sequential: up_proj is solved before down_proj's (overflowing) inputs are computed
    expect_error(capsys, gptq_argv(d, tmp_path, train_text) + ["--sequential"], "model.layers.0.mlp.up_proj.weight (layer 0)",
                 "cannot be quantized", "1e+30")


def test_overflowing_model_cannot_be_sampled(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    write_weights(d, lambda t: t["model.layers.0.post_attention_layernorm.weight"].fill_(1e30))
    expect_error(capsys, gptq_argv(d, tmp_path, "self"), "NaN or Inf in the model's output while sampling")


@pytest.mark.parametrize("record,error", [
    ({"messages": [{"role": "user"}]}, "c.jsonl:1: each JSONL line needs a \"text\" string or a \"messages\" list"),
    ({"text": 3}, "c.jsonl:1: each JSONL line needs"),
])
def test_bad_calibration_records(capsys, tmp_path, tiny_llama, record, error):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record) + "\n")
    expect_error(capsys, gptq_argv(tiny_llama, tmp_path, path), error)


def test_calibration_too_short(capsys, tmp_path, tiny_llama):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    expect_error(capsys, gptq_argv(tiny_llama, tmp_path, short), "calibration text too short")


def test_remote_code_refused_without_flag(capsys, tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, build_argv(d, tmp_path), "auto_map", "--trust-remote-code")
    assert main(build_argv(d, tmp_path) + ["--trust-remote-code"]) == 0  # F16 runs no model code: builds


def pickle_model(tiny_llama, tmp_path) -> Path:
    import torch
    from safetensors.torch import load_file

    d = copy_model(tiny_llama, tmp_path)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_pickle_refused_without_flag_and_read_safely_with_it(capsys, tmp_path, tiny_llama):
    import hashlib

    d = pickle_model(tiny_llama, tmp_path)
    expect_error(capsys, build_argv(d, tmp_path), "pickle", "--allow-pickle")
    argv = build_argv(d, tmp_path) + ["--allow-pickle"]
    assert main(argv) == 0
    from_pickle = hashlib.sha256(Path(argv[argv.index("-o") + 1]).read_bytes()).hexdigest()
    (tmp_path / "st").mkdir()
    assert main(build_argv(copy_model(tiny_llama, tmp_path / "st"), tmp_path)) == 0  # same name: same general.name
    assert hashlib.sha256(Path(argv[argv.index("-o") + 1]).read_bytes()).hexdigest() == from_pickle


class RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_refused_even_with_flag(capsys, tmp_path, tiny_llama):
    import torch

    d = pickle_model(tiny_llama, tmp_path)
    torch.save({"model.embed_tokens.weight": RunsCode()}, d / "pytorch_model.bin")
    expect_error(capsys, build_argv(d, tmp_path) + ["--allow-pickle"], "pytorch_model.bin", "refused", "Unsupported global")
    assert "pwned" not in capsys.readouterr().out


def test_not_enough_disk_space(capsys, tmp_path, tiny_llama, monkeypatch):
    import edgequant.build

    monkeypatch.setattr(edgequant.build.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    expect_error(capsys, build_argv(tiny_llama, tmp_path), "not enough free disk space", "1 MiB are free")


def test_report_not_writable(capsys, tmp_path, tiny_llama):
    """Refused before the build starts: no output file either."""
    expect_error(capsys, build_argv(tiny_llama, tmp_path) + ["--report", "/proc/r.html"], "/proc")


@pytest.mark.parametrize("model,edit,fragment", [
    # llama.cpp scales Gemma's queries by 1/sqrt(head_dim) whatever query_pre_attn_scalar says
    ("tiny_gemma2", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar 100"),
    ("tiny_gemma2", {"attn_logit_softcapping": None}, "soft-capping"),
    ("tiny_gemma3", {"attn_logit_softcapping": 50.0}, "soft-capping"),
    ("tiny_phi3", {"rope_scaling": {"type": "dynamic", "long_factor": [1.0] * 24, "short_factor": [1.0] * 24}},
     "'dynamic' is not supported"),
    ("tiny_phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 3, "short_factor": [1.0] * 3}},
     "24 values"),
])
def test_configs_llama_cpp_would_run_differently(capsys, tmp_path, request, model, edit, fragment):
    """Refused before any work, not after a GPTQ solve."""
    d = copy_model(request.getfixturevalue(model), tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **edit}))
    expect_error(capsys, build_argv(d, tmp_path, "Q4_K_M"), fragment)


def test_moe_routing_llama_cpp_does_not_run(capsys, tmp_path, tiny_qwen3_moe):
    """norm_topk_prob false: transformers would not renormalise the top-k weights, llama.cpp's Qwen3-MoE always does."""
    d = copy_model(tiny_qwen3_moe, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, build_argv(d, tmp_path), "norm_topk_prob")


def test_missing_expert(capsys, tmp_path, tiny_mixtral):
    from safetensors.torch import load_file, save_file

    d = copy_model(tiny_mixtral, tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    expect_error(capsys, build_argv(d, tmp_path), "model.layers.1.block_sparse_moe.experts.5.w3.weight is missing")


def test_budget_on_a_mixture_of_experts(capsys, tmp_path, tiny_qwen3_moe):
    """Type allocation (--target auto:, --size, --bpw) has no expert stacks yet: refused up front, not a traceback."""
    argv = build_argv(tiny_qwen3_moe, tmp_path, target="auto:Q4_K_M")
    expect_error(capsys, argv, "mixtures of experts")

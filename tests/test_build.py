"""`edgequant build` to float and Q8_0 GGUFs: stored weights, metadata, and llama.cpp running them like transformers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgequant.cli import main
from edgequant.convert.imatrix_file import write_imatrix_gguf
from edgequant.model import SourceModel

Q = gguf.GGMLQuantizationType


def llama_quantize() -> str | None:
    """llama.cpp's own llama-quantize (scripts/build_llama_tools.sh), or one on PATH."""
    local = Path(__file__).resolve().parents[1] / ".cache" / "llama-tools" / "bin" / "llama-quantize"
    return str(local) if local.exists() else shutil.which("llama-quantize")


def build(model, target, out, *extra) -> gguf.GGUFReader:
    assert main(["build", str(model), "--target", target, "-o", str(out), "--quiet", *extra]) == 0
    return gguf.GGUFReader(out)


def source_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("target,dtype", [("F32", np.float32), ("F16", np.float16), ("BF16", None)])
def test_float_targets_store_the_checkpoint(tiny_llama, tmp_path, target, dtype):
    reader = build(tiny_llama, target, tmp_path / "m.gguf")
    m = SourceModel(str(tiny_llama))
    hf = source_tensors(tiny_llama)
    assert len(reader.tensors) == len(hf)
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        got = m.from_gguf(t.name, got)
        src = hf[m.tensors[t.name].hf_name].float()
        if got.ndim == 1:
            assert t.tensor_type == Q.F32
            expected = src.numpy()
        elif dtype is None:  # BF16 source -> BF16 is lossless
            expected = src.numpy()
        else:
            expected = src.numpy().astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(got, expected, err_msg=t.name)


def test_llama_metadata(tiny_llama, tmp_path):
    reader = build(tiny_llama, "F16", tmp_path / "m.gguf")
    cfg = SourceModel(str(tiny_llama)).checkpoint.config
    f = reader.fields

    def val(key):
        return f[key].contents()

    assert val("general.architecture") == "llama"
    assert val("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert val("llama.block_count") == cfg["num_hidden_layers"]
    assert val("llama.embedding_length") == cfg["hidden_size"]
    assert val("llama.feed_forward_length") == cfg["intermediate_size"]
    assert val("llama.attention.head_count") == cfg["num_attention_heads"]
    assert val("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert val("llama.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert val("tokenizer.ggml.model") == "llama"
    assert len(val("tokenizer.ggml.tokens")) == cfg["vocab_size"]


def test_qwen2_tied_biases_and_pre_tokenizer(tiny_qwen2, tmp_path):
    reader = build(tiny_qwen2, "F16", tmp_path / "m.gguf")
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert reader.fields["tokenizer.ggml.merges"].contents()


def test_q8_0_bytes_equal_libggml(tiny_llama, tmp_path):
    from ggml_oracle import quantize_chunk

    reader = build(tiny_llama, "Q8_0", tmp_path / "m.gguf", "--method", "rtn")
    m = SourceModel(str(tiny_llama))
    quantized = [t for t in reader.tensors if t.tensor_type == Q.Q8_0]
    assert {t.name for t in quantized} == {n for n, t in m.tensors.items() if len(t.shape) == 2}
    for t in quantized:
        expected = quantize_chunk(Q.Q8_0, m.load(t.name))
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), expected.reshape(-1), err_msg=t.name)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_llama_cpp_matches_transformers(model, request, tmp_path, fixture_text):
    """F32 GGUF in llama.cpp vs the checkpoint in transformers (fp32), same token ids: the layouts, permutation and
    hyperparameters are right exactly when the next-token distributions agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model)
    out = tmp_path / "m.gguf"
    build(model_dir, "F32", out)
    llm = llama_cpp.Llama(str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(fixture_text.read_text(encoding="utf-8")[:2000].encode(), add_bos=True)[:128]
    llm.reset()
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    p = torch.log_softmax(torch.from_numpy(ref), -1)
    q = torch.log_softmax(torch.from_numpy(ours), -1)
    kld = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kld < 1e-4


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2"])
def bf16_source(request, tmp_path_factory):
    """(model dir, its BF16 GGUF, an imatrix file for it): the checkpoint losslessly, as llama-quantize's input, and
    a random importance (some columns 0) for every matrix, read by both quantizers."""
    model = request.getfixturevalue(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    build(model, "BF16", tmp / "bf16.gguf")
    rng = np.random.default_rng(5)
    sums = {}
    for t in gguf.GGUFReader(tmp / "bf16.gguf").tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":  # llama-imatrix sees no input of the embedding
            s = rng.gamma(0.5, 2.0, int(t.shape[0])).astype(np.float32)
            s[rng.random(s.size) < 0.1] = 0
            sums[t.name] = (s, 3)
    write_imatrix_gguf(tmp / "imatrix.gguf", sums, datasets=["random"], chunk_count=1, chunk_size=3)
    return model, tmp / "bf16.gguf", tmp / "imatrix.gguf"


@pytest.mark.skipif(llama_quantize() is None, reason="llama-quantize not built (scripts/build_llama_tools.sh)")
@pytest.mark.parametrize(("target", "method"), [
    *((t, m) for t in ("IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_M") for m in ("rtn", "imatrix")),
    # these ftypes' lattice tensors need the importance matrix
    *((t, "imatrix") for t in ("IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
                                    "Q2_K_S")),
])
def test_bytes_equal_llama_quantize(bf16_source, target, method, tmp_path):
    """`--method rtn` is `llama-quantize`, `--method imatrix --imatrix FILE` is `llama-quantize --imatrix FILE`: the
    same type and the same bytes for every tensor (tiny-qwen2's rows of 320 take the fallbacks)."""
    model, bf16, imatrix = bf16_source
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    options = ["--imatrix", str(imatrix)] if method == "imatrix" else []
    build(model, target, ours, "--method", method, *options)
    subprocess.run([llama_quantize(), *options, str(bf16), str(theirs), target, "1"], check=True, capture_output=True)
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert mine.keys() == ref.keys()  # llama-quantize may write them in another order
    base = {"IQ3_M": Q.IQ3_S, "IQ3_XS": Q.IQ3_S, "IQ2_M": Q.IQ2_S, "IQ2_S": Q.IQ2_XS, "Q2_K_S": Q.Q2_K}
    assert {t.tensor_type for t in mine.values()} >= {base.get(target) or Q[target]}
    for name, t in ref.items():
        assert mine[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name

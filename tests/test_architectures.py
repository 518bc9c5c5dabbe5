"""The architectures beyond LLaMA/Qwen (issue 18), each on its fixture, against independent references:

  * our F32 GGUF run by llama.cpp vs the checkpoint in transformers (fp32): the same next-token distributions;
  * `--method rtn` vs `llama-quantize` run on llama.cpp's own converter's F32 output (convert_hf_to_gguf.py): the
    same tensors, types and bytes, and the same metadata (tokenizer included) but for general.*;
  * a GPTQ build with --verify, then `edgequant parity` on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgequant.cli import main

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".cache" / "llama-tools"  # scripts/build_llama_tools.sh
ARCHITECTURES = ["tiny_phi3", "tiny_gemma2", "tiny_gemma3", "tiny_gemma3_vl"]
# Keys we write that llama.cpp's converter leaves out, with the value llama.cpp assumes when they are absent
DEFAULTS = {"gemma2.rope.freq_base": 10000.0}


def llama_quantize() -> Path | None:
    path = TOOLS / "bin" / "llama-quantize"
    return path if path.exists() else None


def convert_script() -> Path | None:
    return next(TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)


def build(model: Path, target: str, out: Path, *extra) -> Path:
    assert main(["build", str(model), "--target", target, "-o", str(out), "--quiet", *map(str, extra)]) == 0
    return out


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_f32_in_llama_cpp_matches_transformers(model, request, tmp_path, fixture_text):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model)
    out = build(model_dir, "F32", tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(fixture_text.read_text(encoding="utf-8")[:8000].encode(), add_bos=True)[:512]
    llm.reset()
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float64)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.995
    p, q = torch.log_softmax(torch.from_numpy(ref), -1), torch.log_softmax(torch.from_numpy(ours), -1)
    assert (p.exp() * (p - q)).sum(-1).mean().item() < 1e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def llama_cpp_conversion(request, tmp_path_factory):
    """(model dir, llama.cpp's own F32 conversion of it)."""
    if convert_script() is None or llama_quantize() is None:
        pytest.skip("llama.cpp's converter and llama-quantize not built (scripts/build_llama_tools.sh)")
    model = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(request.param) / "llama-cpp-f32.gguf"
    subprocess.run([sys.executable, str(convert_script()), str(model), "--outfile", str(out), "--outtype", "f32"],
                   check=True, capture_output=True)
    return model, out


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith(("general.", "GGUF."))}


@pytest.mark.parametrize("target", ["Q4_K_M", "Q3_K_M"])
def test_rtn_equals_llama_quantize_of_llama_cpps_conversion(llama_cpp_conversion, target, tmp_path):
    model, f32 = llama_cpp_conversion
    ours = build(model, target, tmp_path / "ours.gguf", "--method", "rtn")
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([str(llama_quantize()), str(f32), str(theirs), target, "1"], check=True, capture_output=True)
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert mine.keys() == ref.keys()
    for name, t in ref.items():
        assert mine[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(mine[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    ours_kv, theirs_kv = fields(ours), fields(theirs)  # metadata, tokenizer included
    assert {k: v for k, v in ours_kv.items() if k not in theirs_kv} == {k: v for k, v in DEFAULTS.items() if k in ours_kv}
    assert {k: ours_kv.get(k) for k in theirs_kv} == theirs_kv


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_gptq_build_verifies_and_passes_parity(model, request, tmp_path, fixture_text):
    model_dir = request.getfixturevalue(model)
    text = REPO / "tests" / "fixtures" / "text" / "train.txt"
    out = build(model_dir, "Q4_K_M", tmp_path / "gptq.gguf", "--calib", text, "--calib-samples", 16,
                "--calib-seqlen", 128, "--device", "cpu", "--verify")
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        rc = main(["parity", str(model_dir), str(out), "--text", str(fixture_text), "--ctx", "128", "--chunks", "4",
                   "--threads", "2", "--device", "cpu", "--json"])
    r = json.loads(report.getvalue())
    assert rc == 0 and r["pass"], r["checks"]


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_sensitivities_are_transformers_gradients(model, request, monkeypatch):
    """The streamed Fisher pass (edgequant.sensitivity: layer by layer, its own head, the adapter's embedding scale
    and logit soft-capping) against autograd through transformers' whole model, with the same sampled labels: the
    same mean squared output gradient and input of every linear, the head and the embedding rows."""
    from transformers import AutoModelForCausalLM

    from edgequant import sensitivity
    from edgequant.model import SourceModel, hf_to_gguf

    model_dir = request.getfixturevalue(model)
    m = SourceModel(str(model_dir))
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 400, (3, 40)))
    found = sensitivity.measure(m, ids, torch.device("cpu"), seed=0)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows, grads, inputs = [], {}, {}
    embedding = torch.nn.Embedding.forward

    def raw_rows(self, x):  # the embedding rows before the model scales them (Gemma): their gradient is the table's
        out = embedding(self, x)
        out.retain_grad()
        rows.append(out)
        return out

    monkeypatch.setattr(torch.nn.Embedding, "forward", raw_rows)
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, a, out, name=name):
                inputs[name] = a[0].detach().reshape(-1, a[0].shape[-1]).double()
                out.register_hook(lambda g: grads.__setitem__(name, g.reshape(-1, g.shape[-1]).double()))
            mod.register_forward_hook(hook)
    logits = hf(ids, use_cache=False).logits.reshape(-1, m.hp.n_vocab).float()
    logp = torch.log_softmax(logits, -1)
    cdf = logp.detach().exp().cumsum(-1)
    u = torch.rand(len(logp), 1, generator=torch.Generator().manual_seed(0))
    y = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=m.hp.n_vocab - 1)
    logp.gather(1, y).sum().backward()

    names = hf_to_gguf(m)
    n = ids.numel()
    for name in grads:
        # transformers' module name, as the checkpoint's tensor is known in the text model (a VL model's text tower)
        weight = m.arch.text_name(f"{name}.weight") if name != "lm_head" else m.arch.head_weight(m.hp)
        got = found[names[weight]][0]
        np.testing.assert_allclose(got.rows, (grads[name] ** 2).sum(0).numpy() / n, rtol=2e-3, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got.cols, (inputs[name] ** 2).sum(0).numpy() / n, rtol=2e-3, err_msg=name)
    embedding_rows = found[names[f"{m.arch.layout.embed}.weight"]][-1].cols
    g = rows[0].grad.reshape(-1, m.hp.n_embd).double()
    np.testing.assert_allclose(embedding_rows, (g ** 2).mean(0).numpy(), rtol=2e-3, atol=1e-12)


def test_gemma3_vl_loads_in_both_hub_layouts(tiny_gemma3_vl, tmp_path):
    """Gemma 3 VL checkpoints exist with the original names (language_model.model.*) and with transformers' own
    (model.language_model.*, as save_pretrained writes them now): both convert to the same text model, and neither
    brings a vision tensor into the GGUF."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    new = tmp_path / "new-layout"  # the module tree's names, as transformers 4.52-4.57 saved them
    new.mkdir()
    state = AutoModelForCausalLM.from_pretrained(tiny_gemma3_vl, dtype=torch.bfloat16).state_dict()
    state.pop("lm_head.weight")  # tied
    assert any(n.startswith("model.language_model.layers.") for n in state)
    assert any(n.startswith("model.vision_tower.") for n in state)
    save_file({k: v.contiguous() for k, v in state.items()}, new / "model.safetensors", metadata={"format": "pt"})
    for f in tiny_gemma3_vl.iterdir():
        if f.suffix != ".safetensors":
            (new / f.name).write_bytes(f.read_bytes())
    readers = [gguf.GGUFReader(build(d, "F32", tmp_path / f"{i}.gguf")) for i, d in enumerate((tiny_gemma3_vl, new))]
    tensors = [{t.name: np.array(t.data) for t in r.tensors} for r in readers]
    assert tensors[0].keys() == tensors[1].keys()
    assert not any(n.startswith(("v.", "mm.")) for n in tensors[0])  # llama.cpp's mmproj names: not in the text GGUF
    assert len(tensors[0]) == 2 + 6 * 13  # token_embd, output_norm; per layer 7 linears, 6 norms (QK-norm)
    for name, data in tensors[0].items():
        np.testing.assert_array_equal(data, tensors[1][name], err_msg=name)


def test_vision_language_config_without_a_text_model_type_is_one_line(tiny_gemma3_vl, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_gemma3_vl.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    del config["text_config"]["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    assert main(["build", str(model), "--target", "F32", "-o", str(tmp_path / "x.gguf"), "--quiet"]) == 2
    assert "text_config.model_type" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()

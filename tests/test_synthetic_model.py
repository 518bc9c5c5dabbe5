"""scripts/make_synthetic_model.py, the model of the 8B-shaped end-to-end benchmark (scripts/gpu_e2e_8b.sh), run here
on its tiny config: the 8B config has Llama-3.1-8B's parameter count, the written checkpoint is what transformers
expects, its forward stays finite and non-degenerate, and `edgequant build` (RTN and GPTQ) turns it into GGUFs that
llama.cpp loads with the vocabulary padded to vocab_size, computing what transformers computes."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgequant.build import build
from edgequant.settings import CalibOptions

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_synthetic_model", REPO / "scripts" / "make_synthetic_model.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)
Q = gguf.GGMLQuantizationType
STD = synth.CONFIGS["tiny"]["initializer_range"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    synth.make(out, "tiny", "cpu", seed=0, shard_layers=2, log=lambda _: None)
    return out


def test_8b_config_is_llama_3_1_8b():
    """transformers builds the 8B config (on the meta device) with Llama-3.1-8B's 8,030,261,248 parameters, under
    the names and shapes the script writes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    c = synth.CONFIGS["llama-3.1-8b"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**c))
    ours = {name: shape for group in synth.tensor_shapes(c).values() for name, shape in group}
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == ours
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_checkpoint_is_sharded_bf16_and_seeded(tiny, tmp_path):
    from safetensors import safe_open

    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and sorted(p.name for p in tiny.glob("*.safetensors")) == shards
    expected = {n: s for g in synth.tensor_shapes(synth.CONFIGS["tiny"]).values() for n, s in g}
    seen = {}
    for shard in shards:
        with safe_open(tiny / shard, "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                seen[name] = f.get_tensor(name)
    assert {n: tuple(t.shape) for n, t in seen.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in seen.values())
    assert index["metadata"]["total_size"] == sum(2 * t.numel() for t in seen.values())
    for name, t in seen.items():
        if name.endswith("norm.weight"):
            assert bool((t == 1).all()), name
        else:
            assert abs(t.float().mean()) < 1e-3 and t.float().std() == pytest.approx(STD, rel=0.02), name
    synth.make(tmp_path / "again", "tiny", "cpu", seed=0, shard_layers=2, log=lambda _: None)
    synth.make(tmp_path / "other", "tiny", "cpu", seed=1, shard_layers=2, log=lambda _: None)
    for shard in shards:
        assert (tmp_path / "again" / shard).read_bytes() == (tiny / shard).read_bytes()
        assert (tmp_path / "other" / shard).read_bytes() != (tiny / shard).read_bytes()


def test_forward_is_finite_and_not_degenerate(tiny):
    """Every layer's output is finite, the residual stream grows moderately, and tokens stay distinct."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    rms = [float(h.pow(2).mean().sqrt()) for h in out.hidden_states[:-1]]  # the last one is after the final norm
    assert all(np.isfinite(rms)) and bool(torch.isfinite(out.logits).all())
    assert rms[0] == pytest.approx(STD, rel=0.05)
    assert all(a < b < 10 * a for a, b in zip(rms[1:], rms[2:])), rms
    h = torch.nn.functional.normalize(out.hidden_states[-2][0], dim=-1)
    assert float((h @ h.T).fill_diagonal_(0).mean()) < 0.5


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_build_loads_in_llama_cpp_with_padded_vocab(tiny, tmp_path, method):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    calib = CalibOptions(sources=[str(REPO / "tests" / "fixtures" / "text" / "train.txt")], samples=4, seqlen=128, device="cpu")
    result = build(str(tiny), "Q4_K_M", out, method=method, calib=calib, quiet=True)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert {types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"], types["output.weight"]} == {Q.Q4_K, Q.Q6_K}
    if method == "gptq":
        assert set(result.report["gptq"].loss) == {n for n, t in types.items() if t in (Q.Q4_K, Q.Q6_K)} - {"token_embd.weight"}
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 1000 and bytes(tokens.parts[tokens.data[-1]]) == b"[PAD999]"
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    assert llm.n_vocab() == 1000
    ids = llm.tokenize(b"The old farmer", add_bos=True)
    assert max(ids) < 512
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[len(ids) - 1])
    assert np.isfinite(logits).all()
    llm.reset()
    generated = list(itertools.islice(llm.generate(ids, temp=0.0), 2))  # greedy: the first is the argmax above
    assert generated[0] == int(logits.argmax()) and all(0 <= t < 1000 for t in generated)


def test_llama_cpp_computes_what_transformers_computes(tiny, tmp_path, fixture_text):
    """F32 GGUF in llama.cpp vs the checkpoint in transformers over 512 positions (where the llama3 rope scaling
    changes the mid-frequency rotations): the logits agree to llama.cpp's F16 KV cache rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    build(str(tiny), "F32", out, quiet=True)
    llm = llama_cpp.Llama(str(out), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(fixture_text.read_text(encoding="utf-8")[:6000].encode(), add_bos=True)[:512]
    assert len(ids) == 512
    llm.reset()
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(torch.tensor([ids])).logits[0].double().numpy()
    centered = ref - ref.mean(-1, keepdims=True)
    err = np.linalg.norm((ours - ours.mean(-1, keepdims=True)) - centered) / np.linalg.norm(centered)
    assert err < 1e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.97

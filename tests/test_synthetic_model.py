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


# --- mixtures of experts: Mixtral-8x7B and Qwen3-30B-A3B shapes (scripts/gpu_e2e_8b.sh's MoE speed runs) ---------

@pytest.mark.parametrize("config, params", [("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624)])
def test_moe_configs_have_the_published_parameter_counts(config, params):
    """transformers builds each MoE config (meta device) with the published model's parameter count, and the script's
    per-expert Hub names map onto its modules one for one (experts stacked, as edgequant loads them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = {k: v for k, v in synth.CONFIGS[config].items() if k != "tokenizer"}
    cfg = AutoConfig.for_model(c["model_type"], **{k: v for k, v in c.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ours = [s for group in synth.tensor_shapes(c).values() for _, s in group]
    assert sum(synth.numel(s) for s in ours) == sum(p.numel() for p in model.parameters()) == params


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for config in ("tiny-mixtral", "tiny-qwen3-moe"):
        out[config] = tmp_path_factory.mktemp("synthetic") / config
        synth.make(out[config], config, "cpu", seed=0, layers=1, log=lambda _: None)
    return out


def test_tiny_moe_routing_spreads_over_experts(tmp_path):
    """Random token ids through the tiny Qwen3-MoE (two layers, one window of 2048): every one of the 128 experts
    gets tokens in both layers and none more than 3x its share (with QK-norm weights of 1, positions converge and
    the second layer leaves experts without a token)."""
    from transformers import AutoModelForCausalLM

    synth.make(tmp_path / "m", "tiny-qwen3-moe", "cpu", seed=0, log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    counts = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out: counts.append(torch.bincount(out[-1].reshape(-1), minlength=128)))
    with torch.no_grad():
        model(torch.randint(3, 605, (1, 2048), generator=torch.Generator().manual_seed(0)))
    assert len(counts) == 2
    for c in counts:
        share = 2048 * 8 / 128
        assert int(c.sum()) == 2048 * 8 and int(c.min()) > 0 and float(c.max()) < 3 * share, c.tolist()


@pytest.mark.parametrize("config, n_expert, tokenizer", [("tiny-mixtral", 8, "llama"), ("tiny-qwen3-moe", 128, "gpt2")])
def test_tiny_moe_builds_and_runs_in_llama_cpp(tiny_moe, tmp_path, config, n_expert, tokenizer):
    """RTN Q4_K_M of each tiny MoE: the experts stacked into llama.cpp's 3-D tensors, the router kept F32, the
    fixture's tokenizer; llama.cpp loads it and its logits are finite."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    build(str(tiny_moe[config]), "Q4_K_M", out, method="rtn", quiet=True)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    c = synth.CONFIGS[config]
    ff = c.get("moe_intermediate_size") or c["intermediate_size"]
    assert [int(x) for x in tensors["blk.0.ffn_gate_exps.weight"].shape] == [c["hidden_size"], ff, n_expert]
    assert [int(x) for x in tensors["blk.0.ffn_down_exps.weight"].shape] == [ff, c["hidden_size"], n_expert]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == tokenizer
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = llm.tokenize(b"The old farmer", add_bos=True)
    llm.eval(ids)
    assert np.isfinite(np.asarray(llm.scores[len(ids) - 1])).all()


def test_tiny_mixtral_gptq_solves_every_expert(tiny_moe, tmp_path):
    """GPTQ Q4_K_M of the tiny Mixtral on the CPU: every expert of every stack reached by calibration tokens and
    reported."""
    calib = CalibOptions(sources=[str(REPO / "tests" / "fixtures" / "text" / "train.txt")], samples=8, seqlen=256, device="cpu")
    result = build(str(tiny_moe["tiny-mixtral"]), "Q4_K_M", tmp_path / "m.gguf", method="gptq", calib=calib, quiet=True)
    experts = result.report["gptq"].experts
    assert set(experts) == {f"blk.0.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}
    assert all(len(v) == 8 and all(e["tokens"] > 0 for e in v) for v in experts.values())
    assert sum(e["tokens"] for e in experts["blk.0.ffn_down_exps.weight"]) == 8 * 256 * 2

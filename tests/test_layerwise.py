"""edgequant.layerwise's sequential and asymmetric passes, and gptq.target's asymmetric target, against direct
computations: each linear's Stats are Σ xᵀx (and Σ x_fpᵀ x) of the inputs the layer really sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant import layerwise
from edgequant.gptq.target import asymmetric_target
from edgequant.model import SourceModel


def token_ids(n: int = 3, length: int = 24, vocab: int = 200) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(3, vocab, (n, length)))


def collect(model_dir, shrink: float = 1.0, device: str = "cpu", **options):
    """Run the layer pass; on_layer multiplies every weight by `shrink` (a stand-in for quantization).  Returns the
    calls (layer index, names) in order and each weight's Stats."""
    m = SourceModel(str(model_dir))
    calls, stats = [], {}

    def on_layer(index, weights):
        calls.append((index, sorted(n.rsplit(".", 2)[-2] for n in weights)))
        new = {}
        for name, (w, st) in weights.items():
            stats[name] = st
            new[name] = w * shrink
        return new

    layerwise.run(m, token_ids(), on_layer, torch.device(device), batch=2, **options)
    return calls, stats


def test_sequential_solves_groups_in_forward_order(tiny_llama):
    calls, _ = collect(tiny_llama, sequential=True)
    assert calls[:4] == [(0, ["k_proj", "q_proj", "v_proj"]), (0, ["o_proj"]), (0, ["gate_proj", "up_proj"]),
                         (0, ["down_proj"])]
    assert calls[-1] == ("output", ["lm_head"])


def test_sequential_inputs_come_through_the_changed_weights(tiny_llama):
    _, plain = collect(tiny_llama, shrink=0.5)
    _, seq = collect(tiny_llama, shrink=0.5, sequential=True)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    # layer 0's q/k/v read the embeddings either way; o_proj reads attention through the halved q/k/v
    assert torch.equal(plain[q].s, seq[q].s)
    assert not torch.allclose(plain[o].s, seq[o].s)
    # unchanged weights: sequential collects the same sums as the one pass
    _, same_plain = collect(tiny_llama)
    _, same_seq = collect(tiny_llama, sequential=True)
    for name in same_plain:
        torch.testing.assert_close(same_seq[name].s, same_plain[name].s, rtol=1e-5, atol=1e-4)


def test_asymmetric_cross_sums_pair_full_precision_and_quantized_inputs(tiny_llama):
    _, same = collect(tiny_llama, asymmetric=True)
    for name, st in same.items():  # nothing changed: both streams are one, cross = S
        torch.testing.assert_close(st.cross, st.s, rtol=1e-5, atol=1e-4)
    _, moved = collect(tiny_llama, shrink=0.9, asymmetric=True)
    first = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(moved[first].cross, moved[first].s)  # layer 0 reads the embeddings in both
    later = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(moved[later].cross, moved[later].s, rtol=1e-3)
    # the head's cross sum pairs the final norm of both streams
    assert not torch.allclose(moved["lm_head.weight"].cross, moved["lm_head.weight"].s, rtol=1e-3)


@pytest.mark.parametrize("sequential", [False, True])
def test_full_precision_stream_is_the_full_precision_model(tiny_llama, monkeypatch, sequential):
    """Weights changed layer after layer, the full-precision stream still steps through the original ones: what
    it brings to the head is the original model's input to lm_head."""
    from transformers import AutoModelForCausalLM

    seen = []
    add = layerwise.Stats.add

    def recording_add(self, x, x_fp=None):
        if x_fp is not None:
            seen.append(x_fp.clone())
        add(self, x, x_fp)

    monkeypatch.setattr(layerwise.Stats, "add", recording_add)
    collect(tiny_llama, shrink=0.9, asymmetric=True, sequential=sequential)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    head_input = []
    model.lm_head.register_forward_pre_hook(lambda _m, a: head_input.append(a[0]))
    with torch.no_grad():
        model(token_ids(), use_cache=False)
    torch.testing.assert_close(torch.cat(seen[-2:]), head_input[0], rtol=1e-4, atol=1e-4)  # the head's two batches


def test_asymmetric_target_is_the_least_squares_solution():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 24)) * rng.lognormal(0, 0.5, 24)
    X_fp = X + 0.1 * rng.standard_normal(X.shape)
    W = rng.standard_normal((5, 24))
    S, cross = torch.from_numpy(X.T @ X), torch.from_numpy(X_fp.T @ X)
    got = asymmetric_target(torch.from_numpy(W).float(), S.float(), cross.float(), damp=1e-9).double().numpy()
    want = np.linalg.lstsq(X, X_fp @ W.T, rcond=None)[0].T  # argmin ‖X_fp Wᵀ − X W*ᵀ‖
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    half = asymmetric_target(torch.from_numpy(W).float(), S.float(), cross.float(), damp=1e-9, strength=0.5)
    np.testing.assert_allclose(half.double().numpy(), W + 0.5 * (want - W), rtol=1e-4, atol=1e-4)
    # identical streams: the target is W itself, whatever the damping
    same = asymmetric_target(torch.from_numpy(W).float(), S.float(), S.float(), damp=0.1)
    np.testing.assert_allclose(same.numpy(), W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", ["--sequential", "--asymmetric=0.5"])
def test_gptq_build_with_sequential_or_asymmetric_is_exact(tiny_llama, tmp_path, flag, request):
    from edgequant.cli import main

    text = request.config.rootpath / "tests" / "fixtures" / "text" / "train.txt"
    out = tmp_path / "m.gguf"
    assert main(["build", str(tiny_llama), "--target", "Q3_K_M", "-o", str(out), "--calib", str(text),
                 "--calib-samples", "8", "--calib-seqlen", "64", "--device", "cpu", "--verify", "--quiet", flag]) == 0
    assert out.stat().st_size > 0


def test_asymmetric_strength_out_of_range_is_refused(tiny_llama, tmp_path, capsys):
    from edgequant.cli import main

    assert main(["build", str(tiny_llama), "-o", str(tmp_path / "m.gguf"), "--calib", "x.txt",
                 "--asymmetric", "1.5"]) == 2
    assert "--asymmetric 1.5" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_gptq_settings_defaults_follow_the_device():
    from edgequant.methods import GptqSettings

    cpu = GptqSettings().for_device(torch.device("cpu"))
    assert (cpu.sequential, cpu.asymmetric) == (False, 0.0)
    gpu = GptqSettings().for_device(torch.device("cuda"))
    assert (gpu.sequential, gpu.asymmetric) == (True, 0.5)
    asked = GptqSettings(sequential=True, asymmetric=0.25).for_device(torch.device("cpu"))
    assert (asked.sequential, asked.asymmetric) == (True, 0.25)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_repeated_heads_is_transformers_sdpa(masked):
    """layerwise's attention (key/value heads repeated first) against transformers' own SDPA attention, with no mask
    (is_causal) and with a materialized one (where transformers would repeat the heads itself)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6) if masked else None
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = layerwise.sdpa_heads_repeated(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 12, 64])
def test_stats_sum_the_upper_blocks_and_read_whole(monkeypatch, rows):
    """Σxᵀx from the blocks on and right of the diagonal, mirrored on read, read between adds too: the full product
    (and Σ x_fpᵀ x as it is), whatever the block against the width."""
    monkeypatch.setattr(layerwise, "GRAM_ROWS", rows)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 12, generator=g, dtype=torch.float64).float() for _ in range(3)]
    fps = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    st = layerwise.Stats(12, torch.device("cpu"))
    st.add(xs[0], fps[0])
    torch.testing.assert_close(st.s, xs[0].T @ xs[0], rtol=1e-6, atol=1e-6)
    st.add(xs[1], fps[1])
    st.add(xs[2], fps[2])
    x, fp = torch.cat(xs), torch.cat(fps)
    torch.testing.assert_close(st.s, x.T @ x, rtol=1e-6, atol=1e-6)
    assert torch.equal(st.s, st.s.T)
    torch.testing.assert_close(st.cross, fp.T @ x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.importance, (x * x).sum(0) / 21, rtol=1e-6, atol=1e-6)
    assert st.n == 21


def test_calibration_precision_must_be_known(tiny_llama):
    with pytest.raises(ValueError, match="precision 'fp8'"):
        layerwise.run(SourceModel(str(tiny_llama)), token_ids(), lambda i, w: {}, torch.device("cpu"), precision="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_calibration_stays_close_to_fp32(tiny_llama, precision):
    """On a GPU the calibration's matmuls may run in TF32 or bf16 (sums in float32): every S within their rounding
    of the float32 one, the sequential asymmetric passes included."""
    _, exact = collect(tiny_llama, shrink=0.9, device="cuda", precision="fp32", sequential=True, asymmetric=True)
    _, fast = collect(tiny_llama, shrink=0.9, device="cuda", precision=precision, sequential=True, asymmetric=True)
    tol = 2e-2 if precision == "bf16" else 2e-3
    for name, st in exact.items():
        scale = float(st.s.abs().max())
        assert float((fast[name].s - st.s).abs().max()) <= tol * scale, name
        assert float((fast[name].cross - st.cross).abs().max()) <= tol * scale, name
        assert torch.equal(fast[name].s, fast[name].s.T)

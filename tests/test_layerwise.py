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


def test_build_defaults_to_the_output_aimed_target_on_every_device():
    """No option: --sequential --asymmetric 0.5, whatever the device; --no-sequential --asymmetric 0 is plain GPTQ."""
    from edgequant.cli import parser
    from edgequant.commands.build import calib_options

    for argv, want in (([], (True, 0.5)), (["--device", "cpu"], (True, 0.5)), (["--device", "cuda"], (True, 0.5)),
                       (["--no-sequential", "--asymmetric", "0"], (False, 0.0))):
        g = calib_options(parser().parse_args(["build", "x", "-o", "y.gguf", *argv])).gptq
        assert (g.sequential, g.asymmetric) == want, argv


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
    """Σxᵀx from the blocks on and right of the diagonal, mirrored on read: the full product (and Σ x_fpᵀ x as it
    is), whatever the block against the width; the first read finishes the sums, and an add after it is refused."""
    monkeypatch.setattr(layerwise, "GRAM_ROWS", rows)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 12, generator=g, dtype=torch.float64).float() for _ in range(3)]
    fps = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    first = layerwise.Stats(12, torch.device("cpu"))
    first.add(xs[0], fps[0])
    torch.testing.assert_close(first.s, xs[0].T @ xs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="after finish"):
        first.add(xs[1])
    st = layerwise.Stats(12, torch.device("cpu"))
    st.add(xs[0], fps[0])
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


MATERIALIZE = layerwise.materialize
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trace(model_dir, monkeypatch, budget, shrink=0.9, **options):
    """layerwise.run with REPLAY_BYTES = budget, on_layer multiplying every weight by `shrink`: {weight: (S, cross,
    rows)}, each layer's outputs (on_hidden), and how many windows each kind of linear ran on (both streams, the
    group probe included)."""
    from collections import Counter

    monkeypatch.setattr(layerwise, "REPLAY_BYTES", budget)
    sums, hidden, windows = {}, [], Counter()

    def on_layer(index, weights):
        for name, (w, st) in weights.items():
            sums[name] = (st.s.clone(), None if st.cross is None else st.cross.clone(), st.n)
        return {name: w * shrink for name, (w, _st) in weights.items()}

    def counting(module, weights, device):  # the hooks travel into the full-precision copy too
        MATERIALIZE(module, weights, device)
        for name, mod in module.named_modules():
            if name.endswith(LINEARS):
                mod.register_forward_hook(lambda _m, a, _o, n=name.rpartition(".")[2]: windows.update({n: len(a[0])}))

    monkeypatch.setattr(layerwise, "materialize", counting)
    layerwise.run(SourceModel(str(model_dir)), token_ids(), on_layer, torch.device("cpu"), batch=2,
                  on_hidden=lambda i, h: hidden.append(h.clone()), **options)
    return sums, hidden, windows


def spec(model_dir, sequential, asymmetric, shrink=0.9):
    """What trace() must find, from transformers' whole-model forward: each linear's inputs with the layers before
    it and its earlier groups (sequential) multiplied by `shrink`, paired with the untouched model's (asymmetric);
    each layer's outputs through its changed weights (and the untouched model's)."""
    import copy

    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    except ValueError:  # a model SDPA cannot compute (Gemma 2's soft-capping): transformers' own default
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    untouched = copy.deepcopy(model)
    ids = token_ids()

    def inputs(net, modules):
        got = {}
        hooks = [net.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: got.setdefault(n, a[0]))
                 for n in modules]
        with torch.no_grad():
            net(ids, use_cache=False)
        for h in hooks:
            h.remove()
        return {n: x.reshape(-1, x.shape[-1]) for n, x in got.items()}

    sums = {}
    m = SourceModel(str(model_dir))  # the adapter's input groups are what --sequential means
    linears = [n for n, mod in model.model.layers[0].named_modules() if isinstance(mod, torch.nn.Linear)]
    groups = [list(g) for g in m.arch.input_groups] if sequential else [linears]
    for i in range(len(model.model.layers)):
        for group in groups:
            modules = [f"model.layers.{i}.{g}" for g in group]
            x, x_fp = inputs(model, modules), inputs(untouched, modules)
            for n in modules:
                sums[n + ".weight"] = (x[n].T @ x[n], x_fp[n].T @ x[n] if asymmetric else None, len(x[n]))
            with torch.no_grad():
                for n in modules:
                    model.get_submodule(n).weight.mul_(shrink)
    x, x_fp = inputs(model, ["lm_head"])["lm_head"], inputs(untouched, ["lm_head"])["lm_head"]
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    sums[head] = (x.T @ x, x_fp.T @ x if asymmetric else None, len(x))

    def outputs(net):
        got = []
        hooks = [layer.register_forward_hook(lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
                 for layer in net.model.layers]
        with torch.no_grad():
            net(ids, use_cache=False)
        for h in hooks:
            h.remove()
        return got

    hidden = [torch.stack(pair) if asymmetric else pair[0] for pair in zip(outputs(model), outputs(untouched))]
    return sums, hidden


def assert_close_sums(got, want):
    assert got.keys() == want.keys()
    for name, (s, cross, n) in want.items():
        scale = float(s.abs().max())
        torch.testing.assert_close(got[name][0], s, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert (got[name][1] is None) == (cross is None), name
        if cross is not None:
            torch.testing.assert_close(got[name][1], cross, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert got[name][2] == n, name


BIG = 1 << 40


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_phi3", "tiny_phi4_mini", "tiny_gemma2",
                                   "tiny_gemma3"])
@pytest.mark.parametrize("sequential, asymmetric", [(False, False), (False, True), (True, False), (True, True)])
def test_passes_collect_what_transformers_computes(model, sequential, asymmetric, monkeypatch, request):
    """Every Stats and every layer output against transformers' own forward of the model as it is changed, with
    and without the reused tensors."""
    model_dir = request.getfixturevalue(model)
    want_sums, want_hidden = spec(model_dir, sequential, asymmetric)
    for budget in (0, BIG):
        sums, hidden, _ = trace(model_dir, monkeypatch, budget, sequential=sequential, asymmetric=asymmetric)
        assert_close_sums(sums, want_sums)
        for got, want in zip(hidden, want_hidden, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def attention_bytes(model_dir) -> int:
    """Bytes of one stream's attention outputs (o_proj's inputs) for token_ids()."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return token_ids().numel() * c.num_attention_heads * head_dim * 4


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_reused_tensors_give_the_recomputed_bits_once(model, asymmetric, monkeypatch, request):
    """Sequential passes that start from what earlier passes kept give the same bits as passes that recompute
    everything from the layer's input (budget 0), in every Stats and every layer output, and compute each piece
    once per stream: q/k/v, o, gate/up and down each run on every window once per stream (and the 1-window group
    probe).  With room for attention's outputs but not down_proj's FFN-wide inputs, gate/up run twice for ours
    (and o_proj in every later pass where its outputs do not fit beside its inputs: tiny-llama's)."""
    model_dir = request.getfixturevalue(model)
    streams = 2 if asymmetric else 1
    per_stream = len(token_ids())
    want_sums, want_hidden, windows = trace(model_dir, monkeypatch, 0, sequential=True, asymmetric=asymmetric)
    assert windows["q_proj"] == 2 * (1 + per_stream * (3 * streams + 1))  # 2 layers: ours 4 passes, theirs 3
    for budget in (streams * attention_bytes(model_dir), BIG):
        sums, hidden, windows = trace(model_dir, monkeypatch, budget, sequential=True, asymmetric=asymmetric)
        assert sums.keys() == want_sums.keys()
        for name, (s, cross, n) in want_sums.items():
            assert torch.equal(sums[name][0], s), name
            assert (cross is None and sums[name][1] is None) or torch.equal(sums[name][1], cross), name
            assert sums[name][2] == n
        for got, want in zip(hidden, want_hidden, strict=True):
            assert torch.equal(got, want)
        once = 2 * (1 + per_stream * streams)
        assert windows["q_proj"] == windows["v_proj"] == windows["down_proj"] == once, windows
        assert windows["gate_proj"] == (once if budget == BIG else once + 2 * per_stream), windows
        if budget == BIG:
            assert windows["o_proj"] == once, windows


def test_a_module_that_does_more_after_its_last_linear_is_recomputed(tiny_llama, monkeypatch):
    """An MLP whose output is not down_proj's: its pass is not replaced by down_proj(kept input), and the results
    are those of transformers' forward, as with nothing kept."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: 2 * forward(self, x))
    want_sums, want_hidden = spec(tiny_llama, True, True)
    sums, hidden, windows = trace(tiny_llama, monkeypatch, BIG, sequential=True, asymmetric=True)
    assert_close_sums(sums, want_sums)
    for got, want in zip(hidden, want_hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert windows["gate_proj"] == 2 * (1 + 3 * 3) and windows["o_proj"] == 2 * (1 + 3 * 2), windows


def test_sequential_groups_are_the_adapters_and_checked_against_the_forward(tiny_phi3, tiny_llama):
    """Phi-3's fused projections are one group each (one Hessian per fused matrix); an adapter that is wrong about
    which linears share an input is refused rather than solving linears on inputs they never see."""
    import dataclasses

    calls, _ = collect(tiny_phi3, sequential=True)
    assert calls[:4] == [(0, ["qkv_proj"]), (0, ["o_proj"]), (0, ["gate_up_proj"]), (0, ["down_proj"])]
    m = SourceModel(str(tiny_llama))
    m.arch = dataclasses.replace(m.arch, input_groups=(("self_attn.q_proj",), ("self_attn.k_proj", "self_attn.v_proj"),
                                                       ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                                       ("mlp.down_proj",)))
    with pytest.raises(RuntimeError, match="input groups"):
        layerwise.run(m, token_ids(), lambda i, w: {}, torch.device("cpu"), batch=2, sequential=True)

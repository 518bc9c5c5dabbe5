"""The allocation under a byte budget (edgequant.allocate): the choice against exhaustive search, and the sensitivity
estimate against the KL divergence it estimates."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from edgequant.allocate import Option, choose
from edgequant.sensitivity import Sensitivity, token_frequencies

Q = gguf.GGMLQuantizationType
TEXT = Path(__file__).parent / "fixtures" / "text" / "train.txt"
TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0]


def random_options(rng, n_tensors: int) -> dict[str, list[Option]]:
    """Per tensor, costs falling with bytes roughly as quantization error does (4x per bit), with noise that makes
    some options dominated (more bytes, no less KL)."""
    out = {}
    for i in range(n_tensors):
        size, scale = int(rng.integers(1, 20)) * 1000, rng.random() * 10
        out[f"t{i}"] = [Option(q, size * (k + 2), scale * 4.0 ** -k * rng.uniform(0.6, 1.6)) for k, q in enumerate(TYPES)]
    return out


def best(options: dict[str, list[Option]], budget: int) -> float:
    """The exact optimum, by trying every combination."""
    names = list(options)
    costs = [sum(o.kl for o in combo) for combo in itertools.product(*(options[n] for n in names))
             if sum(o.nbytes for o in combo) <= budget]
    return min(costs)


@pytest.mark.parametrize("seed", range(12))
def test_choice_is_within_budget_and_near_the_optimum(seed):
    rng = np.random.default_rng(seed)
    options = random_options(rng, 4)
    smallest = sum(min(o.nbytes for o in opts) for opts in options.values())
    largest = sum(max(o.nbytes for o in opts) for opts in options.values())
    for budget in np.linspace(smallest, largest, 7).astype(int):
        picked = choose(options, int(budget))
        assert sum(o.nbytes for o in picked.values()) <= budget
        assert all(picked[n] in options[n] for n in options)
        got, opt = sum(o.kl for o in picked.values()), best(options, int(budget))
        assert got == pytest.approx(opt, rel=1e-12), budget  # sizes in whole units: the exact optimum
        # sizes rounded up to units of 1/16 of the spare bytes: within the budget, and no worse than the exact
        # optimum with one unit less per tensor (any choice that fits there fits in rounded units)
        coarse = choose(options, int(budget), resolution=16)
        assert sum(o.nbytes for o in coarse.values()) <= budget
        unit = -(-(int(budget) - smallest) // 16)
        if budget - len(options) * unit >= smallest:
            assert sum(o.kl for o in coarse.values()) <= best(options, int(budget) - len(options) * unit) + 1e-12
    assert choose(options, largest) == {n: min(opts, key=lambda o: o.kl) for n, opts in options.items()}


def test_choice_spends_bytes_where_they_buy_the_most():
    """Two tensors of the same size, one 100 times as sensitive: at a budget for one upgrade, it goes there."""
    a = [Option(Q.Q2_K, 100, 100.0), Option(Q.Q4_K, 200, 25.0)]
    b = [Option(Q.Q2_K, 100, 1.0), Option(Q.Q4_K, 200, 0.25)]
    picked = choose({"a": a, "b": b}, 300)
    assert picked["a"].qtype == Q.Q4_K and picked["b"].qtype == Q.Q2_K


def test_smallest_options_must_fit():
    with pytest.raises(ValueError, match="over the budget"):
        choose({"a": [Option(Q.Q2_K, 100, 1.0)]}, 99)


def test_token_frequencies_keep_mass_for_unseen_tokens():
    counts = np.array([5, 1, 1, 0, 0, 3], dtype=float)
    f = token_frequencies(counts)
    assert f.sum() == pytest.approx(1.0)
    assert f[3] == f[4] > 0 and f[3] + f[4] == pytest.approx(2 / 10)  # Good-Turing: 2 tokens seen once in 10
    assert f[0] / f[5] == pytest.approx(5 / 3)


def test_sensitivity_estimates_the_kl_of_a_perturbed_linear():
    """A linear followed by a softmax: the estimate ½ Σ ḡ_r Σ h̄_j E_rj², with ḡ measured on labels sampled from the
    model, matches the measured mean KL of a small perturbation within the diagonal approximation's error."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 20000, 16, 12
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
    W = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    E = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.01
    logits = x @ W.T
    p = torch.softmax(logits, -1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    grad = torch.nn.functional.one_hot(y, v).double() - p  # ∂ log p(y) / ∂ logits
    est = Sensitivity((grad ** 2).mean(0).numpy(), (x ** 2).mean(0).numpy()).kl((E ** 2).numpy())
    q = torch.log_softmax(x @ (W + E).T, -1)
    kl = float((p * (torch.log(p) - q)).sum(-1).mean())
    assert est == pytest.approx(kl, rel=0.5)
    assert 0.5 * est < kl < 2 * est


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, budget", [("imatrix", ["--target", "auto:Q4_K_M"]), ("gptq", ["--bpw", "3.6"])])
def test_size_budgeted_build(tiny_llama, tmp_path, method, budget):
    """A budgeted build: the file fits the budget (within what one more upgrade would take), every tensor has a
    type from its menu, llama.cpp loads it, and the estimated KL divergence of the chosen types is no more than the
    recipe's at the same size."""
    import json

    from edgequant.cli import main
    from edgequant.convert.type_menu import menu

    out = tmp_path / "m.gguf"
    calib = ["--calib", str(TEXT), "--calib-samples", "8", "--calib-seqlen", "64"]
    report = tmp_path / "r.html"
    args = ["build", str(tiny_llama), *budget, "--method", method, *calib, "-o", str(out), "--json", "--quiet",
            "--report", str(report)]
    if method == "gptq":
        args.append("--verify")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    s = json.loads(buf.getvalue())
    a = s["allocation"]
    assert out.stat().st_size == a["file_bytes"] <= a["budget"]
    reader = gguf.GGUFReader(out)
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    assert file_type & gguf.LlamaFileType.GUESSED  # not the recipe of the ftype it names
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        options = menu(t.name, shape)
        assert not options or t.tensor_type in options, t.name
        if options:
            assert t.tensor_type.name in [o[0] for o in a["options"][t.name]]
    if budget[0] == "--target":
        assert a["predicted_kld"] <= a["recipe_predicted_kld"] and a["file_bytes"] <= a["recipe_bytes"]
    if method == "gptq":  # GPTQ's losses are below the fit's on every tensor here, so is the scaled estimate
        assert 0 < a["predicted_kld_after_gptq"] < a["predicted_kld"]
    spare = a["budget"] - a["file_bytes"]
    chosen = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, opts in a["options"].items():  # no single upgrade that lowers the estimate still fits
        now = next(o for o in opts if o[0] == chosen[name])
        assert not any(o[1] - now[1] <= spare and o[2] < now[2] for o in opts), name
    page = report.read_text()  # the frontier, llama.cpp's ftypes on it (as many as the summary has), this build
    assert "Size and predicted quality" in page and "<polyline" in page
    assert len(a["frontier"]) > 8 and {"Q2_K", "Q4_K_M", "Q6_K"} <= set(a["ftypes"])
    assert all(f"<title>{f}: " in page for f in a["ftypes"] if 8 * a["ftypes"][f][0] / s["params"] <= 8)
    assert [k for _, k in a["frontier"]] == sorted((k for _, k in a["frontier"]), reverse=True)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(out), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    llm.eval([1, 5, 9, 13, 17, 21, 25, 29])
    assert np.isfinite(np.array(llm.scores[:8])).all()
    llm.close()


def test_large_tensors_are_measured_on_a_sample_of_rows(tiny_llama, monkeypatch):
    """Above MEASURED_WEIGHTS a tensor's cost comes from a sample of its rows (the heaviest half exactly, the rest
    by their share of the row weight): close to the cost over every row."""
    import edgequant.allocate as allocate
    from edgequant import sensitivity
    from edgequant.plan import plan_tensors
    from edgequant.write import gguf_layout
    from edgequant.calibration import calibrate
    from edgequant.model import SourceModel

    m = SourceModel(str(tiny_llama))
    plan = plan_tensors(m, "Q4_K_M", has_imatrix=True)
    ids = calibrate(m, [str(TEXT)], 8, 64, 0, torch.device("cpu")).ids
    sens = sensitivity.measure(m, ids, torch.device("cpu"))
    layout = gguf_layout(m, "Q4_K_M", plan)
    full = allocate.measure_options(m, plan, sens, layout, torch.device("cpu"), True)
    monkeypatch.setattr(allocate, "MEASURED_WEIGHTS", 64 * 256)
    sampled = allocate.measure_options(m, plan, sens, layout, torch.device("cpu"), True)
    big = [n for n, t in ((t.name, t) for t in plan) if n in full and t.shape[0] > 64]
    assert big
    for name in big:
        for a, b in zip(full[name], sampled[name]):
            assert a.qtype == b.qtype and a.nbytes == b.nbytes
            assert b.kl == pytest.approx(a.kl, rel=0.3), (name, a.qtype.name)
        # the ranking of the types, which is what the choice uses, is kept
        assert np.argsort([o.kl for o in full[name]]).tolist() == np.argsort([o.kl for o in sampled[name]]).tolist()


def test_the_head_measured_in_chunks_gives_the_same_sensitivities(tiny_llama, monkeypatch):
    """The head's gradients are taken a few tokens at a time (HEAD_ELEMENTS): each token's sampled label and its
    gradient do not depend on the chunks, so every tensor's sensitivity is the same as in one piece."""
    from edgequant import sensitivity
    from edgequant.calibration import calibrate
    from edgequant.model import SourceModel

    m = SourceModel(str(tiny_llama))
    ids = calibrate(m, [str(TEXT)], 4, 64, 0, torch.device("cpu")).ids
    whole = sensitivity.measure(m, ids, torch.device("cpu"))
    monkeypatch.setattr(sensitivity, "HEAD_ELEMENTS", 5 * m.hp.n_vocab)  # 5 tokens a chunk, across windows
    chunked = sensitivity.measure(m, ids, torch.device("cpu"))
    assert whole.keys() == chunked.keys()
    for name, uses in whole.items():
        for a, b in zip(uses, chunked[name]):
            np.testing.assert_allclose(b.rows, a.rows, rtol=1e-4, err_msg=name)
            np.testing.assert_allclose(b.cols, a.cols, rtol=1e-4, err_msg=name)


def test_sensitivities_are_measured_on_the_first_windows_that_hold_TOKENS(tiny_llama, monkeypatch):
    """Only ceil(TOKENS / window length) windows are measured: more windows given change nothing."""
    from edgequant import sensitivity
    from edgequant.calibration import calibrate
    from edgequant.model import SourceModel

    m = SourceModel(str(tiny_llama))
    ids = calibrate(m, [str(TEXT)], 6, 64, 0, torch.device("cpu")).ids
    monkeypatch.setattr(sensitivity, "TOKENS", 2 * 64 - 1)  # two windows of 64
    many, two = sensitivity.measure(m, ids, torch.device("cpu")), sensitivity.measure(m, ids[:2], torch.device("cpu"))
    one = sensitivity.measure(m, ids[:1], torch.device("cpu"))
    for name, uses in many.items():
        for a, b in zip(uses, two[name]):
            np.testing.assert_array_equal(a.rows, b.rows, err_msg=name)
            np.testing.assert_array_equal(a.cols, b.cols, err_msg=name)
    assert any(not np.array_equal(a.cols, b.cols) for name, uses in many.items() for a, b in zip(uses, one[name]))

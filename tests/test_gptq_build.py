"""`edgequant build --method gptq` end to end on the tiny fixtures: the whole layer-by-layer pipeline, exactness of the
written blocks, and GPTQ beating the importance-weighted fit on the calibration objective for every tensor."""

from __future__ import annotations

import shutil

import gguf
import pytest

from edgequant.build import build
from edgequant.settings import CalibOptions
from edgequant.write import digest
from parity_check import assert_parity

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def calib(request):
    text = request.config.rootpath / "tests" / "fixtures" / "text" / "train.txt"
    return CalibOptions(sources=[str(text)], samples=16, seqlen=128, device="cpu")


@pytest.mark.parametrize("model,target,expected_types", [
    ("tiny_llama", "Q4_K_M", {Q.Q4_K, Q.Q6_K}),
    ("tiny_qwen2", "Q3_K_M", {Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q8_0}),  # hidden 320: 32-wide fallbacks
    ("tiny_llama", "IQ4_XS", {Q.IQ4_XS, Q.Q6_K}),  # the table types: codes index ggml's 16 values
    ("tiny_llama", "IQ4_NL", {Q.IQ4_NL, Q.Q6_K}),
    ("tiny_qwen2", "IQ4_XS", {Q.IQ4_XS, Q.IQ4_NL, Q.Q5_1, Q.Q8_0}),  # rows of 320: IQ4_NL; attn_v's Q5_K: Q5_1
    ("tiny_llama", "IQ3_XXS", {Q.IQ3_XXS}),  # the lattice types: vector GPTQ (edgequant/gptq/vector.py)
    ("tiny_llama", "IQ2_XXS", {Q.IQ2_XXS}),
    ("tiny_llama", "IQ1_M", {Q.IQ1_M}),
])
def test_gptq_build_is_exact_and_beats_the_fit(model, target, expected_types, request, tmp_path, calib):
    out = tmp_path / "m.gguf"
    result = build(str(request.getfixturevalue(model)), target, out, method="gptq", calib=calib, verify=True, quiet=True)
    report = result.report["gptq"]
    reader = gguf.GGUFReader(out)
    quantized = [t for t in reader.tensors if t.tensor_type not in (Q.F32, Q.F16)]
    assert {t.tensor_type for t in quantized} >= expected_types
    # every block-quantized tensor went through GPTQ, but an untied input embedding (it has no Hessian)
    solved = {t.name for t in quantized}
    if "output.weight" in {t.name for t in reader.tensors}:
        solved.discard("token_embd.weight")
    assert set(report.loss) == solved == set(report.digest)  # --verify: a digest of every solved Ŵ
    for t in quantized:
        if t.name in solved:  # what gguf-py dequantizes is exactly what the solver produced
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            assert digest(w) == report.digest[t.name], t.name
    for name in report.loss:
        assert report.loss[name] < report.fit_loss[name], name


def test_solved_tensors_are_written_without_loading_their_weights(tiny_llama, tmp_path, calib, monkeypatch):
    """The writer takes GPTQ's packed bytes as they are: it loads (and widens) only the tensors it still encodes."""
    from edgequant.model import SourceModel

    loaded = []
    load = SourceModel.load
    monkeypatch.setattr(SourceModel, "load", lambda self, name: (loaded.append(name), load(self, name))[1])
    result = build(str(tiny_llama), "Q4_K_M", tmp_path / "m.gguf", method="gptq", calib=calib, quiet=True)
    solved = set(result.report["gptq"].loss)
    assert solved and not solved & set(loaded)
    assert set(loaded) == {t.name for t in result.plan} - solved
    assert not result.report["gptq"].digest  # no --verify: no digests, Ŵ never copied to the host for them


def test_calibration_text_too_short(tiny_llama, tmp_path):
    from edgequant.errors import UserError

    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(UserError, match="too short"):
        build(str(tiny_llama), "Q4_K_M", tmp_path / "m.gguf", method="gptq",
              calib=CalibOptions(sources=[str(short)], samples=4, seqlen=128), quiet=True)


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference_build(tiny_llama, tmp_path_factory, calib):
    """tiny-llama Q4_K_M by GPTQ with torch's default thread count: (BuildResult, sha256)."""
    out = tmp_path_factory.mktemp("reference") / "m.gguf"
    result = build(str(tiny_llama), "Q4_K_M", out, method="gptq", calib=calib, quiet=True)
    return result, sha256(out)


def test_summary_sums_losses_per_layer_and_shows_them(reference_build, capsys):
    from edgequant.commands.build import show, summary

    result = reference_build[0]
    s = summary(result)
    loss = result.report["gptq"].loss
    assert list(s["gptq_layers"]) == ["blk.0", "blk.1", "output"]
    for layer, row in s["gptq_layers"].items():
        members = [v for name, v in loss.items() if name.startswith(layer + ".")]
        assert row["tensors"] == len(members) and row["gptq_loss"] == pytest.approx(sum(members))
    assert sum(e["tensors"] for e in s["types"].values()) == s["tensors"] == len(result.plan)
    assert set(s["seconds"]) == {"load", "calibration", "solve", "write"}
    assert s["peak_memory"]["rss_bytes"] > 2**20
    show(result)
    err = capsys.readouterr().err
    assert "Q4_K" in err and "blk.1" in err and "GPTQ / fit" in err and "peak memory" in err


def test_gptq_build_is_reproducible_across_thread_counts(tiny_llama, tmp_path, calib, reference_build):
    """Same inputs and seed -> the same bytes, also with one thread instead of the default (MKL's Cholesky differs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        build(str(tiny_llama), "Q4_K_M", tmp_path / "m.gguf", method="gptq", calib=calib, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert sha256(tmp_path / "m.gguf") == reference_build[1]


def test_rows_solved_in_parts_give_the_same_bytes(tiny_llama, tmp_path, calib, reference_build, monkeypatch):
    """Large matrices are solved a part of their rows at a time (rows are independent given H): the same file."""
    from edgequant import solve

    monkeypatch.setattr(solve, "ROWS_PER_SOLVE", 48)  # tiny-llama's matrices have 64 to 512 rows
    result = build(str(tiny_llama), "Q4_K_M", tmp_path / "m.gguf", method="gptq", calib=calib, quiet=True)
    assert sha256(tmp_path / "m.gguf") == reference_build[1]
    loss = reference_build[0].report["gptq"].loss
    assert result.report["gptq"].loss == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("source", ["text", "self"])
def test_killed_gptq_build_resumes_to_the_same_bytes(tiny_llama, tmp_path, calib, reference_build, source):
    """SIGKILL right after layer 0 is saved: no .gguf, the work dir holds layer 0; the same command again (with
    --verify) resumes after layer 0 (the kill hook would fire again if it redid it), writes the uninterrupted build's bytes and cleans
    up, also the temporary file of a build killed while writing.  With self-calibration, the uninterrupted build is
    a second process: sampling is deterministic per seed."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "m.gguf"
    argv = [sys.executable, "-m", "edgequant.cli", "build", str(tiny_llama), "-t", "Q4_K_M", "--method", "gptq",
            "--calib", calib.sources[0] if source == "text" else "self", "--calib-samples", str(calib.samples),
            "--calib-seqlen", str(calib.seqlen), "--device", "cpu", "--quiet"]
    expected = reference_build[1]
    if source == "self":
        (tmp_path / "ref").mkdir()
        assert subprocess.run(argv + ["-o", str(tmp_path / "ref" / "m.gguf")]).returncode == 0
        expected = sha256(tmp_path / "ref" / "m.gguf")
        shutil.rmtree(tmp_path / "ref")
    argv += ["-o", str(out)]
    env = {**os.environ, "EDGEQUANT_TEST_KILL_AFTER_LAYER": "0"}
    killed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = tmp_path / "m.gguf.work"
    assert [p.name for p in tmp_path.iterdir()] == [work.name]
    assert sorted(p.name for p in work.iterdir()) == ["calibration.npz", "hidden-0.npy", "layer-0.npz", "manifest.json"]
    (tmp_path / ".m.gguf.x1y2.partial").write_bytes(b"GGUF")  # as a kill while writing would leave it
    resumed = subprocess.run(argv + ["--verify"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "(layers done: 1)" in resumed.stderr
    # layer 0's 7 linears were solved without --verify: no digests to check them by, and the build says so
    assert "--verify: 7 tensors solved by an earlier run without --verify are not checked" in resumed.stderr
    assert sha256(out) == expected
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_default_calibration_builds_offline_and_says_what_it_was(tiny_llama, tmp_path, capsys):
    """`edgequant build MODEL --target Q4_K_M -o OUT` with no --calib: calibrates on windows sampled from the model and
    the built-in text, half each, for GPTQ and for the imatrix method alike, and the summary says so."""
    import json

    from edgequant.cli import main

    for method in ("gptq", "imatrix"):
        out = tmp_path / f"{method}.gguf"
        argv = ["build", str(tiny_llama), "--target", "Q4_K_M", "-o", str(out), "--method", method,
                "--calib-samples", "4", "--calib-seqlen", "64", "--json"]
        assert main(argv) == 0
        s = json.loads(capsys.readouterr().out)
        assert [(p["source"], p["windows"]) for p in s["calibration"]] == [("self", 2), ("builtin", 2)]
        assert out.is_file() and ("sampling" in s["seconds"]) and (s["gptq"] != {}) == (method == "gptq")


def test_cli_json_and_quiet(tiny_llama, tmp_path, capsys):
    import json

    from edgequant.cli import main

    argv = ["build", str(tiny_llama), "-t", "Q4_K_M", "--method", "rtn", "-o", str(tmp_path / "m.gguf")]
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out)
    assert captured.err == "" and s["file_bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert s["gptq"] == {} and set(s["seconds"]) == {"load", "write"}
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_act_order_auto_keeps_each_rows_lower_loss():
    """--act-order auto solves a matrix in both column orders and every row keeps the order with its lower loss: the
    rows' losses are the elementwise minimum of the two solves', the blocks dequantize to that Ŵ, and the count of
    act-ordered rows is what was picked."""
    import numpy as np
    import torch

    from edgequant.convert.codecs import codec
    from edgequant.settings import GptqSettings
    from edgequant.solve import row_losses, solve_in_order

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256)).astype(np.float32) * rng.gamma(0.5, 2.0, 256).astype(np.float32)
    h = torch.from_numpy(2 * x.T @ x / len(x))
    w = torch.from_numpy(rng.standard_normal((48, 256)).astype(np.float32))
    c = codec(Q.Q4_K)
    solved = {mode: solve_in_order(w, h, c, GptqSettings(act_order=mode)) for mode in ("off", "on", "auto")}
    loss = {mode: row_losses(w, sol[1], h) for mode, sol in solved.items()}
    assert (loss["on"] < loss["off"]).any() and (loss["off"] < loss["on"]).any()  # both orders win some rows
    torch.testing.assert_close(loss["auto"], torch.minimum(loss["on"], loss["off"]), rtol=0, atol=0)
    blocks, w_hat, ordered = solved["auto"]
    assert ordered == int((loss["on"] < loss["off"]).sum())
    assert np.array_equal(c.dequantize(blocks).reshape(w_hat.shape), w_hat.numpy())
    assert solved["off"][2] == 0 and solved["on"][2] == len(w)


def test_act_order_auto_build_records_what_it_chose(tiny_llama, tmp_path, calib):
    """In a build, layer 0's first group (q/k/v: the same inputs and Hessian whatever the order) loses no more with
    auto than with either order alone, and the summary records the share of rows solved in act-order."""
    from dataclasses import replace

    from edgequant.commands.build import summary

    results = {}
    for mode in ("off", "on", "auto"):
        opts = replace(calib, gptq=replace(calib.gptq, act_order=mode))
        results[mode] = summary(build(str(tiny_llama), "Q4_K_M", tmp_path / f"{mode}.gguf", method="gptq", calib=opts,
                                      verify=True, quiet=True))["gptq"]
    for name in [f"blk.0.attn_{x}.weight" for x in ("q", "k", "v")]:
        off, on, auto = (results[m][name] for m in ("off", "on", "auto"))
        assert auto["gptq_loss"] <= min(off["gptq_loss"], on["gptq_loss"]) * (1 + 1e-6), name
        assert (off["act_order"], on["act_order"]) == (0.0, 1.0) and 0 <= auto["act_order"] <= 1, name
    assert any(0 < v["act_order"] < 1 for v in results["auto"].values())


def test_iq4_xs_build_resumes_and_is_read_by_inspect_report_and_eval(tiny_llama, tmp_path, calib, tiny_gguf,
                                                                      fixture_text, capsys):
    """A table type through the rest of the pipeline: a GPTQ build to IQ4_XS killed after layer 0 resumes (with
    --verify and --report) to the uninterrupted build's bytes; inspect lists its types and sizes, the report maps
    them, and eval runs it in llama.cpp against the F16 build, close to it but not equal."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from edgequant.cli import main

    reference = build(str(tiny_llama), "IQ4_XS", tmp_path / "ref.gguf", method="gptq", calib=calib, quiet=True)
    out, report = tmp_path / "m.gguf", tmp_path / "build.html"
    argv = [sys.executable, "-m", "edgequant.cli", "build", str(tiny_llama), "-t", "IQ4_XS", "--method", "gptq",
            "--calib", calib.sources[0], "--calib-samples", str(calib.samples), "--calib-seqlen", str(calib.seqlen),
            "--device", "cpu", "--quiet", "-o", str(out)]
    env = {**os.environ, "EDGEQUANT_TEST_KILL_AFTER_LAYER": "0"}
    killed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(argv + ["--verify", "--report", str(report)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert sha256(out) == sha256(tmp_path / "ref.gguf")

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types == {t.name: t.qtype.name for t in reference.plan}
    assert types["blk.0.attn_q.weight"] == "IQ4_XS" and types["output.weight"] == "Q6_K"
    xs = [t for t in info["tensors"] if t["type"] == "IQ4_XS"]
    assert all(t["bytes"] * 256 == 136 * t["shape"][0] * t["shape"][1] for t in xs)  # 4.25 bits per weight
    page = report.read_text(encoding="utf-8")
    assert "IQ4_XS" in page and "blk.1.ffn_down.weight" in page

    assert main(["eval", str(out), "--text", str(fixture_text), "--ctx", "64", "--chunks", "4", "--threads", "2",
                 "--base", str(tiny_gguf), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model_info"]["tensor_types"]["IQ4_XS"] == sum(t["bytes"] for t in xs)
    assert 0 < r["kld"]["mean"] < 0.5 and r["same_top_pct"] > 50


def test_lattice_gptq_file_passes_parity(tiny_llama, tmp_path, calib):
    """llama.cpp computes what a vector-GPTQ file's weights say: `edgequant parity` models its Q8_K activations for
    the lattice types (native's dot kernels) and passes, within the noise floor."""
    out = tmp_path / "m.gguf"
    build(str(tiny_llama), "IQ3_XXS", out, method="gptq", calib=calib, quiet=True)
    text = tiny_llama.parent / "text" / "eval.txt"
    assert_parity(tiny_llama, out, text)

"""Builds spread over several processes (edgequant.distributed), on the CPU with torch.distributed's gloo backend:
the same bytes as one process, resumable with another number of processes, and a failing rank ends the others."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgequant.build import build
from edgequant.distributed import World
from edgequant.errors import UserError
from edgequant.settings import CalibOptions

SAMPLES, SEQLEN = 16, 128  # two batches of 8 windows: one per rank


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def text(request):
    return str(request.config.rootpath / "tests" / "fixtures" / "text" / "train.txt")


def cli(model, out, text, *extra, env=None, timeout=300):
    argv = [sys.executable, "-m", "edgequant.cli", "build", str(model), "-t", "Q4_K_M", "--calib", text,
            "--calib-samples", str(SAMPLES), "--calib-seqlen", str(SEQLEN), "--device", "cpu", "--quiet",
            "-o", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_process(model, out, text):
    """The single-process build of the defaults (sequential, asymmetric, act-order auto, refine), in this process."""
    calib = CalibOptions(sources=[text], samples=SAMPLES, seqlen=SEQLEN, device="cpu")
    build(str(model), "Q4_K_M", out, method="gptq", calib=calib, quiet=True)
    return sha256(out)


@pytest.fixture(scope="module")
def llama_reference(tiny_llama, tmp_path_factory, text):
    return one_process(tiny_llama, tmp_path_factory.mktemp("one") / "m.gguf", text)


def test_windows_are_whole_batches_in_rank_order():
    """Each rank's windows are whole batches (the single process's batches), contiguous, covering every window once;
    fewer batches than ranks is refused."""
    for n, batch, size in [(16, 8, 2), (37, 8, 3), (5, 1, 4), (9, 8, 2)]:
        got = [World(r, size).windows(n, batch) for r in range(size)]
        assert got[0].start == 0 and got[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
        assert all(s.start % batch == 0 and (s.stop % batch == 0 or s.stop == n) and s.stop > s.start for s in got)
    with pytest.raises(UserError, match="fewer than the 3 processes"):
        World(0, 3).windows(16, 8)


def _sum_in_world(rank, size, port, into):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    g = torch.Generator().manual_seed(rank)
    t = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (7, 5), generator=g))
    World(rank, size).sum_(t)
    into.put((rank, t))
    dist.destroy_process_group()


def test_sum_adds_the_ranks_in_rank_order_on_every_rank():
    """World.sum_ over 3 gloo processes: every rank gets the same bits, those of ((t0 + t1) + t2) (values over 16
    orders of magnitude, where float64 addition is not associative, so the order shows)."""
    import torch.multiprocessing as mp

    from edgequant.distributed import free_port

    ctx = mp.get_context("spawn")
    into = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_sum_in_world, args=(r, 3, port, into)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(into.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    parts = []
    for r in range(3):
        g = torch.Generator().manual_seed(r)
        parts.append(torch.randn(7, 5, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (7, 5), generator=g))
    want = (parts[0] + parts[1]) + parts[2]
    assert not torch.equal(want, parts[0] + (parts[1] + parts[2]))  # the order shows in these values
    for r in range(3):
        assert torch.equal(got[r], want)


def test_two_gloo_processes_write_the_one_process_bytes(tiny_llama, llama_reference, tmp_path, text):
    """`--processes 2`: the windows, Σxᵀx and every matrix's rows split over two gloo ranks, with the defaults
    (sequential, asymmetric, act-order auto, refine): the one-process file byte for byte, --verify passing."""
    out = tmp_path / "m.gguf"
    t0 = time.perf_counter()
    done = cli(tiny_llama, out, text, "--processes", "2", "--verify")
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - t0 < 120
    assert sha256(out) == llama_reference
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the work directory removed


def test_experts_split_over_two_processes_give_the_one_process_bytes(tiny_qwen3_moe, tmp_path, text):
    """A mixture of experts: the per-expert sums reduced over the ranks, the experts of each stack split between
    them: the one-process file byte for byte."""
    reference = one_process(tiny_qwen3_moe, tmp_path / "one.gguf", text)
    done = cli(tiny_qwen3_moe, tmp_path / "two.gguf", text, "--processes", "2", "--verify")
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / "two.gguf") == reference


def test_killed_two_process_build_resumes_in_one_process(tiny_llama, llama_reference, tmp_path, text):
    """Rank 0 killed right after layer 0 is saved: the launcher ends rank 1 (blocked in a collective) at once and
    exits 128 + SIGKILL; the work directory holds layer 0 and all windows' hidden states, and one process resumes
    it to the uninterrupted build's bytes."""
    out = tmp_path / "m.gguf"
    t0 = time.perf_counter()
    killed = cli(tiny_llama, out, text, "--processes", "2", env={"EDGEQUANT_TEST_KILL_AFTER_LAYER": "0"})
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr
    assert time.perf_counter() - t0 < 120  # not the collectives' timeout
    work = tmp_path / "m.gguf.work"
    assert sorted(p.name for p in work.iterdir()) == ["calibration.npz", "hidden-0.npy", "layer-0.npz", "manifest.json"]
    assert tuple(np.load(work / "hidden-0.npy").shape[:2]) == (2, SAMPLES)  # both streams, all windows
    resumed = cli(tiny_llama, out, text)
    assert resumed.returncode == 0, resumed.stderr
    assert "(layers done: 1)" in resumed.stderr
    assert sha256(out) == llama_reference


def test_what_several_processes_cannot_do_is_one_line_and_exit_2(tiny_llama, tmp_path, text):
    """Bad requests: one line on stderr, exit 2, nothing written, whichever rank found it."""
    cases = [(["--processes", "2", "--method", "rtn"], "only a --method gptq build"),
             (["--processes", "2", "--calib-samples", "8"], "fewer than the 2 processes"),
             (["--gpus", "1", "--processes", "2"], "give one"),
             (["--processes", "0"], "at least 1")]
    if torch.cuda.device_count() < 2:
        cases.append((["--gpus", "2"], "CUDA GPUs"))
    for extra, message in cases:
        done = cli(tiny_llama, tmp_path / "m.gguf", text, *extra)
        assert done.returncode == 2, (extra, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("edgequant build: error:"), (extra, done.stderr)
        assert not list(tmp_path.iterdir()), extra


def test_killed_one_process_build_resumes_under_torchrun(tiny_llama, llama_reference, tmp_path, text):
    """One process killed after layer 0; torchrun's two processes resume it (each reads its own windows of the saved
    hidden states) to the uninterrupted build's bytes."""
    out = tmp_path / "m.gguf"
    killed = cli(tiny_llama, out, text, env={"EDGEQUANT_TEST_KILL_AFTER_LAYER": "0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "edgequant.cli", "build", str(tiny_llama), "-t", "Q4_K_M", "--calib", text, "--calib-samples",
            str(SAMPLES), "--calib-seqlen", str(SEQLEN), "--device", "cpu", "--quiet", "-o", str(out)]
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(layers done: 1)" in resumed.stderr
    assert sha256(out) == llama_reference

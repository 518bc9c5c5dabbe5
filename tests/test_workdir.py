"""The GPTQ work directory on its own: which directories it takes over, clears or refuses, and where it resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant.errors import UserError
from edgequant.workdir import WorkDir


def test_fresh_then_resume_point_follows_the_saved_layers(tmp_path):
    work = WorkDir(tmp_path / "w", {"model": "a"})
    work.open()
    assert work.resume_point() == (0, None)
    work.save_layer(0, {"blk.0.attn_q.weight": np.arange(5, dtype=np.uint8)}, {"blk.0.attn_q.weight": {"loss": 1.0}})
    assert work.resume_point() == (0, None)  # layer 0 solved, its outputs not yet saved: redo it
    h0, h1 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    work.save_hidden(0, h0)
    work.save_layer(1, {}, {})
    work.save_hidden(1, h1)
    start, hidden = work.resume_point()
    assert start == 2 and torch.equal(hidden, h1)
    assert sorted(p.name for p in work.path.iterdir()) == ["hidden-1.npy", "layer-0.npz", "layer-1.npz", "manifest.json"]
    work.save_layer("output", {"output.weight": np.ones(3, dtype=np.uint8)}, {"output.weight": {"loss": 2.0}})
    assert work.resume_point() is None
    assert list(work.report()) == ["blk.0.attn_q.weight", "output.weight"]
    np.testing.assert_array_equal(work.packed("blk.0.attn_q.weight"), np.arange(5, dtype=np.uint8))
    work.remove()
    assert not work.path.exists()


def test_same_identity_keeps_another_clears_with_a_note(tmp_path, capsys):
    WorkDir(tmp_path, {"target": "Q4_K_M", "seed": 0}).open()
    WorkDir(tmp_path, {"target": "Q4_K_M", "seed": 0}).save_hidden(0, torch.zeros(1))
    again = WorkDir(tmp_path, {"target": "Q4_K_M", "seed": 0})
    again.open()
    assert again.resume_point()[0] == 1 and "resuming from" in capsys.readouterr().err
    other = WorkDir(tmp_path, {"target": "Q5_K_M", "seed": 0})
    other.open()
    assert "target differ" in capsys.readouterr().err
    assert other.resume_point() == (0, None)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_refuses_a_directory_that_is_not_a_work_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    work = WorkDir(tmp_path, {})
    with pytest.raises(UserError, match="not an edgequant work directory"):
        work.open()
    work.remove()  # never opened: nothing of ours in it
    assert (tmp_path / "precious.txt").is_file()


def test_checkpoints_are_spaced_by_their_own_cost(tmp_path, monkeypatch):
    """checkpoint_hidden saves the first time, then only once SAVE_EVERY times the last save's cost (queued to
    written) has passed since it was queued.  (The writes run on the work directory's thread: flush() after each
    checkpoint keeps the fake clock's readings in order.)"""
    from edgequant import workdir

    due = 2.0 * workdir.SAVE_EVERY  # save 0 is queued at 0 s and written at 2 s: the next is due SAVE_EVERY times that
    clock = iter([0.0, 2.0, 5.0, due - 0.5, due, due + 3]).__next__
    monkeypatch.setattr(workdir.time, "perf_counter", clock)
    work = WorkDir(tmp_path / "w", {"model": "a"})
    work.open()
    for i in range(3):
        work.checkpoint_hidden(i, torch.full((2,), float(i)))
        work.flush()
    assert work.resume_point()[0] == 1  # only layer 0's outputs were saved (layers 1 and 2 came too early)
    work.checkpoint_hidden(3, torch.full((2,), 3.0))  # when due
    start, hidden = work.resume_point()
    assert start == 4 and torch.equal(hidden, torch.full((2,), 3.0))


def test_a_checkpoint_waits_for_the_one_being_written(tmp_path, monkeypatch):
    """While a hidden file is still being written, the next checkpoint is skipped (its host buffer is in use), and
    the queued writes keep their order: layer-N.npz before hidden-N.npy."""
    import threading

    from edgequant import workdir

    monkeypatch.setattr(workdir, "SAVE_EVERY", 0)  # every checkpoint is due
    release, order = threading.Event(), []
    work = WorkDir(tmp_path / "w", {"model": "a"})
    work.open()
    real_write = work._write

    def slow_write(name, write):
        if name.startswith("hidden"):
            release.wait(10)
        order.append(name)
        real_write(name, write)

    monkeypatch.setattr(work, "_write", slow_write)
    work.save_layer(0, {}, {})
    work.checkpoint_hidden(0, torch.zeros(2))
    work.save_layer(1, {}, {})
    work.checkpoint_hidden(1, torch.ones(2))  # hidden-0 still being written: skipped
    release.set()
    start, hidden = work.resume_point()
    assert order == ["layer-0.npz", "hidden-0.npy", "layer-1.npz"]
    assert start == 1 and torch.equal(hidden, torch.zeros(2))


def test_a_failed_background_write_raises_on_flush(tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "w", {"model": "a"})
    work.open()

    def full(name, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(work, "_write", full)
    work.save_layer(0, {}, {})
    with pytest.raises(OSError, match="No space"):
        work.flush()

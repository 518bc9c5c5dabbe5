"""A GPTQ build's finished layers on disk, so that a killed build resumes where it stopped (`--work-dir`).

    <output>.work/
      manifest.json    what the results are for (the build's identity, below); written first
      calibration.npz  the calibration windows (sampled ones would cost their sampling again, and differ on a GPU)
      layer-0.npz      per decoder layer, then layer-output.npz for the head: the packed GGUF bytes of the layer's
      layer-1.npz      GPTQ tensors, and their losses and digests for the report
      hidden-1.npy     the next layer's inputs: the output of layer 1 through its quantized weights

Each file is written under a temporary name and renamed into place, so a kill at any moment leaves only complete
files.  Per layer, layer-N.npz comes first, then hidden-N.npy, then hidden-(N-1).npy is deleted: the newest hidden
file marks where to resume, and every layer up to it has its npz.  The files are written by one background thread,
in that order, so that the GPU goes on meanwhile (an 8B's hidden file is 4 GiB: seconds of disk); what needs them
written (resume_point, report, packed, remove) waits for it first.  Redoing a layer whose hidden file was lost gives
the same bytes (the build is deterministic), so a resumed build writes the same GGUF as an uninterrupted one.

The identity covers everything the results depend on: the model's config and weight files (sizes, mtimes), the target,
the method and its settings, the calibration tokens themselves (hash), the device type and the software versions.
A work directory made for another identity is cleared, with a note; a directory that is not a work directory is
refused.  Only our own files are ever deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

MANIFEST = "manifest.json"
CALIBRATION = "calibration.npz"
OURS = ("manifest.json", CALIBRATION, "layer-*.npz", "hidden-*.npy", "*.tmp")
SAVE_EVERY = 20  # checkpoint_hidden: at least this many times a save's own cost between two saves
REPORT_KEY = "__report__"  # the layer npz entry holding {tensor: {loss, fit_loss, digest}} as JSON


def file_identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_identity(m, target: str, method: str, calib) -> dict:
    """What a build's layers depend on: `m` a SourceModel, `calib` its CalibOptions."""
    from . import __version__

    files = sorted({e.file for e in m.checkpoint.tensors.values()} | set(m.dir.glob("tokenizer*")))
    sources = []
    for spec in calib.sources:
        path = Path(spec).expanduser()
        sources.append([str(path.resolve()), *file_identity(path)] if path.is_file() else spec)
    return {
        "edgequant": __version__, "torch": torch.__version__, "model": str(m.dir.resolve()),
        "config_sha256": sha256((m.dir / "config.json").read_bytes()), "files": [file_identity(f) for f in files],
        "target": target, "method": method, "device": calib.torch_device().type,
        "calibration": {"sources": sources, "samples": calib.samples, "seqlen": calib.seqlen, "seed": calib.seed},
        "gptq": dataclasses.asdict(calib.gptq),
    }


class WorkDir:
    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity
        self.opened = False  # only then are the files in it ours to delete
        self.where: dict[str, Path] = {}  # GGUF name -> the layer npz holding it, from report() and save_layer()
        self._save_cost: float | None = None  # seconds the last checkpoint_hidden save took, queued to written
        self._saved_at = 0.0
        self._writer: ThreadPoolExecutor | None = None  # the one thread that writes, in the order queued
        self._writes: list[Future] = []
        self._hidden_save: Future | None = None
        self._host_buffer: torch.Tensor | None = None  # a GPU's hidden states copied here (pinned) for saving

    def open(self) -> None:
        """Make the directory ready for this identity: keep it if it matches, clear it if it is stale."""
        if self.opened:
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"work directory {self.path} exists and is not a directory")
        manifest = self.path / MANIFEST
        if self.path.is_dir() and any(self.path.iterdir()) and not manifest.is_file():
            raise UserError(f"work directory {self.path} is not empty and has no {MANIFEST}: not an edgequant work "
                            f"directory; remove it or choose another --work-dir")
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except ValueError:
                old = {}
            if old == self.identity:
                self.opened = True
                done = len(list(self.path.glob("layer-*.npz")))
                print(f"edgequant: resuming from {self.path} (layers done: {done})", file=sys.stderr)
                return
            changed = sorted(k for k in self.identity.keys() | old.keys() if old.get(k) != self.identity.get(k))
            print(f"edgequant: {self.path} holds layers of another build ({', '.join(changed)} differ); starting over",
                  file=sys.stderr)
            self.clear()
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create work directory {self.path}: {e.strerror}") from None
        self.opened = True
        self._write(MANIFEST, lambda f: f.write(json.dumps(self.identity, indent=1).encode()))

    def calibration(self, make):
        """The build's calibration windows (a calibration.Calibration): an earlier run's, else make()'s, kept."""
        from .calibration import Calibration

        self.open()
        self.flush()
        if (self.path / CALIBRATION).is_file():
            with np.load(self.path / CALIBRATION, allow_pickle=False) as z:
                return Calibration(torch.from_numpy(z["ids"]), json.loads(str(z["parts"])))
        windows = make()
        arrays = {"ids": windows.ids.numpy(), "parts": np.array(json.dumps(windows.parts))}
        self._queue(self._write, CALIBRATION, lambda f: np.savez(f, **arrays))
        return windows

    def resume_point(self, hidden: bool = True) -> tuple[int, torch.Tensor | None] | None:
        """(index of the first layer to solve, its inputs or None for the embeddings); None when every layer is done.
        hidden=False: the inputs are left to hidden() (None in their place)."""
        self.flush()
        if (self.path / "layer-output.npz").is_file():
            return None
        done = sorted(int(p.stem.split("-")[1]) for p in self.path.glob("hidden-*.npy"))
        if not done:
            return 0, None
        return done[-1] + 1, self.hidden(done[-1]) if hidden else None

    def hidden(self, index: int, windows: slice = slice(None)) -> torch.Tensor:
        """The saved outputs of layer `index`, of the calibration windows `windows` only (read from the file as it is
        mapped: a process of a distributed build reads its own windows)."""
        saved = np.load(self.path / f"hidden-{index}.npy", mmap_mode="r")
        return torch.from_numpy(np.array(saved if windows == slice(None) else saved[..., windows, :, :]))  # a copy: writable

    def save_layer(self, index, packed: dict[str, np.ndarray], report: dict[str, dict]) -> None:
        """Queue layer `index`'s packed tensors and report for writing (after the head's, the hidden files go)."""
        arrays = {**packed, REPORT_KEY: np.array(json.dumps(report))}
        self._queue(self._write, f"layer-{index}.npz", lambda f: np.savez(f, **arrays))
        if index == "output":  # no resume needs layer inputs any more
            self._queue(self._delete, "hidden-*.npy")
        self.where.update(dict.fromkeys(report, self.path / f"layer-{index}.npz"))

    def checkpoint_hidden(self, index: int, hidden: torch.Tensor) -> None:
        """Queue save_hidden if checkpoint_due(); then test_kill.  What waits here is a copy to host memory (pinned,
        reused)."""
        now = time.perf_counter()
        if self.checkpoint_due(now):
            self.save_hidden_later(index, hidden, now)
        self.test_kill(index)

    def checkpoint_due(self, now: float | None = None) -> bool:
        """Whether a layer's outputs should be saved now: not while the last save is still being written, nor less
        than SAVE_EVERY times its own cost after it was queued.  A small model's layer outputs are saved after every
        layer; an 8B's (4 GiB, seconds to write) every few layers, so that the disk spends at most ~1/SAVE_EVERY of
        the build on them.  A resume redoes the layers after the last one saved."""
        now = time.perf_counter() if now is None else now
        busy = self._hidden_save is not None and not self._hidden_save.done()
        return not busy and (self._save_cost is None or now - self._saved_at >= SAVE_EVERY * self._save_cost)

    def save_hidden_later(self, index: int, hidden: torch.Tensor, now: float | None = None) -> None:
        """Queue save_hidden of a copy of `hidden`."""
        self._saved_at = now = time.perf_counter() if now is None else now
        self._hidden_save = self._queue(self._timed_save_hidden, index, self._host_copy(hidden), now)

    def _host_copy(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type == "cpu":
            return hidden.clone()  # the next layer writes its outputs over `hidden`
        if self._host_buffer is None or self._host_buffer.shape != hidden.shape:
            self._host_buffer = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        return self._host_buffer.copy_(hidden)

    def _timed_save_hidden(self, index: int, hidden: torch.Tensor, queued_at: float) -> None:
        self.save_hidden(index, hidden)
        self._save_cost = time.perf_counter() - queued_at

    def save_hidden(self, index: int, hidden: torch.Tensor) -> None:
        self._write(f"hidden-{index}.npy", lambda f: np.save(f, hidden.cpu().numpy()))
        for p in self.path.glob("hidden-*.npy"):
            if p.name != f"hidden-{index}.npy":
                p.unlink()

    def _queue(self, fn, *args) -> Future:
        """Run fn(*args) on the writer thread, after everything queued before; an earlier write's error raises here."""
        self._raise_failed(wait=False)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, "edgequant-workdir")
        self._writes.append(self._writer.submit(fn, *args))
        return self._writes[-1]

    def _raise_failed(self, wait: bool) -> None:
        done = [f for f in self._writes if wait or f.done()]
        self._writes = [f for f in self._writes if f not in done]
        for f in done:
            f.result()

    def flush(self) -> None:
        """Wait for the queued writes; raise the first one's error, if any."""
        self._raise_failed(wait=True)

    def test_kill(self, index: int) -> None:
        if os.environ.get("EDGEQUANT_TEST_KILL_AFTER_LAYER") == str(index):  # tests: a kill between two layers
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def report(self) -> dict[str, dict]:
        """GGUF name -> {loss, fit_loss, digest} over every finished layer, in build order (layers, then the head)."""
        self.flush()
        numbered = sorted((p for p in self.path.glob("layer-*.npz") if p.stem != "layer-output"),
                          key=lambda p: int(p.stem.split("-")[1]))
        out = {}
        for path in numbered + list(self.path.glob("layer-output.npz")):
            with np.load(path, allow_pickle=False) as z:
                for name, entry in json.loads(str(z[REPORT_KEY])).items():
                    out[name] = entry
                    self.where[name] = path
        return out

    def packed(self, name: str) -> np.ndarray:
        """The packed GGUF bytes of a tensor saved or listed by report()."""
        self.flush()
        with np.load(self.where[name], allow_pickle=False) as z:
            return z[name]

    def clear(self) -> None:
        for pattern in OURS:
            self._delete(pattern)

    def _delete(self, pattern: str) -> None:
        for p in self.path.glob(pattern):
            p.unlink()

    def remove(self) -> None:
        if not self.opened:
            return
        try:
            self.flush()
        finally:
            self.clear()
        try:
            self.path.rmdir()
        except OSError:  # someone else's files in it: leave them
            pass

    def _write(self, name: str, write) -> None:
        tmp = self.path / (name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)


"""How a build is spread over the processes of torch.distributed (one per GPU, or several on the CPU with `gloo`).

Every stage calls the World it is given; a single process is the world of one, where every call is trivial.

    windows     each rank runs the layer passes on its own calibration windows: whole batches (the same batches a
                single process runs, so each batch's sums are the same bits), contiguous, in rank order
    sum_        Σ xᵀx and the other sums are float64 accumulators of float32 per-batch products; the ranks' sums
                are added in rank order on every rank (each rank folds one slice of the tensor, then the slices
                are gathered), so the result is the same for a given N, and the same as one process's whenever the
                float64 sums are exact (see sum_)
    rows        each rank solves rows [r·R/N, (r+1)·R/N) of every matrix (rows are independent given H; an expert
                stack splits by expert); share_rows gives every rank the whole Ŵ, gather_objects the writer (rank 0)
                each rank's packed bytes
    writer      rank 0 keeps the work directory and writes the GGUF

Launch: `torchrun --nproc-per-node N -m edgequant.cli build ...` (its environment: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), or `edgequant build --gpus N` / `--processes N`, which start N such processes themselves
(spawn()).  A rank that fails ends the others: spawn() (and torchrun) stop the group when one process exits non-zero,
and every collective has TIMEOUT as the last resort.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .errors import UserError

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("EDGEQUANT_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share_of(self, n: int, rank: int | None = None) -> slice:
        """Rank's items of n, contiguous: [r·n/N, (r+1)·n/N)."""
        r = self.rank if rank is None else rank
        return slice(r * n // self.size, (r + 1) * n // self.size)

    def windows(self, n: int, batch: int) -> slice:
        """This rank's calibration windows of n, in whole batches of `batch` (the last batch may be short)."""
        batches = -(-n // batch)
        if batches < self.size:
            raise UserError(f"{n} calibration windows make {batches} batches of {batch}, fewer than the {self.size} "
                            f"processes: give more --calib-samples or fewer processes")
        mine = self.share_of(batches)
        return slice(mine.start * batch, min(mine.stop * batch, n))

    # --- collectives: trivial in the world of one ---

    def sum_(self, t):
        """t summed over the ranks, in place, the same bits on every rank: rank j gathers slice j of every rank's t
        and adds them in rank order, then every rank gathers the slices.  Float64 accumulators of float32 values
        (the per-batch products) are summed exactly, hence as one process sums them, wherever an entry's per-batch
        values span less than 2^(29 - log2 batches) in magnitude (a 53-bit sum of 24-bit values); elsewhere the
        float64 rounding (2^-53 relative) can differ from one process's, and survives the cast to float32 only
        at a rounding tie."""
        if self.size == 1:
            return t
        import torch
        import torch.distributed as dist

        flat = t.reshape(-1)
        chunk = -(-flat.numel() // self.size)
        padded = torch.zeros(chunk * self.size, dtype=t.dtype, device=t.device)
        padded[: flat.numel()] = flat
        pieces = list(padded.split(chunk))
        got = None
        for j in range(self.size):
            into = [torch.empty_like(pieces[j]) for _ in range(self.size)] if j == self.rank else None
            dist.gather(pieces[j], into, dst=j)
            if into is not None:
                got = into
        total = got[0].clone()
        for part in got[1:]:
            total += part
        out = [torch.empty_like(total) for _ in range(self.size)]
        dist.all_gather(out, total)
        t.copy_(torch.cat(out)[: flat.numel()].reshape(t.shape))
        return t

    def share_rows(self, t, n: int | None = None) -> None:
        """Every rank's rows of t (share_of along dim 0) to every rank, in place."""
        if self.size == 1:
            return
        import torch.distributed as dist

        n = len(t) if n is None else n
        for r in range(self.size):
            rows = self.share_of(n, r)
            if rows.stop > rows.start:
                part = t[rows].contiguous()
                dist.broadcast(part, src=r)
                t[rows] = part

    def gather_objects(self, obj) -> list | None:
        """Every rank's obj, in rank order, on the writer (None elsewhere)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        into = [None] * self.size if self.writer else None
        dist.gather_object(obj, into, dst=0)
        return into

    def agree(self, obj):
        """The writer's obj, on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_windows(self, t, n: int, batch: int):
        """The whole tensor of every rank's windows (dim -3, windows(n, batch)), on the writer (None elsewhere)."""
        if self.size == 1:
            return t
        import torch
        import torch.distributed as dist

        sizes = [self.windows_of(n, batch, r) for r in range(self.size)]
        most = max(s.stop - s.start for s in sizes)
        shape = list(t.shape)
        shape[-3] = most
        padded = torch.zeros(shape, dtype=t.dtype, device=t.device)
        padded[..., : t.shape[-3], :, :] = t
        into = [torch.empty_like(padded) for _ in range(self.size)] if self.writer else None
        dist.gather(padded, into, dst=0)
        if not self.writer:
            return None
        return torch.cat([p[..., : s.stop - s.start, :, :] for p, s in zip(into, sizes)], dim=-3)

    def windows_of(self, n: int, batch: int, rank: int) -> slice:
        return World(rank, self.size, self.local_rank).windows(n, batch)


SINGLE = World()
_world = SINGLE


def world() -> World:
    """The world this process belongs to (SINGLE unless init() joined one)."""
    return _world


def launched() -> bool:
    """Whether this process was started as one rank of several (by torchrun or spawn())."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> World:
    """Join the process group the environment describes (torchrun's variables): nccl for CUDA, gloo on the CPU."""
    global _world
    import torch
    import torch.distributed as dist

    if not launched():
        return _world
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            if local >= torch.cuda.device_count():
                raise UserError(f"rank with LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} CUDA GPUs")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
        _world = World(dist.get_rank(), dist.get_world_size(), local)
    return _world


def finish() -> None:
    """Leave the process group (after the last collective)."""
    global _world
    if _world.size > 1:
        import torch.distributed as dist

        # every rank at the same point before any tears its connections down: a rank still in gloo's last exchange
        # when its peer's sockets close can abort (std::terminate, seen once in CI under load)
        dist.barrier()
        dist.destroy_process_group()
        _world = SINGLE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(n: int, argv: list[str], threads: int | None = None) -> int:
    """Run `python -m edgequant.cli *argv` as n ranks on this machine (torchrun's environment, one CPU thread share
    each unless OMP_NUM_THREADS is set) and wait: the first rank to fail stops the others, and its exit status is
    returned (128 + signal for a rank killed by one; rank 0's where it failed too).  Rank 0's stderr is this
    process's; the other ranks' is kept in a file, and the last line of a failed one shown only where rank 0 did not
    fail (and say why) itself, so an error reads once."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n)}
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // n)))
    procs, logs = [], []
    try:
        for r in range(n):
            log = None if r == 0 else tempfile.TemporaryFile()
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "edgequant.cli", *argv],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=log,
                                          stdout=None if r == 0 else subprocess.DEVNULL))
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
            time.sleep(0.2)
        failed = [r for r, p in enumerate(procs) if p.returncode]
        if not failed:
            return 0
        if failed[0] != 0:  # rank 0 usually fails the same way a moment later, and says why: its line is enough
            try:
                procs[0].wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if procs[0].returncode:
            return _status(procs[0].returncode)
        _show(failed[0], procs[failed[0]].returncode, logs)
        return _status(procs[failed[0]].returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            if log is not None:
                log.close()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def _show(rank: int, code: int, logs) -> None:
    if rank == 0 or logs[rank] is None:
        return
    logs[rank].seek(0)
    text = logs[rank].read().decode(errors="replace").strip()
    last = text.splitlines()[-1] if text else f"rank {rank} exited with status {code}"
    print(last, file=sys.stderr)

"""One contract for choosing a codec's block scales: `fit(codec, w, importance)`, on w's device.

    f = fit(codec, w, importance)   # w (rows, n) torch; importance (n,) or None
    f.scale, f.offset               # the grid, (rows, n // group) float32 on w's device (None: lattice types)
    f.levels                        # the table types' levels (float32 on w's device), None for uniform grids
    f.blocks()                      # the codec's logical Blocks (numpy), ready for codec.pack
    f.dequantize()                  # codec.dequantize(f.blocks()) on w's device

Every backend writes the bytes of the codec's numpy `fit` (the specification, itself ggml_quantize_chunk's); the
first that covers the codec, the device and the weighting runs it:

    triton  the K-quants' importance-weighted fits and IQ4_NL/IQ4_XS's on a CUDA device, without host round trips
            (triton_fit)
    c       every type native/fit.c writes (all but Q8_K), when the extension is built: on the CPU (from a GPU, through
            the host); IQ2_XXS/IQ2_XS/IQ1_S only weighted
    numpy   the codec's own `fit`: every type, any device (through the host); IQ2_XXS/IQ2_XS/IQ1_S only weighted

tests/test_fit_conformance.py checks each backend against numpy and libggml: a new type or backend is added there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from edgequant.convert.codecs import Codec

from .refine import dequantized

try:
    from edgequant.native import fit as native_fit
except ImportError:  # the C extension is not built
    native_fit = None


@dataclasses.dataclass(frozen=True)
class Fit:
    """A codec's fitted blocks and their grid.

    fields: the Blocks dataclass's fields as tensors (same names, dtypes and shapes as the numpy ones; `q` holds the
    codes in every scalar-grid codec); scale, offset, levels: codec.grid(blocks)'s, on the fit's device.  A lattice
    codec (codec.scalar_grid False: groups of weights are codebook points) has no grid: scale and offset are None
    and w_hat holds its dequantized weights on the fit's device.
    """

    blocks_type: type
    fields: dict[str, torch.Tensor]
    scale: torch.Tensor
    offset: torch.Tensor
    group: int
    qmin: int
    qmax: int
    levels: torch.Tensor | None = None
    w_hat: torch.Tensor | None = None

    @staticmethod
    def of(codec: Codec, blocks, device: torch.device) -> Fit:
        """A Fit of numpy Blocks, the grid (a lattice codec: the dequantized weights) moved to `device` (the fields
        stay on the host)."""
        fields = {f.name: torch.from_numpy(np.require(getattr(blocks, f.name), requirements="W"))
                  for f in dataclasses.fields(blocks)}
        if not codec.scalar_grid:
            w_hat = torch.from_numpy(codec.dequantize(blocks)).to(device)
            return Fit(type(blocks), fields, None, None, codec.block_size, 0, 0, None, w_hat)
        grid = codec.grid(blocks)
        scale, offset = (torch.from_numpy(a).to(device) for a in (grid.scale, grid.offset))
        levels = None if grid.levels is None else torch.from_numpy(grid.levels).to(device)
        return Fit(type(blocks), fields, scale, offset, grid.group, grid.qmin, grid.qmax, levels)

    def blocks(self):
        """The codec's numpy Blocks (one host transfer per field)."""
        return self.blocks_type(**{k: v.cpu().numpy() for k, v in self.fields.items()})

    def dequantize(self) -> torch.Tensor:
        """codec.dequantize(self.blocks()), bit for bit, on the grid's device."""
        if self.w_hat is not None:
            return self.w_hat
        q = self.fields["q"].to(self.scale.device)
        return dequantized(q.reshape(q.shape[0], -1).float(), self.scale, self.offset, self.levels)

    @staticmethod
    def concat(parts: list[Fit], axis: int = 1) -> Fit:
        """Fits of consecutive column ranges of the same rows (axis 1, along the block axis), or of consecutive row
        ranges (axis 0: rows are fitted independently) -> one fit."""
        first = parts[0]
        def cat(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts], axis)

        fields = {k: torch.cat([p.fields[k] for p in parts], axis) for k in first.fields}
        return dataclasses.replace(first, fields=fields, scale=cat("scale"), offset=cat("offset"), w_hat=cat("w_hat"))


class Backend(ABC):
    """One implementation of the contract, for the codecs (and weightings) it `covers`."""

    name: str

    @abstractmethod
    def covers(self, codec: Codec, weighted: bool) -> bool:
        """Whether fit(codec, ·, importance) runs here, weighted: importance is not None."""

    @abstractmethod
    def fit(self, codec: Codec, w: torch.Tensor, importance: torch.Tensor | None) -> Fit:
        """codec.fit(w, importance) as a Fit on w's device; w (rows, n), n a multiple of codec.block_size."""


def host(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class NumpyFit(Backend):
    """The codec's own `fit`, the specification: every type, any device (the grid goes back to w's device)."""

    name = "numpy"

    def covers(self, codec: Codec, weighted: bool) -> bool:
        return weighted or not codec.needs_importance  # ggml has no unweighted IQ2_XXS/IQ2_XS/IQ1_S fit

    def fit(self, codec: Codec, w: torch.Tensor, importance: torch.Tensor | None) -> Fit:
        return Fit.of(codec, codec.fit(host(w), host(importance)), w.device)


class NativeFit(Backend):
    """native/fit.c (edgequant.native.fit) on the CPU: the codec's bytes, unpacked into its Blocks (the grid goes
    back to w's device)."""

    def __init__(self, isa: str = "best"):
        self.isa, self.name = isa, "c" if isa == "best" else f"c-{isa}"

    def covers(self, codec: Codec, weighted: bool) -> bool:
        # as numpy's: ggml has no unweighted IQ2_XXS/IQ2_XS/IQ1_S fit, and neither has native/fit.c
        return native_fit is not None and native_fit.supports(codec.qtype) and (weighted or not codec.needs_importance)

    def fit(self, codec: Codec, w: torch.Tensor, importance: torch.Tensor | None) -> Fit:
        codec.check_shape(w.shape[1])
        x, imp = host(w), host(importance)
        raw = np.empty((len(x), native_fit.row_bytes(codec.qtype, x.shape[1])), dtype=np.uint8)
        # Rows are independent and the C call releases the GIL: large fits go over the host's cores in row chunks
        # (a GPU build's host is otherwise idle while it waits for them).
        step = max(1, THREAD_ELEMENTS // x.shape[1], -(-len(x) // host_threads()))

        def rows(r: int) -> None:
            native_fit.quantize(x[r:r + step], codec.qtype, imp, out=raw[r:r + step], isa=self.isa)

        starts = range(0, len(x), step)
        if len(starts) == 1:
            rows(0)
        else:
            list(_host_pool().map(rows, starts))
        return Fit.of(codec, codec.unpack(raw), w.device)


THREAD_ELEMENTS = 1 << 18  # the least weights worth a thread of NativeFit


def host_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _host_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(host_threads(), "edgequant-fit")


@functools.lru_cache(maxsize=None)
def backends(device_type: str) -> tuple[Backend, ...]:
    """The backends that run on this kind of device, preferred first."""
    found: list[Backend] = []
    if device_type == "cuda":
        try:
            from .triton_fit import TritonFit
        except ImportError:  # no Triton: the host fits
            pass
        else:
            found.append(TritonFit())
    if native_fit is not None:
        found.append(NativeFit())
    return (*found, NumpyFit())


def backend(codec: Codec, device: torch.device, weighted: bool) -> Backend:
    found = next((b for b in backends(device.type) if b.covers(codec, weighted)), None)
    if found is None:
        raise ValueError(f"{codec.name}: ggml quantizes this type only with an importance vector")
    return found


# Weights per backend call: a fit's temporaries grow with its input (TritonFit's scale search holds several copies of
# it), and act-order fits a whole matrix at once, so larger matrices are fitted in slabs of rows.
SLAB_ELEMENTS = 1 << 23


@torch.no_grad()
def fit(codec: Codec, w: torch.Tensor, importance: torch.Tensor | None = None) -> Fit:
    """codec.fit(w, importance) on w's device, by the first backend that covers it (see the module docstring)."""
    b = backend(codec, w.device, importance is not None)
    step = max(1, SLAB_ELEMENTS // w.shape[1])
    if len(w) <= step:
        return b.fit(codec, w, importance)
    return Fit.concat([b.fit(codec, w[r:r + step], importance) for r in range(0, len(w), step)], axis=0)

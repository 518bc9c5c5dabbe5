"""How many bytes a size-budgeted build may write: `--size`, `--bpw` and `--target auto:FTYPE` (issue 17).

A budget covers the whole file: header (metadata, tensor directory), alignment padding and tensor data, as
convert.gguf_out.GGUFLayout.file_bytes counts them.  The allocator chooses each tensor's type from its menu
(convert.type_menu) so that the file is at most that many bytes.

  --size 6GB            6 * 10**9 bytes.  Units, case-insensitive, as GNU coreutils reads sizes (ls -h, du, df,
                        truncate -s): B, KB, MB, GB, TB are powers of 1000; K, M, G, T and KiB, MiB, GiB, TiB are
                        powers of 1024.  So "6G" is what `ls -lh` prints for a 6 GiB file, and "6GB" a download
                        page's 6 GB.  No unit: bytes.
  --bpw 4.3             bits per weight as `edgequant build` reports them: 8 * (tensor bytes) / (every tensor's
                        elements), the header left out.  The budget is the padded header plus bpw * elements / 8,
                        so the built file reports at most the bits per weight asked for.
  --target auto:Q4_K_M  the size of the file `--target Q4_K_M` writes (same method, so the same imatrix-dependent
                        recipe).

A budget must lie between the smallest file (every tensor at its menu's smallest type) and the F16 file (every
quantized tensor at F16); the tensors that are never quantized (norms, biases) keep their type in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .convert.gguf_out import GGUFLayout, TensorPlan
from .convert.recipes import FTYPES
from .convert.type_menu import menu
from .errors import UserError

_UNITS = {"": 1, "b": 1,  # lower-cased unit -> bytes
          **{f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)},
          **{f"{p}{binary}": 1024**i for i, p in enumerate("kmgt", 1) for binary in ("", "ib")}}

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"  # a plain decimal: no nan, inf, 1/2 or 4_3
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*", re.IGNORECASE)
_BPW = re.compile(rf"\s*({_NUMBER})\s*", re.IGNORECASE)
UNITS_HELP = "B, KB, MB, GB, TB (powers of 1000); K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024)"


@dataclass(frozen=True)
class BudgetSpec:
    """A budget as the user gave it, checked for syntax; exactly one of size, bpw, ftype is set."""

    option: str  # "--size", "--bpw" or "--target"
    text: str  # as typed: "6GB", "4.3", "auto:Q4_K_M"
    size: int | None = None  # --size, in bytes
    bpw: Fraction | None = None  # --bpw
    ftype: str | None = None  # --target auto:FTYPE

    def __str__(self) -> str:
        return f"{self.option} {self.text}"


@dataclass(frozen=True)
class Budget:
    total_bytes: int  # the whole file may take at most this many bytes
    what: str  # what the user asked for, for messages: "--size 6GB"
    ftype: str | None = None  # --target auto:FTYPE's FTYPE


def parse_size(text: str) -> int:
    """`--size` text -> bytes (rounded down)."""
    match = _SIZE.fullmatch(text)
    if match is None or match[2].lower() not in _UNITS:
        raise UserError(f"--size {text}: not a size; give a number and a unit: {UNITS_HELP}")
    size = int(Fraction(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise UserError(f"--size {text}: the size must be at least one byte")
    return size


def parse_bpw(text: str) -> Fraction:
    """`--bpw` text -> bits per weight (exact: 4.3 is 43/10)."""
    match = _BPW.fullmatch(text)
    if match is None:
        raise UserError(f"--bpw {text}: not a number of bits per weight (such as 4.5)")
    bpw = Fraction(match[1])
    if bpw <= 0:
        raise UserError(f"--bpw {text}: bits per weight must be more than 0")
    return bpw


def budget_request(target: str | None, size: str | None, bpw: str | None,
                   default_target: str) -> tuple[str, BudgetSpec | None]:
    """The build's options -> (the ftype whose recipe seeds the plan and names the file type, the budget or None).

    --size, --bpw and --target auto:FTYPE exclude each other; --size and --bpw take the default target's recipe as
    their seed and exclude a fixed --target."""
    auto = target is not None and target.lower().startswith("auto")
    given = [(option, text) for option, text in (("--size", size), ("--bpw", bpw)) if text is not None]
    if auto:
        given.append(("--target", target))
    if len(given) > 1:
        raise UserError(f"{' and '.join(f'{o} {t}' for o, t in given)}: give only one file size")
    if not given:
        return target or default_target, None
    option, text = given[0]
    if option != "--target" and target is not None:
        raise UserError(f"{option} {text} sizes the file, --target {target} fixes its recipe: give one of them "
                        f"(--target auto:{target} sizes the file as {target}'s)")
    if option == "--size":
        return default_target, BudgetSpec(option, text, size=parse_size(text))
    if option == "--bpw":
        return default_target, BudgetSpec(option, text, bpw=parse_bpw(text))
    ftype = text[len("auto"):].removeprefix(":").upper()
    if ftype not in FTYPES:
        raise UserError(f"--target {text}: unknown file type {ftype!r}; give auto:FTYPE with one of {', '.join(FTYPES)}")
    return ftype, BudgetSpec(option, text, ftype=ftype)


def file_range(layout: GGUFLayout, plan: list[TensorPlan]) -> tuple[int, int]:
    """(the smallest file, the F16 file) for `plan`'s tensors: every tensor on a menu at its smallest type / at F16
    (the largest on every menu), the others as planned."""

    def every_tensor_at(pick) -> int:
        return layout.file_bytes([pick((TensorPlan(t.name, t.shape, q) for q in menu(t.name, t.shape)),
                                       key=lambda c: layout.padded(c.nbytes), default=t) for t in plan])

    return every_tensor_at(min), every_tensor_at(max)


def budget_bytes(spec: BudgetSpec, layout: GGUFLayout, plan: list[TensorPlan],
                 recipe_plan: Callable[[str], list[TensorPlan]]) -> Budget:
    """The file bytes `spec` allows for `plan`'s tensors (whatever their planned types) in a file of `layout`.

    recipe_plan(ftype): the fixed-recipe plan `--target ftype` builds, for auto:FTYPE.  UserError when the budget is
    below the smallest file or above the F16 file."""
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    if spec.size is not None:
        total = spec.size
    elif spec.bpw is not None:
        total = layout.padded(layout.header) + int(spec.bpw * n_params / 8)
    else:
        total = layout.file_bytes(recipe_plan(spec.ftype))
    smallest, f16 = file_range(layout, plan)

    def describe(nbytes: int) -> str:
        bits = 8 * max(0, nbytes - layout.padded(layout.header)) / n_params
        return f"{nbytes:,} bytes ({nbytes / 2**20:,.2f} MiB, {bits:.3f} bits/weight)"

    if total < smallest:
        raise UserError(f"{spec}: {describe(total)} is less than the smallest file this model fits in, "
                        f"{describe(smallest)} with every tensor at its smallest type")
    if total > f16:
        raise UserError(f"{spec}: {describe(total)} is more than the F16 file, {describe(f16)}; "
                        f"build that with --target F16 (or F32)")
    return Budget(total, str(spec), spec.ftype)

"""Size budgets (edgequant.budget): parsing --size/--bpw/--target auto:, and the bytes each allows."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import gguf
import pytest

from edgequant.budget import BudgetSpec, budget_bytes, budget_request, file_range, parse_bpw, parse_size
from edgequant.convert.gguf_out import GGUFLayout, TensorPlan
from edgequant.convert.type_menu import menu
from edgequant.errors import UserError

Q = gguf.GGMLQuantizationType

# --- parsing ---------------------------------------------------------------------------------------

SIZES = [
    ("6GB", 6 * 10**9), ("6gb", 6 * 10**9), ("6 GB", 6 * 10**9), ("6.5G", int(6.5 * 2**30)), ("6GiB", 6 * 2**30),
    ("6gib", 6 * 2**30), ("5000MB", 5 * 10**9), ("512MiB", 512 * 2**20), ("512m", 512 * 2**20),
    ("123456789", 123456789), ("123456789B", 123456789), ("4.1GB", 4_100_000_000), ("1.5KB", 1500),
    ("1.5K", 1536), ("2T", 2 * 2**40), ("1e9", 10**9), ("1.9B", 1),  # rounded down
]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["6XB", "GB", "", "six GB", "6 G B", "nan", "inf", "infGB", "6GBs", "1/2GB", "0x10"])
def test_parse_size_refuses_what_is_no_size(text):
    with pytest.raises(UserError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0GB", "-5GB", "0.4B", "-0"])
def test_parse_size_refuses_nothing(text):
    with pytest.raises(UserError, match="at least one byte"):
        parse_size(text)


def test_parse_bpw():
    assert parse_bpw("4.3") == Fraction(43, 10)
    assert parse_bpw(" 16 ") == 16
    for text in ["abc", "nan", "inf", "-inf", "4.3bits", "1/2", "4_3", ""]:
        with pytest.raises(UserError, match="not a number"):
            parse_bpw(text)
    for text in ["0", "-1", "-4.5"]:
        with pytest.raises(UserError, match="more than 0"):
            parse_bpw(text)


# (target, size, bpw) -> (ftype, spec)
REQUESTS = [
    ((None, None, None), ("Q4_K_M", None)),
    (("Q2_K", None, None), ("Q2_K", None)),
    ((None, "6GB", None), ("Q4_K_M", BudgetSpec("--size", "6GB", size=6 * 10**9))),
    ((None, None, "4.3"), ("Q4_K_M", BudgetSpec("--bpw", "4.3", bpw=Fraction(43, 10)))),
    (("auto:Q3_K_M", None, None), ("Q3_K_M", BudgetSpec("--target", "auto:Q3_K_M", ftype="Q3_K_M"))),
    (("AUTO:q5_k_s", None, None), ("Q5_K_S", BudgetSpec("--target", "AUTO:q5_k_s", ftype="Q5_K_S"))),
]


@pytest.mark.parametrize(("options", "expected"), REQUESTS)
def test_budget_request(options, expected):
    assert budget_request(*options, default_target="Q4_K_M") == expected


@pytest.mark.parametrize(("options", "message"), [
    ((None, "6GB", "4"), "give only one file size"),
    (("auto:Q4_K_M", "6GB", None), "give only one file size"),
    (("auto:Q4_K_M", None, "4"), "give only one file size"),
    (("Q4_K_M", "6GB", None), "--target Q4_K_M fixes its recipe"),
    (("Q4_K_M", None, "4.5"), "--target Q4_K_M fixes its recipe"),
    (("auto:NOPE", None, None), "unknown file type 'NOPE'"),
    (("auto", None, None), "give auto:FTYPE"),
    ((None, "6XB", None), "not a size"),
    ((None, None, "abc"), "not a number"),
])
def test_budget_request_errors(options, message):
    with pytest.raises(UserError, match=message):
        budget_request(*options, default_target="Q4_K_M")


# --- budgets ---------------------------------------------------------------------------------------

LAYOUT = GGUFLayout(header=1000, alignment=32)  # padded: 1024
# A 256-row matrix (menu Q2_K..F16), a 32-row one (IQ4_NL..F16), a norm (not on a menu), at Q4_K_M's types.
PLAN = [TensorPlan("blk.0.ffn_up.weight", (64, 256), Q.Q4_K), TensorPlan("blk.0.attn_q.weight", (64, 96), Q.Q5_0),
        TensorPlan("blk.0.attn_norm.weight", (96,), Q.F32)]
N_PARAMS = 64 * 256 + 64 * 96 + 96
SMALLEST = 1024 + 64 * 84 + 64 * 3 * 18 + 384  # Q2_K, IQ4_NL (Q4_0's size, listed first), F32
F16_FILE = 1024 + 2 * 64 * 256 + 2 * 64 * 96 + 384


def recipe_plan(ftype: str) -> list[TensorPlan]:
    qtype = {"Q8_0": Q.Q8_0, "F32": Q.F32, "F16": Q.F16}[ftype]
    return [TensorPlan(t.name, t.shape, qtype if menu(t.name, t.shape) else t.qtype) for t in PLAN]


def budget(option: str, text: str):
    _, spec = budget_request(text if option == "--target" else None, text if option == "--size" else None,
                             text if option == "--bpw" else None, default_target="Q4_K_M")
    return budget_bytes(spec, LAYOUT, PLAN, recipe_plan)


def test_file_range():
    assert file_range(LAYOUT, PLAN) == (SMALLEST, F16_FILE)


def test_size_budget_is_the_whole_file():
    assert budget("--size", f"{SMALLEST}").total_bytes == SMALLEST
    assert budget("--size", f"{F16_FILE}B").total_bytes == F16_FILE
    assert budget("--size", "30KB").what == "--size 30KB"


def test_bpw_budget_is_the_header_plus_the_tensor_bits():
    b = budget("--bpw", "5.5")
    assert b.total_bytes == 1024 + int(Fraction(55, 10) * N_PARAMS / 8)
    # a plan that fills it reports at most 5.5 bits per weight, as BuildResult.bits_per_weight counts
    assert 8 * (b.total_bytes - 1024) / N_PARAMS <= 5.5


def test_auto_budget_is_the_recipe_file():
    assert budget("--target", "auto:Q8_0").total_bytes == LAYOUT.file_bytes(recipe_plan("Q8_0"))
    assert budget("--target", "auto:F16").total_bytes == F16_FILE  # the largest budget there is


@pytest.mark.parametrize(("option", "text", "message"), [
    ("--size", f"{SMALLEST - 1}", "less than the smallest file"),
    ("--size", "1", "less than the smallest file"),
    ("--bpw", "1", "less than the smallest file"),
    ("--size", f"{F16_FILE + 1}", "more than the F16 file"),
    ("--bpw", "17", "more than the F16 file"),
    ("--target", "auto:F32", "more than the F16 file"),
])
def test_budget_out_of_range(option, text, message):
    with pytest.raises(UserError, match=message):
        budget(option, text)


# --- through `edgequant build` ---------------------------------------------------------------------


@pytest.mark.parametrize("options", [["--target", "auto:Q4_K_M"], ["--target", "auto:IQ4_XS"], ["--size", "2MB"],
                                     ["--bpw", "6"]])
def test_build_hands_the_budget_to_the_allocator(tiny_llama, tmp_path, monkeypatch, options):
    """With the allocation replaced by one that keeps the recipe's plan: the allocator gets the budget and the
    file's layout, and for auto:FTYPE the file it writes is exactly the budget."""
    import edgequant.build
    from edgequant.allocate import Allocation
    from edgequant.cli import main
    from edgequant.solve import Solved
    from edgequant.write import rtn_encoder

    seen = {}

    def keep_recipe(m, plan, budget, layout, *_args):
        seen.update(budget=budget, layout=layout, plan=plan)
        return plan, Allocation(budget.total_bytes, budget.what, layout.file_bytes(plan), 0.0, 0.0,
                                layout.file_bytes(plan), {}, {}, 0.0, [], {})

    monkeypatch.setattr(edgequant.build, "calibration_windows", lambda *a: SimpleNamespace(ids=None, parts=[]))
    monkeypatch.setattr(edgequant.build, "allocate_types", keep_recipe)
    monkeypatch.setattr(edgequant.build, "solve_plan", lambda *a, **k: Solved(rtn_encoder()))
    out = tmp_path / "m.gguf"
    assert main(["build", str(tiny_llama), *options, "--method", "imatrix", "-o", str(out), "--quiet"]) == 0
    assert seen["budget"].what == " ".join(options)
    assert seen["layout"].file_bytes(seen["plan"]) == out.stat().st_size
    if options[0] == "--target":
        assert out.stat().st_size == seen["budget"].total_bytes

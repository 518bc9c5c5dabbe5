"""The exact size of the GGUF a build writes (build.gguf_layout)."""

from __future__ import annotations

import gguf
import pytest

from edgequant.plan import plan_tensors
from edgequant.write import gguf_layout, write_gguf
from edgequant.cli import main
from edgequant.convert.gguf_out import GGUFLayout, TensorPlan
from edgequant.convert.type_menu import menu
from edgequant.write import rtn_encoder
from edgequant.model import SourceModel
from edgequant.progress import Progress

Q = gguf.GGMLQuantizationType


BUILDS = [("tiny_llama", "Q4_K_M"), ("tiny_llama", "Q2_K"), ("tiny_llama", "F16"), ("tiny_qwen2", "Q4_K_M"),
          ("tiny_qwen2", "IQ4_XS"), ("odd_llama", "Q4_0"), ("odd_llama", "Q3_K_S")]


@pytest.mark.parametrize(("model", "ftype"), BUILDS)
def test_predicted_size_is_the_built_size(request, model, ftype, tmp_path):
    path = request.getfixturevalue(model)
    m = SourceModel(str(path))
    plan = plan_tensors(m, ftype)
    predicted = gguf_layout(m, ftype, plan).file_bytes(plan)
    out = tmp_path / "m.gguf"
    assert main(["build", str(path), "--target", ftype, "--method", "rtn", "-o", str(out), "--quiet"]) == 0
    assert out.stat().st_size == predicted


@pytest.mark.parametrize("model", ["tiny_qwen2", "odd_llama"])
def test_predicted_size_of_a_mixed_plan(request, model, tmp_path):
    """Every tensor on a menu at another of its types (the kind of plan an allocation makes), against a layout
    taken from the recipe's plan: the header does not depend on the types."""
    m = SourceModel(str(request.getfixturevalue(model)))
    recipe = plan_tensors(m, "Q4_K_M")
    mixed = [TensorPlan(t.name, t.shape, types[i % len(types)]) if (types := menu(t.name, t.shape)) else t
             for i, t in enumerate(recipe)]
    if model == "odd_llama":
        assert any(t.nbytes % 32 for t in mixed)  # padding between tensors is exercised
    out = tmp_path / "mixed.gguf"
    write_gguf(out, m, "Q4_K_M", mixed, rtn_encoder(), Progress(quiet=True))
    assert out.stat().st_size == gguf_layout(m, "Q4_K_M", recipe).file_bytes(mixed)
    assert [Q(t.tensor_type) for t in gguf.GGUFReader(out).tensors] == [t.qtype for t in mixed]


def test_layout_arithmetic():
    layout = GGUFLayout(header=1000, alignment=32)
    plan = [TensorPlan("a.weight", (3, 32), Q.Q4_0), TensorPlan("b.weight", (2, 256), Q.Q2_K)]  # 54, 168 bytes
    assert layout.file_bytes(plan) == 1024 + 64 + 192

"""Builds that calibrate nothing import no torch, transformers or datasets: importing torch alone takes longer than
an RTN build of a small model.  Each build runs in a fresh interpreter, which then lists the modules it imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgequant.convert.imatrix_file import write_imatrix_gguf

HEAVY = ("torch", "transformers", "datasets", "triton")

# argv: the CLI's arguments; prints the exit code and the top-level names of every module imported by then
LIST_MODULES = """
import json, sys
from edgequant.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def modules_after(argv: list[str]) -> set[str]:
    done = subprocess.run([sys.executable, "-c", LIST_MODULES, *argv], check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0, done.stderr
    assert {"edgequant", "numpy", "gguf"} <= set(result["modules"])  # the list is the build's
    return set(result["modules"])


@pytest.mark.parametrize("options", [
    ["--method", "rtn", "--target", "Q4_K_M"],
    ["--method", "rtn", "--target", "Q8_0"],
    ["--target", "F16"],  # the default method, gptq, with nothing to quantize
], ids=["rtn-Q4_K_M", "rtn-Q8_0", "gptq-F16"])
def test_build_without_calibration_imports_no_torch(tmp_path, tiny_llama, options):
    modules = modules_after(["build", str(tiny_llama), *options, "-o", str(tmp_path / "m.gguf"), "--quiet"])
    assert not modules & set(HEAVY)
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_imatrix_build_from_a_file_imports_no_torch(tmp_path, tiny_llama):
    hidden = json.loads((tiny_llama / "config.json").read_text())["hidden_size"]
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(imatrix, {"blk.0.attn_q.weight": (np.linspace(1, 2, hidden), 8)}, datasets=["x"],
                       chunk_count=1, chunk_size=8)
    modules = modules_after(["build", str(tiny_llama), "--method", "imatrix", "--imatrix", str(imatrix),
                             "--target", "Q4_K_M", "-o", str(tmp_path / "m.gguf"), "--quiet"])
    assert not modules & set(HEAVY)

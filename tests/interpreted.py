"""Run a test file as a script under TRITON_INTERPRET=1 (which must be set before triton is imported, hence a child
process) and read the one JSON line it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Triton's interpreter before triton-lang/triton#9172 (Triton 3.6 and older) calls int() on one-element arrays, which
# NumPy 2.4 made an error: with that pair no interpreted kernel runs at all (seen in the H200 image: Triton 3.6, NumPy 2.5).
BROKEN_INTERPRETER = "only 0-dimensional arrays can be converted to Python scalars"


def run_interpreted(script: str) -> dict:
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, script], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode and BROKEN_INTERPRETER in proc.stderr and "triton/runtime/interpreter.py" in proc.stderr:
        import numpy
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} "
                    "(triton-lang/triton#9171)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])

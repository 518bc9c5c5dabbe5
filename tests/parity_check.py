"""`edgequant parity` as a test assertion, shared by the tests that build a GGUF and check it in llama.cpp."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from edgequant.cli import main


def assert_parity(model_dir: Path, gguf_file: Path, text: Path, chunks: int = 4) -> None:
    """`edgequant parity` passes: llama.cpp computes what the GGUF's weights say (vs torch, with a noise floor), on
    `chunks` windows of 128 tokens."""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        rc = main(["parity", str(model_dir), str(gguf_file), "--text", str(text), "--ctx", "128", "--chunks", str(chunks),
                   "--threads", "2", "--device", "cpu", "--json"])
    r = json.loads(report.getvalue())
    assert rc == 0 and r["pass"], r["checks"]

"""`edgequant build --report`: a self-contained HTML page (inline SVG, no script), rendered by headless chromium."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import pytest

from edgequant.cli import main


@pytest.fixture(scope="module")
def report(tiny_llama, repo_root, tmp_path_factory):
    """tiny-llama Q4_K_M by GPTQ with --report and --json: (html text, summary dict, path)."""
    out = tmp_path_factory.mktemp("report")
    text = repo_root / "tests" / "fixtures" / "text" / "train.txt"
    argv = ["build", str(tiny_llama), "-t", "Q4_K_M", "--method", "gptq", "--calib", str(text), "--calib-samples", "8",
            "--calib-seqlen", "64", "--device", "cpu", "-o", str(out / "m.gguf"), "--report", str(out / "r.html"), "--json"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(argv) == 0
    return (out / "r.html").read_text(encoding="utf-8"), json.loads(stdout.getvalue()), out / "r.html"


def test_report_is_self_contained_and_shows_every_tensor(report):
    html, summary, _ = report
    assert "<script" not in html and not re.search(r"(src|href)=", html)  # nothing to fetch, nothing to run
    svgs = re.findall(r"<svg xmlns=.*?</svg>", html, flags=re.S)
    assert len(svgs) == 2  # type map, loss chart
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    type_map, losses = svgs
    for name, qtype in summary["recipe"].items():
        assert f"{qtype}</title>" in type_map, name  # every tensor has its cell, with its type
    for name, e in summary["gptq"].items():
        assert f"<title>{name}: GPTQ {e['gptq_loss']:.4g}, fit {e['fit_loss']:.4g}," in losses


def chromium_screenshot(page, png) -> str:
    """Render `page` (a file) to `png` in headless chromium; returns its log (stderr)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
                              "--window-size=1200,1600", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="chromium is not installed")
def test_report_renders_in_chromium(report, tmp_path):
    _, _, page = report
    log = chromium_screenshot(page, tmp_path / "report.png")
    assert "Uncaught" not in log
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    chromium_screenshot(blank, tmp_path / "blank.png")
    shot = (tmp_path / "report.png").read_bytes()
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    # an empty white page compresses to almost nothing; tables, a type map and a chart do not
    assert len(shot) > 5 * (tmp_path / "blank.png").stat().st_size

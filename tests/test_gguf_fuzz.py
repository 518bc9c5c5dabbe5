"""Malformed and hostile GGUF files: `edgequant inspect` answers exit 0 or one line on stderr with exit 2, in bounded
CPU time and memory; never a traceback, a hang or a huge allocation.

Hand-made headers aim at each count, length, type, dim and offset GGUFReader trusts; a seeded mutation run
(scripts/fuzz_gguf.py, whose machinery this reuses; the benchmark runs 10,000 cases) covers what they miss.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import struct
import sys
from pathlib import Path

import gguf
import pytest

from edgequant.convert.gguf_in import MAX_METADATA_ITEMS

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_gguf", REPO / "scripts" / "fuzz_gguf.py")
fuzz = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # registered first: it defines dataclasses
_spec.loader.exec_module(fuzz)

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def array(itype: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", itype, count) + items


def info(name: str | bytes, dims: list[int], qtype: int, offset: int = 0) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def gguf_bytes(kvs=(), infos=(), data=b"", *, version=3, n_kv=None, n_tensors=None, alignment=32) -> bytes:
    """A GGUF written by hand (little-endian), so that any field can be wrong."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


ARCH = kv("general.architecture", V.STRING, string("llama"))
F32_2x4 = info("w", [4, 2], Q.F32)


def inspect(tmp_path, data: bytes | None, as_json: bool = True) -> tuple[str, str]:
    path = tmp_path / "case.gguf"
    if data is not None:
        path.write_bytes(data)
    return fuzz.run_inspect(path, as_json=as_json)


def expect_error(tmp_path, data, fragment: str) -> None:
    outcome, detail = inspect(tmp_path, data)
    assert outcome == "error", detail
    assert fragment in detail, detail


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[Path]:
    return fuzz.make_seeds(tmp_path_factory.mktemp("seeds"))


def test_seeds_inspect_like_gguf_reader(seeds, capsys):
    """The checks accept what our writer, gguf-py's writer (both byte orders) write, and inspect reports them right."""
    from edgequant.cli import main

    for path in seeds:
        assert main(["inspect", str(path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        reader = gguf.GGUFReader(path)
        assert [(t["name"], t["shape"], t["type"], t["bytes"]) for t in shown["tensors"]] == [
            (t.name, t.shape.tolist(), t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors]
        assert shown["metadata"]["general.architecture"] == "llama"


def test_hand_made_baseline_is_valid(tmp_path):
    """The hand-made layout is right, so the failures below come from the one field each case breaks."""
    assert inspect(tmp_path, gguf_bytes([ARCH], [F32_2x4], bytes(32))) == ("ok", "")
    empty_array = kv("a", V.ARRAY, array(V.UINT32, 0))
    zero_rows = info("z", [4, 0], Q.F32)
    assert inspect(tmp_path, gguf_bytes([ARCH, empty_array], [zero_rows, info("w", [4, 2], Q.F32)], bytes(32))) \
        == ("ok", "")


@pytest.mark.parametrize("cut", [1, 4, 7, 20, 24, 40, 60, 100, -33, -1])
def test_truncated(tmp_path, cut):
    data = gguf_bytes([ARCH, kv("t", V.ARRAY, array(V.STRING, 2, string("ab") + string("c")))], [F32_2x4], bytes(32))
    outcome, detail = inspect(tmp_path, data[:cut])
    assert outcome == "error", detail


def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", "empty file")


def test_not_gguf(tmp_path):
    expect_error(tmp_path, b"PK\x03\x04 a zip, say", "starts with b'PK")


def test_directory(tmp_path):
    (tmp_path / "case.gguf").mkdir()
    expect_error(tmp_path, None, "is a directory")


def test_missing(tmp_path):
    expect_error(tmp_path, None, "no such file")


HOSTILE = {
    "array count past the end (GGUFReader loops on it)": (
        gguf_bytes([kv("k", V.ARRAY, array(V.UINT8, 2**40))]), "items of 'k'"),
    "string length past the end": (gguf_bytes([kv("k", V.STRING, struct.pack("<Q", 2**63))]), "value of 'k'"),
    "key length past the end": (gguf_bytes([struct.pack("<Q", 2**64 - 1)]), "key of metadata entry 0"),
    "array of arrays": (gguf_bytes([kv("k", V.ARRAY, array(V.ARRAY, 1, array(V.UINT8, 1, b"x")))]), "array of arrays"),
    "unknown value type": (gguf_bytes([kv("k", 13, b"")]), "not a known GGUFValueType"),
    "unknown array item type": (gguf_bytes([kv("k", V.ARRAY, array(99, 1))]), "not a known GGUFValueType"),
    "too many KV pairs": (gguf_bytes([ARCH], n_kv=2**63), "metadata entries"),
    "KV count past the end": (gguf_bytes([ARCH], n_kv=3, alignment=1), "key of metadata entry 1"),
    "too many tensors": (gguf_bytes([ARCH], n_tensors=2**40), "tensors"),
    "tensor count past the end": (gguf_bytes([ARCH], [F32_2x4], n_tensors=2, alignment=1), "name of tensor 1"),
    "empty key": (gguf_bytes([kv("", V.UINT8, b"\x01")]), "empty, repeated or reserved"),
    "repeated key": (gguf_bytes([ARCH, ARCH]), "empty, repeated or reserved"),
    "key GGUFReader uses itself": (gguf_bytes([kv("GGUF.kv_count", V.UINT8, b"\x01")]), "reserved"),
    "key not UTF-8": (gguf_bytes([kv(b"\xff\xfe", V.UINT8, b"\x01")]), "not UTF-8"),
    "alignment zero": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "power of two"),
    "alignment not a power of two": (
        gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "power of two"),
    "alignment of another type": (gguf_bytes([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "UINT32"),
    "version 1": (gguf_bytes([ARCH], version=1), "version 1"),
    "five dims": (gguf_bytes([ARCH], [info("w", [1] * 5, Q.F32)], bytes(32)), "5 dimensions"),
    "dims past the end": (gguf_bytes([ARCH], [string("w") + struct.pack("<IQ", 4, 8)]), "dimension 1 of 'w'"),
    "removed ggml type (Q4_2)": (gguf_bytes([ARCH], [info("w", [32], 4)], bytes(32)), "GGMLQuantizationType"),
    "dims overflowing int64": (gguf_bytes([ARCH], [info("w", [2**32] * 3, Q.F32)], bytes(32)), "needs bytes up to"),
    "empty tensor with a huge dim (numpy refuses the shape)": (
        gguf_bytes([ARCH], [info("w", [0, 2**62], Q.F32)]), "needs bytes up to"),
    "data past the end": (gguf_bytes([ARCH], [F32_2x4], bytes(31)), "needs bytes up to 160, the file has 159"),
    "data offset out of order": (gguf_bytes([ARCH], [info("w", [4, 2], Q.F32, 32)], bytes(64)), "expected 0"),
    "data offset huge": (gguf_bytes([ARCH], [info("w", [4, 2], Q.F32, 2**64 - 32)], bytes(32)), "expected 0"),
    "second tensor not padded": (
        gguf_bytes([ARCH], [info("a", [3], Q.F32), info("b", [3], Q.F32, 12)], bytes(64)), "expected 32"),
    "row not whole blocks": (gguf_bytes([ARCH], [info("w", [100], Q.Q4_K)], bytes(256)), "blocks of 256"),
    "no dims (GGUFReader cannot reshape BF16 then)": (gguf_bytes([ARCH], [info("w", [], Q.BF16)], bytes(32)), "0 dim"),
    "tensor name too long for llama.cpp": (gguf_bytes([ARCH], [info("w" * 64, [8], Q.F32)], bytes(32)), "63 bytes"),
    "tensor name not UTF-8": (gguf_bytes([ARCH], [info(b"\xc3", [8], Q.F32)], bytes(32)), "not UTF-8"),
    "tensor names repeated": (
        gguf_bytes([ARCH], [info("w", [8], Q.F32), info("w", [8], Q.F32, 32)], bytes(64)), "same name"),
    "name with line breaks stays on one line": (
        gguf_bytes([ARCH], [info("a\nb\x0cc\u2028", [8], Q.F32, 32)], bytes(64)), r"'a\nb\x0cc\u2028'"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_header(tmp_path, case):
    data, fragment = HOSTILE[case]
    expect_error(tmp_path, data, fragment)


def test_metadata_items_are_bounded(tmp_path):
    """An array under the file size but over the item budget: GGUFReader would spend ~12 µs and ~700 B per item."""
    n = MAX_METADATA_ITEMS + 1
    expect_error(tmp_path, gguf_bytes([kv("k", V.ARRAY, array(V.UINT8, n, bytes(n)))]), "metadata items")


def test_table_shows_hostile_text_literally(tmp_path, capsys):
    """Markup, terminal escapes and megabyte strings in metadata: the table shows them escaped and clipped."""
    from edgequant.cli import main

    data = gguf_bytes([ARCH, kv("tokenizer.chat_template", V.STRING, string("[/INST] [bold]x\x1b]0;title\x07")),
                       kv("big", V.STRING, string("y" * 2**20))], [F32_2x4], bytes(32))
    assert inspect(tmp_path, data, as_json=False) == ("ok", "")
    assert main(["inspect", str(tmp_path / "case.gguf")]) == 0
    out = capsys.readouterr().out
    assert "[/INST] [bold]x\\x1b]0;title\\x07" in out and "\x1b" not in out
    assert "(1,048,576 characters)" in out


def test_string_values_need_not_be_utf8(tmp_path, capsys):
    """llama.cpp does not check them either (raw-byte vocabularies): shown with U+FFFD, and field_value never raises."""
    from edgequant.cli import main
    from edgequant.convert.gguf_in import field_value, open_gguf

    tokens = kv("tokenizer.ggml.tokens", V.ARRAY, array(V.STRING, 2, string(b"\xff") + string("ok")))
    data = gguf_bytes([kv("general.architecture", V.STRING, string(b"ll\xfe")), tokens], [F32_2x4], bytes(32))
    assert inspect(tmp_path, data) == ("ok", "")
    assert main(["inspect", str(tmp_path / "case.gguf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["tokenizer.ggml.tokens"] == ["\ufffd", "ok"]
    reader = open_gguf(tmp_path / "case.gguf")
    assert field_value(reader, "general.architecture") == "ll\ufffd" and field_value(reader, "absent") is None


def test_harness_catches_crashes_hangs_and_blowups(tmp_path, monkeypatch):
    """`run_inspect` calls an exception a crash, and its limits stop a runaway loop and a huge allocation."""
    def reader_bug(path):
        raise IndexError("index 0 is out of bounds")

    monkeypatch.setattr("edgequant.commands.inspect.open_gguf", reader_bug)
    outcome, detail = inspect(tmp_path, gguf_bytes([ARCH]))
    assert outcome == "crash" and "IndexError" in detail
    with pytest.raises(fuzz.CaseTimeout), fuzz.limits(0.2):
        while True:
            pass
    before = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(MemoryError), fuzz.limits(5):
        bytearray(2 * fuzz.MEMORY_HEADROOM)
    assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_mutation_fuzz(seeds, tmp_path):
    """300 mutated seeds (the CI share of scripts/fuzz_gguf.py): only clean results, and both kinds of them."""
    loaded = [fuzz.load_seed(p) for p in seeds]
    outcomes = {}
    for case in range(300):
        outcome, detail, origin, _ = fuzz.run_case(loaded, 1234, case, tmp_path)
        assert outcome in ("ok", "error"), f"case {case} of seed 1234 ({origin}): {outcome} {detail}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ok", 0) >= 10 and outcomes.get("error", 0) >= 100, outcomes

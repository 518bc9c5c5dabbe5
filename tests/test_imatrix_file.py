"""Importance-matrix files (edgequant.convert.imatrix_file): both llama-imatrix formats, our writer, bad input."""

from __future__ import annotations

import pathlib
import shutil
import struct
import subprocess

import gguf
import numpy as np
import pytest

from edgequant.convert.imatrix_file import load_imatrix, read_imatrix, write_imatrix_gguf
from edgequant.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


def _stats():
    """A dense entry and a 3-expert stack whose middle expert saw no token."""
    dense = RNG.random(64, dtype=np.float32) * 50
    experts = RNG.random((3, 32), dtype=np.float32) * 9
    return {"blk.0.attn_q.weight": (dense, 300), "blk.1.ffn_down_exps.weight": (experts, np.array([17, 0, 5]))}


def _expected(stats):
    out = {}
    for name, (sum2, count) in stats.items():
        sum2 = np.atleast_2d(sum2).astype(np.float32)
        count = np.broadcast_to(np.asarray(count, np.float32).reshape(-1, 1), sum2.shape)
        out[name] = np.where(count > 0, sum2 / np.where(count > 0, count, 1), np.float32(1)).reshape(-1)
    return out


def _legacy_bytes(entries, trailer=(3, b"wiki.train.raw")):
    """The legacy .dat layout: entries are (name, ncall, stored values)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    if trailer is not None:
        chunks, dataset = trailer
        out += struct.pack("<ii", chunks, len(dataset)) + dataset
    return out


def test_gguf_round_trip(tmp_path):
    stats = _stats()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, stats, datasets=["wiki.train.raw"], chunk_count=4, chunk_size=512)
    loaded = load_imatrix(path)
    assert loaded.datasets == ("wiki.train.raw",)
    assert loaded.chunk_count == 4
    assert list(loaded.importance) == sorted(stats)
    for name, want in _expected(stats).items():
        got = loaded.importance[name]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert np.all(loaded.importance["blk.1.ffn_down_exps.weight"][32:64] == 1)  # expert without tokens


def test_gguf_layout_is_llama_imatrix_s(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, _stats(), datasets=["a.txt", "b.txt"], chunk_count=4, chunk_size=512)
    reader = gguf.GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    assert reader.fields["imatrix.chunk_size"].contents() == 512
    layout = [(t.name, t.tensor_type, [int(n) for n in t.shape]) for t in reader.tensors]
    F32 = gguf.GGMLQuantizationType.F32
    assert layout == [
        ("blk.0.attn_q.weight.in_sum2", F32, [64, 1]),
        ("blk.0.attn_q.weight.counts", F32, [1, 1]),
        ("blk.1.ffn_down_exps.weight.in_sum2", F32, [32, 3]),
        ("blk.1.ffn_down_exps.weight.counts", F32, [1, 3]),
    ]


def test_gguf_counts_round_half_away_from_zero(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, {"w": (np.full(32, 6.0), 2.5)}, datasets=["x"], chunk_count=1, chunk_size=1)
    np.testing.assert_array_equal(read_imatrix(path)["w"], np.full(32, 2.0, np.float32))  # 6 / lround(2.5) = 6 / 3


@pytest.mark.parametrize("trailer", [(3, b"wiki.train.raw"), None])
def test_legacy_dat(tmp_path, trailer):
    mean = RNG.random(64, dtype=np.float32) * 20
    stored = mean * np.float32(7)  # what llama-imatrix writes: mean * ncall
    raw = RNG.random(32, dtype=np.float32)
    path = tmp_path / "imatrix.dat"
    path.write_bytes(_legacy_bytes([("blk.0.ffn_up.weight", 7, stored), ("blk.0.attn_k.weight", 0, raw)], trailer))
    loaded = load_imatrix(path)
    np.testing.assert_array_equal(loaded.importance["blk.0.ffn_up.weight"], stored / np.float32(7))
    np.testing.assert_allclose(loaded.importance["blk.0.ffn_up.weight"], mean, rtol=1e-6)
    np.testing.assert_array_equal(loaded.importance["blk.0.attn_k.weight"], raw)  # ncall 0: as stored
    assert loaded.chunk_count == (3 if trailer else 0)
    assert loaded.datasets == (("wiki.train.raw",) if trailer else ())


def _gguf_with(tmp_path, tensors, *, imatrix_keys=True):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(path, arch="")
    if imatrix_keys:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


ones = np.ones((1, 32), np.float32)
BAD_GGUFS = {
    "model, not imatrix": ({"token_embd.weight": ones}, False, "not an imatrix"),
    "no entries": ({"unrelated": ones}, True, "no importance data"),
    "sums without counts": ({"w.in_sum2": ones}, True, "without its partner"),
    "f16 sums": ({"w.in_sum2": ones.astype(np.float16), "w.counts": np.ones((1, 1), np.float32)}, True, "F32"),
    "sums not per matrix": ({"w.in_sum2": ones, "w.counts": np.ones((3, 1), np.float32)}, True, "matrices"),
    "non-finite": ({"w.in_sum2": ones * np.inf, "w.counts": np.ones((1, 1), np.float32)}, True, "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_GGUFS))
def test_bad_gguf_is_a_user_error(tmp_path, case):
    tensors, keys, message = BAD_GGUFS[case]
    with pytest.raises(UserError, match=message):
        read_imatrix(_gguf_with(tmp_path, tensors, imatrix_keys=keys))


def test_truncated_gguf_is_a_user_error(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, _stats(), datasets=["x"], chunk_count=4, chunk_size=512)
    data = path.read_bytes()
    for cut in (3, 20, 100, len(data) // 2, len(data) - 40):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError):
            read_imatrix(path)


GOOD_DAT = _legacy_bytes([("w", 2, np.ones(32))])
BAD_DATS = {
    "empty": b"",
    "garbage": bytes(RNG.integers(0, 256, 4096, dtype=np.uint8)),
    "text": b"this is not an importance matrix\n" * 10,
    "no entries": struct.pack("<i", 0),
    "no values": _legacy_bytes([("w", 2, [])]),
    "truncated values": GOOD_DAT[:30],
    "trailing junk": GOOD_DAT + b"\x01\x02",
    "non-finite": _legacy_bytes([("w", 2, np.full(32, np.nan))]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATS))
def test_bad_legacy_file_is_a_user_error(tmp_path, case):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(BAD_DATS[case])
    with pytest.raises(UserError):
        read_imatrix(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_imatrix(tmp_path / "nope.gguf")


def _llama_imatrix() -> str | None:
    local = REPO / ".cache" / "llama-tools" / "bin" / "llama-imatrix"
    return str(local) if local.exists() else shutil.which("llama-imatrix")


@pytest.mark.shared
@pytest.mark.skipif(_llama_imatrix() is None, reason="llama-imatrix not built")
def test_llama_imatrix_reads_ours_and_writes_what_we_read(tmp_path):
    """llama-imatrix loads our GGUF and re-saves it in both formats; we read the same importance back."""
    ours = tmp_path / "ours.gguf"
    stats = _stats()
    write_imatrix_gguf(ours, stats, datasets=["calib.txt"], chunk_count=1, chunk_size=512)
    for out, fmt in ((tmp_path / "back.gguf", "gguf"), (tmp_path / "back.dat", "dat")):
        # -m is required but never opened: without a prompt llama-imatrix only combines --in-file matrices
        subprocess.run([_llama_imatrix(), "-m", str(tmp_path / "unused.gguf"), "--in-file", str(ours),
                        "-o", str(out), "--output-format", fmt], check=True, capture_output=True)
    back_gguf, back_dat = read_imatrix(tmp_path / "back.gguf"), read_imatrix(tmp_path / "back.dat")
    for name, want in _expected(stats).items():
        np.testing.assert_array_equal(back_gguf[name], want)
        np.testing.assert_allclose(back_dat[name], want, rtol=1e-6)  # via (mean * ncall) / ncall

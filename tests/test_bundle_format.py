"""Bundle header: round trip, and every kind of corrupt or lying header -> FlashFormatError
that names the path and says how to fix it."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from flashinfer_py._core import FlashFormatError
from flashinfer_py.bundles import BundleReader, BundleWriter, ReaderParams, read_header
from test_packer import pack_random

# Byte offsets of BundleHeader fields (csrc/bundle_format.h, packed, little-endian).
OFF = dict(magic=0, version=8, header_bytes=12, n_layers=16, d_model=20, d_ff=24, dtype=28,
           elem_bytes=32, n_parts=36, part_kinds=40, alignment=56, record_bytes=60,
           data_offset=68, file_bytes=76, down_layout=84, part_bytes=88, part_offsets=104)
V2_FIELDS = (84, 120)  # down_layout .. part_offsets[3]: zero in version 1 files


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "ffn_bundles.bin"
    pack_random(path, n_layers=2, d_model=200, d_ff=97, dtype="float16", n_parts=3)
    return path


def patch(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<" + fmt, value))


def expect_format_error(path, match):
    for opener in (read_header, BundleReader):
        with pytest.raises(FlashFormatError, match=match) as ei:
            opener(path)
        msg = str(ei.value)
        assert str(path) in msg and "re-run `flashinfer-py convert`" in msg, msg
        assert isinstance(ei.value, ValueError)


def test_header_round_trip(bundle):
    h = read_header(bundle)
    assert h == BundleReader(bundle).header
    assert h["magic"] == "FIPYBNDL" and h["version"] == 2 and h["header_bytes"] == 4096
    assert (h["n_layers"], h["d_model"], h["d_ff"]) == (2, 200, 97)
    assert (h["dtype"], h["elem_bytes"], h["n_parts"]) == ("float16", 2, 3)
    assert h["parts"] == ["up", "gate", "down"]
    assert (h["alignment"], h["record_bytes"], h["data_offset"]) == (4096, 4096, 4096)
    assert h["file_bytes"] == 4096 + 2 * 97 * 4096 == bundle.stat().st_size


def test_larger_alignment(tmp_path):
    path = tmp_path / "b.bin"
    with BundleWriter(path, 1, 3000, 5, "float32", ("up", "down"), alignment=8192) as w:
        assert w.header["record_bytes"] == 24576  # 24000 -> 3 x 8192
        w.write_layer(0, [np.zeros((5, 3000), np.float32)] * 2)
    h = read_header(path)
    assert (h["alignment"], h["data_offset"], h["record_bytes"]) == (8192, 8192, 24576)


@pytest.mark.parametrize("field,fmt,value,match", [
    ("magic", "8s", b"GGUF\0\0\0\0", "bad magic"),
    ("version", "I", 3, "version 3"),
    ("version", "I", 0, "version 0"),
    ("header_bytes", "I", 512, "header_bytes"),
    ("dtype", "I", 7, "unknown dtype"),
    ("elem_bytes", "I", 4, "elem_bytes 4 does not match dtype float16"),
    ("n_parts", "I", 4, "n_parts=4"),
    ("n_parts", "I", 1, "n_parts=1"),
    ("part_kinds", "I", 3, "part kinds"),
    ("alignment", "I", 1000, "alignment 1000"),
    ("alignment", "I", 256, "alignment 256"),
    ("record_bytes", "Q", 4000, "record_bytes 4000"),
    ("record_bytes", "Q", 0, "record_bytes 0"),
    ("data_offset", "Q", 100, "data_offset 100"),
    ("file_bytes", "Q", 12345, "file_bytes=12345"),
    ("d_ff", "I", 98, "file_bytes="),          # lies about the shape: sizes disagree
    ("n_layers", "I", 0, "empty dimensions"),
    ("record_bytes", "Q", 1 << 62, "record_bytes 4611686018427387904 is not the parts'"),
    ("record_bytes", "Q", 8192, "record_bytes 8192 is not the parts' 1200 bytes rounded up"),
    ("alignment", "I", 1 << 21, "alignment 2097152 is not a power of two in \\[512, 1048576\\]"),
    ("part_bytes", "I", 401, "part 0 has 401 bytes"),       # parts must be what dtype says
    ("part_offsets", "I", 4, "part 0 has 400 bytes at offset 4"),
    ("down_layout", "I", 1, "down_layout 1"),                # codes need a block format
    ("down_layout", "I", 7, "down_layout 7"),
])
def test_lying_header_rejected(bundle, field, fmt, value, match):
    patch(bundle, OFF[field], fmt, value)
    expect_format_error(bundle, match)


def test_record_count_times_size_overflow_rejected(bundle):
    patch(bundle, OFF["n_layers"], "I", 0xFFFFFFFF)
    patch(bundle, OFF["d_ff"], "I", 0xFFFFFFFF)  # n_layers * d_ff * 4096 wraps 64 bits
    expect_format_error(bundle, "overflow")


def test_version_1_files_still_open(tmp_path, bundle):
    """A version 1 header (float formats, equal parts, zeros after file_bytes) reads as the
    version 2 header of the same file, and its records as before."""
    want = read_header(bundle)
    records = BundleReader(bundle).read(1, [0, 96, 5])
    patch(bundle, OFF["version"], "I", 1)
    with open(bundle, "r+b") as f:
        f.seek(V2_FIELDS[0])
        f.write(bytes(V2_FIELDS[1] - V2_FIELDS[0]))
    old = read_header(bundle)
    assert old["version"] == 1 and {**old, "version": 2} == want
    assert BundleReader(bundle).read(1, [0, 96, 5]).tobytes() == records.tobytes()
    patch(bundle, OFF["dtype"], "I", 4)  # block formats came with version 2
    expect_format_error(bundle, "unknown dtype code 4")


def test_lying_block_format_header_rejected(tmp_path):
    path = tmp_path / "q.bin"
    pack_random(path, n_layers=1, d_model=200, d_ff=96, dtype="q4_1", down_layout="codes")
    assert read_header(path)["part_bytes"] == [140, 140, 112]
    patch(path, OFF["part_bytes"] + 8, "I", 140)  # down as whole blocks, but layout says codes
    expect_format_error(path, "part 2 has 140 bytes")
    patch(path, OFF["part_bytes"] + 8, "I", 112)
    patch(path, OFF["elem_bytes"], "I", 2)
    expect_format_error(path, "elem_bytes 2 does not match dtype q4_1")


def test_truncated_file_rejected(bundle):
    size = bundle.stat().st_size
    with open(bundle, "r+b") as f:
        f.truncate(size - 1)
    expect_format_error(bundle, "truncated")


def test_file_smaller_than_header_rejected(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"FIPYBNDL")
    expect_format_error(path, "too small")


def test_unfinished_file_has_no_valid_header(tmp_path):
    path = tmp_path / "b.bin"
    w = BundleWriter(path, 1, 16, 8, "float32", ("up", "down"))
    w.write_layer(0, [np.ones((8, 16), np.float32)] * 2)
    expect_format_error(path, "bad magic")  # header is written by finish() only
    w.finish()
    assert read_header(path)["d_ff"] == 8


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(OSError, match="nope.bin"):
        read_header(tmp_path / "nope.bin")
    with pytest.raises(OSError, match="nope.bin"):
        BundleReader(tmp_path / "nope.bin")


def test_512_aligned_file_needs_buffered_reads(tmp_path):
    path = tmp_path / "b.bin"
    with BundleWriter(path, 1, 100, 4, "float16", ("up", "down"), alignment=512) as w:
        w.write_layer(0, [np.full((4, 100), 1.5, np.float16)] * 2)
    assert read_header(path)["record_bytes"] == 512
    r = BundleReader(path, ReaderParams(use_direct_io=False))
    assert r.read(0, [3])[0, :200].tolist() == [1.5] * 200
    direct = None
    try:
        direct = BundleReader(path)
    except FlashFormatError as e:
        assert "use_direct_io=False" in str(e) and str(path) in str(e)
    if direct is not None:  # the filesystem refused O_DIRECT: buffered anyway
        assert not direct.is_direct

"""Pack -> read round trips of bundle files, bit-exact against the numpy arrays packed.

Also home of the small packing helpers the other I/O tests import (`pack_random`,
`expected_records`)."""
from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from flashinfer_py._core import FlashIOError
from flashinfer_py.bundles import (BundleReader, BundleWriter, ReaderParams, read_header,
                                   storage_numpy_dtype)

SEED = 20251125
DTYPES = ("float32", "float16", "bfloat16")
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks
PARTS = {2: ("up", "down"), 3: ("up", "gate", "down")}


# ---- helpers shared by the I/O tests ----------------------------------------------------------

def part_width(dtype, d_model, codes=False):
    """Elements of one part in its numpy array: d_model for floats; bytes for block formats
    (blocks of 32 values, the last one padded; the "codes" down part: 4 or 8 bits a value)."""
    if dtype not in BLOCK_BYTES:
        return d_model
    blocks = -(-d_model // 32)
    if codes:
        return blocks * (32 if dtype == "q8_0" else 16)
    return blocks * BLOCK_BYTES[dtype]


def random_part(rng, d_ff, d_model, dtype, codes=False):
    """A (d_ff, part width) matrix in storage dtype (bfloat16 as arbitrary uint16 bit patterns,
    block formats as arbitrary bytes: the file format does not look inside a part)."""
    if dtype == "bfloat16":
        return rng.integers(0, 1 << 16, size=(d_ff, d_model), dtype=np.uint16)
    if dtype in BLOCK_BYTES:
        return rng.integers(0, 256, size=(d_ff, part_width(dtype, d_model, codes)),
                            dtype=np.uint8)
    return rng.standard_normal((d_ff, d_model)).astype(storage_numpy_dtype(dtype))


def pack_random(path, n_layers=3, d_model=200, d_ff=97, dtype="float16", n_parts=3,
                seed=SEED, alignment=4096, down_layout="blocks"):
    """Write a random bundle file; returns mats[layer][part] -> (d_ff, part width) arrays."""
    rng = np.random.default_rng(seed)
    codes = [down_layout == "codes" and p == n_parts - 1 for p in range(n_parts)]
    mats = [[random_part(rng, d_ff, d_model, dtype, codes[p]) for p in range(n_parts)]
            for _ in range(n_layers)]
    with BundleWriter(path, n_layers, d_model, d_ff, dtype, PARTS[n_parts], alignment,
                      down_layout=down_layout) as w:
        for layer in reversed(range(n_layers)):  # any order is allowed
            w.write_layer(layer, mats[layer])
    return mats


def expected_records(mats, layer, ids, record_elems):
    """(len(ids), record_elems) records as the file must hold them: parts back to back, then
    zeros."""
    parts = mats[layer]
    out = np.zeros((len(ids), record_elems), dtype=parts[0].dtype)
    for k, i in enumerate(ids):
        row = np.concatenate([m[i] for m in parts])
        out[k, :row.size] = row
    return out


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + tuple(BLOCK_BYTES))
@pytest.mark.parametrize("n_parts", [2, 3])
def test_round_trip_bit_exact(tmp_path, dtype, n_parts):
    path = tmp_path / "b.bin"
    n_layers, d_ff = 3, 97
    mats = pack_random(path, n_layers=n_layers, d_ff=d_ff, dtype=dtype, n_parts=n_parts)
    r = BundleReader(path)
    assert r.numpy_dtype == storage_numpy_dtype(dtype)
    rng = np.random.default_rng(SEED + 1)
    cases = [(0, []), (1, [5]), (2, list(range(d_ff))), (0, [40, 3, 96, 0, 17, 18, 19]),
             (n_layers - 1, [d_ff - 1]), (1, rng.permutation(d_ff)[:30].tolist())]
    for layer, ids in cases:
        out = r.read(layer, np.array(ids, dtype=np.int64))
        want = expected_records(mats, layer, ids, r.record_elems)
        assert out.shape == want.shape
        assert out.tobytes() == want.tobytes(), (layer, ids)


def test_header_matches_what_was_packed(tmp_path):
    path = tmp_path / "b.bin"
    pack_random(path, n_layers=2, d_model=200, d_ff=97, dtype="float32", n_parts=2)
    h = read_header(path)
    assert (h["n_layers"], h["d_model"], h["d_ff"], h["dtype"]) == (2, 200, 97, "float32")
    assert h["parts"] == ["up", "down"] and h["record_bytes"] == 4096
    assert os.path.getsize(path) == h["file_bytes"] == 4096 + 2 * 97 * 4096


def test_offsets_are_the_one_formula(tmp_path):
    path = tmp_path / "b.bin"
    mats = pack_random(path, d_model=1100, dtype="float32", n_parts=3)  # 13200 B -> 16384
    r = BundleReader(path)
    h = r.header
    assert r.record_bytes == 16384
    raw = path.read_bytes()
    for layer, i in [(0, 0), (1, 50), (2, 96)]:
        off = r.offset(layer, i)
        assert off == h["data_offset"] + (layer * h["d_ff"] + i) * h["record_bytes"]
        want = expected_records(mats, layer, [i], r.record_elems)
        assert raw[off:off + r.record_bytes] == want.tobytes()
    with pytest.raises(ValueError, match=r"neuron id 97 out of range \[0, 97\)"):
        r.offset(0, 97)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        r.offset(3, 0)


@pytest.mark.parametrize("dtype,d_model,layout,part_bytes", [
    # 200 values: 7 blocks (the last holds 8 values and 24 zeros)
    ("q8_0", 200, "blocks", [238, 238, 238]),
    ("q4_0", 200, "blocks", [126, 126, 126]),
    ("q4_1", 200, "blocks", [140, 140, 140]),
    # the codes layout: down holds 4 or 8 bits a value, padded to 32 values (224 here)
    ("q4_1", 200, "codes", [140, 140, 112]),
    ("q8_0", 200, "codes", [238, 238, 224]),
    # d_model 4096 in q4_0: 3 x 2304 bytes, two 4 KiB pages a neuron instead of six in float16
    ("q4_0", 4096, "blocks", [2304, 2304, 2304]),
])
def test_block_format_records(tmp_path, dtype, d_model, layout, part_bytes):
    path = tmp_path / "b.bin"
    mats = pack_random(path, n_layers=2, d_model=d_model, d_ff=96, dtype=dtype,
                       down_layout=layout)
    h = read_header(path)
    assert (h["dtype"], h["elem_bytes"], h["down_layout"]) == (dtype, 1, layout)
    assert h["part_bytes"] == part_bytes and h["payload_bytes"] == sum(part_bytes)
    assert h["part_offsets"] == [0, part_bytes[0], part_bytes[0] + part_bytes[1]]
    assert h["record_bytes"] == -(-sum(part_bytes) // 4096) * 4096
    r = BundleReader(path)
    assert r.numpy_dtype == np.uint8 and r.record_elems == h["record_bytes"]
    ids = [95, 0, 31, 32]
    assert r.read(1, ids).tobytes() == expected_records(mats, 1, ids, r.record_elems).tobytes()
    out = r.read_parts(1, ids, [2, 0])  # parts of unequal size, back to back
    assert out.tobytes() == np.concatenate([mats[1][2][ids], mats[1][0][ids]], axis=1).tobytes()


def test_codes_layout_needs_a_block_format_and_whole_neuron_blocks(tmp_path):
    with pytest.raises(ValueError, match="needs a block format"):
        BundleWriter(tmp_path / "b.bin", 1, 64, 96, "float16", down_layout="codes")
    with pytest.raises(ValueError, match="d_ff a multiple of 32"):
        BundleWriter(tmp_path / "b.bin", 1, 64, 97, "q4_1", down_layout="codes")
    with pytest.raises(ValueError, match='"blocks" or "codes"'):
        BundleWriter(tmp_path / "b.bin", 1, 64, 96, "q4_1", down_layout="rows")


def test_bfloat16_travels_as_uint16(tmp_path):
    path = tmp_path / "b.bin"
    mats = pack_random(path, dtype="bfloat16", n_parts=2)
    assert mats[0][0].dtype == np.uint16
    r = BundleReader(path)
    assert r.read(0, [3]).dtype == np.uint16


# ---- rejected arguments -----------------------------------------------------------------------

def test_duplicate_and_out_of_range_ids_rejected_before_io(tmp_path):
    path = tmp_path / "b.bin"
    pack_random(path)
    r = BundleReader(path)
    calls = r.stats().calls
    with pytest.raises(ValueError, match="duplicate neuron id 7"):
        r.read(0, [7, 1, 7])
    with pytest.raises(ValueError, match=r"neuron id 97 .*out of range \[0, 97\)"):
        r.read(0, [1, 97])
    with pytest.raises(ValueError, match=r"neuron id -1 .*out of range"):
        r.read(0, [-1])
    with pytest.raises(ValueError, match="layer 3 out of range"):
        r.read(3, [0])
    with pytest.raises(ValueError, match="integers"):
        r.read(0, np.array([1.0, 2.0]))
    assert r.stats().calls == calls  # nothing was issued


def test_writer_rejects_bad_parts(tmp_path):
    w = BundleWriter(tmp_path / "b.bin", 2, 200, 97, "float16", ("up", "down"))
    good = np.zeros((97, 200), np.float16)
    with pytest.raises(ValueError, match="dtype float32 but the bundle stores float16"):
        w.write_layer(0, [good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"shape \(d_ff, d_model\)"):
        w.write_layer(0, [good, good[:, :100]])
    with pytest.raises(ValueError, match="C-contiguous"):
        w.write_layer(0, [good, np.zeros((200, 97), np.float16).T])
    with pytest.raises(ValueError, match="expected 2 parts"):
        w.write_layer(0, [good])
    w.write_layer(0, [good, good])
    with pytest.raises(ValueError, match="already written"):
        w.write_layer(0, [good, good])
    with pytest.raises(ValueError, match="layer 1 of 2 was never written"):
        w.finish()
    w.abort()
    assert not (tmp_path / "b.bin").exists()
    with pytest.raises(ValueError, match="parts must be"):
        BundleWriter(tmp_path / "c.bin", 1, 8, 8, "float16", ("down", "up"))
    with pytest.raises(ValueError, match="dtype"):
        BundleWriter(tmp_path / "c.bin", 1, 8, 8, "int8", ("up", "down"))
    q = BundleWriter(tmp_path / "d.bin", 1, 200, 97, "q4_0", ("up", "down"))
    blocks = np.zeros((97, 126), np.uint8)
    with pytest.raises(ValueError, match=r"dtype float16 but the bundle stores q4_0 \(pass its "
                                         r"blocks as uint8 rows\)"):
        q.write_layer(0, [blocks, np.zeros((97, 200), np.float16)])
    with pytest.raises(ValueError, match=r"shape \(d_ff, part bytes\) = \(97, 126\)"):
        q.write_layer(0, [blocks, blocks[:, :120].copy()])
    q.abort()


def test_writer_context_manager_removes_partial_file(tmp_path):
    path = tmp_path / "b.bin"
    with pytest.raises(RuntimeError):
        with BundleWriter(path, 2, 16, 8, "float32", ("up", "down")) as w:
            w.write_layer(0, [np.zeros((8, 16), np.float32)] * 2)
            raise RuntimeError("conversion failed")
    assert not path.exists()


# ---- read_parts: the unbundled ablation -------------------------------------------------------

@pytest.mark.parametrize("d_model,dtype", [(200, "float16"), (1024, "float32")])
def test_read_parts_equals_slices(tmp_path, d_model, dtype):
    # 200 x f16: 400-byte parts, unaligned (bounced); 1024 x f32: 4096-byte parts, aligned.
    path = tmp_path / "b.bin"
    mats = pack_random(path, d_model=d_model, dtype=dtype, n_parts=3)
    for params in (ReaderParams(), ReaderParams(use_direct_io=False)):
        r = BundleReader(path, params)
        ids = [96, 0, 13, 14, 50]
        for parts in ([0], [2], [0, 2], [2, 1, 0]):
            out = r.read_parts(1, ids, parts)
            want = np.concatenate([mats[1][p][ids] for p in parts], axis=1)
            assert out.tobytes() == want.tobytes(), (parts, params)
            assert r.last_stats.reads_issued == len(ids) * len(parts)
            assert r.last_stats.bytes_requested == want.nbytes


# ---- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs mount (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_writer_on_full_disk_raises_flash_io_error(tiny_tmpfs):
    path = tiny_tmpfs / "b.bin"
    w = BundleWriter(path, 4, 200, 97, "float16", ("up", "gate", "down"))  # 4 x 388 KiB
    part = np.ones((97, 200), np.float16)
    with pytest.raises(FlashIOError, match="disk is full") as ei:
        for layer in range(4):
            w.write_layer(layer, [part, part, part])
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, OSError)
    # errno travels with the exception: callers test it instead of matching the message
    assert ei.value.errno == errno.ENOSPC and ei.value.strerror.startswith("writing")
    assert ei.value.path == str(path) and ei.value.offset >= 4096
    w.abort()

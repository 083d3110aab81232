"""`flashinfer-py bench-disk` and the raw-range reads under it: grid shape, JSON, the test
file's lifecycle, the not-enough-space error, the plot. Speeds are never asserted."""
from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple

import numpy as np
import pytest

from flashinfer_py import bench_disk as bd
from flashinfer_py.bundles import BundleReader, ReaderParams, aligned_empty
from flashinfer_py.cli import main

MiB = 1 << 20
TINY = ["--sizes", "4K", "16K", "--depths", "1", "4", "--seconds", "0.2", "--file-size", "16MB",
        "--quiet"]


def test_cli_json_grid_and_file_removed(tmp_path, capsys):
    assert main(["bench-disk", str(tmp_path), "--json", *TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"path", "file_size", "sizes", "depths", "engines", "seconds_per_cell", "unit", "gbps",
            "cells", "environment"} <= out.keys()
    assert out["sizes"] == [4096, 16384] and out["depths"] == [1, 4]
    assert out["file_size"] == 16 * MiB
    assert out["engines"] == bd.available_engines()
    for e in out["engines"]:
        grid = out["gbps"][e]
        assert len(grid) == 2 and all(len(row) == 2 for row in grid)
        assert all(v > 0 for row in grid for v in row)
    assert len(out["cells"]) == 4 * len(out["engines"])
    for c in out["cells"]:
        assert {"engine", "size", "depth", "gbps", "gbps_sd", "iops", "calls", "reads",
                "seconds", "direct"} <= c.keys()
        assert c["reads"] > 0 and c["iops"] > 0
    env = out["environment"]
    assert {"date", "load_avg", "load_avg_after", "cpu", "kernel", "build", "cold"} <= env.keys()
    assert not (tmp_path / bd.FILE_NAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_tables(tmp_path, capsys):
    assert main(["bench-disk", str(tmp_path), *TINY, "--engines", "threads"]) == 0
    text = capsys.readouterr().out
    assert "threads (GB/s" in text and "io_uring" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| size | QD1 | QD4 |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 4 KiB", "| 16 KiB"]
    assert all(float(v) > 0 for r in rows[1:] for v in r.strip("| ").split(" | ")[1:])
    assert not (tmp_path / bd.FILE_NAME).exists()


def test_keep_reuses_the_file(tmp_path, capsys):
    kw = dict(sizes=[4096], depths=[2], engines=["threads"], seconds=0.05, file_size=8 * MiB,
              progress=False)
    bd.run(tmp_path, keep=True, **kw)
    path = tmp_path / bd.FILE_NAME
    assert "kept the test file" in capsys.readouterr().err
    first = path.stat()
    bd.run(tmp_path, keep=True, **kw)  # same size: reused, not rewritten
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    bd.run(tmp_path, keep=False, **kw)  # reused once more, then deleted
    assert not path.exists()


def test_not_enough_space(tmp_path, monkeypatch, capsys):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * MiB, 9 * MiB, MiB))
    with pytest.raises(bd.NotEnoughSpaceError, match="not enough free space.*--file-size"):
        bd.run(tmp_path, sizes=[4096], depths=[1], seconds=0.05, file_size=16 * MiB,
               progress=False)
    assert main(["bench-disk", str(tmp_path), *TINY]) == 1
    assert "not enough free space on the filesystem of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, match", [
    (dict(sizes=[1000]), "multiple of 4 KiB"),
    (dict(depths=[0]), "depth 0"),
    (dict(engines=["aio"]), "unknown engine"),
    (dict(seconds=0), "seconds"),
])
def test_bad_grid(tmp_path, bad, match):
    kw = dict(sizes=[4096], depths=[1], seconds=0.05, file_size=4 * MiB, progress=False)
    with pytest.raises(ValueError, match=match):
        bd.run(tmp_path, **{**kw, **bad})
    assert list(tmp_path.iterdir()) == []


def _fake_result():
    r = bd.DiskBenchResult(path="x", file_size=MiB, sizes=[4096, 8192], depths=[1, 2],
                           engines=["threads"], seconds=0.1, environment={"date": "2026-01-01"})
    for s in r.sizes:
        for d in r.depths:
            r.cells.append(bd.Cell("threads", s, d, 0.1 * d, 0.0, 1.0, 1, 1, 0.1, True))
    return r


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    bd.plot(_fake_result(), tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r'pip install "flashinfer_py\[bench\]"'):
        bd.plot(_fake_result(), tmp_path / "fig.png")
    # The CLI checks before measuring anything.
    assert main(["bench-disk", str(tmp_path), *TINY, "--plot", str(tmp_path / "f.png")]) == 1
    assert 'pip install "flashinfer_py[bench]"' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- BundleReader.read_ranges ---------------------------------------------------------------

@pytest.mark.parametrize("engine", bd.available_engines())
def test_read_ranges_matches_the_file(tmp_path, engine):
    path = bd.make_test_file(tmp_path, 4 * MiB, progress=False)
    raw = path.read_bytes()
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=3))
    offs = np.array([0, 3 * 8192, 8192, len(raw) - 8192, 40960])
    out = r.read_ranges(offs, 8192)
    for k, o in enumerate(offs):
        assert out[k * 8192:(k + 1) * 8192].tobytes() == raw[o:o + 8192]
    assert r.last_stats.reads_issued == 5 and r.last_stats.bytes_read == 5 * 8192
    buf = aligned_empty(2 * 4096, np.uint8)
    assert r.read_ranges([4096, 0], 4096, buf) is buf
    assert buf[4096:].tobytes() == raw[:4096]
    with pytest.raises(ValueError, match="past the end"):
        r.read_ranges([len(raw) - 4096], 8192)
    with pytest.raises(ValueError, match="smaller than one"):
        r.read_ranges([0, 4096], 8192, aligned_empty(4096, np.uint8))
    if r.is_direct:
        with pytest.raises(ValueError, match="unaligned"):
            r.read_ranges([512], 4096)


def test_read_ranges_reuses_a_small_out_round_robin(tmp_path):
    path = bd.make_test_file(tmp_path, 1 * MiB, progress=False)
    raw = path.read_bytes()
    r = BundleReader(path, ReaderParams(engine="threads", queue_depth=1))  # in order
    out = aligned_empty(2 * 4096, np.uint8)
    r.read_ranges([0, 4096, 8192], 4096, out)  # ranges 0 and 2 share slot 0: 2 lands last
    assert out[:4096].tobytes() == raw[8192:12288]
    assert out[4096:].tobytes() == raw[4096:8192]
    assert r.last_stats.reads_issued == 3

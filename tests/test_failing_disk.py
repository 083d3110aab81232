"""A failing disk, for real: a flash directory served by a FUSE file system (tests/faultyfs.py,
a process of its own) that answers chosen reads with EIO or short counts. Reads failing in the
middle of a generation raise FlashIOError with the file and offset, nothing hangs, and the same
model object works again once reads succeed; short reads are completed."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flashinfer_py as fi
from flashinfer_py._core import FlashIOError, build_info

pytest.importorskip("mfusepy")  # and libfuse3: `make test` installs both
ENGINES = ["threads"] + (["io_uring"] if build_info()["io_uring"] else [])
SPARSE = dict(sparse=True, selection="oracle", eviction="window", window=2)
PROMPT = list(range(5, 13))


@pytest.fixture
def faulty(tiny_flash, tmp_path):
    """(mountpoint mirroring the tiny ReLU model, set_faults(name -> [faults]))."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("no /dev/fuse or fusermount3 (Debian's fuse3) here")
    mnt, control = tmp_path / "mnt", tmp_path / "faults.json"
    mnt.mkdir()
    control.write_text("{}")
    log = open(tmp_path / "fuse.txt", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "faultyfs.py"),
                             str(tiny_flash("llama-relu")), str(mnt), str(control)],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not os.path.ismount(mnt):
        proc.kill()
        pytest.skip(f"cannot mount a FUSE file system here: {(tmp_path / 'fuse.txt').read_text()}")

    def set_faults(faults: dict) -> None:
        control.write_text(json.dumps(faults))

    try:
        yield mnt, set_faults
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        proc.terminate()
        proc.wait(timeout=10)


def _tokens(model) -> list:
    return [s.token for s in model.generate_step(PROMPT, 8, stop_at_eos=False)]


@pytest.mark.parametrize("engine", ENGINES)
def test_eio_mid_generation_raises_then_the_same_model_works_again(faulty, tiny_flash, engine):
    mnt, set_faults = faulty
    want = _tokens(fi.load(tiny_flash("llama-relu"), **SPARSE, io_engine=engine))
    model = fi.load(mnt, **SPARSE, io_engine=engine)
    size = (mnt / "ffn_bundles.bin").stat().st_size
    steps = model.generate_step(PROMPT, 8, stop_at_eos=False)
    next(steps), next(steps)
    set_faults({"ffn_bundles.bin": [{"start": 4096, "end": size, "kind": "eio"}]})
    t0 = time.monotonic()
    with pytest.raises(FlashIOError) as ei:
        list(steps)
    assert time.monotonic() - t0 < 30  # raised, not hung
    e = ei.value
    assert e.errno == errno.EIO and e.path == str(mnt / "ffn_bundles.bin")
    assert 4096 <= e.offset < size and f"offset {e.offset}" in str(e)
    set_faults({})
    assert _tokens(model) == want


@pytest.mark.parametrize("engine", ENGINES)
def test_short_reads_are_completed(faulty, tiny_flash, engine, tmp_path):
    mnt, set_faults = faulty
    want = _tokens(fi.load(tiny_flash("llama-relu"), **SPARSE, io_engine=engine))
    size = (mnt / "ffn_bundles.bin").stat().st_size
    set_faults({"ffn_bundles.bin": [{"start": 4096, "end": size, "kind": "short"}]})
    assert _tokens(fi.load(mnt, **SPARSE, io_engine=engine)) == want
    reads = [line.split() for line in (tmp_path / "faults.json.log").read_text().splitlines()]
    short = [r for r in reads if r[0] == "ffn_bundles.bin" and int(r[1]) >= 4096
             and int(r[3]) < int(r[2])]
    assert short  # short answers were given (and the tokens above say they were completed)


def test_a_dense_file_that_cannot_be_read_is_named(faulty):
    mnt, set_faults = faulty
    set_faults({"dense.safetensors": [{"start": 0, "end": 1 << 40, "kind": "eio"}]})
    with pytest.raises(FlashIOError) as ei:
        fi.load(mnt)
    e = ei.value
    assert e.errno == errno.EIO and e.path == str(mnt / "dense.safetensors") and e.offset == 0
    assert "dense.safetensors" in str(e)

"""The read engines: O_DIRECT vs buffered, fallback on tmpfs, buffer validation, coalescing,
both engines, a kernel that refuses io_uring (the thread pool, with a note), and worker errors
surfacing on the caller."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from flashinfer_py._core import FlashIOError, build_info, testing
from flashinfer_py.bundles import BundleReader, ReaderParams, aligned_empty
from test_packer import expected_records, pack_random

ENGINES = ["threads"] + (["io_uring"] if build_info()["io_uring"] else [])
D_FF = 97


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "ffn_bundles.bin"
    mats = pack_random(path, n_layers=3, d_model=200, d_ff=D_FF, dtype="float16", n_parts=3)
    return path, mats


def direct_reader(path, **kw):
    r = BundleReader(path, ReaderParams(**kw))
    if not r.is_direct:
        pytest.skip(f"{path.parent} refuses O_DIRECT")
    return r


# ---- direct == buffered ----------------------------------------------------------------------

@pytest.mark.odirect
@pytest.mark.parametrize("engine", ENGINES)
def test_direct_equals_buffered_and_raw_file(bundle, engine):
    path, mats = bundle
    d = direct_reader(path, engine=engine)
    b = BundleReader(path, ReaderParams(engine=engine, use_direct_io=False))
    assert d.engine == engine and not b.is_direct
    assert d.stats().direct and not b.stats().direct
    raw = path.read_bytes()
    ids = np.random.default_rng(3).permutation(D_FF)[:41]
    for layer in range(3):
        x, y = d.read(layer, ids), b.read(layer, ids)
        assert x.tobytes() == y.tobytes()
        assert d.last_stats.direct and not b.last_stats.direct
        for k, i in enumerate(ids):  # vs plain Python reads at the offset function
            off = d.offset(layer, int(i))
            assert x[k].tobytes() == raw[off:off + d.record_bytes]


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree(bundle, engine):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=4))
    ids = [96, 1, 2, 3, 50, 0]
    assert r.read(2, ids).tobytes() == expected_records(mats, 2, ids, r.record_elems).tobytes()


# ---- buffered fallback (tmpfs on older kernels, ramfs) --------------------------------------

def _refuses_odirect(directory) -> bool:
    probe = os.path.join(directory, f".odirect_probe_{os.getpid()}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
        os.close(fd)
        return False
    except OSError:
        return True
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


@pytest.fixture
def no_odirect_dir(tmp_path):
    """A directory whose filesystem refuses O_DIRECT: /dev/shm where tmpfs still does (kernels
    before 6.6), else a ramfs mount (needs root), else skip."""
    if os.path.isdir("/dev/shm") and _refuses_odirect("/dev/shm"):
        d = tmp_path.__class__(f"/dev/shm/flashinfer_test_{os.getpid()}")
        d.mkdir()
        yield d
        subprocess.run(["rm", "-rf", str(d)], check=False)
        return
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True)
    if res.returncode != 0 or not _refuses_odirect(mnt):
        pytest.skip("no filesystem that refuses O_DIRECT is available")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_fallback_to_buffered_with_one_warning(bundle, no_odirect_dir, capfd):
    path, mats = bundle
    copy = no_odirect_dir / "ffn_bundles.bin"
    copy.write_bytes(path.read_bytes())
    capfd.readouterr()
    r = BundleReader(copy)
    err = capfd.readouterr().err
    assert not r.is_direct
    assert err.count("falling back to buffered I/O") == 1 and str(copy) in err
    assert not r.stats().direct
    out = np.zeros((3, r.record_elems), np.float16)  # buffered: no alignment required
    r.read(1, [5, 0, 96], out)
    assert out.tobytes() == expected_records(mats, 1, [5, 0, 96], r.record_elems).tobytes()
    assert not r.last_stats.direct
    BundleReader(copy, ReaderParams(use_direct_io=False))  # not asked for: no warning
    assert "falling back" not in capfd.readouterr().err


# ---- destination validation -------------------------------------------------------------------

@pytest.mark.odirect
def test_misaligned_out_rejected_with_fix_it(bundle):
    path, _ = bundle
    r = direct_reader(path)
    n, rb = 3, r.record_bytes
    raw = aligned_empty(n * rb + 4096, np.uint8)
    misaligned = raw[512:512 + n * rb].view(np.float16).reshape(n, -1)
    with pytest.raises(ValueError, match="4096-byte aligned.*aligned_empty"):
        r.read(0, [0, 1, 2], misaligned)
    odd_stride = aligned_empty((n, r.record_elems + 8), np.float16)
    with pytest.raises(ValueError, match="row stride .* multiple of 4096"):
        r.read(0, [0, 1, 2], odd_stride)


def test_bad_out_shapes_rejected(bundle):
    path, _ = bundle
    r = BundleReader(path)
    with pytest.raises(ValueError, match="rows hold .* bytes but each needs 4096"):
        r.read(0, [0, 1], aligned_empty((2, 100), np.float16))
    with pytest.raises(ValueError, match="has 3 rows but 2 ids"):
        r.read(0, [0, 1], r.empty(3))
    with pytest.raises(ValueError, match="2-D"):
        r.read(0, [0, 1], aligned_empty(2 * r.record_elems, np.float16))
    with pytest.raises(ValueError, match="contiguous"):
        r.read(0, [0, 1], aligned_empty((r.record_elems * 2, 2), np.float16).T)
    ro = r.empty(2)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        r.read(0, [0, 1], ro)


def test_strided_and_unaligned_destinations(bundle):
    path, mats = bundle
    ids = [4, 5, 6, 90]
    want = expected_records(mats, 0, ids, 2048).tobytes()
    r = BundleReader(path)
    wide = r.empty(len(ids) * 2).reshape(len(ids), -1)[:, :r.record_elems]  # stride 2 records
    assert r.read(0, ids, wide).tobytes() == want
    # Buffered reads take any contiguous rows, even unaligned ones.
    b = BundleReader(path, ReaderParams(use_direct_io=False))
    raw = aligned_empty(len(ids) * r.record_bytes + 64, np.uint8)
    out = raw[2:2 + len(ids) * r.record_bytes].view(np.float16).reshape(len(ids), -1)
    assert b.read(0, ids, out).tobytes() == want


# ---- coalescing and request splitting -----------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_coalescing_gives_identical_bytes(bundle, engine):
    path, mats = bundle
    rng = np.random.default_rng(11)
    ids_sets = [rng.choice(D_FF, 30, replace=False), np.arange(10, 40), np.arange(40)[::-1],
                np.array([0, 2, 4, 6, 96])]
    outs = {}
    for gap in (0, 4096, 3 * 4096, 1 << 30):
        for max_read in (4096, 8192, 1 << 20):
            r = BundleReader(path, ReaderParams(engine=engine, coalesce_gap_bytes=gap,
                                                max_read_bytes=max_read))
            outs[gap, max_read] = [r.read(1, ids).tobytes() for ids in ids_sets]
    first = next(iter(outs.values()))
    assert all(v == first for v in outs.values())
    assert first[0] == expected_records(mats, 1, ids_sets[0], 2048).tobytes()


def test_coalescing_stats(bundle):
    path, _ = bundle
    rb = 4096
    r = BundleReader(path, ReaderParams(coalesce_gap_bytes=0))
    r.read(0, np.arange(10, 20))
    assert (r.last_stats.reads_issued, r.last_stats.bytes_read) == (1, 10 * rb)
    r.read(0, [0, 2, 4])
    assert (r.last_stats.reads_issued, r.last_stats.bytes_read) == (3, 3 * rb)
    r = BundleReader(path, ReaderParams(coalesce_gap_bytes=rb))
    r.read(0, [4, 0, 2])
    assert (r.last_stats.reads_issued, r.last_stats.bytes_read) == (1, 5 * rb)
    assert r.last_stats.bytes_requested == 3 * rb
    r = BundleReader(path, ReaderParams(max_read_bytes=2 * rb))
    r.read(0, np.arange(10))
    assert (r.last_stats.reads_issued, r.last_stats.bytes_read) == (5, 10 * rb)
    s = r.stats()
    assert s.calls == 1 and s.bytes_requested == 10 * rb
    r.reset_stats()
    assert r.stats().calls == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_scratch_stays_within_its_cap_in_rounds(bundle, engine):
    """Gap-merged runs, consecutive ids bound for rows that are not adjacent, and unaligned
    parts all land in the scratch buffer first: a call needing more than scratch_cap runs in
    rounds that reuse it, with the same bytes as a call that needs no scratch at all."""
    path, mats = bundle
    rb = 4096
    every_other = np.arange(1, D_FF, 2)  # one record of gap between each: one merged run
    consecutive = np.arange(D_FF)
    for max_read, max_scratch in ((4096, 1), (8192, 4096), (3 * 4096, 5 * 4096), (1 << 20, 1 << 20)):
        r = BundleReader(path, ReaderParams(engine=engine, coalesce_gap_bytes=rb,
                                            max_read_bytes=max_read,
                                            max_scratch_bytes=max_scratch))
        cap = r.scratch_cap
        assert cap == max(max_scratch, rb)  # (all multiples of 4096 here)
        got = r.read(2, every_other)
        assert got.tobytes() == expected_records(mats, 2, every_other, 2048).tobytes()
        if max_read == 1 << 20:  # the gaps were read: one merged run per request
            assert r.last_stats.bytes_read == (D_FF - 2) * rb
            assert r.last_stats.reads_issued == -(-(D_FF - 2) * rb // max_read)
        assert r.scratch_bytes <= cap
        wide = r.empty(D_FF * 2).reshape(D_FF, -1)[:, :r.record_elems]  # rows 2 records apart
        r.read(1, consecutive, wide)
        assert wide.tobytes() == expected_records(mats, 1, consecutive, 2048).tobytes()
        assert r.scratch_bytes <= cap
        parts = r.read_parts(0, consecutive[::-1], [2, 0])  # 400-byte parts: all via scratch
        want = expected_records(mats, 0, consecutive[::-1], 2048)
        assert parts.tobytes() == np.concatenate([want[:, 400:600], want[:, :200]], 1).tobytes()
        assert 0 < r.scratch_bytes <= cap  # (uncapped, the parts alone needed D_FF * 8 KiB)


@pytest.mark.parametrize("engine", ENGINES)
def test_rounds_with_several_runs_direct_and_scratch(bundle, engine):
    """One call whose runs are mixed: adjacent ids read straight into their rows, and pairs
    one record apart merged through the scratch buffer, two such runs per round, more
    requests per round (about four) than the queue depth (2). Same bytes as one round with
    an unbounded scratch, the scratch within its cap, and the rounds counted."""
    path, mats = bundle
    rb = 4096
    ids = np.array([i for b in range(0, D_FF - 8, 10) for i in (b, b + 1, b + 2, b + 5, b + 7)])
    want = expected_records(mats, 1, ids, 2048).tobytes()
    spans = len(ids) // 5 * (3 + 3) * rb  # three direct records and a 3-record merged span
    one = BundleReader(path, ReaderParams(engine=engine, coalesce_gap_bytes=rb,
                                          max_read_bytes=3 * rb, max_scratch_bytes=1 << 30))
    assert one.read(1, ids).tobytes() == want
    assert one.last_stats.rounds == 1 and one.last_stats.bytes_read == spans
    r = BundleReader(path, ReaderParams(engine=engine, coalesce_gap_bytes=rb, queue_depth=2,
                                        max_read_bytes=3 * rb, max_scratch_bytes=7 * rb))
    got = r.read(1, ids)
    assert got.tobytes() == want
    st = r.last_stats
    assert st.bytes_read == spans and st.reads_issued == 2 * (len(ids) // 5)  # a read a run
    assert st.rounds == -(-(len(ids) // 5) // 2)  # two merged spans fill a round's 7 records
    assert r.scratch_bytes <= r.scratch_cap == 7 * rb
    # the reader's cumulative stats add the rounds up
    assert r.stats().rounds == st.rounds


def test_scratch_cap_rounds_up_to_a_page(bundle):
    """A bound that is not a multiple of 4096 is rounded up (the buffer's granularity), so
    scratch_cap is what the buffer can really reach."""
    path, mats = bundle
    r = BundleReader(path, ReaderParams(max_scratch_bytes=5000))
    assert r.scratch_cap == 8192
    ids = np.arange(D_FF)
    parts = r.read_parts(0, ids, [2, 0])
    want = expected_records(mats, 0, ids, 2048)
    assert parts.tobytes() == np.concatenate([want[:, 400:600], want[:, :200]], 1).tobytes()
    assert r.scratch_bytes <= r.scratch_cap
    if r.is_direct:  # each unaligned part reads its aligned page through scratch: 2 a round
        assert r.last_stats.rounds == D_FF


def test_reader_params_validated(bundle):
    path, _ = bundle
    with pytest.raises(ValueError, match="engine must be"):
        BundleReader(path, ReaderParams(engine="aio"))
    with pytest.raises(ValueError, match="queue_depth"):
        BundleReader(path, ReaderParams(queue_depth=0))
    with pytest.raises(ValueError, match="max_read_bytes"):
        BundleReader(path, ReaderParams(max_read_bytes=100))
    with pytest.raises(ValueError, match=r"max_read_bytes must be in \[4096, 1073741824\]"):
        BundleReader(path, ReaderParams(max_read_bytes=(1 << 32) + 4096))  # io_uring: 32 bits


# ---- errors from workers ----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_truncated_after_open_raises_from_worker(bundle, engine):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=8))
    keep = r.offset(1, 0)  # layers 1 and 2 vanish after the header was validated
    os.truncate(path, keep)
    ids = np.arange(0, D_FF, 3)  # 33 separate requests, spread over the workers
    with pytest.raises(FlashIOError, match="end of file") as ei:
        r.read(1, ids)
    assert str(path) in str(ei.value)
    assert ei.value.errno is None  # no OS error: the file is shorter than its header says
    assert ei.value.path == str(path) and ei.value.offset >= keep
    # The engine is still usable afterwards.
    assert r.read(0, [1, 50]).tobytes() == expected_records(mats, 0, [1, 50], 2048).tobytes()


def test_thread_pool_rethrows_first_worker_error():
    with pytest.raises(FlashIOError, match="injected failure at item 5") as ei:
        testing.parallel_for_fail(8, 1000, 5)
    assert ei.value.path is None and ei.value.offset is None
    assert testing.parallel_for_fail(8, 1000, 10**6) == 1000  # no failure: every item runs


REFUSED = r"""
import os, resource, sys
import numpy as np
from flashinfer_py.bundles import BundleReader, ReaderParams
from flashinfer_py.errors import FlashIOError
path, engine = sys.argv[1], sys.argv[2]

def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False

# Leave exactly one free file descriptor: the bundle file takes it, and io_uring_setup, which
# needs one of its own, is refused by the kernel (EMFILE), as a container's seccomp would.
free = [fd for fd in range(4096) if not is_open(fd)][:2]
limits = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (free[1], limits[1]))
try:
    r = BundleReader(path, ReaderParams(engine=engine))
except FlashIOError as e:
    print("refused:", e)
    sys.exit(0)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
print("engine:", r.engine)
sys.stdout.flush()
np.save(sys.stdout.buffer, r.read(0, [5, 1, 2]))
"""


@pytest.mark.skipif(not build_info()["io_uring"], reason="built without io_uring")
def test_refused_io_uring_falls_back_to_threads_with_a_note(bundle, tmp_path):
    path, mats = bundle
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    run = subprocess.run([sys.executable, str(script), str(path), "auto"], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()
    out = run.stdout
    assert out.startswith(b"engine: threads\n")
    rows = np.load(io.BytesIO(out[len(b"engine: threads\n"):]))
    assert rows.tobytes() == expected_records(mats, 0, [5, 1, 2], rows.shape[1]).tobytes()
    note = [ln for ln in run.stderr.decode().splitlines() if "io_uring" in ln]
    assert len(note) == 1 and "thread" in note[0] and "Too many open files" in note[0], note
    # asked for io_uring explicitly: an error that says why, not a silent fallback
    run = subprocess.run([sys.executable, str(script), str(path), "io_uring"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("refused:")
    assert "io_uring_queue_init" in run.stdout and "Too many open files" in run.stdout

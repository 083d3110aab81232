"""Reads that fail, come back short, or never complete, injected inside the native reader
(csrc/failpoints.h, compiled in by `make test`): what FUSE cannot reach, such as an io_uring
completion that carries an error or never arrives.

Every failure must raise FlashIOError with errno, file and offset, hang nothing, and leave the
reader (and a model over it) working once reads succeed again.
"""
from __future__ import annotations

import errno
import gc
import time
import weakref

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py._core import FlashIOError, build_info, testing
from flashinfer_py.bundles import BundleReader, ReadAhead, ReaderParams
from test_direct_io import D_FF, ENGINES
from test_packer import expected_records, pack_random

pytestmark = pytest.mark.skipif(not build_info()["failpoints"],
                                reason="built without -DFLASHINFER_FAILPOINTS=ON (make test has it)")
URING = pytest.mark.skipif("io_uring" not in ENGINES, reason="built without io_uring")
ERROR_POINT = {"threads": "pread_error", "io_uring": "uring_cqe_error"}
SHORT_POINT = {"threads": "pread_short", "io_uring": "uring_short"}


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "ffn_bundles.bin"
    return path, pack_random(path, n_layers=3, d_model=200, d_ff=D_FF, dtype="float16", n_parts=3)


@pytest.fixture(autouse=True)
def disarmed():
    yield
    for name in testing.failpoint_names():
        testing.arm_failpoint(name, count=0)


def _record_offsets(r, layer):
    return {r.offset(layer, i) for i in range(D_FF)}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_read_names_errno_file_and_offset_and_the_reader_recovers(bundle, engine):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=4))
    ids = np.arange(0, D_FF, 2)  # 49 separate requests: the 6th fails, the others are in flight
    testing.arm_failpoint(ERROR_POINT[engine], skip=5, count=1, value=errno.EIO)
    with pytest.raises(FlashIOError) as ei:
        r.read(1, ids)
    e = ei.value
    assert e.errno == errno.EIO and isinstance(e, OSError)
    assert e.path == str(path) and e.offset in _record_offsets(r, 1)
    assert f"offset {e.offset}" in str(e) and "Input/output error" in str(e)
    assert testing.failpoint_fired(ERROR_POINT[engine]) == 1
    again = r.read(1, ids)  # the same reader, the same buffers: all good now
    assert again.tobytes() == expected_records(mats, 1, ids, r.record_elems).tobytes()
    assert r.engine == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_ahead_that_fails_raises_at_wait_and_the_worker_goes_on(bundle, engine):
    """The worker thread's error travels to the caller as the same FlashIOError (issue 16)."""
    from flashinfer_py.bundles import ReadAhead

    path, mats = bundle
    ra = ReadAhead(path, ReaderParams(engine=engine, queue_depth=4), max_records=D_FF)
    ids = np.arange(0, D_FF, 2)
    testing.arm_failpoint(ERROR_POINT[engine], skip=5, count=1, value=errno.EIO)
    ra.start(0, 1, ids)
    with pytest.raises(FlashIOError) as ei:
        ra.wait(0)
    assert ei.value.errno == errno.EIO and ei.value.path == str(path)
    assert ra.record(1, 0) is None  # a failed slot holds nothing
    ra.start(0, 1, ids)
    ra.wait(0)
    rec = BundleReader(path).record_elems
    assert ra.record(1, 4) == expected_records(mats, 1, [4], rec)[0].tobytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_failing_in_a_later_scratch_round_raises_and_the_reader_recovers(bundle, engine):
    """Gap-merged runs of three records through a scratch of three: one round per run. A
    failure in a later round raises with its offset; the next call reuses the scratch."""
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=4, coalesce_gap_bytes=4096,
                                        max_scratch_bytes=3 * 4096))
    ids = np.arange(1, 40, 2)  # 10 runs (1, 3), (5, 7), ...: 10 rounds of one read each
    testing.arm_failpoint(ERROR_POINT[engine], skip=7, count=1, value=errno.EIO)
    with pytest.raises(FlashIOError) as ei:
        r.read(2, ids)
    assert ei.value.errno == errno.EIO and ei.value.offset is not None
    assert testing.failpoint_fired(ERROR_POINT[engine]) == 1
    again = r.read(2, ids)
    assert again.tobytes() == expected_records(mats, 2, ids, r.record_elems).tobytes()
    assert r.last_stats.reads_issued == 10 and r.scratch_bytes == r.scratch_cap == 3 * 4096


@pytest.mark.parametrize("engine", ENGINES)
def test_short_reads_are_resumed_to_the_last_byte(bundle, engine):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine=engine, queue_depth=4))
    ids = np.arange(10, 60)  # runs of many records: one request each, cut into 4 KiB pieces
    testing.arm_failpoint(SHORT_POINT[engine], count=-1, value=4096)
    got = r.read(0, ids)
    assert testing.failpoint_fired(SHORT_POINT[engine]) >= len(ids) - 1
    assert got.tobytes() == expected_records(mats, 0, ids, r.record_elems).tobytes()


@URING
def test_a_ring_that_refuses_is_drained_before_it_is_replaced(bundle):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine="io_uring", queue_depth=8))
    ids = np.arange(0, D_FF, 3)  # 33 requests, 8 in the kernel when the ring refuses
    testing.arm_failpoint("uring_submit", skip=1, count=1, value=errno.EBADF)
    with pytest.raises(FlashIOError, match="io_uring_submit") as ei:
        r.read(2, ids)
    assert ei.value.errno == errno.EBADF and ei.value.path == str(path)
    assert r.engine == "io_uring"  # on a fresh ring
    assert r.read(2, ids).tobytes() == expected_records(mats, 2, ids, r.record_elems).tobytes()


@URING
def test_a_read_that_never_completes_times_out_instead_of_hanging(bundle):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine="io_uring", queue_depth=4, read_timeout_ms=300))
    ids = np.arange(0, D_FF, 2)
    testing.arm_failpoint("uring_lost", skip=3, count=1)  # one completion never arrives
    t0 = time.monotonic()
    with pytest.raises(FlashIOError, match="did not complete within 300 ms") as ei:
        r.read(0, ids)
    assert time.monotonic() - t0 < 10
    assert ei.value.errno == errno.ETIMEDOUT and ei.value.offset in _record_offsets(r, 0)
    assert r.read(0, ids).tobytes() == expected_records(mats, 0, ids, r.record_elems).tobytes()


def test_unknown_failpoints_are_refused():
    with pytest.raises(ValueError, match="no failpoint named 'nope'"):
        testing.arm_failpoint("nope")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_generation_whose_reads_fail_raises_then_the_model_works_again(tiny_flash, engine):
    """Mid-generation, from flash: the error reaches the caller with the bundle file named;
    afterwards the same model object generates exactly what a fresh one does (ReLU + the
    oracle selection is exact, so the cache's history cannot change the tokens)."""
    d = tiny_flash("llama-relu")
    kw = dict(sparse=True, selection="oracle", eviction="window", window=2, io_engine=engine)
    prompt = list(range(5, 13))
    want = [s.token for s in fi.load(d, **kw).generate_step(prompt, 8, stop_at_eos=False)]
    model = fi.load(d, **kw)
    steps = model.generate_step(prompt, 8, stop_at_eos=False)
    next(steps), next(steps)  # two tokens in, then the disk fails
    testing.arm_failpoint(ERROR_POINT[engine], count=-1, value=errno.EIO)
    with pytest.raises(FlashIOError) as ei:
        list(steps)
    assert ei.value.errno == errno.EIO and ei.value.path.endswith("ffn_bundles.bin")
    testing.arm_failpoint(ERROR_POINT[engine], count=0)
    assert [s.token for s in model.generate_step(prompt, 8, stop_at_eos=False)] == want


def test_a_failed_swap_under_rank_refuses_to_go_on_without_the_lost_neurons(tiny_flash,
                                                                           tmp_path_factory):
    """eviction="rank": a read failing after the newcomers left the sketch store leaves them
    in neither tier; the model says so and asks to be loaded again instead of running
    without them unnoticed."""
    from test_rank import rank_budget, sketch_dir

    d, _ = sketch_dir(tiny_flash, tmp_path_factory)
    m = fi.load(d, dram_budget=rank_budget(d, 0.3), io_engine="threads")
    prompt = list(range(5, 13))
    m.logits(prompt)  # warm: the cache is full, the next tokens swap
    testing.arm_failpoint("pread_error", count=-1, value=errno.EIO)
    with pytest.raises(FlashIOError):
        m.logits(prompt[::-1])
    testing.arm_failpoint("pread_error", count=0)
    with pytest.raises(FlashIOError, match="Load the model again"):
        m.logits(prompt)
    assert "Load the model again" in m.unusable()
    fresh = fi.load(d, dram_budget=rank_budget(d, 0.3), io_engine="threads")
    assert np.isfinite(fresh.logits(prompt)).all()


# ---- a read the device never answers: the kernel may write it at any time, so whatever
# memory it targets is never freed or reused (BundleReader::abandoned, csrc/bundle_reader.h).
# uring_lost withholds a completion; cancelling cannot end it, so the reader abandons the
# ring; testing.late_writes then plays the write such a device could still make.

def _abandoned(read, skip=3):
    testing.late_writes(0)  # forget earlier tests' abandoned reads (into memory kept alive)
    testing.arm_failpoint("uring_lost", skip=skip, count=1)
    with pytest.raises(FlashIOError) as ei:
        read()
    assert ei.value.errno == errno.ETIMEDOUT
    return ei.value.path


@URING
def test_an_abandoned_read_never_frees_the_callers_array(bundle):
    path, mats = bundle
    r = BundleReader(path, ReaderParams(engine="io_uring", queue_depth=4, read_timeout_ms=200))
    ids = np.arange(0, D_FF, 2)  # one request per record
    out = r.empty(len(ids))
    alive = weakref.ref(out)
    _abandoned(lambda: r.read(0, ids, out))
    assert r._r.abandoned == 1
    del out
    gc.collect()
    out = alive()
    assert out is not None  # the caller dropped it; the reader's reference is never released
    written = testing.late_writes(0xAB)
    assert written >= r.record_bytes  # the withheld record's row, in that array
    rows = out.view(np.uint8).reshape(len(ids), -1)
    assert sum(bool((row == 0xAB).all()) for row in rows) == written // r.record_bytes
    assert r.read(0, ids).tobytes() == expected_records(mats, 0, ids, r.record_elems).tobytes()


@URING
def test_reading_ahead_after_an_abandoned_read_lands_in_fresh_staging(bundle):
    """The late write must not reach the records the slot holds next: before the fix the
    slot's staging was reused and the 0xAB bytes replaced records already read."""
    path, mats = bundle
    ra = ReadAhead(path, ReaderParams(engine="io_uring", queue_depth=4, read_timeout_ms=200),
                   max_records=60, n_slots=1)
    ids = np.arange(0, D_FF, 2)

    def first():
        ra.start(0, 1, ids)
        ra.wait(0)

    _abandoned(first)
    ra.start(0, 1, ids)
    ra.wait(0)
    assert testing.late_writes(0xAB) > 0
    want = expected_records(mats, 1, ids, BundleReader(path).record_elems)
    for k, i in enumerate(ids):
        assert ra.record(1, int(i)) == want[k].tobytes(), i


@URING
def test_a_model_whose_cache_read_was_abandoned_refuses_to_go_on(tiny_flash):
    """The neuron cache's rows may still be written: the model raises the read's error, then
    refuses to compute on those rows, and never frees them (the late write after the model is
    dropped hits nothing live: a fresh model computes exactly what it should)."""
    d = tiny_flash("llama-relu")
    kw = dict(sparse=True, selection="oracle", eviction="window", window=2,
              io_engine="io_uring", read_timeout_ms=200)
    prompt = list(range(5, 13))
    want = fi.load(d, **kw).logits(prompt)
    m = fi.load(d, **kw)
    m.logits(prompt[:4])
    assert _abandoned(lambda: m.logits(prompt), skip=2).endswith("ffn_bundles.bin")
    with pytest.raises(FlashIOError, match="load the model again"):  # an I/O failure, not a
        m.logits(prompt)                                              # bad argument
    assert "abandoned" in m.unusable()
    pytest.importorskip("fastapi")
    from flashinfer_py.server import Server

    health = Server(m, "tiny").health()  # a supervisor sees it (HTTP 503) and restarts
    assert health["status"] == "error" and "abandoned" in health["error"]
    del m
    gc.collect()
    assert testing.late_writes(0xAB) > 0
    np.testing.assert_array_equal(fi.load(d, **kw).logits(prompt), want)


@URING
@pytest.mark.parametrize("ablation", ["naive", "predictor"])
def test_the_rows_without_reuse_are_not_read_into_again_after_an_abandoned_read(tiny_flash,
                                                                                ablation):
    """No reuse across tokens (the paper's first rows): one buffer is read into for every
    layer and token. After an abandoned read the next tokens get a fresh one, so the late
    write lands in memory nothing computes on: the model goes on with exact logits."""
    d = tiny_flash("llama-relu")
    kw = dict(ablation=ablation, selection="oracle", io_engine="io_uring", read_timeout_ms=200)
    prompt = list(range(5, 13))
    want = fi.load(d, **kw).logits(prompt)
    m = fi.load(d, **kw)
    old = m.ffn.layer_rows
    _abandoned(lambda: m.logits(prompt), skip=2)
    # the device may write `old` at any time, between a read and the product on it too:
    # the next reads go elsewhere (before, into `old` again)
    assert not np.shares_memory(m.ffn.layer_rows, old)
    assert testing.late_writes(0xAB) > 0
    assert bool((old.view(np.uint8) == 0xAB).any())  # the late write landed in `old`, alive
    np.testing.assert_array_equal(m.logits(prompt), want)
    assert m.unusable() is None

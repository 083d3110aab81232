"""ReadAhead (csrc/async_reads.h): records read on a worker thread into staging slots, and the
neuron cache landing them from there (set_source) byte-identically to reading them itself.
Real files, direct I/O where the filesystem allows it, both read engines."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from flashinfer_py.bundles import BundleReader, ReadAhead, ReaderParams
from flashinfer_py.cache import NeuronCache
from test_direct_io import ENGINES
from test_packer import expected_records, pack_random

D_FF, D_MODEL, N_LAYERS = 97, 200, 3


@pytest.fixture(params=["float16", "q4_0"])
def bundle(tmp_path, request):
    path = tmp_path / "ffn_bundles.bin"
    return path, pack_random(path, n_layers=N_LAYERS, d_model=D_MODEL if request.param ==
                             "float16" else 256, d_ff=D_FF, dtype=request.param, n_parts=3)


@pytest.mark.parametrize("engine", ENGINES)
def test_slots_hold_the_records_after_wait_only(bundle, engine):
    path, mats = bundle
    ra = ReadAhead(path, ReaderParams(engine=engine, queue_depth=4), max_records=40)
    r = BundleReader(path)
    assert ra.engine == engine
    ids0 = np.array([5, 96, 0, 17, 18, 19, 40])
    ids1 = np.random.default_rng(0).choice(D_FF, 40, replace=False)
    ra.start(0, 1, ids0)
    ra.start(1, 2, ids1)  # queued behind slot 0
    assert ra.record(1, 5) is None  # not waited: never visible, landed or not
    st = ra.wait(0)
    assert st.bytes_requested == len(ids0) * r.record_bytes
    for k, i in enumerate(ids0):
        want = expected_records(mats, 1, [i], r.record_elems)[0].tobytes()
        assert ra.record(1, int(i)) == want
    assert ra.record(1, 1) is None and ra.record(2, 5) is None  # not read / other layer
    ra.wait(1)
    for i in ids1:
        assert ra.record(2, int(i)) == expected_records(mats, 2, [i], r.record_elems)[0].tobytes()
    assert ra.busy_ns(0) > 0 and ra.busy_ns(1) > 0
    assert ra.wait(0).bytes_requested == st.bytes_requested  # idempotent
    ra.release(0)
    assert ra.record(1, 5) is None
    assert ra.wait(0).bytes_requested == 0  # idle slot


def test_bad_jobs_are_refused_before_anything_is_queued(bundle):
    path, _ = bundle
    ra = ReadAhead(path, max_records=4, n_slots=1)
    with pytest.raises(ValueError, match="at most max_records"):
        ra.start(0, 0, np.arange(5))
    with pytest.raises(ValueError, match="duplicate neuron id 3"):
        ra.start(0, 0, [1, 3, 3])
    with pytest.raises(ValueError, match="out of range"):
        ra.start(0, 0, [D_FF])
    with pytest.raises(ValueError, match="layer 3 out of range"):
        ra.start(0, N_LAYERS, [1])
    with pytest.raises(ValueError, match="slot 1 out of range"):
        ra.start(1, 0, [1])
    ra.start(0, 0, [1, 2])
    with pytest.raises(ValueError, match="wait"):
        ra.start(0, 0, [3])  # the slot's job was never waited for
    ra.wait(0)
    assert ra.record(0, 1) is not None and ra.record(0, 3) is None
    ra.start(0, 0, [3])  # a waited slot is reused; its old records are gone
    ra.wait(0)
    assert ra.record(0, 1) is None and ra.record(0, 3) is not None
    with pytest.raises(ValueError, match="max_records must be in"):
        ReadAhead(path, max_records=D_FF + 1)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("packed", [False, True])
def test_the_cache_lands_read_ahead_records_byte_identically(bundle, engine, packed):
    """replace/insert copy what a waited slot holds and read the rest; the rows equal the
    records either way, and the cache counts the copies."""
    path, mats = bundle
    params = ReaderParams(engine=engine, queue_depth=8)
    reader = BundleReader(path, params)
    cache = NeuronCache(reader, capacity=60, packed=packed)
    ra = ReadAhead(path, params, max_records=30)
    cache.set_source(ra)
    rng = np.random.default_rng(1)
    copied = 0
    for step in range(12):
        layer = step % N_LAYERS
        held_l = [int(i) for i in cache.ids(layer)]
        absent = np.setdiff1d(np.arange(D_FF), held_l)
        load = rng.choice(absent, min(len(absent), int(rng.integers(0, 25))), replace=False)
        evict = rng.choice(held_l, min(len(held_l), int(rng.integers(0, 25))), replace=False) \
            if held_l else np.empty(0, np.int64)
        while len(held_l) - len(evict) + len(load) > 60:
            load = load[:-1]
        # ahead: some of the loads plus neurons that will not be loaded (wasted reads)
        ahead = np.unique(np.concatenate([load[::2], rng.choice(absent, 5, replace=False)]))[:30]
        ra.start(step % 2, layer, ahead)
        ra.wait(step % 2)
        before = cache.stats()["from_source"]
        cache.replace(layer, evict, np.sort(load))
        got = cache.stats()["from_source"] - before
        assert got == np.isin(load, ahead).sum()
        copied += got
        ids = cache.ids(layer)
        assert sorted(ids.tolist()) == sorted(set(held_l) - set(evict.tolist()) | set(load.tolist()))
        rows = cache.rows(layer)
        assert rows.tobytes() == expected_records(mats, layer, ids, rows.shape[1]).tobytes()
        ra.release(step % 2)
    assert copied > 0
    cache.set_source(None)
    cache.clear(0)
    cache.insert(0, [1, 2, 3])
    assert cache.stats()["from_source"] == copied


def test_a_slot_read_while_the_caller_computes_does_not_hold_the_gil(bundle):
    """start() returns before the reads land; Python keeps running meanwhile (the worker
    needs no GIL), and wait() from another thread gets the same records."""
    path, mats = bundle
    ra = ReadAhead(path, ReaderParams(queue_depth=2), max_records=D_FF)
    ra.start(0, 0, np.arange(D_FF))
    out = {}
    t = threading.Thread(target=lambda: out.update(st=ra.wait(0)))
    t.start()
    t.join(30)
    assert not t.is_alive() and out["st"].bytes_requested > 0
    rec = BundleReader(path).record_elems
    assert ra.record(0, 42) == expected_records(mats, 0, [42], rec)[0].tobytes()

"""NeuronCache driven by scripted and randomized insert/evict/replace sequences, and by the
compiled CacheDriver following the set-based reference policies, checked after every step
against a dict reference model: slot<->id bijection, row bytes, bias."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from flashinfer_py._bookkeeping import CacheDriver
from flashinfer_py.bundles import BundleReader, ReaderParams
from flashinfer_py.cache import NeuronCache
from flashinfer_py.errors import FlashIOError
from flashinfer_py.ffn import TokenStats
from flashinfer_py.window import FrequencyPolicy, SlidingWindow
from policy_reference import FrequencyReference, WindowReference
from test_packer import expected_records, pack_random

D_FF, D_MODEL, N_LAYERS = 97, 200, 3


@pytest.fixture(params=["float16", "float32"])
def bundle(tmp_path, request):
    path = tmp_path / "ffn_bundles.bin"
    mats = pack_random(path, n_layers=N_LAYERS, d_model=D_MODEL, d_ff=D_FF,
                       dtype=request.param, n_parts=3)
    return path, mats


def check(cache, layer, model, mats, bias_all=None):
    """Exact state: n_used, bijection slot<->id, each row = its neuron's record, bias follows."""
    ids = cache.ids(layer)
    assert cache.n_used(layer) == len(model) == len(ids)
    assert sorted(ids.tolist()) == sorted(model)
    for slot, nid in enumerate(ids.tolist()):
        assert cache.slot_of(layer, nid) == slot and cache.contains(layer, nid)
    for nid in set(range(D_FF)) - set(model):
        assert cache.slot_of(layer, nid) == -1
    rows = cache.rows(layer)
    assert rows.tobytes() == expected_records(mats, layer, ids, rows.shape[1]).tobytes()
    want_bias = bias_all[ids] if bias_all is not None else np.zeros(len(ids), np.float32)
    np.testing.assert_array_equal(cache.bias(layer), want_bias)


def test_scripted_sequence(bundle):
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=6)
    bias = np.arange(D_FF, dtype=np.float32) * 0.5 - 7
    cache.set_layer_bias(1, bias)
    model: list[int] = []
    steps = [
        ("insert", [3, 1, 4]),      # unsorted
        ("evict", [1]),             # middle slot: last row (4) moves in
        ("evict", [4]),             # now the last slot: nothing moves
        ("insert", [96, 0, 50]),    # last neuron of the layer
        ("insert", [10, 11]),       # fills to capacity (6)
        ("evict", [3, 10, 96]),
        ("insert", [1, 2, 5]),      # full again
        ("evict", [0, 1, 2, 5, 50, 11]),  # empty
        ("insert", [7]),
    ]
    for op, ids in steps:
        getattr(cache, op)(1, ids)
        model = model + ids if op == "insert" else [m for m in model if m not in ids]
        check(cache, 1, model, mats, bias)
        assert cache.n_used(0) == 0 and cache.n_used(2) == 0  # other layers untouched


def test_errors_leave_the_cache_unchanged(bundle):
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=[4, 2, 0])
    cache.insert(0, [5, 6, 7])
    with pytest.raises(ValueError, match="already cached in slot 1"):
        cache.insert(0, [8, 6])
    with pytest.raises(ValueError, match="would exceed|slots are in use"):
        cache.insert(0, [8, 9])
    with pytest.raises(ValueError, match="duplicate neuron id 9"):
        cache.insert(0, [9, 9])
    with pytest.raises(ValueError, match="not in the cache"):
        cache.evict(0, [5, 8])
    with pytest.raises(ValueError, match="duplicate neuron id 5"):
        cache.evict(0, [5, 5])
    with pytest.raises(ValueError, match=r"out of range \[0, 97\)"):
        cache.insert(0, [97])
    with pytest.raises(ValueError, match="0 of 0 slots"):
        cache.insert(2, [1])
    with pytest.raises(ValueError, match="layer 3 out of range"):
        cache.insert(3, [1])
    check(cache, 0, [5, 6, 7], mats)
    assert (cache.capacity(0), cache.capacity(1), cache.capacity(2)) == (4, 2, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_against_dict_model(bundle, seed):
    path, mats = bundle
    rng = np.random.default_rng(seed)
    caps = [20, 33, D_FF]
    params = ReaderParams(coalesce_gap_bytes=int(rng.integers(0, 3)) * 4096)
    cache = NeuronCache(BundleReader(path, params), capacity=caps)
    biases = [rng.standard_normal(D_FF).astype(np.float32) for _ in range(N_LAYERS)]
    for layer in range(N_LAYERS):
        cache.set_layer_bias(layer, biases[layer])
    models: list[dict[int, None]] = [dict() for _ in range(N_LAYERS)]
    for _ in range(60):
        layer = int(rng.integers(N_LAYERS))
        model = models[layer]
        absent = [i for i in range(D_FF) if i not in model]
        room = caps[layer] - len(model)
        if model and (rng.random() < 0.45 or room == 0):
            k = int(rng.integers(1, len(model) + 1))
            ids = rng.choice(list(model), k, replace=False).tolist()
            cache.evict(layer, ids)
            for i in ids:
                del model[i]
        elif room > 0:
            k = int(rng.integers(1, room + 1))
            ids = rng.choice(absent, k, replace=False).tolist()
            cache.insert(layer, ids)
            model.update(dict.fromkeys(ids))
        check(cache, layer, list(model), mats, biases[layer])
    st = cache.stats()
    assert st["inserted"] - st["evicted"] == sum(len(m) for m in models)
    assert st["reads"]["calls"] > 0 and st["moved_bytes"] % cache.reader.record_bytes == 0


def test_bias_set_after_rows_are_cached(bundle):
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=8)
    cache.insert(2, [9, 3])
    check(cache, 2, [9, 3], mats)  # no bias yet: zeros
    bias = np.linspace(-1, 1, D_FF, dtype=np.float32)
    cache.set_layer_bias(2, bias)
    check(cache, 2, [9, 3], mats, bias)
    with pytest.raises(ValueError, match=r"shape \(d_ff,\)"):
        cache.set_layer_bias(2, bias[:-1])


def test_compaction_stats_and_clear(bundle):
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=10, n_layers=1)
    assert cache.n_layers == 1
    rb = cache.reader.record_bytes
    cache.insert(0, [1, 2, 3, 4])
    cache.evict(0, [4])        # last slot: no copy
    cache.evict(0, [1])        # slot 0 <- row of 3
    st = cache.stats()
    assert (st["inserted"], st["evicted"], st["moved_bytes"]) == (4, 2, rb)
    assert st["reads"]["bytes_requested"] == 4 * rb
    cache.clear(0)
    check(cache, 0, [], mats)
    cache.insert(0, [1, 2])    # ids freed by clear can come back
    check(cache, 0, [1, 2], mats)
    assert cache.nbytes() >= 10 * rb


def test_views_are_zero_copy_read_only_and_keep_the_cache_alive(bundle):
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=5)
    cache.insert(0, [4, 2])
    rows, ids = cache.rows(0), cache.ids(0)
    assert not rows.flags.writeable and not ids.flags.writeable
    assert rows.ctypes.data % 4096 == 0 and rows.strides[0] == cache.reader.record_bytes
    assert rows.dtype == cache.reader.numpy_dtype and ids.dtype == np.int32
    np.testing.assert_array_equal(cache.part(0, "up"), mats[0][0][[4, 2]])
    np.testing.assert_array_equal(cache.part(0, "gate"), mats[0][1][[4, 2]])
    np.testing.assert_array_equal(cache.part(0, "down"), mats[0][2][[4, 2]])
    cache.evict(0, [4])  # aliasing: the old view sees the moved row (documented invalidation)
    assert rows[0].tobytes() == cache.rows(0)[0].tobytes()
    want = expected_records(mats, 0, [2], rows.shape[1]).tobytes()
    del cache
    gc.collect()
    assert rows[0].tobytes() == want  # base keeps the native cache (and its memory) alive


def test_capacity_validation(bundle):
    path, _ = bundle
    r = BundleReader(path)
    with pytest.raises(ValueError, match="d_ff=97"):
        NeuronCache(r, capacity=98)
    with pytest.raises(ValueError, match="capacity has 2 entries"):
        NeuronCache(r, capacity=[1, 2])
    with pytest.raises(ValueError, match="n_layers must be in"):
        NeuronCache(r, capacity=1, n_layers=4)


@pytest.mark.parametrize("direct", [True, False])
def test_insert_parts_rows_equal_bundled_rows(bundle, direct):
    path, mats = bundle
    reader = BundleReader(path, ReaderParams(use_direct_io=direct))
    cache = NeuronCache(reader, capacity=10)
    cache.insert_parts(0, [8, 1, 96])
    check(cache, 0, [8, 1, 96], mats)  # padding zeroed too: rows == records
    assert cache.stats()["reads"]["reads_issued"] == 3 * 3  # one read per part
    cache.evict(0, [1])
    cache.insert(0, [1, 2])
    check(cache, 0, [8, 96, 1, 2], mats)


def test_replace_moves_only_what_must(bundle):
    """Entering neurons take the freed slots: no row moves while as many enter as leave;
    with more leaving, only the live rows past the new end move, each once."""
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=10, n_layers=1)
    rb = cache.row_bytes
    cache.insert(0, [1, 2, 3, 4, 5, 6])
    cache.replace(0, [2, 5], [7, 8])              # equal numbers: 7, 8 land in slots 1, 4
    check(cache, 0, [1, 7, 3, 4, 8, 6], mats)
    assert cache.ids(0).tolist() == [1, 7, 3, 4, 8, 6] and cache.stats()["moved_bytes"] == 0
    cache.replace(0, [1, 4], [9, 10, 11])          # one more enters: the tail
    assert cache.ids(0).tolist() == [9, 7, 3, 10, 8, 6, 11]
    assert cache.stats()["moved_bytes"] == 0
    cache.replace(0, [9, 3, 8, 11], [12])          # 3 more leave: 12 in slot 0, row 6 -> 2
    assert cache.ids(0).tolist() == [12, 7, 6, 10]
    assert cache.stats()["moved_bytes"] == rb       # slot 4 (was 8) is past the end: no move
    check(cache, 0, [12, 7, 6, 10], mats)
    cache.replace(0, [], [])
    with pytest.raises(ValueError, match="not in the cache"):
        cache.replace(0, [2], [13])
    with pytest.raises(ValueError, match="already cached"):
        cache.replace(0, [12], [7])
    with pytest.raises(ValueError, match="4 of 10 slots are in use, 11 would be"):
        cache.replace(0, [], [20, 21, 22, 23, 24, 25, 26])
    check(cache, 0, [12, 7, 6, 10], mats)           # refused calls changed nothing


@pytest.mark.parametrize("seed", [0, 1])
def test_replace_randomized_against_dict_model(bundle, seed):
    path, mats = bundle
    rng = np.random.default_rng(seed)
    cache = NeuronCache(BundleReader(path), capacity=[20, 40, D_FF], packed=bool(seed))
    models = [set() for _ in range(N_LAYERS)]
    for _ in range(60):
        layer = int(rng.integers(N_LAYERS))
        m = models[layer]
        leave = rng.choice(sorted(m), int(rng.integers(0, len(m) + 1)), replace=False) if m \
            else np.empty(0, np.int64)
        room = cache.capacity(layer) - len(m) + len(leave)
        absent = sorted(set(range(D_FF)) - m)
        enter = rng.choice(absent, int(rng.integers(0, min(room, len(absent)) + 1)), replace=False)
        moved0 = cache.stats()["moved_bytes"]
        cache.replace(layer, leave, np.sort(enter))
        models[layer] = (m - set(leave.tolist())) | set(enter.tolist())
        check(cache, layer, list(models[layer]), mats)
        assert cache.stats()["moved_bytes"] - moved0 <= max(0, len(leave) - len(enter)) * cache.row_bytes


# ---- CacheDriver: the compiled per-layer step ------------------------------------------

@pytest.mark.parametrize("policy", ["window", "frequency"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bundled", [True, False])
def test_driver_follows_the_reference(bundle, policy, packed, bundled):
    path, mats = bundle
    rng = np.random.default_rng(11)
    caps = [30, 45, D_FF]
    cache = NeuronCache(BundleReader(path), capacity=caps, packed=packed)
    biases = [rng.standard_normal(D_FF).astype(np.float32) for _ in range(N_LAYERS)]
    for layer, b in enumerate(biases):
        cache.set_layer_bias(layer, b)
    if policy == "window":
        pol, refs = SlidingWindow(N_LAYERS, D_FF, 3), [WindowReference(3) for _ in caps]
    else:
        pol, refs = FrequencyPolicy(N_LAYERS, D_FF), [FrequencyReference(D_FF) for _ in caps]
    driver = CacheDriver(cache, pol, bundled=bundled)
    total = TokenStats()
    for _ in range(80):
        layer = int(rng.integers(N_LAYERS))
        ids = np.sort(rng.choice(D_FF, int(rng.integers(0, 28)), replace=False)).astype(np.int32)
        held = set(cache.ids(layer).tolist())
        enter, leave = refs[layer].update(ids.tolist(), caps[layer])
        driver.step(layer, ids)
        check(cache, layer, list(refs[layer].held()), mats, biases[layer])
        assert set(cache.ids(layer).tolist()) == (held - set(leave)) | set(enter)
        assert driver.loaded == len(enter) and driver.evicted == len(leave)
        assert driver.needed == len(ids) and driver.hits == len(ids) - len(enter)
        assert driver.cached == cache.n_used(layer)
        rows = driver.rows_of(layer, ids)
        assert cache.ids(layer)[rows].tolist() == ids.tolist()
        tok = TokenStats()
        driver.flush(tok)
        assert tok.per_layer_loaded == [len(enter)] and driver.loaded == 0
        total.add(tok)
    st = cache.stats()
    assert total.loaded == st["inserted"] and total.evicted == st["evicted"]
    assert total.bytes_read == st["reads"]["bytes_read"] and total.reads == st["reads"]["reads_issued"]
    assert total.io_ns > 0 and total.mm_ns > 0


def test_failed_read_starts_the_layer_over(bundle):
    """A record past the end of a truncated file: FlashIOError through the compiled driver;
    the layer's cache and policy start over (empty, consistent), the other layers keep theirs,
    and the next token reads what it needs again."""
    path, mats = bundle
    cache = NeuronCache(BundleReader(path), capacity=10, n_layers=N_LAYERS)
    w = SlidingWindow(N_LAYERS, D_FF, 2)
    driver = CacheDriver(cache, w)
    last = N_LAYERS - 1
    driver.step(0, np.array([4, 5], np.int32))
    driver.step(last, np.array([1, 2, 3], np.int32))
    with open(path, "r+b") as f:  # cut the file inside the last layer's records
        f.truncate(os.path.getsize(path) - 60 * cache.reader.record_bytes)
    with pytest.raises(FlashIOError, match="end of file"):
        driver.step(last, np.array([2, 90, 91], np.int32))
    assert cache.n_used(last) == 0 and w.size(last) == 0
    check(cache, 0, [4, 5], mats)
    assert w.state(0).tolist() == [4, 5]
    driver.step(last, np.array([2, 3], np.int32))
    check(cache, last, [2, 3], mats)
    assert w.state(last).tolist() == [2, 3]


def test_driver_refuses_a_policy_of_another_shape(bundle):
    path, _ = bundle
    cache = NeuronCache(BundleReader(path), capacity=10)
    with pytest.raises(ValueError, match=f"2 layers of {D_FF} neurons, the cache has 3 layers"):
        CacheDriver(cache, SlidingWindow(2, D_FF, 3))
    with pytest.raises(ValueError, match="96 neurons"):
        CacheDriver(cache, FrequencyPolicy(N_LAYERS, D_FF - 1))
    with pytest.raises(TypeError, match="SlidingWindow or FrequencyPolicy"):
        CacheDriver(cache, object())


# ---- split: the down parts in a matrix of their own ------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "q4_1"])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_cache_randomized_against_dict_model(tmp_path, dtype, seed):
    """A split cache (FFN without a gate): after every replace, rows.up holds each neuron's up
    part and rows.down its down part, in the same slot order; the FFN on the split rows gives
    the FFN on a whole-row cache holding the same neurons (exactly for block formats; float16
    within rounding: one input's dots on the up matrix take the one-row kernel); row moves
    count both pieces; problems() finds nothing."""
    from flashinfer_py import kernels as K
    from flashinfer_py.dtypes import SplitRows

    path = tmp_path / "ffn_bundles.bin"
    d_model = 96 if dtype == "q4_1" else 90  # q4_1 parts of 60 bytes: pieces not 64-aligned
    mats = pack_random(path, n_layers=2, d_model=d_model, d_ff=D_FF, dtype=dtype, n_parts=2)
    rng = np.random.default_rng(seed)
    reader = BundleReader(path)
    lay = reader.layout
    cache = NeuronCache(reader, capacity=[25, D_FF], packed=True, split=True)
    whole = NeuronCache(BundleReader(path), capacity=[25, D_FF], packed=True)
    assert cache.split and not whole.split
    assert cache.row_bytes == lay.cache_row_bytes == whole.row_bytes  # the same DRAM
    fmt = dtype if dtype.startswith("q") else None
    x = rng.standard_normal((1, d_model)).astype(np.float32)
    models = [set(), set()]
    for step in range(40):
        layer = int(rng.integers(2))
        m = models[layer]
        leave = rng.choice(sorted(m), int(rng.integers(0, len(m) + 1)), replace=False) if m \
            else np.empty(0, np.int64)
        room = cache.capacity(layer) - len(m) + len(leave)
        absent = sorted(set(range(D_FF)) - m)
        enter = np.sort(rng.choice(absent, int(rng.integers(0, min(room, len(absent)) + 1)),
                                   replace=False))
        moved0 = cache.stats()["moved_bytes"]
        cache.replace(layer, leave, enter)
        whole.replace(layer, leave, enter)
        models[layer] = (m - set(leave.tolist())) | set(enter.tolist())
        assert cache.stats()["moved_bytes"] - moved0 <= max(0, len(leave) - len(enter)) * cache.row_bytes
        ids = cache.ids(layer)
        np.testing.assert_array_equal(ids, whole.ids(layer))  # the same slots
        rows = cache.rows(layer)
        assert isinstance(rows, SplitRows) and len(rows) == len(ids)
        up, down = mats[layer]
        np.testing.assert_array_equal(lay.part_view(rows, "up").view(up.dtype), up[ids])
        np.testing.assert_array_equal(lay.part_view(rows, "down").view(down.dtype), down[ids])
        if len(ids):
            kw = dict(activation="relu", fmt=fmt, threads=1)
            w = whole.rows(layer)
            want = K.ffn_rows(x, w, d_model, up_off=0, down_off=lay.offsets["down"], **kw)
            got = K.ffn_rows(x, rows.up, d_model, up_off=0, down_off=0, down_rows=rows.down, **kw)
            # the SplitRows themselves, with the record's offsets: the same call
            same = K.ffn_rows(x, rows, d_model, up_off=0, down_off=lay.offsets["down"], **kw)
            np.testing.assert_array_equal(same, got)
            with pytest.raises(ValueError, match="pass down_rows only with a plain rows array"):
                K.ffn_rows(x, rows, d_model, up_off=0, down_off=0, down_rows=rows.down, **kw)
            if fmt is None:  # float16: the one-row kernel on the up matrix (float rounding)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            else:
                np.testing.assert_array_equal(got, want)
    assert cache.problems() == []


def test_split_cache_is_refused_where_it_cannot_apply(tmp_path):
    path = tmp_path / "ffn_bundles.bin"
    pack_random(path, n_layers=1, d_model=40, d_ff=16, n_parts=3)  # gated: nothing to split
    with pytest.raises(ValueError, match=r"split=True needs packed=True and records without a "
                                         r"gate part \(parts here: up, gate, down\)"):
        NeuronCache(BundleReader(path), capacity=4, packed=True, split=True)
    path2 = tmp_path / "ffn2.bin"
    pack_random(path2, n_layers=1, d_model=40, d_ff=16, n_parts=2)
    with pytest.raises(ValueError, match=r"split=True needs packed=True"):
        NeuronCache(BundleReader(path2), capacity=4, packed=False, split=True)


def test_split_cache_rows_are_zero_padded_and_splits_only_at_a_part(tmp_path):
    """The down rows' bytes past the down part are zeros (as a packed row's padding), also
    after row moves; the native cache refuses a split that is not a part boundary; SplitRows
    index rows only."""
    from flashinfer_py._core import NeuronCache as _Native
    from flashinfer_py.dtypes import SplitRows

    path = tmp_path / "ffn_bundles.bin"
    pack_random(path, n_layers=1, d_model=96, d_ff=D_FF, dtype="q4_1", n_parts=2)  # 60 B parts
    reader = BundleReader(path)
    cache = NeuronCache(reader, capacity=20, packed=True, split=True)
    cache.insert(0, list(range(12)))
    cache.evict(0, [0, 3, 5])          # rows move
    down = cache.rows(0).down
    assert down.shape == (9, 128 - 60) and (down[:, 60:] == 0).all()
    for bad in (1, 59, 61):
        with pytest.raises(ValueError, match=f"split_at={bad} must be 0 .* or the offset of a "
                                             "record's part"):
            _Native(reader._r, 1, 4, True, bad)
    rows = cache.rows(0)
    assert isinstance(rows[2:5], SplitRows) and len(rows[2:5]) == 3
    with pytest.raises(TypeError, match="SplitRows index rows only"):
        rows[:, 0:4]

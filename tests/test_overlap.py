"""Reads overlapping compute (RuntimeConfig.overlap, issue 16): the neurons a layer uses and
the bytes it reads into the cache are those of the sequential order; only when they arrive
changes. The logits are bit-identical to overlap "off": every mode sums the rows that stay, then
the newcomers (rank and the window alike).
A guess made ahead that turns out wrong costs reads, never quality."""
from __future__ import annotations

import errno

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py._core import build_info, testing
from flashinfer_py.errors import FlashIOError
from flashinfer_py.loader import READ_AHEAD_SLOTS, read_ahead_records, reader_scratch_bytes
from test_direct_io import ENGINES
from test_rank import rank_budget, sketch_dir


@pytest.fixture(scope="module")
def trained(tiny_flash, tmp_path_factory):
    return sketch_dir(tiny_flash, tmp_path_factory)


@pytest.fixture(autouse=True)
def small_scratch(monkeypatch):
    """Readers' scratch of 4 records: the tiny models' whole neuron cache is smaller than a
    real model's 1 MiB of scratch, and merged runs then go through it in rounds."""
    import flashinfer_py.loader as loader

    monkeypatch.setattr(loader, "READER_SCRATCH_BYTES", 4 << 12)


def _slots_bytes(m) -> int:
    """What overlap adds to the plan: the worker's slots and maps, and its reader's scratch."""
    f, rec = m.args.intermediate_size, m.manifest["bundle"]["record_bytes"]
    return (READ_AHEAD_SLOTS * (read_ahead_records(m.args, m.runtime) * rec + f * 4)
            + reader_scratch_bytes(rec))


def _decode(m, ids, n_gen=8):
    """Prompt token by token, then greedy: the logits of every step and the stats."""
    cache = m.new_cache()
    m.reset()
    out, stats, tok = [], [], ids[0]
    for step in range(len(ids) + n_gen - 1):
        lg = m.forward([tok], cache)
        out.append(lg[-1])
        stats.append(dict(m.last_stats))
        tok = ids[step + 1] if step + 1 < len(ids) else int(np.argmax(lg[-1]))
    return np.array(out), stats


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("overlap", ["layer", "ahead"])
def test_rank_with_overlap_is_bit_identical_and_reads_what_it_used(trained, prompt_ids,
                                                                   engine, overlap):
    d, _ = trained
    budget = rank_budget(d, 0.5)
    m = fi.load(d, dram_budget=budget, io_engine=engine, overlap=overlap)
    # the same cache sizes without the read-ahead slots the plan counts for overlap
    ref = fi.load(d, dram_budget=budget - _slots_bytes(m), io_engine=engine)
    assert ref.plan.cache_capacity == m.plan.cache_capacity
    ref, ref_st = _decode(ref, prompt_ids[:10])
    assert m.ffn.ahead.engine == engine
    got, st = _decode(m, prompt_ids[:10])
    np.testing.assert_array_equal(got, ref)
    for a, b in zip(st, ref_st):
        assert a["loaded"] == b["loaded"] and a["evicted"] == b["evicted"]
        # every loaded neuron came through the worker; it read a superset (the best
        # candidates before the ranking), all of it counted
        assert a["ahead_used"] == a["loaded"]
        assert a["bytes_read"] == a["ahead_bytes"] >= b["bytes_read"]
        assert a["io_wait_ns"] <= a["total_ns"]
        assert a["compute_ns"] == a["total_ns"] - a["io_wait_ns"] - a["mm_ns"] - a["predict_ns"]
    assert sum(s["loaded"] for s in st) > 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("compute", ["predicted", "cached"])
def test_window_with_overlap_is_bit_identical(tiny_flash, prompt_ids, engine,
                                                               compute):
    d = tiny_flash("llama-relu")
    # no coalescing gap: "layer" reads the same neurons in other groups, and with a gap the
    # groups would decide which unwanted records ride along (bytes, not results, would differ)
    kw = dict(sparse=True, selection="oracle", window=3, compute=compute, io_engine=engine,
              prefill_chunk=4, coalesce_gap_bytes=0)
    ref, ref_st = _decode(fi.load(d, **kw), prompt_ids[:12])
    for overlap in ("layer", "ahead"):
        m = fi.load(d, **kw, overlap=overlap)
        got, st = _decode(m, prompt_ids[:12])
        np.testing.assert_array_equal(got, ref)  # the same rows in the same two groups
        for a, b in zip(st, ref_st):
            assert (a["loaded"], a["evicted"], a["hits"]) == (b["loaded"], b["evicted"], b["hits"])
            assert a["ahead_used"] <= a["loaded"]
        if overlap == "layer":  # the layer's own misses only: nothing wasted
            assert [a["bytes_read"] for a in st] == [b["bytes_read"] for b in ref_st]
            # through the worker, up to a slot (read_limit x d_ff records) a layer; a layer's
            # loads beyond it are read by the cache itself after the slot landed
            assert all(a["ahead_used"] <= a["loaded"] for a in st)
            assert sum(a["ahead_used"] for a in st[1:]) >= 0.5 * sum(a["loaded"] for a in st[1:])


@pytest.fixture(scope="module")
def relu_lowrank(tiny_flash, tmp_path_factory):
    """A copy of the tiny ReLU llama with its low-rank predictors (the paper's path)."""
    import shutil

    from flashinfer_py.train import TrainConfig, train_predictors

    d = tmp_path_factory.mktemp("lowrank") / "relu.flash"
    shutil.copytree(tiny_flash("llama-relu"), d)
    ids = np.random.default_rng(2).integers(3, 500, 256).tolist()
    train_predictors(fi.load(d), ids, TrainConfig(max_tokens=256, window=128), progress=False)
    return d


def test_the_predictors_look_ahead_reads_only_their_most_confident_share(relu_lowrank,
                                                                        prompt_ids):
    """The paper's path (low-rank predictors, the window) with overlap "ahead": the logits are
    "off"'s bit for bit, and a layer's guess reads only the most confident AHEAD_SHARE of the
    predicted neurons the cache lacks (reading all of them cost more than it hid: RESULTS 14)."""
    from flashinfer_py.ffn import AHEAD_SHARE

    kw = dict(sparse=True, selection="predictor", eviction="window", window=2,
              predictor_threshold=0.3, coalesce_gap_bytes=0)
    ref, _ = _decode(fi.load(relu_lowrank, **kw), prompt_ids[:8])
    m = fi.load(relu_lowrank, **kw, overlap="ahead")
    got, st = _decode(m, prompt_ids[:8])
    np.testing.assert_array_equal(got, ref)
    assert sum(a["ahead_bytes"] for a in st) > 0
    ffn, layer = m.ffn, 1
    x = np.random.default_rng(5).standard_normal((1, m.args.hidden_size)).astype(np.float32)
    s = ffn.predictors.layers[layer].scores(x).max(axis=0)
    thr = m.runtime.predictor_threshold
    lacks = np.flatnonzero(s > np.log(thr / (1 - thr)))
    lacks = lacks[ffn.driver.rows_of(layer, lacks) < 0]
    assert lacks.size >= 4, "the test needs a guess with something to cut"
    keep = int(np.ceil(lacks.size * AHEAD_SHARE))
    want = np.sort(lacks[np.argsort(-s[lacks], kind="stable")[:keep]])
    ffn._guess(layer, x)
    slot, guessed = ffn._ahead.pop(layer)
    ffn.ahead.wait(slot)
    ffn.ahead.release(slot)
    ffn._is_ahead[slot][guessed] = False
    np.testing.assert_array_equal(guessed, want)
    assert 0 < guessed.size < lacks.size
    # a prompt in chunks (the guess from several tokens' inputs): still "off"'s logits
    kw.update(prefill_chunk=5)
    a, b = fi.load(relu_lowrank, **kw), fi.load(relu_lowrank, **kw, overlap="ahead")
    np.testing.assert_array_equal(b.forward(prompt_ids[:13], b.new_cache()),
                                  a.forward(prompt_ids[:13], a.new_cache()))
    assert b.last_stats["ahead_bytes"] > 0


# ---- overlap "async": a layer loads only what its guess read ahead (Deja Vu) ---------------


def _spy_slots(m) -> list:
    """The read-ahead slots started, in order (a spy on the real worker, which still reads)."""
    from flashinfer_py import ffn as ffn_mod

    started, real = [], m.ffn.ahead.start

    def start(slot, layer, ids):
        started.append((slot, layer))
        return real(slot, layer, ids)

    m.ffn.ahead.start = start
    assert ffn_mod.REST_SLOT not in (0, 1)
    return started


def test_async_with_a_guess_of_everything_is_off_bit_for_bit(trained, prompt_ids, monkeypatch):
    """With a guess that reads every candidate the restriction changes nothing: the logits
    are the sequential runtime's bit for bit, and nothing is dropped."""
    import flashinfer_py.ffn as ffn_mod

    d, _ = trained
    monkeypatch.setattr(ffn_mod, "ASYNC_SHARE", 1e9)
    budget = rank_budget(d, 0.5, read_limit=1.0)
    slots = _slots_bytes(fi.load(d, sparse=True, overlap="async", read_limit=1.0))
    m = fi.load(d, dram_budget=budget + slots, overlap="async", read_limit=1.0)
    ref = fi.load(d, dram_budget=budget, read_limit=1.0)
    assert ref.plan.cache_capacity == m.plan.cache_capacity
    ref, ref_st = _decode(ref, prompt_ids[:10])
    got, st = _decode(m, prompt_ids[:10])
    np.testing.assert_array_equal(got, ref)
    assert sum(a["dropped"] for a in st) == 0
    assert [a["loaded"] for a in st] == [b["loaded"] for b in ref_st]
    assert sum(a["loaded"] for a in st) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_async_loads_only_what_was_read_ahead_and_counts_what_it_missed(trained, prompt_ids,
                                                                        engine):
    """Rank eviction with the sketch: the guess for layer l is made from layer l - 1's FFN
    input (layer 0's from its attention input); the layer takes only neurons read ahead,
    never starts reads of its own, and counts the ones its own selection would have loaded."""
    d, _ = trained
    budget = rank_budget(d, 0.5)
    m = fi.load(d, dram_budget=budget, overlap="async", io_engine=engine)
    ref = fi.load(d, dram_budget=budget - _slots_bytes(m), io_engine=engine)
    started = _spy_slots(m)
    busy, real_busy = [], m.ffn.ahead.busy_ns
    m.ffn.ahead.busy_ns = lambda slot: busy.append(real_busy(slot)) or busy[-1]
    got, st = [], []
    cache = m.new_cache()
    for tok in prompt_ids[:10]:
        busy.clear()
        got.append(m.forward([tok], cache)[-1])
        st.append(dict(m.last_stats))
        # the token's I/O is the worker's reads alone: landing them in the cache is copying,
        # counted as memory management
        assert st[-1]["io_ns"] == sum(busy) > 0
    got = np.array(got)
    want, ref_st = _decode(ref, prompt_ids[:10], n_gen=1)  # the same 10 inputs
    assert want.shape == got.shape
    from flashinfer_py.ffn import REST_SLOT

    assert started and all(slot != REST_SLOT for slot, _ in started)
    L = m.args.num_hidden_layers
    assert {layer for _, layer in started} == set(range(L))  # every layer guessed for
    for a in st:
        assert a["loaded"] == a["ahead_used"]  # every load came from the guess
        assert a["bytes_read"] == a["ahead_bytes"]
        assert a["loaded"] <= m.ffn.max_loads * L + sum(m.plan.cache_capacity)
    assert sum(a["loaded"] for a in st) > 0
    # a guess from the layer before misses some of what the layer's own input picks, and
    # those are left out, and the logits move (the cost is measured on a real model:
    # benchmarks/overlap.py)
    assert sum(a["dropped"] for a in st) > 0
    assert not np.array_equal(got, want)
    assert np.isfinite(got).all()


def test_async_runs_a_prompt_chunk_exactly(trained, prompt_ids):
    """A prompt chunk may load more than a read-ahead slot holds (one token's loads), so it
    runs as "ahead" does: exact, nothing dropped, the prompt's logits "off"'s bit for bit.
    The decode steps after it select from the guess alone."""
    d, _ = trained
    budget = rank_budget(d, 0.5)
    m = fi.load(d, dram_budget=budget, overlap="async", prefill_chunk=4)
    ref = fi.load(d, dram_budget=budget - _slots_bytes(m), prefill_chunk=4)
    c, rc = m.new_cache(), ref.new_cache()
    np.testing.assert_array_equal(m.forward(prompt_ids[:12], c), ref.forward(prompt_ids[:12], rc))
    assert m.last_stats["dropped"] == 0
    assert m.last_stats["loaded"] == ref.last_stats["loaded"] > 0
    dropped = 0
    for tok in prompt_ids[12:20]:
        m.forward([tok], c)
        dropped += m.last_stats["dropped"]
        assert m.last_stats["loaded"] == m.last_stats["ahead_used"]
    assert dropped > 0


def test_async_on_the_window_path_keeps_only_cached_or_guessed_neurons(relu_lowrank,
                                                                      prompt_ids):
    """The paper's path (low-rank predictors, the window): the layer's predicted set is cut
    to what is cached or was read ahead. With a look-ahead that guesses every neuron the cut
    is empty and the logits are "off"'s bit for bit; with the real one it drops some."""
    kw = dict(sparse=True, selection="predictor", eviction="window", window=2,
              predictor_threshold=0.3, coalesce_gap_bytes=0, read_limit=1.0)
    ref, ref_st = _decode(fi.load(relu_lowrank, **kw), prompt_ids[:8])
    m = fi.load(relu_lowrank, **kw, overlap="async")
    f = m.args.intermediate_size

    class Everything:
        def predict(self, x, threshold, cap):
            return np.arange(f)

    m.ffn.predictors.lookahead = [Everything()] * m.args.num_hidden_layers
    got, st = _decode(m, prompt_ids[:8])
    np.testing.assert_array_equal(got, ref)
    assert sum(a["dropped"] for a in st) == 0
    assert [a["loaded"] for a in st] == [b["loaded"] for b in ref_st]
    m = fi.load(relu_lowrank, **kw, overlap="async")
    started = _spy_slots(m)
    got, st = _decode(m, prompt_ids[:8])
    from flashinfer_py.ffn import REST_SLOT

    assert started and all(slot != REST_SLOT for slot, _ in started)
    assert sum(a["dropped"] for a in st) > 0
    assert all(a["loaded"] == a["ahead_used"] for a in st)
    assert np.isfinite(got).all()


def test_overlap_needs_the_cache_and_says_so(tiny_flash):
    d = tiny_flash("llama-relu")
    with pytest.raises(ValueError, match="overlap='layer' needs the neuron cache"):
        fi.load(d, sparse=True, selection="oracle", reuse=False, overlap="layer")
    with pytest.raises(ValueError, match="overlap must be one of"):
        fi.RuntimeConfig(overlap="sometimes")


@pytest.mark.skipif(not build_info()["failpoints"], reason="built without failpoints")
@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_failing_on_the_worker_raises_and_the_next_token_works(trained, prompt_ids,
                                                                     engine):
    d, _ = trained
    point = {"threads": "pread_error", "io_uring": "uring_cqe_error"}[engine]
    m = fi.load(d, dram_budget=rank_budget(d, 0.5), io_engine=engine, overlap="ahead")
    cache = m.new_cache()
    for t in prompt_ids[:4]:
        m.forward([t], cache)
    testing.arm_failpoint(point, count=-1, value=errno.EIO)
    try:
        with pytest.raises(FlashIOError):
            for t in prompt_ids[4:8]:
                m.forward([t], cache)
    finally:
        testing.arm_failpoint(point, count=0)
    # the same model goes on (its slots were released; the failed layer starts over), and a
    # fresh one still gives the sequential runtime's logits
    assert np.isfinite(m.logits(prompt_ids[:6])).all()
    m2 = fi.load(d, dram_budget=rank_budget(d, 0.5), io_engine=engine, overlap="ahead")
    ref2 = fi.load(d, dram_budget=rank_budget(d, 0.5) - _slots_bytes(m2), io_engine=engine)
    np.testing.assert_array_equal(m2.logits(prompt_ids[:6]), ref2.logits(prompt_ids[:6]))

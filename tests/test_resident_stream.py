"""Resident matrices left on flash and read every token (RuntimeConfig.stream_resident,
flashinfer_py/resident_stream.py): the same logits as with the matrices in DRAM, a plan that
streams only when the budget needs it, and read errors and interrupted passes handled."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import flashinfer_py as fi
from flashinfer_py.errors import FlashIOError
from flashinfer_py.loader import plan_directory

# llama-silu: untied embeddings, fused q/k/v; opt: biases on q/k/v/o (sliced per chunk) and
# the post-norm-free OPT block; gemma3: tied embeddings (the head and the input rows stream),
# q/k norms, soft-capping; q4_1 / q8_0: matrices stored in blocks (uint8 rows)
CASES = [("llama-silu", "float32"), ("opt", "float16"), ("gemma3", "float16"),
         ("llama-silu", "q4_1"), ("opt-350m", "q8_0")]


def _run(m, ids):
    """Logits of a prompt in chunks, then token by token."""
    cache = m.new_cache()
    m.reset()
    out = [m.forward(ids[:13], cache)]
    out += [m.forward([t], cache) for t in ids[13:]]
    return np.concatenate(out)


@pytest.mark.parametrize("name,dtype", CASES)
def test_streamed_logits_equal_resident(name, dtype, tiny_flash, prompt_ids, small_chunks,
                                        monkeypatch):
    """Every resident matrix read from flash in row chunks gives the floats of the matrices
    in DRAM, bit for bit. Chunks of 1 KiB, so every matrix is several chunks and several
    matrices share a read. (4-bit matrices in DRAM are interleaved where the CPU has the
    kernels for it, and streamed ones stay row-major: the same integer dots, the floats
    summed in another order, so those agree within float rounding; bit for bit against the
    row-major kernels. That comparison runs dense: under the oracle's selection a rounding
    difference can tip a neuron in or out and the logits part, as they did at the 35th
    position once the row-major dots summed their blocks in chunks.)"""
    d = tiny_flash(name, dtype)
    kw = dict(sparse=True, selection="oracle", eviction="window")
    interleaved = _run(fi.load(d, fi.RuntimeConfig(stream_resident="off")), prompt_ids)
    monkeypatch.setattr(fi.kernels, "interleaves", lambda fmt: False)
    row_major = _run(fi.load(d, fi.RuntimeConfig(stream_resident="off")), prompt_ids)
    np.testing.assert_allclose(interleaved, row_major, rtol=1e-4,
                               atol=1e-4 * np.abs(row_major).max())
    ref = _run(fi.load(d, fi.RuntimeConfig(stream_resident="off", **kw)), prompt_ids)
    m = fi.load(d, fi.RuntimeConfig(stream_resident="all", **kw))
    assert m.plan.streamed and m.plan.stream_bytes > 0
    assert m.info()["resident_bytes"] < fi.load(d).info()["resident_bytes"]
    got = _run(m, prompt_ids)
    assert np.array_equal(got, ref)
    s = m.last_stats
    assert s["stream_bytes"] > 0 and s["stream_reads"] > 0 and s["stream_wait_ns"] >= 0
    # a second sequence on the same model: the stream continues across calls
    assert np.array_equal(_run(m, prompt_ids), ref)


@pytest.fixture
def small_chunks(monkeypatch):
    """Reads of 1 KiB (and 1 KiB of allowance beside the buffers): the tiny models' matrices
    are smaller than the stream's buffers of a real model would be, so without this streaming
    could never save memory on them."""
    import flashinfer_py.resident_stream as rs

    monkeypatch.setattr(rs, "CHUNK_BYTES", 1 << 10)
    monkeypatch.setattr(rs, "STREAM_EXTRA", 1 << 10)  # scaled down with the reads


def _budget_between(d, **kw):
    """A budget the resident part does not fit beside the smallest cache, but fits once its
    matrices are on flash: the "all" plan without a neuron cache, plus half the FFN."""
    _, plan = plan_directory(d, fi.RuntimeConfig(stream_resident="all", **kw))
    return plan.total - plan.cache_bytes + (plan.cache_bytes // 2)


def test_needed_streams_only_when_the_budget_needs_it(tiny_flash, small_chunks):
    d = tiny_flash("llama-silu", "float32")
    base = dict(selection="oracle", eviction="window", max_context=64)
    kw = base | {"stream_resident": "needed"}
    _, roomy = plan_directory(d, fi.RuntimeConfig(dram_budget="1GB", **kw))
    assert roomy.streamed == [] and roomy.stream_buffers == 0
    budget = _budget_between(d, dram_budget="1GB", **base)
    with pytest.raises(ValueError, match="too small.*--stream-resident auto"):
        plan_directory(d, fi.RuntimeConfig(dram_budget=budget, **(kw | {"stream_resident": "off"})))
    _, plan = plan_directory(d, fi.RuntimeConfig(dram_budget=budget, **kw))
    assert plan.streamed and plan.total <= budget
    assert plan.streamed[0] == "embed"  # untied: the input embedding goes first (a row a token)
    assert "read from flash every token" in plan.describe()
    assert plan.as_dict()["stream_bytes_per_token"] == plan.stream_bytes > 0
    # a budget below even the streamed plan names its minimum
    with pytest.raises(ValueError, match="left on flash.*at least"):
        plan_directory(d, fi.RuntimeConfig(dram_budget=plan.total // 4, **kw))


@pytest.mark.parametrize("dtype", ["float32", "q4_1"])
def test_auto_splits_the_budget_even_where_the_resident_part_fits(tiny_flash, prompt_ids,
                                                                  small_chunks, dtype):
    """"auto": at a budget where "needed" keeps every matrix and caches part of the FFN, the
    matrices and the cache get the same share, so the cache is larger; a budget holding the
    whole model streams nothing. The model runs under the budget (q4_1: some matrices read
    from flash, the others resident and interleaved where the CPU has the kernels)."""
    d = tiny_flash("llama-silu", dtype)
    kw = dict(selection="oracle", eviction="frequency", max_context=64, oracle_sparsity=0.8,
              prefill_chunk=1)
    _, full = plan_directory(d, fi.RuntimeConfig(dram_budget="1GB", **kw))
    # the resident part beside a third of the FFN
    budget = full.total - full.cache_bytes + full.cache_bytes // 3
    _, needed = plan_directory(d, fi.RuntimeConfig(dram_budget=budget, stream_resident="needed",
                                                   **kw))
    _, auto = plan_directory(d, fi.RuntimeConfig(dram_budget=budget, **kw))
    assert needed.streamed == [] and auto.streamed
    assert auto.cache_fraction > needed.cache_fraction
    assert auto.total <= budget and needed.total <= budget
    _, roomy = plan_directory(d, fi.RuntimeConfig(dram_budget="1GB", **kw))
    assert roomy.streamed == [] and roomy.cache_fraction == 1.0
    m = fi.load(d, fi.RuntimeConfig(dram_budget=budget, **kw))
    steps = list(m.generate_step(prompt_ids[:8], max_new_tokens=4, stop_at_eos=False))
    assert len(steps) == 4 and all(s.stats["stream_bytes"] > 0 for s in steps[1:])


def test_streamed_model_runs_under_its_budget(tiny_flash, prompt_ids, small_chunks):
    """Generation under a budget that only fits with streaming: tokens come out, and the
    greedy tokens are those of the same cache sizes with the matrices in DRAM."""
    d = tiny_flash("llama-silu", "float32")
    # a fifth of the neurons a token, one token at a time: what fits the cache of this budget
    kw = dict(selection="oracle", eviction="frequency", max_context=64, oracle_sparsity=0.8,
              prefill_chunk=1)
    budget = _budget_between(d, dram_budget="1GB", **kw)
    m = fi.load(d, fi.RuntimeConfig(dram_budget=budget, **kw))
    assert m.plan.streamed
    steps = list(m.generate_step(prompt_ids[:8], max_new_tokens=6, stop_at_eos=False))
    assert len(steps) == 6 and all(s.stats["stream_bytes"] > 0 for s in steps[1:])


def test_interrupted_pass_restarts_the_stream(tiny_flash, prompt_ids):
    """A forward pass that fails half-way (the context overflows in layer 0's attention,
    after its q/k/v were read) leaves the stream mid-cycle; the next pass starts it again."""
    d = tiny_flash("gemma3", "float16")
    kw = dict(sparse=True, selection="oracle", eviction="window", max_context=16)
    ref = fi.load(d, fi.RuntimeConfig(stream_resident="off", **kw))
    m = fi.load(d, fi.RuntimeConfig(stream_resident="all", **kw))
    cache = m.new_cache()
    m.forward(prompt_ids[:10], cache)
    with pytest.raises(ValueError, match="max_context"):
        m.forward(prompt_ids[10:20], cache)
    assert np.array_equal(m.logits(prompt_ids[:12]), ref.logits(prompt_ids[:12]))


def test_read_error_is_a_flash_io_error_naming_the_file(tiny_flash, tmp_path, prompt_ids,
                                                        small_chunks):
    """The file shrinks under the model: the thread's short read comes back as FlashIOError
    with the path and offset; once the file is whole again the model goes on. (Small reads:
    what the thread has read ahead is a few KiB, not the whole tiny model.)"""
    src = tiny_flash("llama-silu", "float16")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    kw = dict(sparse=True, selection="oracle", eviction="window")
    m = fi.load(d, fi.RuntimeConfig(stream_resident="all", **kw))
    ref = m.logits(prompt_ids[:5])
    dense = d / m.manifest["files"]["dense"]
    whole = dense.read_bytes()
    with open(dense, "r+b") as f:
        f.truncate(len(whole) // 2)
    with pytest.raises(FlashIOError, match=f"{dense}.*offset"):
        m.logits(prompt_ids[:5])
    dense.write_bytes(whole)
    os.sync()
    assert np.array_equal(m.logits(prompt_ids[:5]), ref)


def test_a_tiny_cache_warns_of_the_quality_loss(tiny_flash, tmp_path):
    """A budget that leaves the cache a sliver of the FFN loads, with a warning that says so;
    a roomy one loads without."""
    from flashinfer_py.train import TrainConfig, train_predictors

    d = tmp_path / "m"
    shutil.copytree(tiny_flash("llama-silu", "float16"), d)
    m = fi.load(d)
    ids = np.random.default_rng(0).integers(3, m.args.vocab_size, 256).tolist()
    train_predictors(m, ids, TrainConfig(methods=("sketch",), max_tokens=256), progress=False)
    _, plan = plan_directory(d, fi.RuntimeConfig(dram_budget="1GB", max_context=64))
    # the plan with every neuron cached, less its cache, plus every neuron's sketch, plus 5%
    # of the FFN as cache rows (each costs its row less the sketch it replaces)
    n, sk = len(plan.cache_capacity) * plan.d_ff, plan.sketch_record_bytes + 12
    budget = (plan.total - plan.cache_bytes + plan.sketch_fixed + n * sk
              + int(0.05 * n * (plan.row_bytes - sk)))
    with pytest.warns(UserWarning, match="cache holds .* of the FFN.*quality loss"):
        m = fi.load(d, dram_budget=budget, max_context=64, stream_resident="off")
    assert sum(m.plan.cache_capacity) < 0.15 * n
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fi.load(d, dram_budget="1GB", max_context=64)


def test_stream_resident_is_checked():
    with pytest.raises(ValueError, match="stream_resident"):
        fi.RuntimeConfig(stream_resident="some")


def test_a_dropped_model_frees_its_stream_thread_and_files(tiny_flash, prompt_ids):
    """The reading thread holds the stream only weakly: dropping the model (mid-cycle, with
    reads ahead of the compute) ends the thread and closes the files instead of leaking them
    (a thread, its buffers and two descriptors per model loaded in the process)."""
    import gc
    import threading
    import time
    import weakref

    d = tiny_flash("gemma3", "float16")
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection="oracle", eviction="window",
                                    max_context=16, stream_resident="all"))
    m.forward(prompt_ids[:4], m.new_cache())
    stream = m.transformer.stream
    assert stream is not None and stream._thread is not None and stream._thread.is_alive()
    thread, fds = stream._thread, [stream._fd, stream._row_fd]
    ref = weakref.ref(stream)
    del m, stream
    # The thread may be inside a read, holding the stream for its duration; it lets go when
    # the read ends (then the last reference goes and __del__ runs), so wait for that: a
    # bounded wait, not a timing claim (a leak keeps it alive for the whole 10 s).
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        if ref() is None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert ref() is None
    thread.join(timeout=10)
    assert not thread.is_alive()
    for fd in fds:
        if fd >= 0:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed (nothing else in this test opens files meanwhile)


def test_a_prompt_runs_the_lm_head_once(tiny_flash, prompt_ids, small_chunks):
    """Sparse prefill runs a prompt in chunks; when only the last position's logits are
    wanted (generation) the chunks before the last skip the LM head, which here is read from
    flash: 4 chunks, 1 head product (before: 4, each reading the head)."""
    d = tiny_flash("llama-silu")
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection="oracle", eviction="window",
                                    stream_resident="all", prefill_chunk=4))
    t = m.transformer
    calls, mm = [], t._mm

    def counted(x, w, *rest):
        if w is t.lm_head:
            calls.append(x.shape[0])
        return mm(x, w, *rest)

    t._mm = counted  # observes the products; every one still runs
    full = m.logits(prompt_ids[:13])  # every position's logits: every chunk needs the head
    assert calls == [4, 4, 4, 1]
    calls.clear()
    m.reset()
    last = m.forward(prompt_ids[:13], m.new_cache(), last_only=True)
    assert calls == [1] and last.shape == (1, full.shape[1])
    np.testing.assert_array_equal(last[0], full[-1])
    # the stream's order survives the skipped heads: a second pass gives the same logits
    m.reset()
    np.testing.assert_array_equal(m.logits(prompt_ids[:13]), full)


@pytest.mark.parametrize("bad,match", [([], "at least one token"),
                                       ([[1, 2], [3, 4]], "one sequence"),
                                       ([1.5, 2.0], "integers")])
def test_bad_token_ids_are_refused_in_every_mode(tiny_flash, bad, match):
    d = tiny_flash("llama-silu")
    for m in (fi.load(d), fi.load(d, sparse=True, selection="oracle", eviction="window")):
        with pytest.raises(ValueError, match=match):
            m.logits(bad)

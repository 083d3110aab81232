"""Sparse inference from flash: with the true active set (oracle), ReLU models give the dense
logits in every mode; the window, the cache and the budget do what they claim."""
from __future__ import annotations

import json

import numpy as np
import pytest

import flashinfer_py as fi
from conftest import rel_err

TOL = 1e-5

MODES = {
    "window": dict(window=3),
    "window-k1": dict(window=1),
    "no-reuse": dict(reuse=False),
    "hybrid": dict(selection="all", window=1),
    "compute-cached": dict(window=4, compute="cached"),
    "tiny-budget": dict(window=5, dram_budget="tight", prefill_chunk=1),
    "unbundled": dict(window=2, bundled=False),
    "frequency-budget": dict(eviction="frequency", dram_budget="tight", prefill_chunk=1),
    # reads overlapping compute (issue 16): the same neurons, summed in two groups
    "overlap-layer": dict(window=3, overlap="layer"),
    "overlap-ahead-cached": dict(window=4, compute="cached", overlap="ahead"),
    "overlap-ahead-budget": dict(eviction="frequency", dram_budget="tight", prefill_chunk=1,
                                 overlap="ahead"),
}


def _runtime(flash_dir, mode):
    kw = dict(MODES[mode])
    kw.setdefault("selection", "oracle")
    if kw.get("dram_budget") == "tight":
        # Room for ~70% of each layer's neurons (a random ReLU layer fires ~50% per token):
        # the window's union never fits,
        # so the oldest tokens are dropped early.
        m = fi.load(flash_dir)
        plan_kw = dict(sparse=True, selection="oracle", overlap=kw.get("overlap", "off"))
        from flashinfer_py.loader import plan_memory

        base = plan_memory(m.args, m.manifest, fi.RuntimeConfig(**plan_kw))
        kw["dram_budget"] = base.total - base.cache_bytes + int(0.7 * base.cache_bytes)
    return fi.RuntimeConfig(sparse=True, **kw)


@pytest.mark.parametrize("name", ["llama-relu", "llama-fatrelu", "opt"])
@pytest.mark.parametrize("mode", list(MODES))
def test_oracle_sparse_equals_dense(name, mode, tiny_flash, prompt_ids):
    d = tiny_flash(name)
    dense = fi.load(d)
    sparse = fi.load(d, _runtime(d, mode))
    assert sparse.sparse
    # prompt in chunks, then token-by-token decoding through the window
    ref = dense.logits(prompt_ids)
    cache = sparse.new_cache()
    sparse.reset()
    got = [sparse.forward(prompt_ids[:9], cache)]
    got += [sparse.forward([t], cache) for t in prompt_ids[9:]]
    assert rel_err(np.concatenate(got), ref) < TOL


@pytest.mark.parametrize("mode", ["window", "compute-cached", "frequency-budget",
                                  "overlap-layer", "overlap-ahead-budget"])
def test_split_cache_gives_the_whole_row_cache_logits(mode, tiny_flash, prompt_ids, monkeypatch):
    """An FFN without a gate (OPT) caches its down parts in matrices of their own (the
    paper's up and down matrices): the same neurons, the same sums, bit for bit, as the
    cache of whole records; a gated FFN keeps whole records."""
    from flashinfer_py.dtypes import SplitRows
    from flashinfer_py.ffn import SparseFFN

    d = tiny_flash("opt")

    def run():
        m = fi.load(d, _runtime(d, mode))
        cache = m.new_cache()
        m.reset()
        out = [m.forward(prompt_ids[:9], cache)] + [m.forward([t], cache) for t in prompt_ids[9:]]
        return m, np.concatenate(out)

    split, got = run()
    assert split.ffn.cache.split and isinstance(split.ffn.cache.rows(0), SplitRows)
    assert split.ffn.plan.cache_split
    assert split.ffn.cache.problems() == []
    monkeypatch.setattr(SparseFFN, "SPLIT_CACHE", False)
    whole, want = run()
    assert not whole.ffn.cache.split
    np.testing.assert_array_equal(got, want)
    gated = fi.load(tiny_flash("llama-relu"), _runtime(tiny_flash("llama-relu"), mode))
    assert not gated.ffn.cache.split and not gated.ffn.plan.cache_split


def test_the_plan_counts_a_split_caches_staging(tiny_flash):
    """A split cache stages every read (its two pieces are copied out), even for records
    without padding, which a whole-row cache reads in place: the plan counts the staging
    buffer whenever the cache is split."""
    import copy

    from flashinfer_py.loader import STAGING_RECORDS, plan_memory

    m = fi.load(tiny_flash("opt"))
    rt = fi.RuntimeConfig(sparse=True, selection="oracle")
    man = copy.deepcopy(m.manifest)
    d = m.args.hidden_size
    man["bundle"]["record_bytes"] = 2 * d * 4  # float32 up + down, no padding
    split = plan_memory(m.args, man, rt)
    whole = plan_memory(m.args, man, rt, device=_NoDevice())
    assert split.cache_split and not whole.cache_split
    assert split.overhead - whole.overhead == STAGING_RECORDS * 2 * d * 4
    assert "(up parts and down parts in two matrices)" in split.describe()
    assert "two matrices" not in whole.describe()


class _NoDevice:
    """The fields plan_memory reads of a device backend's costs, all zero: a whole-row plan."""
    host = 0
    unified = None
    row_bytes = 0


def test_window_loads_only_new_neurons(tiny_flash, prompt_ids):
    d = tiny_flash("llama-relu")
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection="oracle", window=3, prefill_chunk=1))
    cache = m.new_cache()
    m.reset()
    rec = m.manifest["bundle"]["record_bytes"]
    loaded, needed = 0, 0
    for t in prompt_ids:
        m.forward([t], cache)
        s = m.last_stats
        assert s["bytes_read"] >= s["loaded"] * rec  # coalescing may read gaps, never less
        assert 0 <= s["hits"] <= s["needed"]
        loaded += s["loaded"]
        needed += s["needed"]
        for layer in range(m.args.num_hidden_layers):  # the cache holds exactly the window
            assert sorted(m.ffn.cache.ids(layer).tolist()) == m.ffn.policy.state(layer).tolist()
    assert loaded < needed  # reuse across tokens happened


def test_no_reuse_reads_every_needed_neuron(tiny_flash, prompt_ids):
    m = fi.load(tiny_flash("llama-relu"), fi.RuntimeConfig(sparse=True, selection="oracle",
                                                           reuse=False, prefill_chunk=1))
    cache = m.new_cache()
    for t in prompt_ids[:5]:
        m.forward([t], cache)
        assert m.last_stats["loaded"] == m.last_stats["needed"] > 0


def test_budget_too_small_is_a_clear_error(tiny_flash):
    with pytest.raises(ValueError, match="too small.*at least"):
        fi.load(tiny_flash("llama-relu"), dram_budget="1MB", selection="oracle")


def test_budget_is_checked_before_any_weight_is_read(tiny_flash, tmp_path):
    """A budget too small for the resident part fails at once, not after reading it (under a
    memory cap, reading it first got the process killed before the message): in a copy whose
    resident file's header is garbage, the budget error comes first."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_flash("llama-relu"), d)
    dense = d / json.loads((d / "manifest.json").read_text())["files"]["dense"]
    with open(dense, "r+b") as f:  # same size: the manifest's size check still passes
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match="dram_budget .* too small.*at least"):
        fi.load(d, dram_budget="1MB", selection="oracle")
    with pytest.raises(fi.FlashFormatError):  # and the garbage is found when the plan fits
        fi.load(d, dram_budget="1GB", selection="oracle")


def test_budget_caps_the_cache(tiny_flash):
    d = tiny_flash("llama-relu")
    m = fi.load(d, _runtime(d, "tiny-budget"))
    plan = m.plan
    assert plan.total <= m.runtime.dram_budget
    assert all(c < m.args.intermediate_size for c in plan.cache_capacity)
    assert m.ffn.cache.capacity(0) == plan.cache_capacity[0]


def test_missing_predictors_message(tiny_flash):
    with pytest.raises(fi.FlashFormatError, match="train-predictors"):
        fi.load(tiny_flash("llama-relu"), sparse=True, selection="predictor")


def test_generate_reports_per_token_stats(tiny_flash):
    m = fi.load(tiny_flash("opt"), sparse=True, selection="oracle", window=2)
    steps = list(m.generate_step("w5 w6 w7", max_new_tokens=4, stop_at_eos=False))
    for s in steps:
        for key in ("io_ns", "mm_ns", "compute_ns", "bytes_read", "reads", "loaded", "evicted",
                    "hit_rate", "direct"):
            assert key in s.stats
        assert s.stats["compute_ns"] > 0


@pytest.mark.parametrize("row", ["naive", "hybrid", "predictor", "window", "bundling"])
def test_paper_table_rows_are_exact_with_the_oracle(row, tiny_flash, prompt_ids):
    """Every ablation row of the paper's Table 2 computes the same function (ReLU + oracle)."""
    d = tiny_flash("opt")
    ref = fi.load(d).logits(prompt_ids[:12])
    m = fi.load(d, fi.RuntimeConfig(ablation=row, selection="oracle", prefill_chunk=1))
    cache = m.new_cache()
    got = np.concatenate([m.forward([t], cache) for t in prompt_ids[:12]])
    assert rel_err(got, ref) < TOL
    s = m.last_stats
    rec = m.manifest["bundle"]["record_bytes"]
    if row in ("naive", "hybrid"):  # the whole FFN is read for every token
        assert s["loaded"] == m.args.num_hidden_layers * m.args.intermediate_size
    if row == "naive":  # ... and the resident file too
        dense = (d / "dense.safetensors").stat().st_size
        assert s["bytes_read"] >= dense + s["loaded"] * rec
    if row == "bundling":
        assert s["reads"] <= s["loaded"] + m.args.num_hidden_layers  # one read per neuron or fewer
    if row in ("predictor", "window") and s["loaded"]:
        assert s["reads"] >= 2 * s["loaded"]  # up and down parts fetched separately


def test_rows_without_reuse_fit_a_budget_smaller_than_the_ffn(tiny_flash, prompt_ids):
    """naive/hybrid/+predictor hold one layer's rows at a time, so they run under a budget that
    could not cache the whole FFN, and still compute the dense function."""
    from flashinfer_py.loader import plan_memory

    d = tiny_flash("opt")
    m = fi.load(d)
    rt = fi.RuntimeConfig(ablation="hybrid", selection="oracle")
    one_layer = plan_memory(m.args, m.manifest, rt)
    assert one_layer.layer_buffer == m.args.intermediate_size * m.manifest["bundle"]["record_bytes"]
    whole_ffn = m.args.num_hidden_layers * one_layer.layer_buffer
    budget = one_layer.total + whole_ffn // 3  # far less than the whole FFN on top of the rest
    sparse = fi.load(d, rt.replace(dram_budget=budget))
    assert sparse.plan.total <= budget
    assert rel_err(sparse.logits(prompt_ids[:10]), m.logits(prompt_ids[:10])) < TOL
    with pytest.raises(ValueError, match="one layer"):
        fi.load(d, rt.replace(dram_budget=one_layer.total - one_layer.layer_buffer))


def test_frequency_eviction_keeps_the_cache_full(tiny_flash, prompt_ids):
    """eviction="frequency" keeps neurons the window would drop: once the cache has filled, every
    layer holds exactly its capacity, and never more; the window policy holds only its union."""
    d = tiny_flash("llama-relu")
    rt = _runtime(d, "tiny-budget").replace(window=1)
    win = fi.load(d, rt)
    freq = fi.load(d, rt.replace(eviction="frequency"))
    assert freq.plan.overhead > win.plan.overhead  # the policy's per-neuron state is planned
    for m in (win, freq):
        cache = m.new_cache()
        for t in prompt_ids[:16]:
            m.forward([t], cache)
    L = freq.args.num_hidden_layers
    for layer in range(L):
        cap = freq.ffn.cache.capacity(layer)
        assert freq.ffn.cache.n_used(layer) == cap == freq.ffn.policy.size(layer)
        assert win.ffn.cache.n_used(layer) == win.ffn.policy.size(layer)
    assert sum(win.ffn.cache.n_used(i) for i in range(L)) < sum(
        freq.ffn.cache.n_used(i) for i in range(L))


def test_an_interrupt_in_the_layers_kernel_leaves_policy_and_cache_in_step(tiny_flash,
                                                                          monkeypatch):
    """Ctrl-C (which chat survives) or an error inside a layer's FFN kernel, after the window
    planned the layer: the layer is aborted on both sides, so a conversation that goes on
    (its prompt cache kept: no reset) generates exactly what a fresh model does (ReLU + the
    oracle selection: the cache's history cannot change the tokens). Before the fix the
    policy kept the unapplied plan and the next turn failed ("already cached")."""
    from flashinfer_py.ffn import SparseFFN

    d = tiny_flash("llama-relu")
    kw = dict(sparse=True, selection="oracle", eviction="window", window=2)
    model = fi.load(d, **kw)
    pc = model.new_prompt_cache()
    prompt = list(range(5, 13))
    first = [s.token for s in model.generate_step(prompt, 2, stop_at_eos=False,
                                                  prompt_cache=pc)]
    turn = prompt + first + [40, 41, 42]
    want = [s.token for s in fi.load(d, **kw).generate_step(turn, 6, stop_at_eos=False)]
    real, calls = SparseFFN._ffn_on, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # layer 1's rows that stay (a layer calls it twice: those,
            raise KeyboardInterrupt  # then the newcomers): after its plan, before its commit
        return real(self, *a, **k)

    monkeypatch.setattr(SparseFFN, "_ffn_on", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(model.generate_step(turn, 6, stop_at_eos=False, prompt_cache=pc))
    monkeypatch.setattr(SparseFFN, "_ffn_on", real)
    got = list(model.generate_step(turn, 6, stop_at_eos=False, prompt_cache=pc))
    assert got[0].cached_tokens > 0  # the conversation went on: no reset
    assert [s.token for s in got] == want

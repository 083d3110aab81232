"""Sparse inference under a DRAM budget as ranking (eviction="rank"), on the tiny SwiGLU llama:

- the 4-bit sketch file and the two tiers (every neuron either a cached record or a sketch,
  each sketch bit for bit the file's, bounded reads per token);
- the runtime against a numpy re-implementation of the policy (selection="oracle");
- the memory plan (per-layer cache sizes, the sketch tier in the budget);
- the calibration `train-predictors` records;
- "auto" defaults, refused combinations, and predictor files of format 1.
"""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

import flashinfer_py as fi
from conftest import rel_err
from flashinfer_py import kernels as K
from flashinfer_py.config import ModelArgs, RuntimeConfig, parse_bytes
from flashinfer_py.loader import allocate_caps, cache_row_bytes, prepare_sparse
from flashinfer_py.predictor import Predictors
from flashinfer_py.sketch import sketch_record_bytes
from flashinfer_py.train import TrainConfig, calibrate, record, train_predictors
from test_kernels_q4 import ref_record

VOCAB = 503
SKETCH_ONLY = TrainConfig(max_tokens=512, window=64, methods=("sketch",))


# ---- helpers -----------------------------------------------------------------------------


def sketch_dir(tiny_flash, tmp_path_factory, dtype="float32"):
    """A copy of the tiny SwiGLU llama after `train-predictors` with the sketch only (the
    shared fixture directory stays untrained: other tests need that)."""
    d = tmp_path_factory.mktemp("sketch") / f"silu-{dtype}.flash"
    shutil.copytree(tiny_flash("llama-silu", dtype), d)
    m = fi.load(d)
    ids = np.random.default_rng(1).integers(3, VOCAB, 512).tolist()
    preds = train_predictors(m, ids, SKETCH_ONLY, progress=False)
    return d, preds


@pytest.fixture(scope="module")
def trained(tiny_flash, tmp_path_factory):
    return sketch_dir(tiny_flash, tmp_path_factory)


def bundle_rows(d, layer: int) -> np.ndarray:
    """Every record of `layer`, read straight from ffn_bundles.bin as the README lays it out."""
    man = json.loads((d / "manifest.json").read_text())
    b, dt = man["bundle"], {"float32": np.float32, "float16": np.float16,
                            "bfloat16": np.uint16}.get(man["dtype"], np.uint8)  # blocks: bytes
    f, rec = b["d_ff"], b["record_bytes"]
    raw = np.fromfile(d / man["files"]["bundles"], np.uint8, count=f * rec,
                      offset=b["data_offset"] + layer * f * rec)
    return raw.reshape(f, rec).view(dt)


def upcast32(rows: np.ndarray) -> np.ndarray:
    if rows.dtype == np.uint16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32)


def file_sketches(d, args: ModelArgs) -> np.ndarray:
    """ffn_sketch.bin as [L, d_ff, record_bytes]."""
    raw = np.fromfile(d / "ffn_sketch.bin", np.uint8)
    return raw.reshape(args.num_hidden_layers, args.intermediate_size, -1)


def rank_budget(d, fraction: float, **runtime) -> int:
    """A budget whose neuron cache holds about `fraction` of the FFN, for `runtime`."""
    m = fi.load(d)
    rt = RuntimeConfig(sparse=True, **runtime)
    _, _, full = prepare_sparse(d, m.manifest, m.args, rt)
    assert all(c == m.args.intermediate_size for c in full.cache_capacity)
    return full.total - full.cache_bytes + int(fraction * full.cache_bytes)


# ---- the sketch file and the two tiers ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sketch_file_is_the_q4_of_every_bundle_record(dtype, tiny_flash, tmp_path_factory):
    d, preds = sketch_dir(tiny_flash, tmp_path_factory, dtype)
    args = fi.load(d).args
    dm, f = args.hidden_size, args.intermediate_size
    assert preds.kinds == ["sketch"] and preds.layers == []
    assert preds.sketch["record_bytes"] == sketch_record_bytes(args) == 2 * 7 * 18
    sk = file_sketches(d, args)
    assert sk.shape == (args.num_hidden_layers, f, 252)
    for layer in range(args.num_hidden_layers):
        rows = bundle_rows(d, layer)
        out = np.zeros((f, 252), np.uint8)
        K.quantize_q4(rows, [0, dm], dm, np.arange(f), out, np.arange(f))  # up, then gate
        np.testing.assert_array_equal(sk[layer], out)
        f32 = upcast32(rows)
        for i in (0, 1, f // 2, f - 1):   # and the documented format, from numpy
            np.testing.assert_array_equal(sk[layer, i], ref_record(f32[i], [0, dm], dm))


def check_tiers(m, file_sk: np.ndarray) -> None:
    """Every neuron of every layer in exactly one tier; each stored sketch is the file's."""
    f = m.args.intermediate_size
    store = m.ffn.sketch
    for layer in range(m.args.num_hidden_layers):
        cached = np.asarray(m.ffn.cache.ids(layer), np.int64)
        slot_id = store.slot_id[layer]
        assert cached.size == m.ffn.cache.capacity(layer)       # the cache stays full
        assert np.array_equal(np.sort(np.concatenate([cached, slot_id])), np.arange(f))
        assert (store.id_slot[layer][cached] == -1).all()
        assert np.array_equal(store.id_slot[layer][slot_id], np.arange(slot_id.size))
        np.testing.assert_array_equal(store.data[layer], file_sk[layer][slot_id])
        np.testing.assert_array_equal(store.scale[layer], m.ffn.down_norm[layer][slot_id])


@pytest.fixture(params=["auto", "scalar"])
def runtime_isa(request):
    """The kernels' instruction set while the runtime runs ("auto" also built the file)."""
    K.set_kernel_isa(request.param)
    yield request.param
    K.set_kernel_isa("auto")


def test_every_neuron_in_exactly_one_tier_during_generation(trained, prompt_ids, runtime_isa):
    """Greedy decoding under a budget with the defaults (sketch + rank), token by token: after
    every token the tiers partition each layer, the sketches of the neurons that left the
    cache were re-quantized from their cache rows into exactly the file's bytes (on either
    instruction set), and no layer read more than ceil(read_limit * d_ff) neurons."""
    d, _ = trained
    m = fi.load(d, dram_budget=rank_budget(d, 0.5), prefill_chunk=1)
    assert (m.runtime.selection, m.runtime.eviction) == ("sketch", "rank")
    f, L = m.args.intermediate_size, m.args.num_hidden_layers
    assert all(16 <= c < f for c in m.plan.cache_capacity)
    file_sk = file_sketches(d, m.args)
    limit = math.ceil(m.runtime.read_limit * f)
    start = [set(m.ffn.cache.ids(i).tolist()) for i in range(L)]
    check_tiers(m, file_sk)
    cache = m.new_cache()
    token, peak = prompt_ids[0], 0
    for step in range(32):
        logits = m.forward([token], cache)
        per_layer = m.ffn.tok.per_layer_loaded
        assert len(per_layer) == L and max(per_layer) <= limit
        assert m.last_stats["loaded"] == m.last_stats["evicted"] == sum(per_layer)
        peak = max(peak, max(per_layer))
        check_tiers(m, file_sk)
        token = prompt_ids[step + 1] if step + 1 < 12 else int(np.argmax(logits[-1]))
    assert peak == limit                                  # the limit was what stopped the reads
    assert any(set(m.ffn.cache.ids(i).tolist()) != start[i] for i in range(L))


def test_a_coalescing_gap_reads_fewer_larger_requests_and_changes_nothing(trained, prompt_ids):
    """coalesce_gap_bytes merges loads with up to that many bytes of unwanted records between
    them into one read (the unwanted ones dropped): the same neurons are loaded and the logits
    are identical, in fewer requests that carry more bytes."""
    d, _ = trained
    runs = {}
    for gap_records in (0, 2):
        m = fi.load(d, dram_budget=rank_budget(d, 0.5), prefill_chunk=1)
        rec = m.manifest["bundle"]["record_bytes"]
        m = fi.load(d, dram_budget=rank_budget(d, 0.5), prefill_chunk=1,
                    coalesce_gap_bytes=gap_records * rec)
        assert m.ffn.reader.params.coalesce_gap_bytes == gap_records * rec
        cache, logits, st = m.new_cache(), [], []
        for t in prompt_ids[:12]:
            logits.append(m.forward([t], cache, last_only=True)[0])
            st.append(m.last_stats)
        runs[gap_records] = (np.asarray(logits), {k: sum(s[k] for s in st)
                                                  for k in ("reads", "bytes_read", "loaded")})
    (l0, s0), (l2, s2) = runs[0], runs[2]
    np.testing.assert_array_equal(l2, l0)
    assert s2["loaded"] == s0["loaded"] > 0
    assert s2["reads"] < s0["reads"]
    assert s2["bytes_read"] > s0["bytes_read"]


def test_a_negative_coalescing_gap_is_refused():
    with pytest.raises(ValueError, match="coalesce_gap_bytes must be a whole number of bytes >= 0"):
        RuntimeConfig(coalesce_gap_bytes=-1)


def test_a_truncated_sketch_file_is_refused(trained, tmp_path):
    d, _ = trained
    bad = tmp_path / "bad.flash"
    shutil.copytree(d, bad)
    with open(bad / "ffn_sketch.bin", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(fi.FlashFormatError, match="ffn_sketch.bin.*train-predictors"):
        fi.load(bad, dram_budget=rank_budget(d, 0.5))


def test_default_prefill_chunks_run_under_a_budget(trained, prompt_ids):
    d, _ = trained
    m = fi.load(d, dram_budget=rank_budget(d, 0.5))
    assert len(set(m.plan.cache_capacity)) > 1 and m.runtime.prefill_chunk > 1
    m.logits(prompt_ids[:5])


# ---- the rank runtime against a numpy reference ------------------------------------------


def silu(v):
    return v / (1.0 + np.exp(-v))


class RankReference:
    """eviction="rank" with selection="oracle", in float64 numpy from the HF weights, written
    from its description. Per layer and call of T tokens:
      h = silu(gate . x) * (up . x) for every neuron; its score max_t |h| * ||down||;
      empty cache rows take the best uncached neurons (no limit: the first fill);
      then the best remaining uncached neurons replace the lowest-scoring cached ones, pair
      by pair while strictly better, at most ceil(read_limit * d_ff) * T of them;
      output = the FFN over the neurons cached before the call plus those loaded."""

    def __init__(self, hf_model, caps, read_limit: float, start=None):
        mlps = [layer.mlp for layer in hf_model.model.layers]
        w = lambda lin: lin.weight.detach().double().numpy()  # noqa: E731
        self.up = [w(p.up_proj) for p in mlps]          # [f, d]
        self.gate = [w(p.gate_proj) for p in mlps]      # [f, d]
        self.down = [w(p.down_proj) for p in mlps]      # [d, f]
        self.norm = [np.linalg.norm(dn, axis=0) for dn in self.down]
        self.f = self.up[0].shape[0]
        self.caps, self.max_swaps = list(caps), math.ceil(read_limit * self.f)
        self.cached = [set(s) for s in start] if start is not None else [set() for _ in caps]

    def forward(self, layer: int, x: np.ndarray, act_out=None) -> np.ndarray:
        x = np.asarray(x, np.float64)
        h = silu(x @ self.gate[layer].T) * (x @ self.up[layer].T)     # [T, f]
        score = np.abs(h).max(axis=0) * self.norm[layer]
        cached = self.cached[layer]
        uncached = sorted(set(range(self.f)) - cached, key=lambda j: -score[j])
        n_fill = min(self.caps[layer] - len(cached), len(uncached))
        load, evict = uncached[:n_fill], []
        lowest = sorted(cached, key=lambda j: score[j])
        for new, old in list(zip(uncached[n_fill:], lowest))[:self.max_swaps * len(x)]:
            if not score[new] > score[old]:
                break
            load.append(new)
            evict.append(old)
        used = sorted(cached | set(load))
        self.cached[layer] = (cached - set(evict)) | set(load)
        return (h[:, used] @ self.down[layer][:, used].T).astype(np.float32)


def run_against_reference(m, ref, ids, chunk: int):
    """Chunk by chunk: the same cached sets after every call, and the same logits."""
    c_m, c_ref = m.new_cache(), ref.new_cache()
    worst = 0.0
    for i in range(0, len(ids), chunk):
        got, want = m.forward(ids[i:i + chunk], c_m), ref.forward(ids[i:i + chunk], c_ref)
        worst = max(worst, rel_err(got, want))
        for layer in range(m.args.num_hidden_layers):
            assert set(m.ffn.cache.ids(layer).tolist()) == ref.transformer.ffn.cached[layer]
    assert worst < 1e-4, worst




@pytest.mark.parametrize("case,chunk,per_layer", [
    ("on-demand", 1, True),
    ("calibrated", 1, True),
    ("calibrated", 4, False),   # 4 tokens a call: scores are maxima over them, 4x the swaps
])
def test_rank_runtime_matches_the_numpy_reference(case, chunk, per_layer, tiny_hf, tiny_flash,
                                                  trained, prompt_ids):
    """With the oracle: on demand (no predictors.npz: the first token fills the cache) or from
    the calibration's hot neurons (a trained directory), per-layer cache sizes or equal ones."""
    hf, _ = tiny_hf("llama-silu")
    d = tiny_flash("llama-silu") if case == "on-demand" else trained[0]
    rt = RuntimeConfig(selection="oracle", eviction="rank", prefill_chunk=chunk,
                       per_layer_cache=per_layer)
    m = fi.load(d, rt.replace(dram_budget=rank_budget(d, 0.6, selection="oracle",
                                                      eviction="rank", prefill_chunk=chunk,
                                                      per_layer_cache=per_layer)))
    f, L = m.args.intermediate_size, m.args.num_hidden_layers
    caps = m.plan.cache_capacity
    # per-layer sizes need the calibration; without one every layer gets the same
    assert all(c < f for c in caps) and (len(set(caps)) > 1) == (per_layer and case != "on-demand")
    start = None
    if case == "calibrated":
        hot = trained[1].calibration.hot
        start = [set(np.argsort(-hot[i], kind="stable")[:caps[i]].tolist()) for i in range(L)]
        assert [set(m.ffn.cache.ids(i).tolist()) for i in range(L)] == start
    else:
        assert all(m.ffn.cache.n_used(i) == 0 for i in range(L))
    ref = fi.load(d)
    # the reference itself: with every neuron cached it is the dense model
    dense = ref.logits(prompt_ids[:6])
    ref.transformer.ffn = RankReference(hf, [f] * L, 0.1, [range(f)] * L)
    assert rel_err(ref.logits(prompt_ids[:6]), dense) < 1e-5
    ref.transformer.ffn = RankReference(hf, caps, m.runtime.read_limit, start)
    run_against_reference(m, ref, prompt_ids, chunk)
    assert m.ffn.total.loaded > (sum(caps) if start is None else 0)


@pytest.mark.parametrize("case", ["oracle-on-demand",
                                  "oracle-calibrated", "sketch"])
def test_rank_with_every_neuron_cached_is_dense(case, tiny_flash, trained, prompt_ids):
    """read_limit=1.0 and a budget that holds every neuron: the dense logits (the oracle fills
    the cache with the first token or from the calibration; the sketch's store is empty)."""
    d = tiny_flash("llama-silu") if case == "oracle-on-demand" else trained[0]
    selection = "auto" if case == "sketch" else "oracle"
    kw = dict(selection=selection, eviction="auto" if case == "sketch" else "rank",
              prefill_chunk=1, read_limit=1.0)
    m = fi.load(d, RuntimeConfig(**kw, dram_budget=rank_budget(d, 1.0, **kw)))
    f = m.args.intermediate_size
    assert m.runtime.eviction == "rank" and m.plan.cache_capacity == [f] * m.args.num_hidden_layers
    if selection == "auto":
        assert all(s.size == 0 for s in m.ffn.sketch.slot_id)
    ref = fi.load(d).logits(prompt_ids[:16])
    cache = m.new_cache()
    got = np.concatenate([m.forward([t], cache) for t in prompt_ids[:16]])
    assert rel_err(got, ref) < 1e-5


# ---- the memory plan ---------------------------------------------------------------------


def decaying_curves(rng, n_layers: int, f: int, points: int = 33):
    ks = np.unique(np.round(np.linspace(0, f, points)).astype(np.int64))
    rates = rng.uniform(2, 12, n_layers)
    err = np.stack([np.exp(-r * ks / f) - np.exp(-r) for r in rates]) * rng.uniform(0.5, 2, (n_layers, 1))
    return err, ks


def assert_errors_equalized(caps, err, ks, minimum: int) -> None:
    """No neuron moved from one layer to another could lower the largest error: the largest
    error at the caps is at most any layer's error with one neuron fewer."""
    at = [np.interp(c, ks, e) for c, e in zip(caps, err)]
    fewer = [np.interp(c - 1, ks, e) for c, e in zip(caps, err) if c > minimum]
    assert max(at) <= min(fewer, default=np.inf) + 1e-12, (caps, at, fewer)


def test_allocate_caps_spends_the_total_within_bounds():
    """Strictly falling error curves (what the calibration measures on SwiGLU models)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        L, f = int(rng.integers(1, 7)), int(rng.integers(40, 400))
        err, ks = decaying_curves(rng, L, f)
        minimum = int(rng.integers(0, 20))
        total = int(rng.integers(minimum * L, f * L + 1))
        caps = allocate_caps(err, ks, total, f, minimum)
        assert len(caps) == L and sum(caps) == total, (caps, total)
        assert all(minimum <= c <= f for c in caps)
        assert_errors_equalized(caps, err, ks, minimum)
    # totals outside [minimum * L, f * L] are clamped to it
    err, ks = decaying_curves(rng, 3, 100)
    assert allocate_caps(err, ks, 10, 100, 7) == [7, 7, 7]
    assert allocate_caps(err, ks, 10_000, 100, 7) == [100, 100, 100]


def test_allocate_caps_gives_more_to_the_layer_with_more_error():
    rng = np.random.default_rng(4)
    f = 300
    err, ks = decaying_curves(rng, 1, f)
    base = err[0]
    shifted = np.interp(ks - 40, ks, base, left=base[0])     # the same curve, 40 neurons later
    for curves in ([base, 2 * base], [base, shifted], [shifted, base, 1.5 * base]):
        e = np.stack(curves)
        for total in range(2 * 16, len(curves) * f + 1, 37):
            caps = allocate_caps(e, ks, total, f, 16)
            for a in range(len(curves)):
                for b in range(len(curves)):
                    if (e[a] >= e[b]).all():
                        assert caps[a] >= caps[b], (total, caps)


@pytest.mark.parametrize("total", [300, 303, 399])
def test_allocate_caps_is_uniform_for_equal_curves_and_divisible_totals(total):
    err, ks = decaying_curves(np.random.default_rng(5), 1, 344)
    assert allocate_caps(np.repeat(err, 3, axis=0), ks, total, 344, 16) == [total // 3] * 3


def test_allocate_caps_for_equal_curves_differ_by_at_most_one():
    err, ks = decaying_curves(np.random.default_rng(5), 1, 344)
    for total in (301, 302, 304, 305):
        caps = allocate_caps(np.repeat(err, 3, axis=0), ks, total, 344, 16)
        assert max(caps) - min(caps) <= 1, (total, caps)
        assert_errors_equalized(caps, np.repeat(err, 3, axis=0), ks, 16)


def test_allocate_caps_spends_the_total_with_flat_curves():
    assert sum(allocate_caps(np.array([[1.0, 0, 0], [1.0, 0, 0]]), np.array([0, 50, 100]),
                             150, 100, 0)) == 150


def test_plan_with_a_sketch_accounts_for_both_tiers(trained):
    d, preds = trained
    budget = rank_budget(d, 0.4)
    m = fi.load(d, dram_budget=budget, prefill_chunk=1)
    plan, a = m.plan, m.args
    L, f, rec = a.num_hidden_layers, a.intermediate_size, m.manifest["bundle"]["record_bytes"]
    sk = sketch_record_bytes(a)
    caps = plan.cache_capacity
    assert len(set(caps)) > 1 and all(16 <= c < f for c in caps)   # sized per layer
    row = plan.row_bytes  # the packed cache: the parts without the flash padding
    assert row < rec and row == cache_row_bytes(m.manifest)
    assert plan.cache_bytes == sum(caps) * row
    assert plan.sketch_bytes == (L * f - sum(caps)) * (sk + 12) + L * f * 12
    assert plan.total == (plan.resident + plan.predictors + plan.kv_cache + plan.overhead
                          + plan.cache_bytes + plan.sketch_bytes)
    # what was allocated is what was planned: the cache's rows, the store to the byte
    assert [m.ffn.cache.capacity(i) for i in range(L)] == caps
    assert m.ffn.sketch.nbytes == plan.sketch_bytes
    assert [s.shape for s in m.ffn.sketch.data] == [(f - c, sk) for c in caps]
    # the budget is spent: one more cached neuron (a record instead of a sketch) would not fit
    assert plan.total + row - (sk + 12) > budget
    # and the sizes equalize the calibrated errors
    assert_errors_equalized(caps, preds.calibration.err, preds.calibration.err_k, 16)


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_plan_with_a_sketch_fits_the_budget(trained, fraction):
    d, _ = trained
    budget = rank_budget(d, fraction)
    assert fi.load(d, dram_budget=budget).plan.total <= budget


def test_a_budget_too_small_for_the_tiers_names_the_smallest_figure(trained):
    d, _ = trained
    with pytest.raises(ValueError, match=r"too small.*4-bit sketch.*Give at least [0-9.]+ MiB"):
        fi.load(d, dram_budget="1MB")


def test_the_smallest_figure_named_is_enough(trained):
    d, _ = trained
    with pytest.raises(ValueError) as e:
        fi.load(d, dram_budget="1MB")
    figure = re.search(r"Give at least ([0-9.]+ \w+)", str(e.value)).group(1)
    fi.load(d, dram_budget=parse_bytes(figure.replace("iB", "B")))
    # the second figure named is the budget that caches 15% of the FFN
    good = re.search(r"; ([0-9.]+ \w+) caches 15% of the FFN", str(e.value)).group(1)
    plan = fi.load(d, dram_budget=parse_bytes(good.replace("iB", "B"))).plan
    assert sum(plan.cache_capacity) >= 0.15 * len(plan.cache_capacity) * plan.d_ff


# ---- calibration -------------------------------------------------------------------------


def test_calibration_against_numpy(tiny_hf, tiny_flash):
    hf, _ = tiny_hf("llama-silu")
    m = fi.load(tiny_flash("llama-silu"))
    ids = np.random.default_rng(6).integers(3, VOCAB, 192).tolist()
    xs, hs, rs = record(m, ids, TrainConfig(window=64, max_tokens=192), progress=False)
    cal = calibrate(m, hs, rs, points=16, xs=xs)
    f = m.args.intermediate_size
    down = [layer.mlp.down_proj.weight.detach().double().numpy() for layer in hf.model.layers]
    norms = np.stack([np.linalg.norm(dn, axis=0) for dn in down])            # [L, f]
    np.testing.assert_allclose(cal.down_norm, norms, rtol=1e-6)
    # hot: the mean contribution |h| * ||down|| of each neuron over the recorded tokens
    contrib = np.asarray(hs, np.float64) * norms[:, None, :]                # [L, N, f]
    np.testing.assert_allclose(cal.hot, contrib.mean(axis=1), rtol=1e-5)
    # ... and |h| itself recomputed from the recorded inputs (float16) and the HF weights
    for layer, block in enumerate(hf.model.layers):
        x = np.asarray(xs[layer], np.float64)
        g = x @ block.mlp.gate_proj.weight.detach().double().numpy().T
        h = np.abs(silu(g) * (x @ block.mlp.up_proj.weight.detach().double().numpy().T))
        hot = (h * norms[layer]).mean(axis=0)
        assert np.linalg.norm(cal.hot[layer] - hot) < 5e-3 * np.linalg.norm(hot)
        # up_mean: each neuron's mean |up . x| over the tokens (the gate sketch's scale)
        up = np.abs(x @ block.mlp.up_proj.weight.detach().double().numpy().T).mean(axis=0)
        np.testing.assert_allclose(cal.up_mean[layer], up, rtol=1e-4)
    # err: falls with k, 0 when every neuron is kept, and equals the brute-force definition
    assert cal.err_k[0] == 0 and cal.err_k[-1] == f and (np.diff(cal.err_k) > 0).all()
    assert cal.err.shape == (m.args.num_hidden_layers, cal.err_k.size)
    assert (cal.err[:, -1] == 0).all() and (cal.err[:, 0] > 0).all()
    assert (np.diff(cal.err, axis=1) <= 0).all()
    for i in (1, cal.err_k.size // 2, cal.err_k.size - 2):
        k = int(cal.err_k[i])
        dropped = np.sort(contrib, axis=2)[:, :, :f - k]                     # the f-k smallest
        want = (np.sqrt((dropped ** 2).sum(axis=2)) / np.asarray(rs, np.float64)).mean(axis=1)
        np.testing.assert_allclose(cal.err[:, i], want, rtol=1e-5)


def test_calibration_survives_the_predictors_file(trained, tiny_flash):
    d, preds = trained
    m = fi.load(d)
    loaded = Predictors.load(d, m.manifest)
    assert loaded.kinds == ["sketch"] and loaded.sketch == preds.sketch
    assert preds.calibration.up_mean is not None
    for name in ("hot", "err_k", "err", "down_norm", "up_mean"):
        np.testing.assert_array_equal(getattr(loaded.calibration, name),
                                      getattr(preds.calibration, name))


# ---- defaults and refused combinations ---------------------------------------------------


def tiny_args(act: str) -> ModelArgs:
    return ModelArgs(arch="llama", vocab_size=11, hidden_size=8, intermediate_size=13,
                     num_hidden_layers=2, num_attention_heads=2, hidden_act=act)


@pytest.mark.parametrize("act,kinds,runtime,want", [
    ("silu", ["sketch"], {}, ("sketch", "rank")),
    ("silu", ["lowrank", "sketch"], {}, ("sketch", "rank")),
    ("gelu_tanh", ["sketch"], {}, ("sketch", "rank")),
    ("silu", ["lowrank"], {}, ("predictor", "window")),
    ("silu", None, {}, ("predictor", "window")),
    ("relu", ["lowrank"], {}, ("predictor", "window")),
    ("relu", ["lowrank", "sketch"], {}, ("predictor", "window")),
    ("fatrelu", ["lowrank", "sketch"], {}, ("predictor", "window")),
    # an explicit paper policy, or no reuse, keeps the predictor
    ("silu", ["lowrank", "sketch"], dict(eviction="window"), ("predictor", "window")),
    ("silu", ["lowrank", "sketch"], dict(eviction="frequency"), ("predictor", "frequency")),
    ("silu", ["lowrank", "sketch"], dict(reuse=False), ("predictor", "window")),
    # an explicit selection picks its eviction
    ("silu", ["sketch"], dict(selection="oracle"), ("oracle", "window")),
    ("relu", ["lowrank"], dict(selection="sketch"), ("sketch", "rank")),
    ("silu", ["sketch"], dict(selection="oracle", eviction="rank"), ("oracle", "rank")),
])
def test_auto_resolves_per_model_and_directory(act, kinds, runtime, want):
    rt = RuntimeConfig(**runtime)
    got = rt.resolved(tiny_args(act), kinds)
    assert (got.selection, got.eviction) == want
    assert (rt.selection, rt.eviction) == (runtime.get("selection", "auto"),
                                           runtime.get("eviction", "auto"))  # a copy


@pytest.mark.parametrize("kw,match", [
    (dict(selection="sketch", eviction="window"), r"selection='sketch'.*eviction='rank'"),
    (dict(selection="sketch", eviction="frequency"), r"selection='sketch'.*eviction='rank'"),
    (dict(selection="all", eviction="rank"), r"eviction='rank'.*selection='all'"),
    (dict(eviction="rank", reuse=False), r"eviction='rank'.*reuse=True"),
    (dict(read_limit=0.0), r"read_limit must be in \(0, 1\]"),
    (dict(read_limit=-0.5), r"read_limit must be in \(0, 1\]"),
    (dict(read_limit=1.01), r"read_limit must be in \(0, 1\]"),
    (dict(selection="rank"), r"selection must be one of"),
    (dict(eviction="sketch"), r"eviction must be one of"),
])
def test_refused_combinations(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_auto_that_resolves_to_a_refused_combination_is_refused():
    rt = RuntimeConfig(selection="sketch", reuse=False)   # eviction auto -> rank
    with pytest.raises(ValueError, match="reuse=True"):
        rt.resolved(tiny_args("silu"), ["sketch"])
    assert RuntimeConfig(read_limit=1.0).read_limit == 1.0


def test_a_sketch_only_directory_refuses_the_predictor(trained):
    d, _ = trained
    with pytest.raises(fi.FlashFormatError,
                       match=r"no low-rank predictors.*train-predictors .*--method lowrank"):
        fi.load(d, sparse=True, selection="predictor")
    # the other selections still open it
    assert fi.load(d, sparse=True).runtime.selection == "sketch"
    assert fi.load(d, sparse=True, selection="oracle").runtime.eviction == "window"


def _write_format1(d, manifest, L: int, dim: int, f: int, rank: int = 3) -> None:
    """predictors.npz as format 1 wrote it: low-rank arrays and a header, nothing else."""
    rng = np.random.default_rng(8)
    arrays = {}
    for i in range(L):
        arrays[f"A{i}"] = rng.standard_normal((dim, rank)).astype(np.float32)
        arrays[f"B{i}"] = rng.standard_normal((rank, f)).astype(np.float32)
        arrays[f"b{i}"] = np.full(f, 0.5, np.float32)
    header = {"format": 1, "label": "magnitude", "n_layers": L, "act_thresholds": [0.1] * L,
              "weights_sha256": manifest["checksums"][manifest["files"]["bundles"]]["sha256"],
              "meta": {"tokens": 7}}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(d / "predictors.npz", **arrays)


def test_format1_predictors_still_load(tiny_flash, tmp_path, prompt_ids):
    d = tmp_path / "old.flash"
    shutil.copytree(tiny_flash("llama-silu"), d)
    m = fi.load(d)
    a = m.args
    _write_format1(d, m.manifest, a.num_hidden_layers, a.hidden_size, a.intermediate_size)
    preds = Predictors.load(d, m.manifest)
    assert preds.kinds == ["lowrank"] and preds.calibration is None and preds.sketch is None
    assert preds.layers[0].A.shape == (a.hidden_size, 3) and preds.meta == {"tokens": 7}
    sparse = fi.load(d, sparse=True, prefill_chunk=1)
    assert (sparse.runtime.selection, sparse.runtime.eviction) == ("predictor", "window")
    assert sparse.forward(prompt_ids[:3], sparse.new_cache()).shape == (3, VOCAB)
    with pytest.raises(fi.FlashFormatError, match="no 4-bit sketch.*--method sketch"):
        fi.load(d, sparse=True, selection="sketch")


# ---- the command line over a directory `train-predictors` made ----------------------------


def test_cli_generate_after_cli_train_predictors(tiny_flash, tmp_path):
    from flashinfer_py.cli import main

    d = tmp_path / "cli.flash"
    shutil.copytree(tiny_flash("llama-silu"), d)
    text = tmp_path / "calib.txt"
    words = np.random.default_rng(9).integers(4, VOCAB, 600)
    text.write_text(" ".join(f"w{i}" for i in words))
    assert main(["train-predictors", str(d), "--text", str(text), "--tokens", "256",
                 "--quiet"]) == 0
    assert main(["generate", str(d), "--prompt", "w5 w6 w7", "-n", "3", "--sparse"]) == 0


# ---- the gate sketch (RuntimeConfig.sketch) -----------------------------------------------


def check_gate_tiers(m, file_sk: np.ndarray) -> None:
    """As check_tiers, for the gate sketch: each stored sketch is the file's gate half, each
    scale ||down|| * mean|up.x|."""
    store, cal = m.ffn.sketch, m.ffn.predictors.calibration
    half = file_sk.shape[-1] // 2
    assert store.kind == "gate" and store.rec == half
    for layer in range(m.args.num_hidden_layers):
        cached = np.asarray(m.ffn.cache.ids(layer), np.int64)
        slot_id = store.slot_id[layer]
        assert cached.size == m.ffn.cache.capacity(layer)       # the cache stays full
        assert np.array_equal(np.sort(np.concatenate([cached, slot_id])),
                              np.arange(m.args.intermediate_size))
        assert (store.id_slot[layer][cached] == -1).all()
        assert np.array_equal(store.id_slot[layer][slot_id], np.arange(slot_id.size))
        np.testing.assert_array_equal(store.data[layer], file_sk[layer][slot_id, half:])
        want = (cal.down_norm[layer] * cal.up_mean[layer])[slot_id].astype(np.float32)
        np.testing.assert_array_equal(store.scale[layer], want)


def test_the_gate_sketch_holds_gate_halves_and_scores_them(trained, prompt_ids):
    """sketch="gate": half the bytes per uncached neuron, so the same budget caches more; the
    store holds the file's gate halves (re-quantized from cache rows as neurons leave, bit
    for bit) and scores |act(gate~.x)| * ||down|| * mean|up.x|, against numpy on the
    dequantized sketch."""
    from flashinfer_py.sketch import sketch_record_bytes as skb

    d, _ = trained
    budget = rank_budget(d, 0.5)
    full = fi.load(d, dram_budget=budget, prefill_chunk=1, sketch="full")
    m = fi.load(d, dram_budget=budget, prefill_chunk=1, sketch="gate")
    a = m.args
    assert (full.runtime.sketch, m.runtime.sketch) == ("full", "gate")
    assert skb(a, "gate") * 2 == skb(a, "full")
    assert m.plan.sketch_record_bytes == skb(a, "gate")
    assert sum(m.plan.cache_capacity) > sum(full.plan.cache_capacity)
    file_sk = file_sketches(d, a)
    check_gate_tiers(m, file_sk)
    store = m.ffn.sketch
    x = np.random.default_rng(3).standard_normal((2, a.hidden_size)).astype(np.float32)
    ids, got = store.scores(0, x)
    gate = np.stack([K.dequantize_q4(r, 1, a.hidden_size) for r in store.data[0]])  # [n, d]
    want = np.abs(silu(x.astype(np.float64) @ gate.T.astype(np.float64))).max(0) * store.scale[0]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())
    cache, token = m.new_cache(), prompt_ids[0]
    for step in range(16):
        logits = m.forward([token], cache)
        check_gate_tiers(m, file_sk)
        token = prompt_ids[step + 1] if step + 1 < 8 else int(np.argmax(logits[-1]))
    assert m.ffn.total.loaded > 0


def test_sketch_auto_picks_the_gate_sketch_where_the_full_one_is_large(trained):
    from flashinfer_py.predictor import Calibration
    from flashinfer_py.sketch import GATE_SKETCH_SHARE, resolve_sketch
    from flashinfer_py.sketch import sketch_record_bytes as skb

    d, preds = trained
    a, cal = fi.load(d).args, preds.calibration
    big = int(skb(a) / GATE_SKETCH_SHARE) - 1    # the full sketch just over 40% of a row
    small = int(skb(a) / GATE_SKETCH_SHARE) + 1
    assert resolve_sketch("auto", a, big, cal) == "gate"
    assert resolve_sketch("auto", a, small, cal) == "full"
    assert resolve_sketch("full", a, big, cal) == "full"
    old = Calibration(cal.hot, cal.err_k, cal.err, cal.down_norm)   # a file without the means
    assert resolve_sketch("auto", a, big, old) == "full"
    with pytest.raises(ValueError, match="train-predictors"):
        resolve_sketch("gate", a, big, old)
    ungated = ModelArgs(arch="opt", vocab_size=11, hidden_size=8, intermediate_size=13,
                        num_hidden_layers=2, num_attention_heads=2, hidden_act="relu",
                        gated=False)
    assert resolve_sketch("auto", ungated, 1, cal) == "full"     # however large the sketch
    with pytest.raises(ValueError, match="no gate"):
        resolve_sketch("gate", ungated, 1, cal)
    with pytest.raises(ValueError, match="sketch must be one of"):
        RuntimeConfig(sketch="half")


def test_a_4bit_model_under_a_budget_gets_the_gate_sketch(tiny_flash, tmp_path, prompt_ids):
    """q4_1 records: the full sketch would be 64% of a cached neuron, so "auto" takes the gate
    sketch, and the model runs under the budget with it."""
    from flashinfer_py.sketch import sketch_record_bytes as skb

    d = tmp_path / "silu-q4_1.flash"
    shutil.copytree(tiny_flash("llama-silu", "q4_1"), d)
    m = fi.load(d)
    ids = np.random.default_rng(1).integers(3, VOCAB, 512).tolist()
    train_predictors(m, ids, SKETCH_ONLY, progress=False)
    from flashinfer_py.loader import cache_row_bytes

    assert skb(m.args) > 0.4 * cache_row_bytes(m.manifest)
    s = fi.load(d, dram_budget=rank_budget(d, 0.5), prefill_chunk=1)
    assert s.runtime.sketch == "gate" and s.ffn.sketch.kind == "gate"
    check_gate_tiers(s, file_sketches(d, s.args))
    cache = s.new_cache()
    out = np.concatenate([s.forward([t], cache) for t in prompt_ids[:8]])
    assert np.isfinite(out).all() and s.ffn.total.loaded > 0
    check_gate_tiers(s, file_sketches(d, s.args))


@pytest.mark.parametrize("bad", ["shape", "nan", "negative", "down_inf"])
def test_a_malformed_calibration_mean_is_refused(trained, tmp_path, bad):
    """predictors.npz comes from strangers: a cal_up_mean of the wrong shape, NaN or negative
    (or a non-finite down norm, which the gate sketch multiplies by it) is refused with the
    file named, not turned into NaN scores."""
    d, _ = trained
    work = tmp_path / "m.flash"
    shutil.copytree(d, work)
    path = work / "predictors.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    up = arrays["cal_up_mean"].copy()
    if bad == "shape":
        arrays["cal_up_mean"] = up[:, :-1]
    elif bad == "nan":
        up[0, 0] = np.nan
        arrays["cal_up_mean"] = up
    elif bad == "negative":
        up[-1, -1] = -1.0
        arrays["cal_up_mean"] = up
    else:
        dn = arrays["cal_down_norm"].copy()
        dn[0, 1] = np.inf
        arrays["cal_down_norm"] = dn
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    m = fi.load(work)
    with pytest.raises(fi.FlashFormatError, match="predictors.npz"):
        Predictors.load(work, m.manifest)


def test_cli_sketch_flag_reaches_the_plan(trained, capsys):
    """--sketch gate: `info` names the sketch the plan was made with, and its JSON says so."""
    from flashinfer_py.cli import main

    d, _ = trained
    assert main(["info", str(d), "--dram-budget", str(rank_budget(d, 0.5)), "--sketch",
                 "gate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_plan"]["sketch_kind"] == "gate"
    assert main(["info", str(d), "--dram-budget", str(rank_budget(d, 0.5))]) == 0
    assert "selection sketch, sketch full," in capsys.readouterr().out


def test_the_training_report_rates_both_sketches(trained):
    """train-predictors rates the full and the gate sketch on held-out tokens: the share of the
    true top half's contribution their own top half carries, per layer; both rank far better
    than chance (a random half carries about half of all the mass, less than the true top
    half's), the full sketch close to exact."""
    from flashinfer_py.train import format_report

    d, preds = trained
    L = fi.load(d).args.num_hidden_layers
    rep = preds.meta["report"]
    full = [r["sketch_mass"] for r in rep if r.get("method") == "sketch"]
    gate = [r["sketch_mass"] for r in rep if r.get("method") == "gate sketch"]
    assert len(full) == len(gate) == L
    assert all(0.9 < m <= 1.0 + 1e-6 for m in full), full
    assert all(0.6 < m <= 1.0 + 1e-6 for m in gate), gate
    text = format_report(preds)
    assert "4-bit sketch: on held-out" in text and "gate sketch (--sketch gate" in text

"""benchmarks/recorded_trace.py: the mapping of a real model's recorded neuron sets to the
OPT-6.7B shape (paper_table.py --trace smollm2) keeps what the paper's Table 2 rows depend on:
the fraction of the FFN per token, the token-to-token reuse and the window's new and held
fractions, and the popularity skew; and the recording hook sees the neurons the model uses."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import paper_table as pt  # noqa: E402
import recorded_trace as rt  # noqa: E402

# Relative tolerance of the mapped statistics against the unmapped ones. The only change the
# widening makes to a set's size is the 10-vs-11 block sizes (+-5% per neuron, averaged over a
# set's neurons and the tokens); set operations act on whole blocks, so the fractions agree
# up to that noise (measured: within 0.9% over 15 seeds of trace and mapping).
REL_TOL = 0.03


def _random_masks(n_layers=6, n_tok=80, d=192, frac=0.1, keep=0.4, seed=0):
    """A set trace at width d with reuse and skew (make_trace's process, as masks)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_layers, n_tok, d), bool)
    for layer in range(n_layers):
        logw = np.empty(d)
        logw[rng.permutation(d)] = -1.0 * np.log(np.arange(1, d + 1))
        n = int(rng.integers(int(frac * d * 0.5), int(frac * d * 1.5)))
        prev = np.empty(0, np.int64)
        for t in range(n_tok):
            kept = prev[rng.random(prev.size) < keep]
            key = logw + rng.gumbel(size=d)
            key[kept] = -np.inf
            s = np.concatenate([kept, np.argpartition(-key, n - kept.size)[:n - kept.size]])
            masks[layer, t, s] = True
            prev = s
    return masks


def test_widening_preserves_fraction_reuse_and_window():
    d_src, d_dst = 192, 2048  # 10.67 per neuron, as 1536 -> 16384
    pred = _random_masks(d=d_src)
    true = pred & _random_masks(d=d_src, frac=0.3, seed=1)
    native = pt.trace_stats(rt.masks_to_sets(pred), rt.masks_to_sets(true), d_ff=d_src)
    wide_p, wide_t = rt.widen(pred, d_dst), rt.widen(true, d_dst)
    mapped = pt.trace_stats(wide_p, wide_t, d_ff=d_dst)
    for k in ("predicted_mean", "active_mean", "window_new", "window_union", "reuse_prev",
              "hot10"):
        assert mapped[k] == pytest.approx(native[k], rel=REL_TOL), k
    # the truly active set stays inside the predicted one; ids are distinct and in range
    for layer in range(len(wide_p)):
        for p, t in zip(wide_p[layer], wide_t[layer]):
            assert np.isin(t, p).all()
            assert p.size == np.unique(p).size and (p.size == 0 or 0 <= p.min() <= p.max() < d_dst)


def test_widening_scatters_blocks():
    """A source neuron's block is spread over the file (random offsets), not contiguous: the
    mapped trace's reads are single records, as the synthetic trace's are."""
    m = np.zeros((2, 1, 1536), bool)
    m[:, 0, 100] = True
    ids = rt.widen(m, 16384)
    assert all(s.size in (10, 11) for s in (ids[0][0], ids[1][0]))
    assert np.diff(ids[0][0]).min() > 1 or np.diff(ids[0][0]).max() > 11
    assert not np.array_equal(ids[0][0], ids[1][0])  # a permutation of its own per layer


def test_block_map_partitions_and_layer_map():
    blocks = rt.block_map(1536, 16384)
    sizes = np.array([b.size for b in blocks])
    assert set(sizes) == {10, 11} and (sizes == 11).sum() == 1024
    assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(16384))
    lm = rt.opt_layer_map(32, 30)
    assert lm[0] == 0 and lm[-1] == 29 and (np.diff(lm) >= 0).all()
    assert set(lm) == set(range(30))
    vals, counts = np.unique(lm, return_counts=True)
    assert vals[counts == 2].tolist() == [7, 22]  # as the module docstring says


def test_thresholds_give_the_chosen_fractions():
    rng = np.random.default_rng(0)
    c = rng.lognormal(size=(3, 200, 256)).astype(np.float32)
    lmap = rt.opt_layer_map(4, 3)
    fr = np.array([0.05, 0.1, 0.15, 0.2])
    masks, th = rt.threshold_sets(c, lmap, fr)
    assert masks.shape == (4, 200, 256)
    np.testing.assert_allclose(masks[:, 1:].mean(axis=(1, 2)), fr, rtol=0.01)
    lo, _ = rt.threshold_sets(c, lmap, fr / 3)
    assert not (lo & ~masks).any()  # the truly active set is a subset of the predicted one


def test_contributions_are_the_dense_ffns_neurons(tiny_flash, prompt_ids):
    """Decoding token by token through the observer gives |act(gate.x) * up.x| * ||down_j||
    of the prefill's activations (train.record), on a tiny random SwiGLU model."""
    import flashinfer_py as fi
    from flashinfer_py.sketch import down_norms
    from flashinfer_py.train import TrainConfig, record

    model = fi.load(tiny_flash("llama-silu"))
    ids = prompt_ids[:12]
    c, g = rt.contributions(model, ids)
    xs, hs, _ = record(model, ids, TrainConfig(max_tokens=len(ids), window=len(ids)),
                       progress=False)
    dn = down_norms(model.ffn.kernel, model.ffn.rows_by_layer)
    ref = hs.astype(np.float32) * dn[:, None, :]
    assert c.shape == ref.shape
    np.testing.assert_allclose(c, ref, rtol=2e-2, atol=1e-3 * float(ref.max()))
    # the look-ahead guess: layer s's neurons on layer s - 1's FFN input; none for layer 0
    assert g.shape == c.shape and not g[0].any()
    for s in range(1, g.shape[0]):
        x = xs[s - 1].astype(np.float32)
        gate = x @ model.ffn.part_f32(s, "gate").T
        h = gate / (1.0 + np.exp(-gate)) * (x @ model.ffn.part_f32(s, "up").T)
        want = np.abs(h) * dn[s]
        np.testing.assert_allclose(g[s], want, rtol=2e-2, atol=1e-3 * float(want.max()))
        assert not np.allclose(g[s], c[s], rtol=0.1)  # a guess, not the layer's own set

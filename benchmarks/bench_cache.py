"""NeuronCache update cost at the paper's churn: per token, 2.4% of a layer's neurons leave the
window and 2.4% enter it (OPT-6.7B: window ~24% of the FFN). pytest-benchmark, not a test:

    python -m pytest benchmarks/bench_cache.py --benchmark-columns=mean,stddev,rounds -q

Layer: 16384 neurons x 16 KiB records (the 1 GiB file of bench_io.py), capacity 24%.
  evict  : swap-with-last compaction of 393 rows (memcpy of 393 x 16 KiB), no I/O
  insert : 393 cold reads straight into the tail rows (I/O bound)
  numpy  : the naive alternative, np.delete + np.concatenate (reallocates the layer matrix)
"""
from __future__ import annotations

import numpy as np
import pytest

from bench_io import D_FF, bundle_file  # noqa: F401  (same synthetic file)
from flashinfer_py.bundles import BundleReader
from flashinfer_py.cache import NeuronCache

CAPACITY = int(0.24 * D_FF)      # 3932 rows
CHURN = int(0.024 * D_FF)        # 393 rows per token
LAYER = 0
ROUNDS = 30


@pytest.fixture(scope="module")
def cache():
    reader = BundleReader(bundle_file())
    c = NeuronCache(reader, capacity=CAPACITY, n_layers=1)
    rng = np.random.default_rng(0)
    c.insert(LAYER, rng.choice(D_FF, CAPACITY - CHURN, replace=False))
    return c


def absent_ids(c, rng, k):
    present = np.zeros(D_FF, bool)
    present[c.ids(LAYER)] = True
    return rng.choice(np.flatnonzero(~present), k, replace=False)


def test_evict_compaction(benchmark, cache):
    rng = np.random.default_rng(1)

    def setup():  # untimed: bring the layer back to capacity, then pick victims
        cache.insert(LAYER, absent_ids(cache, rng, CHURN))
        return (LAYER, rng.choice(cache.ids(LAYER), CHURN, replace=False)), {}

    cache.reset_stats()
    benchmark.pedantic(cache.evict, setup=setup, rounds=ROUNDS, iterations=1)
    s = cache.stats()
    benchmark.extra_info.update(rows_per_token=CHURN, capacity=CAPACITY,
                                moved_MB_per_token=round(s["moved_bytes"] / ROUNDS / 1e6, 2),
                                compaction_ms=round(s["compaction_ns"] / ROUNDS / 1e6, 3))


def test_insert_cold(benchmark, cache):
    rng = np.random.default_rng(2)

    def setup():  # untimed: make room, drop the file from the page cache
        cache.evict(LAYER, rng.choice(cache.ids(LAYER), CHURN, replace=False))
        cache.reader.drop_page_cache()
        return (LAYER, absent_ids(cache, rng, CHURN)), {}

    cache.reader.reset_stats()
    benchmark.pedantic(cache.insert, setup=setup, rounds=ROUNDS, iterations=1)
    s = cache.reader.stats()
    benchmark.extra_info.update(read_GBps=round(s.bytes_requested / s.ns, 3), direct=s.direct,
                                MB_per_token=round(s.bytes_requested / s.calls / 1e6, 2))


def test_token_update(benchmark, cache):
    rng = np.random.default_rng(3)

    def setup():
        cache.reader.drop_page_cache()
        old = rng.choice(cache.ids(LAYER), CHURN, replace=False)
        return (old, absent_ids(cache, rng, CHURN)), {}

    def update(old, new):
        cache.evict(LAYER, old)
        cache.insert(LAYER, new)

    benchmark.pedantic(update, setup=setup, rounds=ROUNDS, iterations=1)


def test_numpy_realloc_baseline(benchmark, cache):
    """What the in-place cache avoids: rebuilding the layer matrix every token."""
    rows = np.array(cache.rows(LAYER))
    new = np.ones((CHURN, rows.shape[1]), rows.dtype)
    rng = np.random.default_rng(4)

    def setup():
        return (rows, rng.choice(len(rows), CHURN, replace=False)), {}

    def rebuild(rows, victims):
        return np.concatenate([np.delete(rows, victims, axis=0), new])

    benchmark.pedantic(rebuild, setup=setup, rounds=ROUNDS, iterations=1)

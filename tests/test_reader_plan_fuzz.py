"""Randomized differential test of the reader's read planning (csrc/bundle_reader.cpp): for
random coalescing gaps, request and scratch bounds, queue depths, id sets in any order and
destinations whose rows are adjacent or not, both engines return exactly the records the
packer wrote, the scratch buffer never passes its cap, and the call's statistics are
consistent (every byte asked for read once, requests within max_read_bytes, rounds only where
the scratch had to be reused)."""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_py._core import build_info
from flashinfer_py.bundles import BundleReader, ReaderParams
from test_packer import expected_records, pack_random

ENGINES = ["threads"] + (["io_uring"] if build_info()["io_uring"] else [])
CASES = 30  # per engine and record size; each case is a handful of small reads


@pytest.fixture(params=[(200, 97), (1000, 61)], ids=["record-4k", "record-8k"])
def bundle(tmp_path, request):
    d_model, d_ff = request.param
    path = tmp_path / "ffn_bundles.bin"
    mats = pack_random(path, n_layers=2, d_model=d_model, d_ff=d_ff, dtype="float16",
                       n_parts=3)
    return path, mats, d_ff


@pytest.mark.parametrize("engine", ENGINES)
def test_random_plans_read_the_packed_bytes(bundle, engine):
    path, mats, d_ff = bundle
    rng = np.random.default_rng(2026)
    for case in range(CASES):
        probe = BundleReader(path, ReaderParams(use_direct_io=False))
        rb = probe.record_bytes
        params = ReaderParams(
            engine=engine,
            queue_depth=int(rng.choice([1, 2, 3, 8, 32])),
            coalesce_gap_bytes=int(rng.choice([0, rb, 2 * rb, 5 * rb, 64 * rb])),
            max_read_bytes=int(rng.choice([4096, 8192, 3 * 4096, 5 * rb, 1 << 20])),
            max_scratch_bytes=int(rng.choice([1, 4096, 5000, 3 * rb, 7 * rb, 1 << 20])))
        r = BundleReader(path, params)
        cap = r.scratch_cap
        assert cap % 4096 == 0 and cap >= max(params.max_scratch_bytes, rb)
        layer = int(rng.integers(2))
        n = int(rng.integers(1, d_ff + 1))
        ids = rng.choice(d_ff, n, replace=False)
        if rng.random() < 0.3:
            ids = np.sort(ids)  # sorted ids: long runs of neighbours
        want = expected_records(mats, layer, ids, r.record_elems)
        where = f"case {case}: {params}, layer {layer}, {n} ids"
        spread = int(rng.choice([1, 1, 2, 3]))  # 1: rows adjacent; else rows apart
        out = r.empty(n * spread).reshape(n, -1)[:, :r.record_elems]
        got = r.read(layer, ids, out)
        assert got.tobytes() == want.tobytes(), where
        st = r.last_stats
        assert st.bytes_requested == n * rb, where
        assert st.bytes_read >= n * rb and st.bytes_read % rb == 0, where
        assert st.reads_issued * max(params.max_read_bytes // 4096 * 4096, rb) >= st.bytes_read
        assert st.rounds >= 1, where
        if params.coalesce_gap_bytes == 0 and spread == 1:
            assert st.bytes_read == n * rb, where  # nothing but the records themselves
        assert r.scratch_bytes <= cap, where
        # the unbundled path: a random selection of parts, each its own (often unaligned) read
        parts = list(rng.choice(3, int(rng.integers(1, 4)), replace=False))
        pb = r.header["part_bytes"]
        po = np.r_[0, np.cumsum(pb)]  # the parts back to back (expected_records' layout)
        got = r.read_parts(layer, ids, parts).view(np.uint8)
        raw = want.view(np.uint8)
        ref = np.concatenate([raw[:, po[p]:po[p] + pb[p]] for p in parts], 1)
        assert got.tobytes() == ref.tobytes(), where + f", parts {parts}"
        assert r.scratch_bytes <= cap, where
        # a failed call leaves nothing behind: a duplicate id is refused before any I/O and
        # the next call still reads right
        if n >= 2:
            with pytest.raises(ValueError, match="duplicate"):
                r.read(layer, np.r_[ids[:2], ids[:1]])
            assert r.read(layer, ids[:2]).tobytes() == want[:2].tobytes(), where

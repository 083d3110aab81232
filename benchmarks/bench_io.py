"""Raw bundle-read throughput: engines, queue depth, coalescing, direct vs buffered, bundled vs
unbundled. pytest-benchmark microbenchmarks (not part of the test-suite):

    python -m pytest benchmarks/bench_io.py --benchmark-columns=mean,stddev,rounds \
        --benchmark-sort=name -q

Every round reads a fresh random 10% of one layer's neurons (16 KiB fp16 up+down records, the
paper's OPT-6.7B bundle) from a 1 GiB file after dropping the file from the page cache, so
every byte comes from the disk. Achieved GB/s (useful record bytes / wall time, and disk bytes
/ wall time) goes into each row's extra_info; `summarize()` prints them.

The bundle file lives in $FLASHINFER_BENCH_DIR (default /tmp/flashinfer_bench) and is reused.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flashinfer_py._core import build_info
from flashinfer_py.bundles import BundleReader, BundleWriter, ReaderParams, read_header

# 4 layers x 16384 neurons x 16 KiB = 1 GiB (+4 KiB header).
N_LAYERS, D_MODEL, D_FF, DTYPE = 4, 4096, 16384, "float16"
DENSITY = 0.10  # fraction of a layer read per round
ROUNDS = 12
BENCH_DIR = Path(os.environ.get("FLASHINFER_BENCH_DIR", "/tmp/flashinfer_bench"))
ENGINES = ["threads"] + (["io_uring"] if build_info()["io_uring"] else [])


def bundle_file() -> Path:
    """Create (once) the 1 GiB synthetic bundle file; random bytes so nothing compresses."""
    path = BENCH_DIR / f"bench_{N_LAYERS}x{D_FF}x{D_MODEL}_{DTYPE}.bin"
    try:
        if read_header(path)["d_ff"] == D_FF:
            return path
    except (OSError, ValueError):
        pass
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with BundleWriter(path, N_LAYERS, D_MODEL, D_FF, DTYPE, ("up", "down")) as w:
        for layer in range(N_LAYERS):
            m = rng.integers(0, 1 << 16, size=(D_FF, D_MODEL), dtype=np.uint16).view(np.float16)
            w.write_layer(layer, [m, m])
    return path


@pytest.fixture(scope="session")
def bundle():
    return bundle_file()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def run_cold(benchmark, reader: BundleReader, read_fn, n_ids: int):
    """Benchmark read_fn(layer, ids) over ROUNDS cold rounds with fresh random ids; record
    achieved bandwidth from the reader's own counters."""
    rng = np.random.default_rng(1)

    def setup():
        reader.drop_page_cache()
        layer = int(rng.integers(N_LAYERS))
        ids = rng.choice(D_FF, n_ids, replace=False)
        return (layer, ids), {}

    reader.reset_stats()
    benchmark.pedantic(read_fn, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    s = reader.stats()
    benchmark.extra_info.update(
        useful_GBps=round(s.bytes_requested / s.ns, 3),
        disk_GBps=round(s.bytes_read / s.ns, 3),
        reads_per_call=round(s.reads_issued / s.calls, 1),
        direct=s.direct, engine=reader.engine, params=repr(reader.params),
        git=git_sha(), cold="posix_fadvise(DONTNEED) before each round")
    return s


def make_reader(path, **kw) -> BundleReader:
    return BundleReader(path, ReaderParams(**kw))


N_IDS = int(D_FF * DENSITY)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("qd", [4, 16, 32, 64])
def test_engine_queue_depth(benchmark, bundle, engine, qd):
    r = make_reader(bundle, engine=engine, queue_depth=qd)
    out = r.empty(N_IDS)
    run_cold(benchmark, r, lambda layer, ids: r.read(layer, ids, out), N_IDS)


@pytest.mark.parametrize("gap_records", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("qd", [8, 32])
def test_coalesce_gap(benchmark, bundle, gap_records, qd):
    r = make_reader(bundle, queue_depth=qd, coalesce_gap_bytes=gap_records * 16384)
    out = r.empty(N_IDS)
    run_cold(benchmark, r, lambda layer, ids: r.read(layer, ids, out), N_IDS)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_vs_buffered_cold(benchmark, bundle, direct):
    r = make_reader(bundle, use_direct_io=direct)
    out = r.empty(N_IDS)
    run_cold(benchmark, r, lambda layer, ids: r.read(layer, ids, out), N_IDS)


@pytest.mark.parametrize("bundled", [True, False])
def test_bundled_vs_unbundled(benchmark, bundle, bundled):
    r = make_reader(bundle)
    out = r.empty(N_IDS)
    if bundled:
        fn = lambda layer, ids: r.read(layer, ids, out)  # noqa: E731
    else:  # up and down as two 8 KiB reads each (the paper's "no bundling" row)
        fn = lambda layer, ids: r.read_parts(layer, ids, [0, 1], out)  # noqa: E731
    run_cold(benchmark, r, fn, N_IDS)


def pytest_terminal_summary_rows(benchmarks):
    """Rows for RESULTS.md: name, useful GB/s, disk GB/s, reads/call, mean ms."""
    for b in benchmarks:
        e = b["extra_info"]
        yield (b["name"], e.get("useful_GBps"), e.get("disk_GBps"), e.get("reads_per_call"),
               round(b["stats"]["mean"] * 1e3, 1))


if __name__ == "__main__":  # python benchmarks/bench_io.py results.json -> markdown table
    import json
    import sys

    data = json.load(open(sys.argv[1]))["benchmarks"]
    print("| case | useful GB/s | disk GB/s | reads/call | mean ms |\n|---|---|---|---|---|")
    for row in pytest_terminal_summary_rows(data):
        print("| " + " | ".join(str(x) for x in row) + " |")

"""Kernel throughput: linear (matvec / small GEMM) and ffn_rows, reported as achieved GB/s.

Not part of the tests. Two ways to run the same case table:

    python -m pytest benchmarks/bench_kernels.py --benchmark-only -q   # pytest-benchmark
    python benchmarks/bench_kernels.py [--threads N]                   # markdown table

Weights are cycled through enough copies to exceed the 32 MiB L3, so the numbers are DRAM
streaming rates, not cache hits. GB/s = weight bytes touched / time (for ffn_rows: every
row's up part + the down parts of active rows).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from flashinfer_py import kernels as K

COLD_BYTES = 96 << 20  # cycle copies until this many bytes: 3x the L3


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "linear", "numpy", "ffn"
    dtype: str
    m: int  # linear: out features; ffn: rows used
    k: int  # linear: in features; ffn: d_model
    n: int = 1
    active: float = 0.1  # ffn: target fraction of rows with h != 0


CASES = [
    *(Case(f"linear 4096x4096 {dt}", "linear", dt, 4096, 4096) for dt in
      ("float32", "float16", "bfloat16")),
    Case("numpy 4096x4096 float32", "numpy", "float32", 4096, 4096),
    *(Case(f"linear 576x1536 {dt}", "linear", dt, 576, 1536) for dt in
      ("float32", "float16", "bfloat16")),
    Case("numpy 576x1536 float32", "numpy", "float32", 576, 1536),
    Case("linear n=64 4096x4096 float16", "linear", "float16", 4096, 4096, n=64),
    Case("ffn_rows d=4096 r=1600 float16", "ffn", "float16", 1600, 4096),
]


def _storage(a: np.ndarray, dtype: str) -> np.ndarray:
    return a if dtype == "float32" else K.from_float32(a, dtype)


def make_runner(case: Case, threads: int = 0) -> tuple[Callable[[], None], float, float, int]:
    """(fn, bytes, flops, copies): fn runs the case once over every weight copy."""
    rng = np.random.default_rng(0)
    if case.kind in ("linear", "numpy"):
        base = (rng.standard_normal((case.m, case.k)) * 0.02).astype(np.float32)
        w0 = _storage(base, case.dtype)
        copies = [w0] + [w0.copy() for _ in range(max(1, math.ceil(COLD_BYTES / w0.nbytes)) - 1)]
        x = rng.standard_normal((case.n, case.k)).astype(np.float32)
        out = np.empty((case.n, case.m), np.float32)
        if case.kind == "numpy":
            def fn():
                for w in copies:
                    np.matmul(x, w.T, out=out)
        else:
            def fn():
                for w in copies:
                    K.linear(x, w, out=out, threads=threads)
        nbytes = w0.nbytes * len(copies)
        return fn, nbytes, 2.0 * case.n * case.m * case.k * len(copies), len(copies)

    d, r = case.k, case.m
    base = (rng.standard_normal((r, 2 * d)) * 0.02).astype(np.float32)
    rows0 = _storage(base, case.dtype)
    x = rng.standard_normal((1, d)).astype(np.float32)
    # fatrelu threshold at the (1 - active) quantile of u gives the target sparsity.
    u = x[0] @ base[:, :d].T
    thr = float(np.quantile(u, 1.0 - case.active))
    copies = [rows0] + [rows0.copy() for _ in range(max(1, math.ceil(COLD_BYTES / rows0.nbytes)) - 1)]
    out = np.empty((1, d), np.float32)
    act = np.empty((1, r), np.float32)

    def fn():
        for rows in copies:
            K.ffn_rows(x, rows, d, up_off=0, down_off=d, activation="fatrelu", act_param=thr,
                       out=out, act_out=act, threads=threads)

    fn()
    n_active = int((act != 0).sum())
    eb = rows0.itemsize
    nbytes = (r * d * eb + n_active * d * eb) * len(copies)
    return fn, nbytes, 2.0 * (r + n_active) * d * len(copies), len(copies)


def measure(fn: Callable[[], None], trials: int = 7) -> tuple[float, float, float]:
    """One warm-up, then `trials` timed runs: (mean, stdev, best) seconds."""
    fn()
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.mean(ts), statistics.stdev(ts), min(ts)


# ---- pytest-benchmark -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "-"))
def test_kernel_throughput(benchmark, case):
    fn, nbytes, flops, _ = make_runner(case)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(nbytes / t / 1e9, 2)
    benchmark.extra_info["GFLOP/s"] = round(flops / t / 1e9, 2)
    benchmark.extra_info["isa"] = K.kernel_isa()


# ---- table mode -----------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="OpenMP threads (0: all)")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--only", default="", help="substring filter on case names")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"isa={K.kernel_isa()}, threads={args.threads or 'all'}, "
          f"load={os.getloadavg()[0]:.2f}")
    print("| case | ms per matrix (mean ± sd) | GB/s mean | GB/s best | GFLOP/s best |")
    print("|---|---|---|---|---|")
    for case in CASES:
        if args.only not in case.name:
            continue
        fn, nbytes, flops, copies = make_runner(case, args.threads)
        mean, std, best = measure(fn, args.trials)
        print(f"| {case.name} | {mean / copies * 1e3:.3f} ± {std / copies * 1e3:.3f} | "
              f"{nbytes / mean / 1e9:.1f} | {nbytes / best / 1e9:.1f} | "
              f"{flops / best / 1e9:.1f} |", flush=True)

if __name__ == "__main__":
    main()

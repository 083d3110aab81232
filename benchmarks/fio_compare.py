"""Our reader vs fio on the same file, same request size and depth, run back to back; then the
coalesce-gap sweep with the cases INTERLEAVED round by round (the shared VM's disk drifts by
tens of percent within a minute, which sequential pytest-benchmark cases cannot cancel out).

    python benchmarks/fio_compare.py [--seconds 5] [--rounds 10]

Prints a markdown table for RESULTS_io.md. Cold: posix_fadvise(DONTNEED) before every call.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_io import D_FF, DENSITY, N_LAYERS, bundle_file  # noqa: E402
from flashinfer_py.bundles import BundleReader, ReaderParams  # noqa: E402


def fio_gbps(path: Path, bs: str, qd: int, seconds: int) -> float:
    cmd = ["fio", "--name=r", f"--filename={path}", "--rw=randread", f"--bs={bs}",
           f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", f"--runtime={seconds}",
           "--time_based", "--output-format=json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out["jobs"][0]["read"]["bw_bytes"] / 1e9


def reader_gbps(r: BundleReader, seconds: float, rng) -> float:
    n = int(D_FF * DENSITY)
    out = r.empty(n)
    r.reset_stats()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        r.drop_page_cache()
        r.read(int(rng.integers(N_LAYERS)), rng.choice(D_FF, n, replace=False), out)
    s = r.stats()
    return s.bytes_requested / s.ns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sweep-only", action="store_true", help="skip the fio comparison")
    a = ap.parse_args()
    path = bundle_file()
    rng = np.random.default_rng(0)

    if not a.sweep_only:
        compare_fio(path, a.seconds, rng)
    sweep(path, a.rounds, rng)


def compare_fio(path: Path, seconds: int, rng) -> None:
    a = argparse.Namespace(seconds=seconds)
    print("| tool (16 KiB random reads, QD32, O_DIRECT) | GB/s |\n|---|---|")
    if shutil.which("fio"):
        print(f"| fio io_uring | {fio_gbps(path, '16k', 32, a.seconds):.3f} |")
    for engine in ("io_uring", "threads"):
        r = BundleReader(path, ReaderParams(engine=engine, queue_depth=32))
        print(f"| flashinfer_py {r.engine} (10% of a layer per call) | "
              f"{reader_gbps(r, a.seconds, rng):.3f} |")
    if shutil.which("fio"):
        print(f"| fio io_uring (again, drift check) | {fio_gbps(path, '16k', 32, a.seconds):.3f} |")



def sweep(path: Path, rounds: int, rng) -> None:
    """coalesce_gap_bytes sweep, interleaved round by round."""
    n = int(D_FF * DENSITY)
    print("\n| queue depth | gap (records) | useful GB/s | disk GB/s | reads/call |\n|---|---|---|---|---|")
    for qd in (8, 32):
        readers = {g: BundleReader(path, ReaderParams(queue_depth=qd, coalesce_gap_bytes=g * 16384))
                   for g in (0, 1, 2, 4)}
        outs = {g: r.empty(n) for g, r in readers.items()}
        for r in readers.values():
            r.reset_stats()
        for _ in range(rounds):
            layer, ids = int(rng.integers(N_LAYERS)), rng.choice(D_FF, n, replace=False)
            for g in rng.permutation(list(readers)):  # same ids, same moment, shuffled order
                g = int(g)
                r = readers[g]
                r.drop_page_cache()
                r.read(layer, ids, outs[g])
        for g, r in readers.items():
            s = r.stats()
            print(f"| {qd} | {g} | {s.bytes_requested / s.ns:.3f} | {s.bytes_read / s.ns:.3f} | "
                  f"{s.reads_issued / s.calls:.0f} |")


if __name__ == "__main__":
    main()

"""Our reader vs fio on the same file: random reads of 16/32/64/128 KiB x 16/32/64 in flight,
cold cache, direct I/O, fio (io_uring) and both of our engines INTERLEAVED in every cell and
round (the shared VM's disk drifts by tens of percent within a minute; only ratios measured
side by side mean anything). Then the coalesce-gap sweep, interleaved the same way.

    python benchmarks/fio_compare.py [--seconds 2] [--rounds 2] [--sweep] [--json rows.jsonl]

Our side reads through BundleReader.read_ranges (the engine under read(), one request per
read, the same size-aligned uniform random offsets over the whole file as fio's
--norandommap); GB/s = bytes / time inside the reader. Buffers: huge pages (as the neuron
cache) and 4 KiB pages (as fio's), see compare_fio. The target (issue 3): ours >= 0.90 x
fio in every cell. Prints markdown tables for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_io import BENCH_DIR, D_FF, DENSITY, N_LAYERS, bundle_file, git_sha  # noqa: E402
from flashinfer_py import bench_disk as bd  # noqa: E402
from flashinfer_py.bundles import BundleReader, ReaderParams  # noqa: E402

SIZES_KIB = (16, 32, 64, 128)
DEPTHS = (16, 32, 64)
GRID_FILE_SIZE = 4 << 30


def hugetlb_free_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            kv = {ln.split(":")[0]: ln.split()[1] for ln in f}
        return int(kv.get("HugePages_Free", 0)) * int(kv.get("Hugepagesize", 0)) * 1024
    except OSError:
        return 0


def fio_gbps(path: Path, bs: int, qd: int, seconds: float, huge: bool = False) -> float:
    """fio's random-read GB/s. huge: its buffers in hugetlb pages (--mem=shmhuge), the fair
    peer of our huge-page buffers; needs reserved pages (echo 80 > /proc/sys/vm/nr_hugepages)."""
    cmd = ["fio", "--name=r", f"--filename={path}", "--rw=randread", f"--bs={bs}",
           f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", "--norandommap",
           "--randrepeat=0", f"--runtime={seconds}s", "--time_based", "--output-format=json"] + (["--mem=shmhuge"] if huge else [])
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out["jobs"][0]["read"]["bw_bytes"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per tool, cell and round")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the grid (order shuffled)")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES_KIB, help="KiB")
    ap.add_argument("--depths", type=int, nargs="+", default=DEPTHS)
    ap.add_argument("--call-mib", type=int, default=64, help="bytes per reader call (MiB)")
    ap.add_argument("--small-pages", action="store_true",
                    help="also read into 4 KiB-page buffers (columns engine/4k)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--sweep", action="store_true", help="also run the coalesce-gap sweep")
    ap.add_argument("--sweep-rounds", type=int, default=10)
    a = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (apt-get install fio)")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = bd.make_test_file(BENCH_DIR, GRID_FILE_SIZE)  # kept for later runs
    compare_fio(path, a)
    if a.sweep:
        sweep(bundle_file(), a.sweep_rounds, np.random.default_rng(0))


def compare_fio(path: Path, a) -> None:
    """The grid. Our engines read into huge-page memory (what the neuron cache uses) and, as
    "/4k" columns, into 4 KiB pages like fio's own buffers: the like-for-like engine check."""
    rng = np.random.default_rng(0)
    engines = bd.available_engines()
    tools = ["fio"] + engines
    if a.small_pages:
        tools += [f"{e}/4k" for e in engines]
    if hugetlb_free_bytes() >= 2 * max(a.depths) * (max(a.sizes) << 10):
        tools.insert(1, "fio/huge")
    else:
        print("no free hugetlb pages: skipping fio/huge (echo 80 > /proc/sys/vm/nr_hugepages)",
              file=sys.stderr)
    sizes = [k << 10 for k in a.sizes]
    call_bytes = a.call_mib << 20
    nbuf = bd.buffer_bytes(sizes, a.depths)
    bufs = {True: bd.page_buffer(nbuf, True), False: bd.page_buffer(nbuf, False)}
    n_blocks = {s: path.stat().st_size // s for s in sizes}
    gb = {}  # (tool, size, depth) -> [GB/s per round]
    load0, t0 = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M")
    for rnd in range(a.rounds):
        for s in sizes:
            for d in a.depths:
                for tool in rng.permutation(tools):  # same cell, same minute, shuffled order
                    tool = str(tool)
                    if tool.startswith("fio"):
                        v = fio_gbps(path, s, d, a.seconds, huge=tool == "fio/huge")
                    else:
                        engine, _, pages = tool.partition("/")
                        r = BundleReader(path, ReaderParams(engine=engine, queue_depth=d))
                        v = bd.measure_cell(r, s, d, a.seconds, n_blocks[s], bufs[pages != "4k"],
                                            rng, call_bytes).gbps
                        del r
                    gb.setdefault((tool, s, d), []).append(v)
                print(f"round {rnd} {s >> 10:>4} KiB QD{d:<3} " + "  ".join(
                    f"{t} {gb[(t, s, d)][-1]:.3f}" for t in tools), file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]

    mean = {k: float(np.mean(v)) for k, v in gb.items()}
    ref = "fio/huge" if "fio/huge" in tools else "fio"
    ours = [t for t in tools if not t.startswith("fio")]
    print(f"\n{t0}, commit {git_sha()}, load average {load0:.2f} -> {load1:.2f}, "
          f"{a.rounds} rounds x {a.seconds:g} s per tool and cell, file {path.stat().st_size >> 20}"
          f" MiB; ours = BundleReader.read_ranges, huge-page buffer unless /4k\n")
    fios = [t for t in tools if t.startswith("fio")]
    print("| size | QD | " + " | ".join(fios + ours) + " | " +
          " | ".join(f"{t} / {ref}" for t in ours) + " |")
    print("|---" * (2 + len(fios) + 2 * len(ours)) + "|")
    worst = {t: 9.0 for t in ours}
    rows = []
    for s in sizes:
        for d in a.depths:
            f = mean[(ref, s, d)]
            ratios = {t: mean[(t, s, d)] / f for t in ours}
            for t in ours:
                worst[t] = min(worst[t], ratios[t])
            print(f"| {s >> 10} KiB | {d} | " +
                  " | ".join(f"{mean[(t, s, d)]:.3f}" for t in fios + ours) + " | " +
                  " | ".join(f"**{ratios[t]:.2f}**" if ratios[t] < 0.9 else f"{ratios[t]:.2f}"
                             for t in ours) + " |")
            rows.append({"size": s, "depth": d, **{f"{t}_gbps": gb[(t, s, d)] for t in tools},
                         **{f"{t}_over_{ref}": round(ratios[t], 3) for t in ours}})
    print(f"\nworst ratio to {ref}: " + ", ".join(f"{t} {w:.2f}" for t, w in worst.items()))
    if a.json:
        env = {"date": t0, "git": git_sha(), "load_avg": [load0, load1], "file": str(path),
               "cold": "direct I/O; posix_fadvise(DONTNEED) before each cell",
               "cpu": bd._environment(path).get("cpu")}
        with open(a.json, "w") as fh:
            for row in rows:
                fh.write(json.dumps({**row, **env}) + "\n")


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

"""How long `flashinfer-py convert` takes and how much memory it needs, on the real models that
install offline (issue 15: the README's conversion rows come from here).

    python benchmarks/convert_time.py [--models smollm2 gemma3] [--rounds 2]

Each conversion runs in a fresh process (`python -m flashinfer_py convert SRC DST --force`
into a temporary directory), timed from outside; its peak RSS is the child's VmHWM (Linux:
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of that one child). Prints a markdown table
with the machine and load average for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {
    # name: (how to find the source, storage dtype of the records)
    "smollm2": ("SmolLM2-135M-Instruct Q4_1 GGUF", "float16"),
    "gemma3": ("Gemma-3-270M Q4_K_M GGUF", "float32"),
}


def source(name: str) -> Path:
    from flashinfer_py import default_model

    if name == "smollm2":
        return Path(default_model.default_gguf_path())
    return Path(default_model.gemma3_gguf_path())


def convert_once(src: Path, dtype: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one conversion in a child process."""
    out = Path(tempfile.mkdtemp(prefix="fi-convert-")) / "model.flash"
    cmd = [sys.executable, "-c",
           "import resource, sys\n"
           "from flashinfer_py.convert import convert\n"
           f"convert({str(src)!r}, {str(out)!r}, dtype={dtype!r}, progress=False)\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    shutil.rmtree(out.parent, ignore_errors=True)
    if res.returncode:
        raise SystemExit(f"convert of {src} failed:\n{res.stderr[-2000:]}")
    return dt, int(res.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    load0 = os.getloadavg()
    rows = []
    for name in a.models:
        src = source(name)
        runs = [convert_once(src, SOURCES[name][1]) for _ in range(a.rounds)]
        rows.append((name, src, runs))
    load1 = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, commit {git}, load average {load0[0]:.1f} -> "
          f"{load1[0]:.1f}, {platform.machine()}, {os.cpu_count()} cores\n")
    print("| source | records | seconds (runs) | peak RSS |")
    print("|---|---|---|---|")
    for name, src, runs in rows:
        secs = ", ".join(f"{s:.1f}" for s, _ in runs)
        rss = max(r for _, r in runs)
        print(f"| {SOURCES[name][0]} ({src.stat().st_size / 1e6:.0f} MB) | {SOURCES[name][1]} | "
              f"{secs} | {rss / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()

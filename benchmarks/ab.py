"""Before and after a kernel change, in one run: a benchmark script run alternately by a
baseline build of flashinfer_py and by this checkout's, each run in a process of its own.

    python benchmarks/ab.py BASELINE_DIR [--runs 2] [--out FILE] -- SCRIPT [ARGS...]

BASELINE_DIR holds a ``flashinfer_py`` package built at the commit to compare, e.g.

    git worktree add /tmp/base <commit> && pip install --no-deps --target /tmp/base-pkg /tmp/base

The script's output of every run is printed (and written to --out) under a ``== baseline`` or
``== current`` line, in the order run: baseline, current, baseline, current, ... so the two
builds meet the machine in the same minutes. Each script prints its own table; compare rows.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", help="directory holding the baseline flashinfer_py package")
    ap.add_argument("--runs", type=int, default=2, help="alternations (default 2)")
    ap.add_argument("--out", default="", help="also write every run's output here")
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.parse_args(argv)  # -h / --help, or a missing baseline
    if "--" not in argv:
        ap.error("give the benchmark after --, e.g. -- benchmarks/bench_kernels.py --only q4")
    cut = argv.index("--")
    a = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    if not cmd:
        ap.error("give the benchmark after --, e.g. -- benchmarks/bench_kernels.py --only q4")
    if not (Path(a.baseline) / "flashinfer_py" / "__init__.py").exists():
        ap.error(f"{a.baseline}: no flashinfer_py package there")
    boot = ("import sys, runpy; sys.path.insert(0, {here!r}); import common; {use}"
            "sys.argv = {argv!r}; sys.path.insert(0, {sdir!r}); "
            "runpy.run_path({script!r}, run_name='__main__')")
    script = str(Path(cmd[0]).resolve())
    chunks = []
    for _ in range(a.runs):
        for who in ("baseline", "current"):
            use = f"common.use_baseline({str(Path(a.baseline).resolve())!r}); " \
                if who == "baseline" else ""
            code = boot.format(here=str(HERE), use=use, argv=[script, *cmd[1:]],
                               sdir=str(Path(script).parent), script=script)
            r = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True)
            if r.returncode:
                sys.exit(f"{who} run failed ({r.returncode}):\n{r.stderr[-2000:]}")
            chunk = f"== {who}\n{r.stdout}"
            print(chunk, flush=True)
            chunks.append(chunk)
    if a.out:
        Path(a.out).write_text("\n".join(chunks))


if __name__ == "__main__":
    main()

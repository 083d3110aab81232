"""What every results table records about where and from what it ran."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(*paths: str) -> str:
    """The short commit, and whether `paths` (default: the package and the core) differ
    from it."""
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--",
                                *(paths or ("flashinfer_py", "csrc"))], cwd=ROOT, text=True,
                               capture_output=True).stdout.strip()
        return c + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out `fig` and write it to `path` (its folder made if missing), saying where."""
    import sys

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}", file=sys.stderr)


def machine() -> str:
    """CPU model, cores, memory and OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB, {platform.system()} {platform.release()}"


def memcpy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """One thread's memcpy bandwidth, DRAM to DRAM (buffers 4x a large L3): the median of
    `repeats` copies of `nbytes`, after one untimed copy that faults the pages in. What the
    neuron cache's row moves are held against (their physical floor)."""
    import numpy as np

    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t0)
    return nbytes / sorted(times)[len(times) // 2]


def use_baseline(root: str) -> None:
    """Import flashinfer_py from `root` (a directory holding a ``flashinfer_py`` package built
    at another commit: ``pip install --no-deps --target DIR .`` there) instead of this
    environment's install; call before the first import of flashinfer_py. An editable
    install's import hook would otherwise answer first."""
    import sys
    from importlib.machinery import PathFinder

    root = str(Path(root).resolve())
    if not (Path(root) / "flashinfer_py" / "__init__.py").exists():
        raise SystemExit(f"baseline {root}: no flashinfer_py package there (build one with "
                         "pip install --no-deps --target DIR . at the commit to compare)")
    sys.path.insert(0, root)

    def claims(f) -> bool:
        if f is PathFinder or not hasattr(f, "find_spec"):
            return False
        spec = f.find_spec("flashinfer_py", None)
        return spec is not None and not str(spec.origin or "").startswith(root + os.sep)

    sys.meta_path[:] = [f for f in sys.meta_path if not claims(f)]


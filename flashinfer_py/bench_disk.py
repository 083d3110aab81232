"""bench-disk: the paper's random-read figure (Figure 2b) measured on your own disk.

"LLM in a flash" sizes its reads from one plot: cold random-read throughput against read size,
for several numbers of reads in flight. This module redraws it for the filesystem you point it
at, through the same native reader the runtime uses (:class:`~flashinfer_py.bundles.
BundleReader`, direct I/O, "threads" and "io_uring" engines), so the numbers are the ones the
runtime can get, not a separate tool's.

    flashinfer-py bench-disk /mnt/nvme --plot disk.png

Method: a test file of ``file_size`` random bytes (a valid bundle file of 4 KiB records) is
created on the filesystem, dropped from the page cache (posix_fadvise DONTNEED), and read with
``BundleReader.read_ranges``: ``size``-aligned random offsets over the whole file, one request
per read, ``depth`` requests in flight, calls of about ``call_bytes`` each, into 2 x ``depth``
huge-page buffer slots reused round-robin (as fio reuses its buffers), for ``seconds`` per cell
after one warm-up call. Engines are measured back to back in every (size, depth) cell, so
their ratio is not skewed by drift on a shared machine. GB/s = bytes / time inside the reader.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import format_bytes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = (4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB,
                 1 * MiB)
DEFAULT_DEPTHS = (1, 2, 4, 8, 16, 32, 64)
ENGINES = ("threads", "io_uring")
DEFAULT_FILE_SIZE = 4 * GiB
FILE_NAME = "flashinfer-bench-disk.bin"
HEADROOM = 256 * MiB       # free space left on the filesystem after the test file
LAYER_BYTES = 64 * MiB     # the test file is written one 64 MiB bundle "layer" at a time
RECORD_D_MODEL = 1024      # float16 up + down parts of 1024 = 4 KiB records
BENCH_EXTRA = 'pip install "flashinfer_py[bench]"'
HUGE_PAGE = 2 * MiB
SLOTS_PER_READ = 2         # destination slots per read in flight (reused round-robin)


class NotEnoughSpaceError(OSError):
    """The filesystem cannot hold the test file."""


@dataclass
class Cell:
    """One (engine, read size, depth) measurement."""

    engine: str
    size: int
    depth: int
    gbps: float          # bytes / time inside the reader, 1e9 bytes per second
    gbps_sd: float       # stdev of the per-call GB/s
    iops: float
    calls: int
    reads: int
    seconds: float       # time inside the reader
    direct: bool


@dataclass
class DiskBenchResult:
    path: str
    file_size: int
    sizes: list
    depths: list
    engines: list
    seconds: float
    cells: list = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def grid(self, engine: str, key: str = "gbps") -> list:
        """rows = sizes, columns = depths, values = `key` of the matching cells."""
        by = {(c.size, c.depth): getattr(c, key) for c in self.cells if c.engine == engine}
        return [[by.get((s, d)) for d in self.depths] for s in self.sizes]

    def to_dict(self) -> dict:
        return {
            "path": self.path, "file_size": self.file_size, "sizes": self.sizes,
            "depths": self.depths, "engines": self.engines, "seconds_per_cell": self.seconds,
            "unit": "GB/s (1e9 bytes/s)",
            "gbps": {e: self.grid(e) for e in self.engines},
            "cells": [dataclasses.asdict(c) for c in self.cells],
            "environment": self.environment,
        }


# ---- the test file ------------------------------------------------------------------------

def test_file_path(directory) -> Path:
    return Path(directory) / FILE_NAME


def _valid_test_file(path: Path, file_size: int) -> bool:
    from .bundles import read_header

    try:
        h = read_header(path)
    except (OSError, ValueError):
        return False
    return h["record_bytes"] == 4096 and h["file_bytes"] - h["data_offset"] == file_size


def check_free_space(directory, file_size: int) -> None:
    """Raise NotEnoughSpaceError unless the filesystem of `directory` holds the test file."""
    free = shutil.disk_usage(directory).free
    if free < file_size + HEADROOM:
        raise NotEnoughSpaceError(
            f"not enough free space on the filesystem of {directory}: bench-disk needs "
            f"{format_bytes(file_size)} for its test file plus {format_bytes(HEADROOM)} "
            f"headroom, but only {format_bytes(free)} is free; pass a smaller --file-size "
            f"(e.g. --file-size 1GB) or a PATH on another filesystem")


def make_test_file(directory, file_size: int = DEFAULT_FILE_SIZE, progress: bool = True,
                   seed: int = 0) -> Path:
    """Create (or reuse, if one of the same size is there) the test file in `directory`.

    A bundle file of 4 KiB records holding `file_size` random bytes (plus a 4 KiB header), so
    that the native reader opens it and nothing compresses or deduplicates. `file_size` must be
    a multiple of 4 KiB.
    """
    if file_size < 4096 or file_size % 4096:
        raise ValueError(f"--file-size must be a positive multiple of 4 KiB, got {file_size}")
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory; bench-disk creates its test "
                                 "file in the directory you name (default: the current one)")
    path = test_file_path(directory)
    if _valid_test_file(path, file_size):
        return path
    check_free_space(directory, file_size)

    from tqdm.auto import tqdm

    from .bundles import BundleWriter

    layer = math.gcd(file_size, LAYER_BYTES)  # bytes per bundle "layer", a multiple of 4 KiB
    n_layers, d_ff = file_size // layer, layer // 4096
    base = np.random.default_rng(seed).integers(0, 1 << 16, size=(2, d_ff, RECORD_D_MODEL),
                                                 dtype=np.uint16)
    bar = tqdm(total=file_size, desc="creating test file", unit="B", unit_scale=True,
               unit_divisor=1024, disable=not progress, leave=False)
    with bar, BundleWriter(path, n_layers, RECORD_D_MODEL, d_ff, "float16", ("up", "down")) as w:
        for i in range(n_layers):
            k = np.uint16((i * 0x9E37 + 1) & 0xFFFF)  # per layer: every 4 KiB block differs
            w.write_layer(i, [(base[0] ^ k).view(np.float16), (base[1] ^ k).view(np.float16)])
            bar.update(layer)
    return path


# ---- measuring ----------------------------------------------------------------------------

def _environment(path: Path) -> dict:
    from . import __version__
    from ._core import build_info

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_avg": list(os.getloadavg()),
           "cpus": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine(),
           "flashinfer_py": __version__, "build": build_info(),
           "cold": "posix_fadvise(DONTNEED) on the test file before each cell; direct I/O"}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f
                               if ln.startswith("model name")), platform.processor())
    except OSError:
        env["cpu"] = platform.processor()
    env["filesystem"], env["device"] = _mount_of(path)
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5,
                                    cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


def _mount_of(path: Path) -> tuple:
    """(filesystem type, device) of the mount holding `path` (Linux; else (None, None))."""
    try:
        best = ("", None, None)
        p = str(path.resolve())
        with open("/proc/mounts") as f:
            for ln in f:
                dev, mnt, fs = ln.split()[:3]
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, fs, dev)
        return best[1], best[2]
    except OSError:
        return None, None


def page_buffer(nbytes: int, huge_pages: bool = True) -> np.ndarray:
    """A page-aligned uint8 destination, in transparent huge pages or explicitly not.

    Direct reads into huge-page memory were up to 1.75x faster on the dev VM (fewer DMA
    segments per read); the runtime's neuron cache asks for huge pages, so bench-disk does too.
    ``huge_pages=False`` gives 4 KiB pages, like fio's own buffers.
    """
    import mmap

    # Private anonymous memory, like malloc's and numpy's (mmap's default, MAP_SHARED, is
    # shmem: slower for O_DIRECT here, and outside the THP setting that matters).
    nbytes = max(int(nbytes), mmap.PAGESIZE)
    if huge_pages:  # whole 2 MiB pages: a smaller mapping is not THP-aligned and gets none
        nbytes = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError:  # THP not supported: plain pages
            pass
    buf = np.frombuffer(mm, np.uint8)
    buf[::mmap.PAGESIZE] = 0  # fault the pages in now, not inside the first timed call
    return buf


def _requests_per_call(size: int, depth: int, call_bytes: int) -> int:
    return max(4 * depth, call_bytes // size, 1)


def measure_cell(reader, size: int, depth: int, seconds: float, n_blocks: int, buf: np.ndarray,
                 rng, call_bytes: int) -> Cell:
    """Random `size`-aligned reads at `depth` for `seconds` after one warm-up call.

    Calls of about `call_bytes` (so the queue drains rarely) land in 2 x `depth` slots of
    `buf`, reused round-robin like fio's buffers: spreading the reads over a large buffer cost
    10-15% on the dev VM (per-page work on the host), which is the buffer's cost, not the disk's.
    """
    n = _requests_per_call(size, depth, call_bytes)
    slots = buf[:SLOTS_PER_READ * depth * size]
    reader.drop_page_cache()
    reader.read_ranges(rng.integers(0, n_blocks, depth) * size, size, slots)  # warm-up
    reader.reset_stats()
    per_call = []
    t_end = time.perf_counter() + seconds
    while True:
        reader.read_ranges(rng.integers(0, n_blocks, n) * size, size, slots)
        s = reader.last_stats
        per_call.append(s.bytes_read / s.ns)
        if time.perf_counter() >= t_end:
            break
    t = reader.stats()
    return Cell(engine=reader.engine, size=size, depth=depth, gbps=t.bytes_read / t.ns,
                gbps_sd=statistics.stdev(per_call) if len(per_call) > 1 else 0.0,
                iops=t.reads_issued / (t.ns * 1e-9), calls=t.calls, reads=t.reads_issued,
                seconds=t.ns * 1e-9, direct=t.direct)


def buffer_bytes(sizes: Sequence[int], depths: Sequence[int]) -> int:
    """Destination bytes measure_cell needs for every cell of the grid."""
    return SLOTS_PER_READ * max(depths) * max(sizes)


def available_engines() -> list:
    from ._core import build_info

    return [e for e in ENGINES if e != "io_uring" or build_info()["io_uring"]]


def run(directory=".", sizes: Sequence[int] = DEFAULT_SIZES,
        depths: Sequence[int] = DEFAULT_DEPTHS, engines: Optional[Sequence[str]] = None,
        seconds: float = 1.0, file_size: int = DEFAULT_FILE_SIZE, keep: bool = False,
        progress: bool = True, call_bytes: int = 64 * MiB, huge_pages: bool = True,
        seed: int = 0) -> DiskBenchResult:
    """Measure the (engine, size, depth) grid on the filesystem of `directory`.

    Creates the test file there (or reuses one of the same size), and deletes it afterwards
    unless `keep`. Reads land in a huge-page buffer like the runtime's neuron cache
    (`huge_pages=False`: 4 KiB pages, like fio). Raises NotEnoughSpaceError if the file does
    not fit, ValueError on a bad grid.
    """
    from tqdm.auto import tqdm

    from .bundles import BundleReader, ReaderParams

    engines = list(engines) if engines else available_engines()
    sizes, depths = [int(s) for s in sizes], [int(d) for d in depths]
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if "io_uring" in engines and "io_uring" not in available_engines():
        raise ValueError("this build has no io_uring (liburing was not found at build time); "
                         "use --engines threads")
    for s in sizes:
        if s < 4096 or s % 4096 or s > file_size:
            raise ValueError(f"read size {s} must be a multiple of 4 KiB (direct I/O) and at most "
                             f"the file size {file_size}")
    for d in depths:
        if not 1 <= d <= 1024:
            raise ValueError(f"depth {d} must be in [1, 1024]")
    if seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {seconds}")
    call_bytes = min(call_bytes, file_size)

    directory = Path(directory)
    existed = test_file_path(directory).exists()
    path = make_test_file(directory, file_size, progress=progress, seed=seed)
    result = DiskBenchResult(path=str(path), file_size=file_size, sizes=sizes, depths=depths,
                             engines=engines, seconds=seconds)
    try:
        result.environment = _environment(path)
        file_bytes = path.stat().st_size
        buf = page_buffer(buffer_bytes(sizes, depths), huge_pages)
        result.environment["buffer"] = "huge pages (madvise)" if huge_pages else "4 KiB pages"
        rng = np.random.default_rng(seed)
        cells = [(s, d) for s in sizes for d in depths]
        with tqdm(total=len(cells) * len(engines), desc="bench-disk", unit="cell",
                  disable=not progress, leave=False) as bar:
            for s, d in cells:
                n_blocks = file_bytes // s
                for e in engines:  # back to back in every cell: ratios survive drift
                    r = BundleReader(path, ReaderParams(engine=e, queue_depth=d))
                    result.cells.append(measure_cell(r, s, d, seconds, n_blocks, buf, rng,
                                                     call_bytes))
                    del r
                    bar.set_postfix_str(f"{format_bytes(s)} x{d} {e}: "
                                        f"{result.cells[-1].gbps:.2f} GB/s")
                    bar.update()
        result.environment["load_avg_after"] = list(os.getloadavg())
    finally:
        if not keep:
            path.unlink(missing_ok=True)
        elif not existed:
            print(f"kept the test file {path} (delete it when done)", file=sys.stderr)
    return result


# ---- output -------------------------------------------------------------------------------

def _size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // KiB} KiB"


def format_tables(result: DiskBenchResult) -> str:
    """One markdown table per engine: rows = read size, columns = reads in flight, GB/s."""
    env = result.environment
    direct = all(c.direct for c in result.cells)
    out = [f"cold random reads on {result.path} ({env.get('filesystem')}, {env.get('device')}), "
           f"{format_bytes(result.file_size)} file, {result.seconds:g} s per cell, "
           f"{'direct I/O' if direct else 'BUFFERED (the filesystem refused direct I/O)'} into "
           f"{env.get('buffer', 'a buffer')}; "
           f"load average {env.get('load_avg', [0])[0]:.2f} -> "
           f"{env.get('load_avg_after', [0])[0]:.2f}"]
    for e in result.engines:
        out.append(f"\n{e} (GB/s; columns = reads in flight)\n")
        out.append("| size | " + " | ".join(f"QD{d}" for d in result.depths) + " |")
        out.append("|---" * (len(result.depths) + 1) + "|")
        for s, row in zip(result.sizes, result.grid(e)):
            out.append(f"| {_size_label(s)} | " + " | ".join(
                "-" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(out)


def plot(result: DiskBenchResult, filename) -> None:
    """Figure 2b: GB/s against read size, one line per depth, one panel per engine."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"--plot needs matplotlib: {BENCH_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result.engines), figsize=(5.5 * len(result.engines), 4.2),
                             sharey=True, squeeze=False)
    for ax, e in zip(axes[0], result.engines):
        grid = np.array(result.grid(e), dtype=float)
        for j, d in enumerate(result.depths):
            ax.plot(result.sizes, grid[:, j], marker="o", label=f"{d} in flight")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.sizes, [_size_label(s) for s in result.sizes], rotation=45)
        ax.set_xlabel("read size")
        ax.set_title(f"{e}, direct I/O, cold")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("random read throughput (GB/s)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{result.environment.get('device') or result.path}: random reads "
                 f"({result.environment.get('date', '')[:10]})")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def to_json(result: DiskBenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)

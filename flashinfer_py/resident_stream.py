"""Resident matrices left on flash and read every token, when the DRAM budget cannot hold them.

The paper keeps the attention, the embeddings and the LM head in DRAM ("resident") and streams
only FFN neurons. On a small model the resident part is 40-85% of the weights (Gemma-3-270M's
tied embedding alone is 62%), so a budget of half the weights could not run at all
(benchmarks/RESULTS.md section 17). Here the memory plan (loader.plan_memory,
RuntimeConfig.stream_resident) leaves some of these matrices in dense.safetensors, and:

- a thread reads them in row chunks of at most CHUNK_BYTES, in the order a forward pass uses
  them, into a ring of N_BUFFERS aligned buffers, with direct I/O, running ahead of the compute
  (across tokens too: the weights do not depend on the token), so the reads of the next chunks
  overlap the products on this one;
- the transformer computes each product chunk by chunk (rows of the output: the same rows
  of the same matrix, so the same floats as when the matrix is in DRAM);
- the untied input embedding is read a row per token, on its own descriptor.

Large reads need little queue depth on this disk: at 512 KiB-1 MiB one read at a time reaches
1.7-2.0 GB/s, about what any depth gives (benchmarks/RESULTS.md section 1). So the reads are
plain os.preadv calls (which release the GIL), one at a time, not the native reader's queue of
4 KiB records.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import kernels
from .checkpoint import _SafetensorsFile
from .config import ModelArgs

ALIGN = 4096
CHUNK_BYTES = 4 << 20   # one read: long enough to stream at the disk's rate (module docstring)
N_BUFFERS = 3           # one being computed on, two read ahead
GAP_BYTES = 64 << 10    # neighbouring matrices closer than this are one read (the norms between)
# what a streaming process holds beyond the buffers (its thread, the products' per-chunk
# outputs): a 1,500-token chat session at 340 MiB peaked 0.5 MB over a plan without it
# (RESULTS section 15); 2 MiB leaves a margin
STREAM_EXTRA = 2 << 20

# dense.safetensors' dtypes as stored (bfloat16 as uint16, blocks as uint8): the reader's own map
_NUMPY = _SafetensorsFile._RAW


def buffer_bytes(units: list) -> int:
    """DRAM the buffers of a stream of `units` take, at most (the memory plan counts it): a
    read is at most CHUNK_BYTES, or all of the units with the gaps between them."""
    span = sum(u.nbytes for u in units) + len(units) * GAP_BYTES
    return N_BUFFERS * (min(CHUNK_BYTES, span) + 2 * ALIGN) + 2 * ALIGN + STREAM_EXTRA


def open_uncached(path, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor of `path` that bypasses the page cache where it can, and
    whether it does: O_DIRECT (Linux), F_NOCACHE (macOS, as csrc/direct_file.cpp does;
    untested here), else buffered (a filesystem that refuses O_DIRECT, such as tmpfs)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            return os.open(path, os.O_RDONLY), False
    fd = os.open(path, os.O_RDONLY)
    if direct and sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
            return fd, True
        except (OSError, AttributeError):
            pass
    return fd, False


@dataclass(frozen=True)
class StreamUnit:
    """What the memory plan may leave on flash: `tensors` of dense.safetensors, `nbytes` in
    all; `per_token`: read whole every token (False: the untied input embedding, of which a
    token reads its row only)."""

    name: str
    tensors: tuple
    nbytes: int
    per_token: bool = True


def stream_units(args: ModelArgs, entries: dict) -> list[StreamUnit]:
    """The units of a dense.safetensors header (`entries`: name -> (dtype, shape, offset,
    count), checkpoint._SafetensorsFile), in the order the plan leaves them on flash: the
    untied input embedding (a row a token costs nothing), the LM head (the longest reads),
    then each layer's attention matrices, last layer first."""
    def size(names) -> int:
        return sum(entries[n][3] * _NUMPY[entries[n][0]].itemsize for n in names)

    units = []
    if not args.tie_word_embeddings and "lm_head" in entries:
        units.append(StreamUnit("embed", ("tok_embeddings",), size(["tok_embeddings"]), False))
        units.append(StreamUnit("head", ("lm_head",), size(["lm_head"])))
    else:
        units.append(StreamUnit("head", ("tok_embeddings",), size(["tok_embeddings"])))
    for i in reversed(range(args.num_hidden_layers)):
        names = tuple(f"layers.{i}.{w}" for w in ("wq", "wk", "wv", "wo"))
        units.append(StreamUnit(f"layers.{i}.attn", names, size(names)))
    return units


@dataclass(frozen=True)
class StreamedMatrix:
    """A matrix left on flash (the transformer's placeholder for it): `rows` rows of
    `row_bytes` stored bytes at file `offset`, `cols` values a row, stored as `dtype`
    (safetensors name) in storage format `fmt`. `nbytes` is 0: it takes no DRAM."""

    key: str
    offset: int
    rows: int
    row_bytes: int
    cols: int
    dtype: str
    fmt: str
    nbytes: int = 0

    def view(self, raw: np.ndarray, rows: int) -> np.ndarray:
        """`rows` stored rows in the bytes `raw` as the array the kernels take."""
        if self.dtype == "U8":
            return raw.reshape(rows, self.row_bytes)
        return raw.view(_NUMPY[self.dtype]).reshape(rows, self.cols)


def streamed_matrix(key: str, names: list, entries: dict, fmt: str) -> StreamedMatrix:
    """The StreamedMatrix of tensors `names`, which must lie one after the other in the file
    with rows of the same size (q, k and v as one matrix, as the transformer fuses them)."""
    dtype, shape, offset, _ = entries[names[0]]
    row_bytes = (int(np.prod(shape[1:])) if len(shape) > 1 else 1) * _NUMPY[dtype].itemsize
    rows, end = 0, offset
    for n in names:
        dt, sh, off, count = entries[n]
        if off != end or dt != dtype or count * _NUMPY[dt].itemsize != sh[0] * row_bytes:
            raise ValueError(f"{names} are not contiguous rows of one size")
        rows += sh[0]
        end = off + count * _NUMPY[dt].itemsize
    cols = shape[1] if dtype != "U8" else 0
    return StreamedMatrix(key, offset, rows, row_bytes, cols, dtype, fmt)


@dataclass(frozen=True)
class _Piece:
    """Rows r0:r1 of matrix `key`: in read `read`'s buffer from byte `skip` on."""

    key: str
    r0: int
    r1: int
    read: int
    skip: int
    last: bool  # the last piece of its read: the buffer is free after it


@dataclass(frozen=True)
class _Read:
    off: int     # aligned file offset
    length: int  # aligned length (may pass the end of the file: the read stops there)
    need: int    # bytes that must come back (the rest is past the end of the file)



class ResidentStream:
    """Reads the streamed matrices of a forward pass, in its order, ahead of the compute.

    The transformer calls :meth:`begin` at the start of each forward pass and
    :meth:`linear` for each streamed product, in the order of `order` (the keys of
    `matrices`). A read error on the thread surfaces as FlashIOError naming the file and
    offset in the next :meth:`linear`; a pass that stopped half-way (an error anywhere) is
    followed by a restart of the reads at the first piece.
    """

    def __init__(self, path, matrices: dict, order: list, use_direct_io: bool = True,
                 embed: Optional[StreamedMatrix] = None):
        self.path = Path(path)
        self.matrices = matrices
        self.embed = embed
        # rows in chunks of at most CHUNK_BYTES; neighbouring chunks (a layer's q/k/v and o,
        # the next layer's) share a read up to CHUNK_BYTES: fewer, longer reads than one per
        # matrix (SmolLM2's are 0.7-1.1 MB), and at one read in flight the rate grows with
        # the read's size (RESULTS.md section 1)
        spans = []  # (key, r0, r1, start, end) in file bytes
        for key in order:
            m = matrices[key]
            per = max(1, CHUNK_BYTES // m.row_bytes)
            for r0 in range(0, m.rows, per):
                r1 = min(m.rows, r0 + per)
                spans.append((key, r0, r1, m.offset + r0 * m.row_bytes, m.offset + r1 * m.row_bytes))
        self.pieces: list[_Piece] = []
        self.reads: list[_Read] = []
        group: list = []

        def close_group():
            off = group[0][3] - group[0][3] % ALIGN
            end = max(g[4] for g in group)
            self.reads.append(_Read(off, -(-end // ALIGN) * ALIGN - off, end - off))
            for k, (key, r0, r1, start, _) in enumerate(group):
                self.pieces.append(_Piece(key, r0, r1, len(self.reads) - 1, start - off,
                                          k == len(group) - 1))
            group.clear()

        for sp in spans:
            if group:
                off = group[0][3] - group[0][3] % ALIGN
                near = 0 <= sp[3] - group[-1][4] <= GAP_BYTES
                if not near or -(-sp[4] // ALIGN) * ALIGN - off > CHUNK_BYTES + 2 * ALIGN:
                    close_group()
            group.append(sp)
        if group:
            close_group()
        self._fd, self.direct = open_uncached(self.path, use_direct_io)
        self._row_fd = open_uncached(self.path, self.direct)[0] if embed is not None else -1
        self.size = os.fstat(self._fd).st_size
        from .bundles import aligned_empty

        longest = max((r.length for r in self.reads), default=ALIGN)
        self._bufs = [aligned_empty((longest,), np.uint8) for _ in range(N_BUFFERS)]
        self._row_buf = aligned_empty((2 * ALIGN,), np.uint8) if embed is not None else None
        self._cur = None  # (read, slot) of the buffer the compute is on
        self._thread: Optional[threading.Thread] = None
        self._pos = 0  # the next piece the compute takes
        # totals: the thread's (written by it only), the row reads' and the waits (the
        # caller's); take_stats reports the change since its last call
        self._thread_bytes = self._thread_reads = self.busy_ns = 0
        self._row_bytes = self._row_reads = self.wait_ns = 0
        self._last = self._totals()

    # ---------------------------------------------------------------- the reading thread
    def _start(self) -> None:
        self._stop = False
        self._free = threading.Semaphore(N_BUFFERS)
        self._ready: queue.Queue = queue.Queue()
        self._pos = 0
        # The thread holds the stream only weakly, and never while it waits for a free
        # buffer: a model dropped with its stream running is freed (and __del__ stops the
        # thread and closes the files) instead of leaking both.
        self._thread = threading.Thread(target=ResidentStream._run,
                                        args=(weakref.ref(self), self._free, self._ready),
                                        name="flashinfer-resident-stream", daemon=True)
        self._thread.start()

    @staticmethod
    def _run(ref, free: threading.Semaphore, ready: queue.Queue) -> None:
        i = slot = 0
        while True:
            free.acquire()
            self = ref()
            if self is None or self._stop:
                return
            r = self.reads[i]
            t0 = time.perf_counter_ns()
            try:
                self._read(self._fd, self._bufs[slot], r.off, r.need, r.length)
            except Exception as e:  # noqa: BLE001 - any failure reaches the compute side
                if not isinstance(e, OSError):
                    e = OSError(5, f"reading a streamed matrix failed: {type(e).__name__}: {e}")
                ready.put((i, slot, e, r.off))
                return
            self.busy_ns += time.perf_counter_ns() - t0
            self._thread_bytes += r.length
            self._thread_reads += 1
            ready.put((i, slot, None, r.off))
            i, slot = (i + 1) % len(self.reads), (slot + 1) % N_BUFFERS
            del self  # not held while waiting for the next free buffer

    def _read(self, fd: int, buf: np.ndarray, off: int, need: int, length: int) -> None:
        """`length` bytes at `off` into buf (fewer at the end of the file: at least `need`)."""
        view, done = memoryview(buf)[:length], 0
        while done < length:
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                break
            done += got
        if done < need:
            raise OSError(5, f"the file ends at byte {off + done}, {need - done} bytes short "
                          "of a streamed matrix (truncated?)")

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop = True
        self._free.release()
        if self._thread is not threading.current_thread():  # __del__ may run on the thread
            self._thread.join()
        self._thread = None

    # ---------------------------------------------------------------- the compute side
    def begin(self) -> None:
        """At the start of a forward pass: (re)start the reads at the first piece when none
        run, or when the last pass stopped half-way."""
        if self._thread is not None and self._pos == 0:
            return
        self._halt()
        self._cur = None
        if self.pieces:
            self._start()

    def linear(self, x: np.ndarray, m: StreamedMatrix, bias: Optional[np.ndarray],
               threads: int) -> np.ndarray:
        """x @ m.T (+ bias), float32 [T, rows], chunk by chunk as the reads arrive."""
        from .errors import FlashIOError

        t = x.shape[0]
        out = np.empty((t, m.rows), np.float32)
        while True:
            p = self.pieces[self._pos]
            if p.key != m.key:  # a bug: the compute's order is not ours
                self._halt()
                raise RuntimeError(f"resident stream out of order: {m.key} asked for, "
                                   f"{p.key} next")
            if self._cur is None:
                t0 = time.perf_counter_ns()
                i, slot, err, off = self._ready.get()
                self.wait_ns += time.perf_counter_ns() - t0
                if err is not None:
                    self._thread = None  # it has stopped
                    raise FlashIOError(f"reading {self.path} at offset {off}: "
                                       f"{err.strerror or err}")
                if i != p.read:
                    self._halt()
                    raise RuntimeError(f"resident stream out of order: read {i}, "
                                       f"{p.read} expected")
                self._cur = slot
            try:
                n = p.r1 - p.r0
                raw = self._bufs[self._cur][p.skip:p.skip + n * m.row_bytes]
                b = bias[p.r0:p.r1] if bias is not None else None
                res = kernels.linear(x, m.view(raw, n), bias=b, fmt=m.fmt, threads=threads)
                if t == 1:
                    out[0, p.r0:p.r1] = res[0]
                else:
                    out[:, p.r0:p.r1] = res
            finally:
                self._pos = (self._pos + 1) % len(self.pieces)
                if p.last:
                    self._cur = None
                    self._free.release()
            if p.r1 == m.rows:
                return out

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of the streamed input embedding, in their stored form, read now."""
        m = self.embed
        out = np.empty((len(idx), m.row_bytes), np.uint8)
        t0 = time.perf_counter_ns()
        for k, r in enumerate(np.asarray(idx, np.int64)):
            start = m.offset + int(r) * m.row_bytes
            off = start - start % ALIGN
            length = -(-(start + m.row_bytes) // ALIGN) * ALIGN - off
            if length > len(self._row_buf):
                from .bundles import aligned_empty

                self._row_buf = aligned_empty((length,), np.uint8)
            try:
                self._read(self._row_fd, self._row_buf, off, start - off + m.row_bytes, length)
            except OSError as e:
                from .errors import FlashIOError

                raise FlashIOError(f"reading {self.path} at offset {off}: "
                                   f"{e.strerror or e}") from None
            out[k] = self._row_buf[start - off:start - off + m.row_bytes]
            self._row_bytes += length
            self._row_reads += 1
        self.wait_ns += time.perf_counter_ns() - t0
        return out if m.dtype == "U8" else out.view(_NUMPY[m.dtype]).reshape(len(idx), m.cols)

    def _totals(self) -> dict:
        return {"stream_bytes": self._thread_bytes + self._row_bytes,
                "stream_reads": self._thread_reads + self._row_reads,
                "stream_wait_ns": self.wait_ns, "stream_busy_ns": self.busy_ns}

    def take_stats(self) -> dict:
        """Since the last call: bytes and reads (the thread's run ahead of the compute, so a
        token's figure includes some of the next token's reads), the compute's wait for them
        and the thread's busy time (ns)."""
        now = self._totals()
        d = {k: now[k] - self._last[k] for k in now}
        self._last = now
        return d

    def close(self) -> None:
        self._halt()
        for fd in (self._fd, self._row_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._row_fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

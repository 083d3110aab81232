"""Bundle files: write an FFN as one aligned record per neuron, read records back in parallel.

A bundle file (``ffn_bundles.bin``) stores, for neuron ``i`` of layer ``l``, its up row, gate
row (gated FFNs) and down column back to back in one record of ``record_bytes`` (a multiple of
4096), so one direct read fetches one neuron. The layout and the header are defined in
``csrc/bundle_format.h``; this module is a thin typed layer over the native classes.

bfloat16 has no numpy dtype: its records travel as raw ``uint16`` bits; records in a block
format (q8_0, q4_0, q4_1: ``flashinfer_py.dtypes``) as ``uint8``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ._core import AsyncReads as _AsyncReads
from ._core import BundleReader as _BundleReader
from ._core import BundleWriter as _BundleWriter
from ._core import FlashFormatError, FlashIOError  # noqa: F401  (re-exported)
from ._core import ReaderParams as _ReaderParams
from ._core import ReadStats
from ._core import read_header as _read_header
from .dtypes import RecordLayout, storage_format

__all__ = ["BundleReader", "BundleWriter", "ReaderParams", "ReadStats", "aligned_empty",
           "read_header", "storage_numpy_dtype", "storage_dtype_name", "FlashFormatError",
           "FlashIOError"]

IO_ALIGNMENT = 4096


# ---- dtype and buffer helpers -------------------------------------------------------------

def storage_numpy_dtype(name: str) -> np.dtype:
    """numpy dtype holding storage format ``name`` ("bfloat16" -> uint16, blocks -> uint8)."""
    return storage_format(name, "storage dtype").numpy


def storage_dtype_name(dtype) -> str:
    """The float storage format of a numpy dtype: float32/float16, and uint16 or ml_dtypes
    bfloat16 -> "bfloat16" (uint8 rows could be any block format: name it)."""
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "float32"
    if dt == np.float16:
        return "float16"
    if dt == np.uint16 or dt.name == "bfloat16":
        return "bfloat16"
    raise ValueError(f"no storage dtype for numpy dtype {dt}; use float32, float16 or uint16 "
                     "(bfloat16 bits)")


def aligned_empty(shape, dtype, alignment: int = IO_ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `alignment` boundary.

    Direct (O_DIRECT) reads land straight in such a buffer. For a 2-D ``(n, record_elems)``
    destination the row stride is ``record_bytes``, a multiple of 4096, so every row is aligned.
    """
    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes].view(dt).reshape(shape)


def read_header(path) -> dict:
    """Read and validate the header of bundle file `path`.

    Returns a dict: magic, version, header_bytes, n_layers, d_model, d_ff, dtype, elem_bytes,
    n_parts, parts (e.g. ["up", "gate", "down"]), part_bytes and part_offsets (per part),
    payload_bytes, down_layout ("blocks" or "codes"), alignment, record_bytes, data_offset,
    file_bytes. A version 1 file reads as its version 2 equivalent (version stays 1).
    Raises FlashFormatError (naming the path) if the file is not a valid bundle file.
    """
    return _read_header(str(path))


# ---- writer -------------------------------------------------------------------------------

class BundleWriter:
    """Stream an FFN into a bundle file, one layer at a time (memory O(a few MiB)).

    Args:
        path: file to create (truncated if it exists).
        n_layers, d_model, d_ff: FFN shape; each part holds d_model values.
        dtype: storage format: "float32", "float16", "bfloat16", "q8_0", "q4_0" or "q4_1".
        parts: ("up", "down") for plain MLPs or ("up", "gate", "down") for gated ones.
        alignment: record alignment in bytes (power of two from 512 to 1 MiB; 4096 suits
            every SSD).
        down_layout: "blocks" (every part a row of blocks along d_model), or "codes" (block
            formats: the down part holds only its codes; the scales stay resident, see
            ``csrc/bundle_format.h``; d_ff must be a multiple of 32).

    Use as a context manager, or call :meth:`finish` after the last layer. The header is
    written last, so an unfinished file is rejected by readers; on an exception inside the
    ``with`` block the partial file is removed. A full disk raises FlashIOError.
    """

    def __init__(self, path, n_layers: int, d_model: int, d_ff: int, dtype: str = "float16",
                 parts: Sequence[str] = ("up", "gate", "down"), alignment: int = IO_ALIGNMENT,
                 down_layout: str = "blocks"):
        storage_numpy_dtype(dtype)
        self._w = _BundleWriter(str(path), n_layers, d_model, d_ff, dtype, list(parts),
                                alignment, down_layout)

    def write_layer(self, layer: int, parts: Sequence[np.ndarray]) -> None:
        """Write every neuron of `layer`.

        `parts` follows the header's part order; each is a C-contiguous ``(d_ff, d_model)``
        array in the storage dtype: up = up_proj.weight, gate = gate_proj.weight,
        down = ``np.ascontiguousarray(down_proj.weight.T)`` (row i = neuron i's down column).
        bfloat16 parts are passed as uint16 bits (or an ml_dtypes bfloat16 array); block
        formats as uint8 ``(d_ff, header["part_bytes"][p])`` rows of blocks (or codes).
        """
        mats = [p.view(np.uint16) if p.dtype.name == "bfloat16" else p for p in parts]
        self._w.write_layer(layer, mats)

    def finish(self) -> None:
        """Check every layer was written, write the header, fsync and close."""
        self._w.finish()

    def abort(self) -> None:
        """Close without a header and delete the file."""
        self._w.abort()

    @property
    def header(self) -> dict:
        """The header that :meth:`finish` will write (same keys as :func:`read_header`)."""
        return self._w.header

    @property
    def path(self) -> str:
        return self._w.path

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._w.abort()
        elif not self._w.finished:
            self._w.finish()


# ---- reader -------------------------------------------------------------------------------

_DEFAULTS = _ReaderParams()


@dataclass(frozen=True)
class ReaderParams:
    """Knobs of :class:`BundleReader`; defaults mirror the native ``struct ReaderParams``.

    Attributes:
        engine: "auto" (io_uring when built in and allowed by the kernel, else "threads"),
            "threads" (a pool of `queue_depth` pread workers) or "io_uring".
        queue_depth: reads kept in flight. The dev VM's disk needs 16-32 to reach ~1.2 GB/s.
        use_direct_io: bypass the page cache (O_DIRECT / F_NOCACHE). Filesystems that refuse
            (tmpfs) fall back to buffered reads with one warning; see ``BundleReader.is_direct``.
        coalesce_gap_bytes: merge two requested neurons into one read when the bytes between
            their records are at most this (0 = merge only adjacent records).
        max_read_bytes: upper bound on one read request, 4 KiB to 1 GiB; longer runs are
            split.
        max_scratch_bytes: upper bound on the reader's scratch buffer, where gap-merged runs,
            runs whose rows are not adjacent and unaligned parts land before they are copied
            into the rows. A run bound for scratch is cut to fit it, and a call needing more
            runs in rounds (read, wait, copy, reuse). The bound in force is
            :attr:`BundleReader.scratch_cap`: this, or one record if larger, rounded up to
            4 KiB.
        read_timeout_ms: io_uring engine: a read call none of whose reads completes for this
            long cancels them and raises FlashIOError (errno ETIMEDOUT) instead of hanging on
            a failing device; 0 waits forever. The threads engine cannot interrupt a pread.
    """

    engine: str = _DEFAULTS.engine
    queue_depth: int = _DEFAULTS.queue_depth
    use_direct_io: bool = _DEFAULTS.use_direct_io
    coalesce_gap_bytes: int = _DEFAULTS.coalesce_gap_bytes
    max_read_bytes: int = _DEFAULTS.max_read_bytes
    read_timeout_ms: int = _DEFAULTS.read_timeout_ms
    max_scratch_bytes: int = _DEFAULTS.max_scratch_bytes

    def _native(self) -> _ReaderParams:
        return _ReaderParams(**dataclasses.asdict(self))

    def replace(self, **kw) -> "ReaderParams":
        return dataclasses.replace(self, **kw)


class BundleReader:
    """Read neuron records of a bundle file into caller-provided rows, in parallel.

    Args:
        path: the bundle file; its header is validated on open (FlashFormatError).
        params: a :class:`ReaderParams` (defaults if None).

    ``read`` sorts the ids, merges neighbours into larger requests, keeps
    ``params.queue_depth`` requests in flight, and places record ``ids[k]`` in ``out[k]``.
    Worker failures (EIO, a file truncated under us) surface as FlashIOError on the caller.
    The GIL is released during I/O.
    """

    def __init__(self, path, params: Optional[ReaderParams] = None):
        self.params = params or ReaderParams()
        self._r = _BundleReader(str(path), self.params._native())
        self.last_stats: Optional[ReadStats] = None

    # -- reading
    def read(self, layer: int, ids, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Records of `ids` (any order, no duplicates) of `layer` -> rows of `out`.

        `out`: 2-D, C-contiguous rows of at least ``record_bytes`` bytes, one per id; with
        direct I/O it must start on a 4096-byte boundary with a row stride that is a multiple
        of 4096 (:meth:`empty` / :func:`aligned_empty` give one). Allocated if None.
        Returns `out`; the call's :class:`ReadStats` is in :attr:`last_stats`.
        """
        ids = np.asarray(ids)
        if out is None:
            out = self.empty(len(ids))
        self.last_stats = self._r.read(layer, ids, out)
        return out

    def read_parts(self, layer: int, ids, parts: Sequence[int],
                   out: Optional[np.ndarray] = None) -> np.ndarray:
        """The "unbundled" ablation: each part of each neuron is a separate read.

        Row k of `out` = parts ``parts[0], parts[1], ...`` (indices into :attr:`parts`) of
        neuron ``ids[k]``, each ``header["part_bytes"][p]`` bytes. Unaligned parts go through
        scratch.
        """
        ids = np.asarray(ids)
        if out is None:
            nbytes = sum(self.header["part_bytes"][p] for p in parts)
            out = aligned_empty((len(ids), nbytes // self.numpy_dtype.itemsize), self.numpy_dtype)
        self.last_stats = self._r.read_parts(layer, ids, list(parts), out)
        return out

    def read_ranges(self, offsets, length: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Raw reads for disk benchmarks: ``length`` bytes at each file offset, through the
        same engine and queue depth as :meth:`read`, one request per range, in the given order
        (no sorting or coalescing).

        Range k lands in slot ``k % (out.nbytes // length)`` of `out`: an `out` of ``n *
        length`` bytes keeps every range; a smaller one is reused round-robin like fio's
        buffers (a few slots per read in flight; the data is then meaningless). With direct
        I/O, offsets and `length` must be multiples of 4096 and `out` 4096-byte aligned
        (:func:`aligned_empty`). Returns `out` (uint8, ``n * length`` bytes if None); the
        call's :class:`ReadStats` is in :attr:`last_stats`.
        """
        offsets = np.asarray(offsets, dtype=np.uint64)
        if out is None:
            out = aligned_empty(max(len(offsets), 1) * int(length), np.uint8)
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        self.last_stats = self._r.read_ranges(offsets, int(length), out)
        return out

    def empty(self, n: int) -> np.ndarray:
        """An aligned ``(n, record_elems)`` destination for :meth:`read`."""
        return aligned_empty((n, self.record_elems), self.numpy_dtype)

    def offset(self, layer: int, neuron: int) -> int:
        """Byte offset of a neuron's record in the file (the one offset function)."""
        return self._r.offset(layer, neuron)

    # -- stats
    def stats(self) -> ReadStats:
        """Cumulative :class:`ReadStats` (bytes_requested, bytes_read, reads_issued, ns, calls,
        rounds, direct) since open or :meth:`reset_stats`."""
        return self._r.stats()

    def reset_stats(self) -> None:
        self._r.reset_stats()

    def drop_page_cache(self) -> None:
        """posix_fadvise(DONTNEED) on the file: makes the next reads cold (benchmarks)."""
        self._r.drop_page_cache()

    # -- description
    @property
    def header(self) -> dict:
        return self._r.header

    @property
    def parts(self) -> list:
        """Part names in record order, e.g. ["up", "gate", "down"]."""
        return self._r.header["parts"]

    @property
    def is_direct(self) -> bool:
        """True when reads bypass the page cache (False after a buffered fallback)."""
        return self._r.is_direct

    @property
    def engine(self) -> str:
        """The engine in use: "io_uring" or "threads"."""
        return self._r.engine

    @property
    def path(self) -> str:
        return self._r.path

    @property
    def scratch_cap(self) -> int:
        """The most bytes the scratch buffer will ever hold: ``params.max_scratch_bytes``,
        or one record when larger, rounded up to a multiple of 4096."""
        return self._r.scratch_cap

    @property
    def scratch_bytes(self) -> int:
        """The scratch buffer's size now (it grows up to :attr:`scratch_cap`, never shrinks)."""
        return self._r.scratch_bytes

    @property
    def record_bytes(self) -> int:
        return self._r.record_bytes

    @property
    def record_elems(self) -> int:
        """Elements of the storage dtype per record (parts plus padding; bytes for blocks)."""
        return self._r.record_elems

    @property
    def layout(self) -> RecordLayout:
        """Where each part of a record lies (format, part offsets, down layout)."""
        h = self.header
        return RecordLayout.build(h["dtype"], h["parts"], h["d_model"], h["down_layout"],
                                  h["record_bytes"])

    @property
    def numpy_dtype(self) -> np.dtype:
        """numpy dtype of the records (uint16 for bfloat16, uint8 for block formats)."""
        return self._r.storage_dtype

    storage_dtype = numpy_dtype

    def __repr__(self) -> str:
        h = self.header
        return (f"BundleReader({self.path!r}, layers={h['n_layers']}, d_ff={h['d_ff']}, "
                f"d_model={h['d_model']}, dtype={h['dtype']}, parts={h['parts']}, "
                f"engine={self.engine!r}, direct={self.is_direct})")


class ReadAhead:
    """Reads of neuron records that run on a worker thread while the caller computes.

    ``start(slot, layer, ids)`` returns at once; the records land in the slot's own staging
    matrix (never in the neuron cache's rows, which a kernel may be reading meanwhile);
    ``wait(slot)`` blocks until they are there and raises what the reads raised
    (FlashIOError). A :class:`~flashinfer_py.cache.NeuronCache` given this object with
    ``set_source`` copies the waited records it loads from here instead of reading them.

    Args:
        path: the bundle file (opened again: the worker has its own descriptor and engine).
        params: a :class:`ReaderParams`, as for :class:`BundleReader`.
        max_records: records per slot (at most a layer's neurons).
        n_slots: independent slots (jobs run one at a time, in start order).
    """

    def __init__(self, path, params: Optional[ReaderParams] = None, max_records: int = 1,
                 n_slots: int = 2):
        self.params = params or ReaderParams()
        self._a = _AsyncReads(str(path), self.params._native(), int(max_records), int(n_slots))

    def start(self, slot: int, layer: int, ids) -> None:
        """Queue reading `ids` (distinct) of `layer` into `slot`, forgetting what it held."""
        self._a.start(slot, layer, np.asarray(ids))

    def wait(self, slot: int) -> ReadStats:
        """Block until `slot`'s reads landed; their ReadStats (zeros for an idle slot)."""
        return self._a.wait(slot)

    def release(self, slot: int) -> None:
        """Forget `slot`'s records (after its reads finish, if they are in flight)."""
        self._a.release(slot)

    def busy_ns(self, slot: int) -> int:
        """Nanoseconds the worker spent on `slot`'s last job (after wait)."""
        return self._a.busy_ns(slot)

    def record(self, layer: int, neuron: int) -> Optional[bytes]:
        """A copy of the record of `neuron` held by a waited slot, or None."""
        return self._a.record(layer, neuron)

    @property
    def max_records(self) -> int:
        return self._a.max_records

    @property
    def engine(self) -> str:
        return self._a.engine

    @property
    def is_direct(self) -> bool:
        return self._a.is_direct

    @property
    def nbytes(self) -> int:
        """Bytes of the staging matrices and maps."""
        return self._a.nbytes()

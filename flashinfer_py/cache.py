"""The in-place neuron cache: per layer one preallocated matrix of bundle records.

Follows "LLM in a flash" section 3.3: rows ``[0, n_used)`` of a layer's matrix hold the cached
neurons' records; evicting moves the last rows into the freed slots, inserting reads new records
from flash straight into the tail. Nothing is reallocated after construction.

Views (:meth:`NeuronCache.rows`, :meth:`ids`, :meth:`bias`, :meth:`part`) alias the cache's
memory without copying. They are read-only and are INVALIDATED by the next insert/evict/clear of
that layer (rows move and n_used changes): take them again after every update.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from ._core import NeuronCache as _NeuronCache
from .bundles import BundleReader
from .dtypes import SplitRows

__all__ = ["NeuronCache"]


class NeuronCache:
    """Per-layer ``(capacity, record_elems)`` matrices of neuron records, filled from flash.

    Args:
        reader: the :class:`~flashinfer_py.bundles.BundleReader` that insert() reads through
            (kept alive by the cache).
        capacity: rows per layer, one int for every layer or a sequence with one per layer.
        n_layers: layers to cache (default: all layers of the bundle file).
        packed: rows hold the record's parts only (rounded up to 64 bytes), not its padding
            to 4096: more neurons in the same DRAM when records are padded (SmolLM2: 3456 of
            4096 bytes), at the cost of staging reads and one copy of the bytes read.
        split: (packed only) the down parts in a matrix of their own, the paper's preallocated
            up and down matrices: :meth:`rows` gives :class:`~flashinfer_py.dtypes.SplitRows`.
            For FFNs without a gate (``RecordLayout.split_at``; ValueError otherwise), whose
            sparse FFN then reads the cached up parts as one stream.
    """

    def __init__(self, reader: BundleReader, capacity: Union[int, Sequence[int]],
                 n_layers: int | None = None, packed: bool = False, split: bool = False):
        self.reader = reader
        n_layers = reader.header["n_layers"] if n_layers is None else n_layers
        cap = int(capacity) if np.isscalar(capacity) else [int(c) for c in capacity]
        split_at = reader.layout.split_at if split else 0
        if split and not (packed and split_at):
            raise ValueError("split=True needs packed=True and records without a gate part "
                             f"(parts here: {', '.join(reader.parts)})")
        self._c = _NeuronCache(reader._r, n_layers, cap, packed, split_at)

    # -- updates
    def insert(self, layer: int, ids) -> None:
        """Read neurons `ids` (absent from the layer, no duplicates) into the tail rows.

        Raises ValueError if an id is already cached, out of range or duplicated, or if the
        layer would exceed its capacity; FlashIOError if a read fails. On error nothing changes.
        """
        self._c.insert(layer, np.asarray(ids))

    def insert_parts(self, layer: int, ids) -> None:
        """Like :meth:`insert`, but each part of each neuron is a separate read (the paper's
        "no bundling" ablation). The rows are byte-identical to :meth:`insert`'s."""
        self._c.insert(layer, np.asarray(ids), bundled=False)

    def evict(self, layer: int, ids) -> None:
        """Drop cached neurons `ids`; the last live rows move into the freed slots below the
        new end, each at most once (at most len(ids) row copies)."""
        self._c.evict(layer, np.asarray(ids))

    def replace(self, layer: int, evict, load) -> None:
        """Drop cached neurons `evict` and read neurons `load` (absent) into the rows they
        free, then into the tail: rows move only when more neurons leave than enter (at most
        len(evict) - len(load) of them). Checked like :meth:`evict` and :meth:`insert` before
        anything changes; if a read fails (FlashIOError), `evict` is gone and no `load` is
        cached."""
        self._c.replace(layer, np.asarray(evict), np.asarray(load))

    def set_source(self, source) -> None:
        """Records read ahead (a :class:`~flashinfer_py.bundles.ReadAhead`, or None): insert
        and replace copy each loaded neuron that a waited slot of `source` holds from there
        and read only the others. The rows are byte-identical either way."""
        self._c.set_source(None if source is None else source._a)

    def clear(self, layer: int) -> None:
        """Drop every neuron of `layer` (no copying)."""
        self._c.clear(layer)

    def set_layer_bias(self, layer: int, bias: np.ndarray) -> None:
        """Give each neuron of `layer` a float32 bias (shape ``(d_ff,)``) that travels with its
        row: :meth:`bias` then returns the cached neurons' biases in row order."""
        self._c.set_layer_bias(layer, np.ascontiguousarray(bias, dtype=np.float32))

    # -- views (invalidated by the next update of the layer)
    def rows(self, layer: int):
        """``(n_used, row_bytes / element size)`` records in the storage dtype (uint16 for
        bfloat16); rows are whole records unless the cache is packed. A split cache gives
        :class:`~flashinfer_py.dtypes.SplitRows`: the up parts' rows and the down parts' rows."""
        up = self._c.rows(layer)
        if not self.split:
            return up
        return SplitRows(up, self._c.down_rows(layer), self._c.split_at // up.itemsize)

    @property
    def split(self) -> bool:
        """The down parts are in a matrix of their own (see the constructor)."""
        return self._c.split_at > 0

    def ids(self, layer: int) -> np.ndarray:
        """``(n_used,)`` int32 neuron id of each row."""
        return self._c.ids(layer)

    def bias(self, layer: int) -> np.ndarray:
        """``(n_used,)`` float32 bias of each row (zeros unless :meth:`set_layer_bias`)."""
        return self._c.bias(layer)

    def part(self, layer: int, name: str) -> np.ndarray:
        """``(n_used, d_model)`` view of one part ("up", "gate" or "down") of every row (float
        formats)."""
        return self.reader.layout.part_view(self.rows(layer), name)

    # -- queries
    @property
    def poisoned(self) -> bool:
        """A read into the rows was abandoned (a device that never answered it may still write
        them): the cache refuses use (FlashIOError) and its rows are never freed."""
        return self._c.poisoned

    def problems(self) -> list[str]:
        """What is wrong with the cache now (empty: nothing): per layer, ids unique and as many
        as n_used, within capacity and range, the slot map agreeing with the ids, and every
        row byte-equal to its neuron's record in the bundle file (read again, apart from the
        cache's reads). For long-run checks; it reads every cached record."""
        reader = BundleReader(self.reader.path)
        d_ff, out = reader.header["d_ff"], []
        for layer in range(self.n_layers):
            ids = np.asarray(self.ids(layer))
            if len(set(ids.tolist())) != len(ids) or len(ids) != self.n_used(layer):
                out.append(f"layer {layer}: ids not unique or not n_used")
            if len(ids) == 0:
                continue
            if len(ids) > self.capacity(layer) or ids.min() < 0 or ids.max() >= d_ff:
                out.append(f"layer {layer}: over capacity or out of range")
            if any(self.slot_of(layer, int(i)) != s for s, i in enumerate(ids)):
                out.append(f"layer {layer}: slot map disagrees with the ids")
            want = reader.read_parts(layer, ids, list(range(len(reader.parts))))
            want = want.view(np.uint8).reshape(len(ids), -1)
            rows = self.rows(layer)
            if self.split:  # the pieces joined again
                a = self._c.split_at
                up = np.ascontiguousarray(rows.up).view(np.uint8).reshape(len(ids), -1)
                down = np.ascontiguousarray(rows.down).view(np.uint8).reshape(len(ids), -1)
                rows = np.concatenate([up[:, :a], down[:, :want.shape[1] - a]], axis=1)
            rows = np.ascontiguousarray(rows).view(np.uint8).reshape(len(ids), -1)
            if not np.array_equal(rows[:, :want.shape[1]], want):  # packed: parts, then padding
                out.append(f"layer {layer}: a cached row differs from its record")
        return out

    @property
    def row_bytes(self) -> int:
        """DRAM bytes per cached neuron (the record size, or the parts' size when packed; both
        pieces when split)."""
        return self._c.row_bytes + self._c.down_row_bytes

    def n_used(self, layer: int) -> int:
        return self._c.n_used(layer)

    def capacity(self, layer: int) -> int:
        return self._c.capacity(layer)

    def contains(self, layer: int, neuron: int) -> bool:
        return self._c.contains(layer, neuron)

    def slot_of(self, layer: int, neuron: int) -> int:
        """Row holding `neuron`, or -1."""
        return self._c.slot_of(layer, neuron)

    @property
    def n_layers(self) -> int:
        return self._c.n_layers

    def nbytes(self) -> int:
        """Bytes allocated by the cache (rows, maps, biases)."""
        return self._c.nbytes()

    def stats(self) -> dict:
        """Cumulative counters: inserted, evicted, moved_bytes and compaction_ns (evict's
        swap-with-last copies), from_source (rows copied from the set_source), reads (the
        reader's ReadStats for insert)."""
        return self._c.stats()

    def reset_stats(self) -> None:
        self._c.reset_stats()

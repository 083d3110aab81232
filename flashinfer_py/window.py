"""The sliding window of the paper (Section 3.2): keep in DRAM the FFN neurons active for any of
the last k tokens; each new token loads only the neurons not already there and evicts those
that left the window. Pure numpy, no I/O: the loader applies (to_load, to_evict) to the cache.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class SlidingWindow:
    """Per-layer union of the active sets of the last `k` tokens.

    A count per neuron (how many of the last k tokens used it) makes each update cost
    O(|new set| + |dropped set|), independent of d_ff.
    """

    def __init__(self, n_layers: int, d_ff: int, k: int):
        if k < 1:
            raise ValueError(f"window k must be >= 1, got {k}")
        self.n_layers, self.d_ff, self.k = n_layers, d_ff, k
        self.reset()

    def reset(self) -> None:
        self._counts = np.zeros((self.n_layers, self.d_ff), dtype=np.int32)
        self._history = [deque() for _ in range(self.n_layers)]
        self._size = np.zeros(self.n_layers, dtype=np.int64)

    def update(self, layer: int, active_ids) -> tuple[np.ndarray, np.ndarray]:
        """Record this token's active set for `layer`.

        Returns:
            (to_load, to_evict): sorted int32 ids that entered / left the window's union.
            A neuron both used now and dropped from the oldest token is in neither.
        """
        ids = np.unique(np.asarray(active_ids, dtype=np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= self.d_ff):
            raise ValueError(f"neuron ids must be in [0, {self.d_ff}); got {ids[0]}..{ids[-1]}")
        counts, hist = self._counts[layer], self._history[layer]
        counts[ids] += 1
        to_load = ids[counts[ids] == 1]
        hist.append(ids)
        to_evict = np.empty(0, dtype=np.int64)
        if len(hist) > self.k:
            old = hist.popleft()
            counts[old] -= 1
            to_evict = old[counts[old] == 0]
        self._size[layer] += to_load.size - to_evict.size
        return to_load.astype(np.int32), to_evict.astype(np.int32)

    def drop_oldest(self, layer: int) -> np.ndarray:
        """Forget the oldest token still in the window (when the cache cannot hold the whole
        union); returns the ids that leave the union. The newest token is never dropped."""
        hist = self._history[layer]
        if len(hist) <= 1:
            raise ValueError("cannot drop the only token in the window: its active set alone "
                             "exceeds the cache; raise the DRAM budget")
        old = hist.popleft()
        counts = self._counts[layer]
        counts[old] -= 1
        gone = old[counts[old] == 0]
        self._size[layer] -= gone.size
        return gone.astype(np.int32)

    def size(self, layer: int) -> int:
        """Neurons in the window's union for `layer` (what the cache must hold)."""
        return int(self._size[layer])

    def state(self, layer: int) -> np.ndarray:
        """Sorted ids in the union (for tests and statistics)."""
        return np.flatnonzero(self._counts[layer]).astype(np.int32)

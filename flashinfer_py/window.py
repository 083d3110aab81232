"""What stays in the neuron cache. Pure numpy, no I/O: the loader applies the decisions.

- `SlidingWindow`, the paper's (Section 3.2): keep in DRAM the FFN neurons active for any of
  the last k tokens; each new token loads only the neurons not already there and evicts those
  that left the window.
- `FrequencyPolicy` (``eviction="frequency"``): keep neurons while the cache has room, evict
  the least used when it is full.
- `rank_swaps` (``eviction="rank"``): the cache stays full; for each token the uncached
  neurons that score higher than the lowest-scoring cached ones replace them, a bounded number
  per token. Selection under a budget as a ranking problem.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np


def _sorted_unique(active_ids, d_ff: int) -> np.ndarray:
    """int64 sorted unique ids in [0, d_ff), else ValueError. Predictors already return sorted
    unique ids: checking that is O(n) and skips np.unique, which cost ~170 us per call for
    SmolLM2's ~1250 ids (numpy 2.4; about half of a token's memory management, RESULTS.md
    section 8)."""
    ids = np.array(active_ids, dtype=np.int64).reshape(-1)  # a copy: the window keeps it
    if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
        ids = np.unique(ids)
    if ids.size and (ids[0] < 0 or ids[-1] >= d_ff):
        raise ValueError(f"neuron ids must be in [0, {d_ff}); got {ids[0]}..{ids[-1]}")
    return ids


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

    def update(self, layer: int, active_ids,
               capacity: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Record this token's active set for `layer`; with `capacity` (the layer's cache rows),
        forget the oldest tokens until the union fits (a budget smaller than the window's union).

        Returns:
            (to_load, to_evict): sorted int32 ids that entered / left the window's union.
            A neuron both used now and dropped from the oldest token is in neither.
        """
        ids = _sorted_unique(active_ids, self.d_ff)
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
        to_evict = to_evict.astype(np.int32)
        while capacity is not None and self._size[layer] > capacity:
            to_evict = np.union1d(to_evict, self.drop_oldest(layer)).astype(np.int32)
        return to_load.astype(np.int32), to_evict

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


class FrequencyPolicy:
    """Eviction by use frequency: beyond the paper's window (our extension).

    The paper evicts a neuron as soon as none of the last k tokens used it, even when the cache
    has room to spare; a neuron that many tokens use is then read again and again. This policy
    keeps every loaded neuron while the layer's cache has room, and when it is full evicts the
    neurons with the lowest use score first: an exponentially decayed count of the tokens (or
    prefill chunks) that needed it, half-life `halflife` tokens. The current token's neurons are
    never evicted. At the same capacity as the window's peak it reads fewer neurons whenever
    some neurons are used far more often than others (the "hot neurons" of ReLU LLMs; measured
    in benchmarks/RESULTS.md sections 6 and 10).

    Decay without touching every neuron per token: token t adds weight g**t (g = 2**(1/halflife))
    to the neurons it uses, which ranks them exactly as a decayed count; the weights are rescaled
    before they overflow.
    """

    def __init__(self, n_layers: int, d_ff: int, halflife: float = 64.0):
        if halflife <= 0:
            raise ValueError(f"halflife must be > 0 tokens, got {halflife}")
        self.n_layers, self.d_ff = n_layers, d_ff
        self._growth = 2.0 ** (1.0 / halflife)
        self.reset()

    def reset(self) -> None:
        self._held = np.zeros((self.n_layers, self.d_ff), dtype=bool)
        self._score = np.zeros((self.n_layers, self.d_ff), dtype=np.float64)
        self._weight = np.ones(self.n_layers, dtype=np.float64)
        self._size = np.zeros(self.n_layers, dtype=np.int64)

    def update(self, layer: int, active_ids, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Record this token's active set for `layer` and make room for it in `capacity` rows.

        Returns:
            (to_load, to_evict): sorted int32 ids to read (needed, not held) and to drop (held,
            not needed now, lowest score), with held + loaded - evicted <= capacity.
        Raises ValueError if the active set alone exceeds `capacity`.
        """
        ids = _sorted_unique(active_ids, self.d_ff)
        if ids.size > capacity:
            raise ValueError(f"layer {layer}: {ids.size} active neurons exceed the cache's "
                             f"{capacity} rows; raise the DRAM budget")
        held, score = self._held[layer], self._score[layer]
        w = self._weight[layer] * self._growth
        if w > 1e200:  # rescale: only the order of the scores matters
            score *= 1.0 / w
            w = 1.0
        self._weight[layer] = w
        score[ids] += w
        to_load = ids[~held[ids]]
        excess = int(self._size[layer]) + to_load.size - capacity
        to_evict = np.empty(0, dtype=np.int64)
        if excess > 0:
            free = held.copy()
            free[ids] = False
            cand = np.flatnonzero(free)
            if excess < cand.size:
                cand = cand[np.argpartition(score[cand], excess - 1)[:excess]]
            to_evict = np.sort(cand)
            held[to_evict] = False
        held[to_load] = True
        self._size[layer] += to_load.size - to_evict.size
        return to_load.astype(np.int32), to_evict.astype(np.int32)

    def size(self, layer: int) -> int:
        """Neurons held for `layer`."""
        return int(self._size[layer])

    def state(self, layer: int) -> np.ndarray:
        """Sorted ids held (for tests and statistics)."""
        return np.flatnonzero(self._held[layer]).astype(np.int32)

    @property
    def nbytes(self) -> int:
        return self._held.nbytes + self._score.nbytes + self._weight.nbytes


def rank_swaps(cached_scores: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray,
               max_swaps: int, free: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Which uncached neurons to read for the current token, and which cached rows they replace.

    Args:
        cached_scores: (n,) the cached neurons' scores for this token, in cache row order.
        cand_ids, cand_scores: the uncached neurons and their (estimated) scores.
        max_swaps: at most this many cached neurons are replaced.
        free: empty cache rows; the best candidates fill them first (no replacement).

    Returns:
        (load_ids int64, evict_rows int64): the free rows take the `free` best candidates;
        then the next best replace the lowest-scoring cached rows, pair by pair, while the
        candidate scores strictly higher. A cached neuron is never given up for one that
        scores no better, so the current token's most important neurons are never evicted
        for less important ones.
    """
    cand_ids = np.asarray(cand_ids, np.int64)
    cand_scores = np.asarray(cand_scores)
    cached_scores = np.asarray(cached_scores)
    n_free = min(max(free, 0), cand_ids.size)
    want = min(cand_ids.size, n_free + max(max_swaps, 0))
    if want == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    top = np.argpartition(-cand_scores, want - 1)[:want] if want < cand_ids.size \
        else np.arange(cand_ids.size)
    top = top[np.argsort(-cand_scores[top], kind="stable")]
    fill, rest = top[:n_free], top[n_free:]
    k = min(rest.size, cached_scores.size)
    if k == 0:
        return cand_ids[fill], np.empty(0, np.int64)
    low = np.argpartition(cached_scores, k - 1)[:k] if k < cached_scores.size \
        else np.arange(cached_scores.size)
    low = low[np.argsort(cached_scores[low], kind="stable")]
    # both sorted: candidates falling, victims rising, so the winners are a prefix
    wins = int(np.count_nonzero(cand_scores[rest[:k]] > cached_scores[low]))
    return cand_ids[np.concatenate([fill, rest[:wins]])], low[:wins].astype(np.int64)

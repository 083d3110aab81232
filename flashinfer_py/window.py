"""What stays in the neuron cache. No I/O here: the loader applies the decisions.

- `SlidingWindow`, the paper's (Section 3.2): keep in DRAM the FFN neurons active for any of
  the last k tokens; each new token loads only the neurons not already there and evicts those
  that left the window. With a capacity smaller than the window's union, the oldest tokens are
  forgotten until it fits.
- `FrequencyPolicy` (``eviction="frequency"``): keep neurons while the cache has room, evict
  the least used when it is full (ties: the lower id).

Both are compiled (``_bookkeeping.pyx``) and share one interface: ``update(layer, ids,
capacity) -> (to_load, to_evict)`` as sorted int32 arrays, ``size``, ``state``, ``reset``; a
set that alone exceeds the capacity is refused with ValueError and changes nothing.
tests/policy_reference.py states each as plain Python sets.
- `rank_swaps` (``eviction="rank"``): the cache stays full; for each token the uncached
  neurons that score higher than the lowest-scoring cached ones replace them, a bounded number
  per token. Selection under a budget as a ranking problem.
"""
from __future__ import annotations

import numpy as np

# The window and frequency policies run for every layer of every token: they are compiled
# (flashinfer_py/_bookkeeping.pyx), with the C++ calls that make the neuron cache follow them.
from ._bookkeeping import FrequencyPolicy, SlidingWindow

__all__ = ["FrequencyPolicy", "SlidingWindow", "rank_swaps"]


def rank_swaps(cached_scores: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray,
               max_swaps: int, free: int = 0, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Which uncached neurons to read for the current token, and which cached rows they replace.

    Args:
        cached_scores: (n,) the cached neurons' scores for this token, in cache row order.
        cand_ids, cand_scores: the uncached neurons and their (estimated) scores.
        max_swaps: at most this many cached neurons are replaced.
        free: empty cache rows; the best candidates fill them first (no replacement).
        margin: a candidate replaces a cached row only if it scores more than (1 + margin)
            times as much.

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
    beat = cached_scores[low] * (1.0 + margin) if margin else cached_scores[low]
    wins = int(np.count_nonzero(cand_scores[rest[:k]] > beat))
    return cand_ids[np.concatenate([fill, rest[:wins]])], low[:wins].astype(np.int64)

"""Quality measurement: perplexity over non-overlapping token windows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .sampling import log_softmax


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float          # mean negative log-likelihood per predicted token (nats)
    tokens: int         # predicted tokens
    windows: int


def windows_of(ids, window: int, max_windows: Optional[int] = None) -> list[list[int]]:
    """Split ids into non-overlapping windows of `window` tokens (the last partial one dropped)."""
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    return [list(ids[i * window:(i + 1) * window]) for i in range(n)]


def perplexity(logits_fn: Callable[[list[int]], np.ndarray], ids, window: int = 512,
               max_windows: Optional[int] = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `ids` under `logits_fn` (token ids -> logits [T, vocab] from an empty
    context, e.g. ``model.logits``), each window scored from an empty context.
    """
    wins = windows_of(ids, window, max_windows)
    if not wins:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    for w in tqdm(wins, desc="perplexity", disable=not progress, leave=False):
        logits = logits_fn(w)
        for t in range(len(w) - 1):
            total -= float(log_softmax(logits[t])[w[t + 1]])
        count += len(w) - 1
    nll = total / count
    return PerplexityResult(float(np.exp(nll)), nll, count, len(wins))


def stepwise(model) -> Callable[[list[int]], np.ndarray]:
    """A logits function for `perplexity` that decodes one token at a time from an empty
    context, as generation does (sparse models then choose neurons per token)."""

    def logits(ids):
        cache = model.new_cache()
        model.reset()
        return np.stack([model.forward([t], cache)[0] for t in ids])

    return logits

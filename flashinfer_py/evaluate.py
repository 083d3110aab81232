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


def bos_id(model) -> Optional[int]:
    """The BOS id `model`'s tokenizer starts every text with (Gemma's), or None (SmolLM2's
    adds none; so does a directory without a tokenizer)."""
    from .errors import FlashFormatError

    try:
        first = model.tokenizer.encode("a")[:1]
    except FlashFormatError:
        return None
    return first[0] if first and first[0] == model.args.bos_token_id else None


def windows_of(ids, window: int, max_windows: Optional[int] = None,
               bos: Optional[int] = None) -> list[list[int]]:
    """Split ids into non-overlapping windows of `window` tokens (the last partial one
    dropped). With `bos`, every window starts with it, as every text the model saw in
    training did (the ids' own leading BOS is dropped first): a model trained that way is off
    its distribution in a window without it (Gemma-3-270M's perplexity ~145 instead of ~19)."""
    ids = list(ids)
    if bos is None:
        body, head = window, []
    else:
        if window < 2:
            raise ValueError(f"a window with a BOS needs >= 2 tokens, got {window}")
        body, head = window - 1, [int(bos)]
        if ids and ids[0] == bos:
            ids = ids[1:]
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    return [head + ids[i * body:(i + 1) * body] for i in range(n)]


def perplexity(logits_fn: Callable[[list[int]], np.ndarray], ids, window: int = 512,
               max_windows: Optional[int] = None, progress: bool = False,
               bos: Optional[int] = None) -> PerplexityResult:
    """Perplexity of `ids` under `logits_fn` (token ids -> logits [T, vocab] from an empty
    context, e.g. ``model.logits``), each window scored from an empty context; with `bos`
    (:func:`bos_id`) each window starts with it (:func:`windows_of`) and it is not scored.
    """
    wins = windows_of(ids, window, max_windows, bos)
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

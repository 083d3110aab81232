"""Token-by-token generation: `generate_step` yields one `StepResult` per new token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .sampling import log_softmax


@dataclass
class StepResult:
    """One generated token and what it cost."""

    token: int
    logprob: float
    text: str = ""                   # the decoded piece this token added ("" while incomplete)
    seconds: float = 0.0             # wall time of this step (the prompt's forward for step 0)
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)  # per-token runtime statistics (I/O, cache, ...)


def generate_step(forward: Callable[[np.ndarray], np.ndarray], prompt_ids: Iterable[int],
                  sampler: Callable[[np.ndarray], int], max_new_tokens: int,
                  stop_ids: Iterable[int] = (), on_token=None,
                  stats: Optional[Callable[[], dict]] = None) -> Iterator[StepResult]:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`.

    Args:
        forward: runs new token ids (continuing the context) and returns logits of the last one.
        sampler: logits -> token id (see `make_sampler`).
        stop_ids: tokens that end generation (they are yielded, then generation stops).
        on_token: optional token -> text function for streaming detokenization.
        stats: optional callable returning per-step runtime statistics.
    """
    ids = np.asarray(list(prompt_ids), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    stop = set(int(s) for s in stop_ids)
    feed = ids
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        logits = forward(feed)[-1]
        tok = sampler(logits)
        res = StepResult(token=tok, logprob=float(log_softmax(logits)[tok]),
                         seconds=time.perf_counter() - t0, prompt_tokens=len(ids))
        if stats is not None:
            res.stats = stats()
        if on_token is not None:
            res.text = on_token(tok)
        yield res
        if tok in stop:
            return
        feed = np.array([tok], dtype=np.int64)

"""Token-by-token generation: `generate_step` yields one `StepResult` per new token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .sampling import log_softmax


@dataclass
class StepResult:
    """One generated token and what it cost.

    `logprob` is the token's log-probability under the model's own distribution: the
    log-softmax of the float32 logits, before temperature, top-k and top-p (what OpenAI's
    ``logprobs`` report). `logits` are those logits ([vocab], float32), for a caller that wants
    more (the top alternatives): nothing is computed from them unless it asks, and they are
    set only while this step is the current one (the generator drops them when it moves on,
    so a list of StepResults holds no vocab-sized arrays); copy them to keep them.
    """

    token: int
    logprob: float
    text: str = ""                   # the decoded piece this token added ("" while incomplete)
    seconds: float = 0.0             # wall time of this step (the prompt's forward for step 0)
    prompt_tokens: int = 0
    cached_tokens: int = 0           # of the prompt, taken from a PromptCache rather than run
    stats: dict = field(default_factory=dict)  # per-token runtime statistics (I/O, cache, ...)
    logits: Optional[np.ndarray] = field(default=None, repr=False, compare=False)


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
                         seconds=time.perf_counter() - t0, prompt_tokens=len(ids),
                         logits=logits)
        if stats is not None:
            res.stats = stats()
        if on_token is not None:
            res.text = on_token(tok)
        yield res
        res.logits = None
        if tok in stop:
            return
        feed = np.array([tok], dtype=np.int64)


class StopStrings:
    """Finds stop strings in streamed text, as OpenAI's ``stop`` does.

    ``add(piece)`` returns the text that is safe to show: text that may be the start of a stop
    string is held back until the next pieces decide. When a stop string appears, ``hit`` is
    set, and the stop string and anything after it are dropped. ``flush()`` returns what is
    held back once generation ends without one.
    """

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: Optional[str] = None

    def add(self, piece: str) -> str:
        text = self.pending + piece
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            at, self.hit = min(found)
            self.pending = ""
            return text[:at]
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

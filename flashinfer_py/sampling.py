"""Token sampling: `make_sampler` returns a callable logits -> token id."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Callable

import numpy as np

from .config import whole_at_least


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - logits.max()
    return x - np.log(np.exp(x).sum())


def check_sampling(temperature, top_k, top_p, seed) -> None:
    """ValueError naming the argument for sampling settings that cannot work (called before
    any token runs, so a bad setting costs no prompt)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if not whole_at_least(top_k, 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0 = no limit), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) \
            or not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not whole_at_least(seed, 0):
        raise ValueError(f"seed must be a whole number >= 0 or None, got {seed!r}")


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> Callable[[np.ndarray], int]:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus).

    Args:
        temperature: 0 for greedy (argmax), > 0 to sample.
        top_k: keep only the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
        seed: seed for reproducible sampling.
    """
    check_sampling(temperature, top_k, top_p, seed)
    top_k = operator.index(top_k)
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        lp = log_softmax(np.asarray(logits, np.float64) / temperature)
        order = np.argsort(-lp, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(lp[order])
        if top_p < 1.0:  # the nucleus of what top-k kept (renormalised, as transformers,
            # vLLM and llama.cpp do), not of the whole vocabulary
            cum = np.cumsum(probs / probs.sum())
            keep = min(int(np.searchsorted(cum, top_p)) + 1, len(order))
            order, probs = order[:keep], probs[:keep]
        return int(order[rng.choice(len(order), p=probs / probs.sum())])

    return sample

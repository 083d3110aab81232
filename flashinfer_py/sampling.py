"""Token sampling: `make_sampler` returns a callable logits -> token id."""
from __future__ import annotations

from typing import Callable

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64) - logits.max()
    return x - np.log(np.exp(x).sum())


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> Callable[[np.ndarray], int]:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus).

    Args:
        temperature: 0 for greedy (argmax), > 0 to sample.
        top_k: keep only the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
        seed: seed for reproducible sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        lp = log_softmax(np.asarray(logits, np.float64) / temperature)
        order = np.argsort(-lp, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(lp[order])
        if top_p < 1.0:
            keep = np.searchsorted(np.cumsum(probs), top_p) + 1
            order, probs = order[:keep], probs[:keep]
        return int(order[rng.choice(len(order), p=probs / probs.sum())])

    return sample

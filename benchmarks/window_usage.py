"""The paper's Figure 4 for SmolLM2: aggregated neuron usage and new neurons loaded per token
against the sliding-window size, from its trained predictors on real text.

    python benchmarks/window_usage.py [--tokens 256] [--plot benchmarks/figures/window_usage.png]

Runs the default SmolLM2 flash directory (``flashinfer_py.default_model.default_model_dir()``;
predictors from ``flashinfer-py train-predictors --method both`` must exist) in sparse mode, one token per
step over the Wikipedia excerpt (``corpora.wikipedia_excerpt``), and records each layer's
predicted set per token. Then, for window sizes k = 1..12 (offline, on the same sets):
- aggregated usage: neurons in the union of the last k tokens' sets (what the window holds),
- new per token: neurons of the current set not in the previous k-1 tokens' sets (what the
  window must load), both as % of the FFN, averaged over layers and over tokens >= 12.
Prints a markdown table and, with --plot, writes the two-panel PNG.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from flashinfer_py.config import RuntimeConfig
from flashinfer_py.corpora import wikipedia_excerpt
from flashinfer_py.default_model import default_model_dir
from flashinfer_py.runtime import load

KS = tuple(range(1, 13))


def record_sets(n_tokens: int):
    model = load(default_model_dir(), RuntimeConfig(sparse=True, selection="predictor",
                                                    window=1, prefill_chunk=1, threads=1))
    preds, sets = model.predictors, [[] for _ in range(model.args.num_hidden_layers)]
    for i, layer in enumerate(preds.layers):
        orig = layer.predict

        def rec(x, threshold=0.5, max_active=None, _orig=orig, _i=i):
            ids = _orig(x, threshold, max_active)
            sets[_i].append(ids)
            return ids
        layer.predict = rec
    ids = model.tokenizer.encode(wikipedia_excerpt())[:n_tokens]
    cache = model.new_cache()
    for t in ids:
        model.forward([t], cache, last_only=True)
    return sets, model.args.intermediate_size


def window_curves(sets, d_ff: int, ks=KS):
    skip = max(ks)
    usage, new = [], []
    for k in ks:
        u, n = [], []
        for layer_sets in sets:
            for t in range(skip, len(layer_sets)):
                prev = (np.unique(np.concatenate(layer_sets[t - k + 1:t])) if k > 1
                        else np.empty(0, np.int32))
                cur = layer_sets[t]
                u.append(np.union1d(prev, cur).size / d_ff)
                n.append(np.setdiff1d(cur, prev).size / d_ff)
        usage.append(100 * float(np.mean(u)))
        new.append(100 * float(np.mean(n)))
    return usage, new


def plot(ks, usage, new, filename) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(ks, usage, "o-")
    a.set_xlabel("window size (tokens)")
    a.set_ylabel("aggregated neuron usage (% of FFN)")
    a.set_title("(a) neurons held by the window")
    b.plot(ks, new, "o-", color="C1")
    b.set_xlabel("window size (tokens)")
    b.set_ylabel("new neurons per token (% of FFN)")
    b.set_title("(b) neurons loaded per token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle("SmolLM2-135M, trained predictors, Wikipedia text")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE.png")
    a = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()[0]
    sets, d_ff = record_sets(a.tokens)
    usage, new = window_curves(sets, d_ff)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {len(sets[0])} tokens x {len(sets)} layers, "
          f"d_ff {d_ff}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{time.time() - t0:.0f} s\n")
    print("| window k | aggregated usage | new per token |\n|---|---|---|")
    for k, u, n in zip(KS, usage, new):
        print(f"| {k} | {u:.1f}% | {n:.2f}% |")
    if a.plot:
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(KS, usage, new, a.plot)
        print(f"\nwrote {a.plot}")


if __name__ == "__main__":
    main()

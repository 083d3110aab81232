"""Co-activation on SmolLM2-135M (the paper's appendix figure, and its "closest friend" failure).

    python benchmarks/coactivation.py [--tokens 2048] [--layers 5,20] [--plot benchmarks/figures/coactivation.png]

Records the dense model's FFN activations |h| (``train.record``) on Wikipedia text from the
excerpt's tail (the predictors were calibrated on its head) and, per layer, labels neuron j
active on token t when |h[t, j]| is among that token's top ``--top`` fraction of the layer
(default 10%: the OPT regime of the paper, where ~3-10% of neurons fire; SmolLM2 is SwiGLU and
has no exact zeros). It also reports the predictor's own labels (|h| above the layer's median,
``sparsity=0.5`` in train.py). For neuron i, the co-activation rate with neuron j is
P(j active | i active) = #tokens both / #tokens i. Its "closest friend" is the j != i with the
highest rate.

Figure: (left) for 6 neurons of the first layer, the rate with their top-k friends (k = 1..100,
sorted), and the mean over all neurons; (middle/right) per layer, the distribution of every
neuron's activation frequency and of its closest friend's: closest friends are the very
active neurons, which is why bundling a neuron with its closest friend reloads those few
neurons over and over (the paper's appendix). Prints the numbers as markdown.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

EVAL_CHARS = 200_000


def record(n_tokens: int):
    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.default_model import default_model_dir
    from flashinfer_py.train import TrainConfig, record as rec

    model = fi.load(default_model_dir(), threads=1)
    text = wikipedia_excerpt()[-EVAL_CHARS:]
    ids = model.tokenizer.encode(text[text.index("\n") + 1:])
    _, hs = rec(model, ids, TrainConfig(max_tokens=n_tokens, window=256), progress=False)
    return hs


def labels_top(h: np.ndarray, frac: float) -> np.ndarray:
    """[N, f] bool: each token's top `frac` neurons by |h|."""
    k = max(1, int(round(frac * h.shape[1])))
    idx = np.argpartition(-h, k - 1, axis=1)[:, :k]
    a = np.zeros(h.shape, bool)
    np.put_along_axis(a, idx, True, axis=1)
    return a


def labels_median(h: np.ndarray) -> np.ndarray:
    return h > np.quantile(h.astype(np.float32), 0.5)


def coactivation(a: np.ndarray):
    """(rate [f, f] with P(j | i) in row i, diagonal set to -1; frequency [f])."""
    af = a.astype(np.float32)
    both = af.T @ af
    n_i = np.diag(both).copy()
    rate = both / np.maximum(n_i, 1)[:, None]
    np.fill_diagonal(rate, -1.0)
    return rate, n_i / a.shape[0]


def friend_stats(rate: np.ndarray, freq: np.ndarray) -> dict:
    fired = freq > 0
    friend = rate.argmax(axis=1)[fired]
    top10 = freq >= np.quantile(freq, 0.9)
    srt = -np.sort(-rate[fired], axis=1)
    return {"neurons": int(fired.sum()), "mean_freq": float(freq.mean()),
            "friend_freq_mean": float(freq[friend].mean()),
            "friend_in_top10": float(top10[friend].mean()),
            "distinct_friends": int(np.unique(friend).size),
            "rate_top1": float(srt[:, 0].mean()), "rate_top10": float(srt[:, 9].mean()),
            "rate_top100": float(srt[:, 99].mean()), "friend": friend, "sorted": srt}


def plot(layers, stats, freqs, top, filename, seed=0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(layers), figsize=(4.2 * (1 + len(layers)), 3.8))
    a0 = axes[0]
    s0 = stats[0]
    rng = np.random.default_rng(seed)
    ks = np.arange(1, 101)
    for i in rng.choice(s0["sorted"].shape[0], 6, replace=False):
        a0.plot(ks, s0["sorted"][i, :100], lw=1.2, label=f"neuron {i}")
    a0.plot(ks, s0["sorted"][:, :100].mean(axis=0), "k--", lw=2, label="mean, all neurons")
    a0.axhline(top, color="grey", lw=0.8, ls=":")
    a0.text(100, top, "independent", ha="right", va="bottom", fontsize=8, color="grey")
    a0.set_xscale("log")
    a0.set_xlabel("k-th most co-activated neuron")
    a0.set_ylabel("P(friend active | neuron active)")
    a0.set_title(f"(a) layer {layers[0]}: co-activation with top-k friends", fontsize=10)
    a0.legend(fontsize=7)
    a0.set_ylim(0, 1)
    for ax, layer, s, f in zip(axes[1:], layers, stats, freqs):
        bins = np.linspace(0, f.max(), 40)
        ax.hist(f, bins=bins, alpha=0.6, density=True, label="all neurons")
        ax.hist(f[s["friend"]], bins=bins, alpha=0.6, density=True,
                label="each neuron's closest friend")
        ax.set_yscale("log")
        ax.set_xlabel("activation frequency (fraction of tokens)")
        ax.set_ylabel("density")
        ax.set_title(f"layer {layer}: {s['distinct_friends']} distinct closest friends of "
                     f"{s['neurons']} neurons", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, Wikipedia text, active = top {100 * top:.0f}% |h| per token")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", default="5,20")
    ap.add_argument("--top", type=float, default=0.10)
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE.png")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    t0, load0 = time.time(), os.getloadavg()[0]
    hs = record(a.tokens)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {hs.shape[1]} tokens, layers {layers}, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s\n")
    print("| layer | labels | active/token | closest friend's mean frequency (all neurons' mean) "
          "| friend in top 10% most active | distinct closest friends | rate top-1 / 10 / 100 |")
    print("|---|---|---|---|---|---|---|")
    stats, freqs = [], []
    for layer in layers:
        h = hs[layer].astype(np.float32)
        for name, lab in ((f"top {100 * a.top:.0f}%", labels_top(h, a.top)),
                          ("above median (predictor's)", labels_median(h))):
            rate, freq = coactivation(lab)
            s = friend_stats(rate, freq)
            print(f"| {layer} | {name} | {100 * lab.mean():.1f}% | {s['friend_freq_mean']:.3f} "
                  f"({s['mean_freq']:.3f}) | {100 * s['friend_in_top10']:.0f}% | "
                  f"{s['distinct_friends']} of {s['neurons']} | {s['rate_top1']:.2f} / "
                  f"{s['rate_top10']:.2f} / {s['rate_top100']:.2f} |")
            if name.startswith("top"):
                stats.append(s)
                freqs.append(freq)
    if a.plot:
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(layers, stats, freqs, a.top, a.plot)
        print(f"\nwrote {a.plot}")


if __name__ == "__main__":
    main()

"""Ranking's churn under a budget: does a swap margin read less for the same quality?

    python benchmarks/swap_margin.py [--budget 340MB] [--margins 0,0.25,0.5,1,2] [--json F]

Under eviction "rank" a token replaces a cached neuron by an uncached one whenever the
candidate's (sketch-estimated) score for this token beats the cached neuron's exact score, up
to ``read_limit`` of the layer (10%). With a large cache those swaps are between neurons of
nearly equal score, so the reads a token stay at the limit whatever the cache's size (RESULTS
section 14: 23.5 MB a token at 25% and at 59% cached). With ``swap_margin`` m a candidate must
score (1 + m) times the neuron it replaces. For each margin this runs the real runtime
(default selection, eviction and plan at the budget) over section 17's held-out Wikipedia
windows token by token from an empty context, and reports the perplexity, the neuron bytes read
a token and the token time (cold reads, O_DIRECT), margins interleaved over ``--rounds``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(directory, budget: str, margin: float, windows: list) -> dict:
    import flashinfer_py as fi

    m = fi.load(directory, dram_budget=budget, swap_margin=margin)
    nll, n, ms, mb = 0.0, 0, [], []
    for w in windows:
        cache = m.new_cache()
        m.reset()
        for i, t in enumerate(w):
            logits = np.asarray(m.forward([t], cache, last_only=True)[0], np.float64)
            if i + 1 < len(w):
                z = logits - logits.max()
                nll -= z[w[i + 1]] - np.log(np.exp(z).sum())
                n += 1
            if i >= 8:
                ms.append(m.last_stats["total_ns"] / 1e6)
                mb.append(m.last_stats["bytes_read"] / 1e6)
    return {"margin": margin, "perplexity": float(np.exp(nll / n)), "token_ms": float(np.mean(ms)),
            "mb_read": float(np.mean(mb)), "cache_fraction": m.plan.cache_fraction,
            "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="340MB")
    ap.add_argument("--margins", default="0,0.25,0.5,1,2")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import flashinfer_py as fi
    from flashinfer_py.default_model import default_model_dir
    from quant_quality import eval_ids

    d = default_model_dir()
    windows = eval_ids(fi.load(d), a.windows, a.window)
    margins = [float(x) for x in a.margins.split(",")]
    rows: dict = {}
    t0 = time.time()
    for r in range(a.rounds):
        for mg in (margins if r % 2 == 0 else margins[::-1]):
            res = run(d, a.budget, mg, windows)
            rows.setdefault(mg, []).append(res)
            print(f"round {r} margin {mg}: ppl {res['perplexity']:.3f}, {res['mb_read']:.2f} MB "
                  f"read a token, {res['token_ms']:.1f} ms", file=sys.stderr, flush=True)
    base = rows[margins[0]][0]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, budget {a.budget}, cache "
          f"{base['cache_fraction']:.0%} of the FFN, {a.windows} x {a.window} tokens, "
          f"{a.rounds} round(s), load average {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s\n")
    print("| swap margin | perplexity | vs margin 0 | MB of neurons read / token | vs margin 0 | token ms |")
    print("|---|---|---|---|---|---|")
    out = []
    for mg in margins:
        rs = rows[mg]
        p = rs[0]["perplexity"]
        mb = float(np.mean([x["mb_read"] for x in rs]))
        ms = float(np.mean([x["token_ms"] for x in rs]))
        print(f"| {mg:g} | {p:.3f} | {p / base['perplexity'] - 1:+.2%} | {mb:.2f} | "
              f"{mb / base['mb_read'] - 1:+.0%} | {ms:.1f} |")
        out.append({"margin": mg, "perplexity": p, "mb_read": mb, "token_ms": ms,
                    "runs": rs})
    if a.json:
        a.json.write_text(json.dumps({"budget": a.budget, "rows": out}, indent=1))


if __name__ == "__main__":
    main()

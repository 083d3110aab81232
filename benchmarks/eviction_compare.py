"""Eviction policies on SmolLM2 under a DRAM budget: the paper's window vs our frequency policy.

    python benchmarks/eviction_compare.py [--caches 0.3 0.5 0.85] [--windows 2] [--tokens 192]

Real model, real text: the default SmolLM2 flash directory (float16) with its trained predictors
(``flashinfer-py train-predictors --method both``; the low-rank ones are the paper's) reads
windows of ``--tokens`` tokens from the excerpt's tail (never seen in training), one token per
forward call (``prefill_chunk=1``), each window from an empty context and an empty neuron cache.
For each cache size (a fraction of the FFN; the DRAM budget is planned so each layer's cache
holds that fraction) it runs ``eviction="window"`` (the paper: a neuron leaves when none of the
last k=4 tokens used it, or when the window's union overflows the cache, oldest token first) and
``eviction="frequency"`` (ours: neurons stay while the cache has room, least used first when it
is full), everything else default (``compute="cached"``: each token uses every cached neuron).

Prints perplexity, FFN bytes read per token and cache hit rate for both, side by side.
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
from flashinfer_py.evaluate import perplexity, windows_of
from flashinfer_py.loader import plan_memory
from flashinfer_py.runtime import load
from paper_table import environment  # the date / commit / machine header of every table

EVAL_CHARS = 60_000  # the excerpt's tail (as benchmarks/sparse_quality.py)


def budget_for(model, fraction: float, eviction: str) -> int:
    """A DRAM budget whose neuron cache holds `fraction` of every layer's FFN."""
    rt = RuntimeConfig(sparse=True, eviction=eviction, max_context=model.runtime.max_context)
    full = plan_memory(model.args, model.manifest, rt, model.predictors.nbytes)
    per_neuron = full.record_bytes * model.args.num_hidden_layers
    cap = max(1, int(round(fraction * model.args.intermediate_size)))
    return full.total - full.cache_bytes + cap * per_neuron + per_neuron - 1


def run(directory: Path, budget: int, eviction: str, ids, tokens: int, n_windows: int) -> dict:
    rt = RuntimeConfig(dram_budget=budget, eviction=eviction, prefill_chunk=1,
                       max_context=tokens, threads=1, stream_resident="needed")  # equal caches
    m = load(directory, rt)
    acc = {"bytes_read": 0, "hits": 0, "needed": 0, "tokens": 0}

    def logits_token_by_token(w):
        """One forward call per token, each window from an empty context and cache; the stats
        of the tokens that are scored (all but the last) are summed."""
        cache = m.new_cache()
        m.reset()
        out = []
        for i, t in enumerate(w):
            out.append(m.forward([t], cache))
            if i < len(w) - 1:
                for k in ("bytes_read", "hits", "needed"):
                    acc[k] += m.last_stats[k]
                acc["tokens"] += 1
        return np.concatenate(out)

    t0 = time.perf_counter()
    res = perplexity(logits_token_by_token, ids, tokens, n_windows)  # the dense row's windows
    return {"eviction": eviction, "cap": m.plan.cache_capacity[0], "ppl": res.perplexity,
            "bytes": acc["bytes_read"] / acc["tokens"], "hit_rate": acc["hits"] / acc["needed"],
            "s": time.perf_counter() - t0, "ffn_bytes": m.args.num_hidden_layers
            * m.args.intermediate_size * m.plan.record_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="flash dir (default: SmolLM2)")
    ap.add_argument("--caches", type=float, nargs="+", default=[0.3, 0.5, 0.85],
                    help="neuron cache sizes as fractions of the FFN")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=192)
    a = ap.parse_args()
    directory = a.dir or default_model_dir()
    if not (directory / "predictors.npz").exists():
        raise SystemExit(f"{directory} has no predictors.npz: run `flashinfer-py "
                         f"train-predictors {directory} --method both` first")
    dense = load(directory, RuntimeConfig(threads=1))
    ids = dense.tokenizer.encode(wikipedia_excerpt()[-EVAL_CHARS:])
    windows = windows_of(ids, a.tokens, a.windows)
    env = environment(directory)
    print(f"{env['date']}, commit {env['git']}, {env['cpu']}, {env['cores']} cores, "
          f"{env['ram_gib']} GiB, {env['device']}, load {os.getloadavg()[0]:.1f}; "
          f"{len(windows)} windows x {a.tokens} tokens\n")
    print("| cache (of the FFN) | eviction | perplexity | FFN read per token | hit rate | s |")
    print("|---|---|---|---|---|---|")
    ref = perplexity(dense.logits, ids, a.tokens, a.windows)  # the same windows
    print(f"| dense (no streaming) | - | {ref.perplexity:.2f} | - | - | - |", flush=True)
    del dense
    probe = load(directory, RuntimeConfig(sparse=True, max_context=a.tokens))  # for the plans
    for f in a.caches:
        rows = [run(directory, budget_for(probe, f, ev), ev, ids, a.tokens, a.windows)
                for ev in ("window", "frequency")]
        for r in rows:
            print(f"| {100 * f:.0f}% ({r['cap']} neurons/layer) | {r['eviction']} | "
                  f"{r['ppl']:.2f} | {r['bytes'] / 2**20:.2f} MiB "
                  f"({100 * r['bytes'] / r['ffn_bytes']:.1f}%) | {100 * r['hit_rate']:.1f}% | "
                  f"{r['s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

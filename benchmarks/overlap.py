"""Reads overlapping compute (issue 16) on SmolLM2-135M under a DRAM budget, side by side.

    python benchmarks/overlap.py [--budget 340MB] [--rounds 3] [--tokens 40]

Runs the same Wikipedia text, token by token (decode steps), through the real runtime with
overlap "off", "layer", "ahead" and "async", interleaved round by round so that a change of machine
load hits each alike, and reports per token: the wall time, the reads' busy time (I/O), the
part of the token spent waiting for them, memory management, the predictor (sketch scores,
ranking), compute, bytes read, and the issue's ratio token / max(I/O, compute + management).
It also checks that each mode's logits equal "off"'s (rank: bit for bit): the overlap modes get
the read-ahead slots' bytes on top of the budget, so that all cache the same neurons. "async"
(a layer loads only what was read ahead for it) changes the logits by design: its cost is the
neurons it drops and the perplexity of the text's next tokens, shown beside each mode's (over
a few hundred tokens: a sign, not a frontier; benchmarks/sparse_quality.py measures that).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import flashinfer_py as fi
from flashinfer_py.corpora import wikipedia_excerpt
from flashinfer_py.default_model import default_model_dir
from flashinfer_py.sampling import log_softmax

MODES = ("off", "layer", "ahead", "async")
KEYS = ("total_ns", "io_ns", "io_wait_ns", "mm_ns", "predict_ns", "compute_ns", "bytes_read",
        "ahead_bytes", "loaded", "reads", "dropped", "stream_wait_ns", "stream_bytes",
        "stream_busy_ns")


def slots_bytes(directory, budget: str, **kw) -> int:
    """What the plan counts for the read-ahead worker (its slots, their maps and its own
    reader's scratch): given on top of the budget to the overlap modes, so that every mode
    caches the same neurons (and the logits can match). Taken from the plan itself, the
    difference between overlap "ahead" and "off", so it follows what the plan counts."""
    from flashinfer_py.config import RuntimeConfig
    from flashinfer_py.loader import plan_directory

    _, off = plan_directory(directory, RuntimeConfig(dram_budget=budget, **kw))
    _, on = plan_directory(directory, RuntimeConfig(dram_budget=budget, overlap="ahead", **kw))
    return on.overhead - off.overhead


def run(directory, budget: str, mode: str, ids: list, warm: int, setup=None,
        **kw) -> tuple[dict, np.ndarray]:
    """Per-token stats (KEYS, after `warm` tokens) and every token's logits of `ids` decoded
    one by one under `budget` with overlap `mode`; `setup(model)`, when given, runs on the
    loaded model first (a study's own hook, benchmarks/lookahead_study.py)."""
    from flashinfer_py.config import parse_bytes

    b = parse_bytes(budget) + (slots_bytes(directory, budget, **kw) if mode != "off" else 0)
    m = fi.load(directory, dram_budget=b, overlap=mode, **kw)
    if setup is not None:
        setup(m)
    if mode != "off":
        assert m.plan.cache_capacity == fi.load(directory, dram_budget=budget,
                                                **kw).plan.cache_capacity
    cache = m.new_cache()
    m.reset()
    acc = {k: [] for k in KEYS}
    logits = []
    for i, t in enumerate(ids):
        logits.append(m.forward([t], cache, last_only=True)[0])
        if i >= warm:
            for k in KEYS:
                acc[k].append(m.last_stats.get(k, 0))  # stream_*: matrices left on flash
    rt = m.runtime
    del m
    return ({k: np.asarray(v, np.float64) for k, v in acc.items()}
            | {"selection": rt.selection, "eviction": rt.eviction}), np.asarray(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="340MB", help="DRAM budget (default %(default)s: the "
                    "neuron cache holds about a quarter of the FFN, the sketch the rest)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40, help="measured tokens per round")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=None,
                    help="flash directory (default: the embedded SmolLM2)")
    ap.add_argument("--selection", default="auto", help="RuntimeConfig.selection")
    ap.add_argument("--eviction", default="auto", help="RuntimeConfig.eviction")
    ap.add_argument("--read-limit", type=float, default=None, help="RuntimeConfig.read_limit "
                    "(default: the runtime's)")
    ap.add_argument("--threshold", type=float, default=None, help="RuntimeConfig."
                    "predictor_threshold (the window path: a higher one loads fewer neurons)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="overlap modes to run (default: all; \"off\" always runs first)")
    a = ap.parse_args()
    modes = ["off"] + [m for m in a.modes if m != "off"]
    directory = a.dir or default_model_dir()
    kw = dict(selection=a.selection, eviction=a.eviction)
    if a.read_limit is not None:
        kw["read_limit"] = a.read_limit
    if a.threshold is not None:
        kw["predictor_threshold"] = a.threshold
    tok = fi.load(directory).tokenizer
    text = wikipedia_excerpt()[:20000]
    ids = tok.encode(text)[1000:1000 + a.warmup + a.tokens]
    load0 = os.getloadavg()
    res = {m: [] for m in modes}
    same = {m: True for m in modes}
    diff = {m: 0.0 for m in modes}  # max |logit - off's| / max |off's logit|
    argmax = {m: True for m in modes}
    nll = {m: [] for m in modes}  # of each next token of the text (async changes the logits)
    for r in range(a.rounds):
        ref = None
        for mode in modes:
            st, lg = run(directory, a.budget, mode, ids, a.warmup, **kw)
            res[mode].append(st)
            nll[mode].extend(-log_softmax(lg[i])[ids[i + 1]] for i in range(len(ids) - 1))
            if ref is None:
                ref = lg
            else:
                same[mode] &= bool(np.array_equal(lg, ref))
                diff[mode] = max(diff[mode], float(np.abs(lg - ref).max() / np.abs(ref).max()))
                argmax[mode] &= bool((lg.argmax(-1) == ref.argmax(-1)).all())
            print(f"round {r} {mode}: {np.mean(st['total_ns']) / 1e6:.1f} ms/token", flush=True)
    load1 = os.getloadavg()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, commit {git}, load average {load0[0]:.1f} -> "
          f"{load1[0]:.1f}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores; SmolLM2-135M float16 records, budget {a.budget}, "
          f"{res['off'][0]['selection']} + {res['off'][0]['eviction']}, {a.rounds} rounds x "
          f"{a.tokens} tokens (after {a.warmup})\n")
    print("| overlap | token ms | I/O (reads busy) ms | waited ms | memory mgmt ms | predictor "
          "ms | compute ms | MB read / token | of which read ahead | resident matrices read "
          "from flash: MB / busy / waited ms | token / max(I/O, CPU) | the same, I/O = FFN + "
          "resident reads | dropped / token | perplexity of the text | logits = off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = []
    for mode in modes:
        cat = {k: np.concatenate([s[k] for s in res[mode]]) for k in KEYS}
        mean = {k: float(v.mean()) for k, v in cat.items()}
        per_round = [float(s["total_ns"].mean()) / 1e6 for s in res[mode]]
        cpu = mean["compute_ns"] + mean["mm_ns"] + mean["predict_ns"]
        ratio = mean["total_ns"] / max(mean["io_ns"], cpu)
        # under a budget that leaves resident matrices on flash (stream_resident) the disk
        # also serves them: both reads' busy times, summed (they share the one disk)
        ratio_all = mean["total_ns"] / max(mean["io_ns"] + mean["stream_busy_ns"], cpu)
        ppl = float(np.exp(np.mean(nll[mode])))
        print(f"| {mode} | {mean['total_ns'] / 1e6:.1f} ({', '.join(f'{x:.1f}' for x in per_round)})"
              f" | {mean['io_ns'] / 1e6:.1f} | {mean['io_wait_ns'] / 1e6:.1f} | "
              f"{mean['mm_ns'] / 1e6:.1f} | {mean['predict_ns'] / 1e6:.1f} | "
              f"{mean['compute_ns'] / 1e6:.1f} | {mean['bytes_read'] / 1e6:.2f} | "
              f"{mean['ahead_bytes'] / 1e6:.2f} | {mean['stream_bytes'] / 1e6:.1f} / "
              f"{mean['stream_busy_ns'] / 1e6:.1f} / {mean['stream_wait_ns'] / 1e6:.1f} | "
              f"{ratio:.2f} | {ratio_all:.2f} | {mean['dropped']:.0f} | "
              f"{ppl:.3f} | "
              + ("bit-identical |" if same[mode] else
                 f"max rel. diff {diff[mode]:.1e}, argmax {'same' if argmax[mode] else 'DIFFERS'} |"))
        out.append({"mode": mode, **mean, "per_round_ms": per_round, "ratio": ratio, "ratio_all_reads": ratio_all, "ppl": ppl,
                    "io_share": mean["io_wait_ns"] / mean["total_ns"],
                    "identical": same[mode], "max_rel_diff": diff[mode],
                    "argmax_same": argmax[mode]})
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git,
                                "load": [load0, load1], "budget": a.budget, "rows": out}) + "\n")


if __name__ == "__main__":
    main()

"""The paper's Table 2 (and the Table 3 split) for SmolLM2-135M with its trained predictors.

    python benchmarks/smollm2_table.py [--tokens 32] [--rounds 2] [--budget 250MB]
                                       [--json benchmarks/smollm2_table.json]

Real model, real text, real activations: the default SmolLM2 flash directory
(``default_model_dir()``, float16, its files linked into ``<cache>/bench/smollm2-table``; its
``predictors.npz`` trained there once as ``flashinfer-py train-predictors --method both`` does,
calibrated on the *head* of the Wikipedia excerpt) decodes text from the excerpt's *tail* (never
seen in training). For each ablation preset (naive, hybrid, predictor, window, bundling):
``RuntimeConfig(ablation=row, max_context=512, threads=1)``, everything else default (window
k=4, compute="cached", io_uring/O_DIRECT, queue depth 32). Before each row the page cache of
every model file is dropped (``posix_fadvise(DONTNEED)``) after loading; then a 16-token prompt
is prefilled (one window step) and the next ``--tokens`` tokens of the text are fed one by one
(teacher forcing: the same tokens for every row). Per token it records
``FlashModel.last_stats``: I/O (flash reads; naive also re-reads the resident file),
memory management (window update, eviction, row bookkeeping), predictor, compute (the rest
of the forward), bytes and reads. Rows run ``--rounds`` times in shuffled order (compared
cases interleaved); means are over the tokens after the first k=4 (window full), over rounds.

``--budget``: every row runs under that ``dram_budget`` (the whole process, as ``--dram-budget``
plans it), so the rows that keep neurons cache only what fits; without it they may hold the
whole FFN. Each row also reports the prompt's cost (time to first token: the 16-token prompt's
forward, which loads the prompt's neurons from a cold cache, and its bytes) and the quality of
its logits on the fed tokens (perplexity over the measured tokens: every row is fed the same
tokens, so the rows compare; a short sample, not a benchmark of the model).

DRAM column = resident tensors (0 for naive: it re-reads them every token) + predictors (rows
that use them) + KV cache for max_context + the planned runtime overhead + the peak neuron-cache
rows in use. Prints markdown for benchmarks/RESULTS.md; --json keeps every token.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from common import git_commit, machine

from flashinfer_py.config import RuntimeConfig, parse_bytes
from flashinfer_py.corpora import wikipedia_excerpt
from flashinfer_py.default_model import default_model_dir
from flashinfer_py.runtime import load
from flashinfer_py.sampling import log_softmax

ROWS = ("naive", "hybrid", "predictor", "window", "bundling")
FLAGS = {"naive": "- - - -", "hybrid": "x - - -", "predictor": "x x - -",
         "window": "x x x -", "bundling": "x x x x"}
PROMPT_TOKENS = 16
EVAL_CHARS = 200_000   # text is taken from the excerpt's tail: the predictors saw its head
HERE = Path(__file__).resolve().parent


def drop_cache(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def table_dir() -> Path:
    """The default SmolLM2 directory's files, hard-linked (copied across file systems) into
    ``<cache>/bench/smollm2-table``, so that this table's predictors never replace the ones a
    user trained in the default directory."""
    import shutil

    from flashinfer_py.default_model import cache_root

    src, dst = default_model_dir(), cache_root() / "bench" / "smollm2-table"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "predictors.npz" and not (dst / f.name).exists():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return dst


def ensure_lowrank(directory: Path) -> None:
    """The rows with a predictor need the low-rank predictors: train them (and the sketch) on
    the excerpt's head, once, if the directory's predictors.npz lacks them."""
    from flashinfer_py.errors import FlashFormatError
    from flashinfer_py.format import read_manifest
    from flashinfer_py.predictor import Predictors
    from flashinfer_py.train import TrainConfig, train_predictors

    try:
        if "lowrank" in Predictors.load(directory, read_manifest(directory)).kinds:
            return
    except FlashFormatError:
        pass
    print("training low-rank predictors and the sketch on the excerpt's head (once) ...",
          flush=True)
    model = load(directory)
    cfg = TrainConfig(methods=("lowrank", "sketch"))
    head = wikipedia_excerpt()[:-EVAL_CHARS]
    train_predictors(model, model.tokenizer.encode(head[: cfg.max_tokens * 12]), cfg,
                     progress=False)


def eval_tokens(model, n: int) -> list[int]:
    text = wikipedia_excerpt()[-EVAL_CHARS:]
    text = text[text.index("\n") + 1:]  # start at a line boundary
    return model.tokenizer.encode(text)[:n]


def run_row(row: str, directory: Path, ids: list[int], threads: int, skip: int,
            **overrides) -> dict:
    rt = RuntimeConfig(ablation=row, max_context=512, threads=threads, **overrides)
    model = load(directory, rt)
    plan = model.plan
    drop_cache(directory)
    cache = model.new_cache()
    model.reset()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter_ns()
    logits = model.forward(ids[:PROMPT_TOKENS], cache, last_only=True)[-1]
    prompt = {"ttft_ms": (time.perf_counter_ns() - t0) / 1e6,
              "prompt_bytes": model.last_stats["bytes_read"]}
    per_tok = []
    for i, t in enumerate(ids[PROMPT_TOKENS:]):
        nll = -float(log_softmax(logits)[t])  # the previous step's prediction of this token
        logits = model.forward([t], cache, last_only=True)[-1]
        s = model.last_stats
        per_tok.append({k: s[k] for k in ("io_ns", "mm_ns", "predict_ns", "compute_ns",
                                          "total_ns", "bytes_read", "reads", "loaded",
                                          "needed", "hits", "cached", "direct")})
        per_tok[-1]["nll"] = nll
    engine, direct = model.ffn.reader.engine, model.ffn.reader.is_direct
    rec = plan.record_bytes
    del model, cache
    gc.collect()
    m = per_tok[skip:]

    def mean(k):
        return float(np.mean([p[k] for p in m]))

    resident = 0 if rt.reread_resident else plan.resident
    cache_peak = max(p["cached"] for p in per_tok) * rec
    io_ms = mean("io_ns") / 1e6
    return {
        "row": row, "tokens": len(per_tok), "measured_from": skip, "engine": engine,
        "direct": bool(direct and all(p["direct"] for p in per_tok)),
        "threads": threads, "window": rt.window, "compute": rt.compute,
        "dram_bytes": resident + plan.predictors + plan.kv_cache + plan.overhead + cache_peak,
        "resident_bytes": resident, "predictor_bytes": plan.predictors,
        "kv_bytes": plan.kv_cache, "overhead_bytes": plan.overhead,
        "cache_peak_bytes": cache_peak, "plan_cache_bytes": plan.cache_bytes,
        "model_bytes": plan.resident + plan.d_ff * rec * len(plan.cache_capacity),
        "bytes_per_token": mean("bytes_read"), "reads_per_token": mean("reads"),
        "gbps": mean("bytes_read") / (io_ms * 1e6) if io_ms else 0.0,
        "io_ms": io_ms, "io_ms_sd": float(np.std([p["io_ns"] / 1e6 for p in m], ddof=1)),
        "mm_ms": mean("mm_ns") / 1e6, "predict_ms": mean("predict_ns") / 1e6,
        "compute_ms": mean("compute_ns") / 1e6, "total_ms": mean("total_ns") / 1e6,
        "total_ms_sd": float(np.std([p["total_ns"] / 1e6 for p in m], ddof=1)),
        "hit_rate": sum(p["hits"] for p in m) / max(1, sum(p["needed"] for p in m)),
        "needed_frac": mean("needed") / (plan.d_ff * len(plan.cache_capacity)),
        "load_start": load0, "load_end": os.getloadavg()[0], "per_token": per_tok,
        "budget": rt.dram_budget, "perplexity": float(np.exp(mean("nll"))), **prompt,
    }


def combine(runs: list[dict]) -> dict:
    """Mean over rounds of one row (token-weighted: every round has the same token count)."""
    out = dict(runs[0])
    for k in ("dram_bytes", "cache_peak_bytes", "bytes_per_token", "reads_per_token", "gbps",
              "io_ms", "mm_ms", "predict_ms", "compute_ms", "total_ms", "hit_rate",
              "needed_frac", "ttft_ms", "prompt_bytes"):
        out[k] = float(np.mean([r[k] for r in runs]))
    # every round feeds the same ids: the perplexity is of one round's tokens (pooling the
    # rounds counted each token once per round), with how many tokens it rests on
    first = runs[0]["per_token"][runs[0]["measured_from"]:]
    out["perplexity"] = float(np.exp(np.mean([p["nll"] for p in first])))
    out["ppl_tokens"] = len(first)
    toks = [p for r in runs for p in r["per_token"][r["measured_from"]:]]
    out["io_ms_sd"] = float(np.std([p["io_ns"] / 1e6 for p in toks], ddof=1))
    out["total_ms_sd"] = float(np.std([p["total_ns"] / 1e6 for p in toks], ddof=1))
    out["rounds"] = len(runs)
    out["load"] = [min(r["load_start"] for r in runs), max(r["load_end"] for r in runs)]
    out["direct"] = all(r["direct"] for r in runs)
    return out


def format_tables(rows: dict, meta: dict) -> str:
    mb = 1e6
    out = [f"{meta['date']}, commit {meta['commit']}, {meta['machine']}; load average "
           f"{meta['load'][0]:.1f} -> {meta['load'][1]:.1f}; {meta['tokens']} decoded tokens x "
           f"{meta['rounds']} rounds per row (rows shuffled per round), means over tokens "
           f">= {meta['skip']}; {meta['wall_s']:.0f} s.", "",
           "**Table 2, SmolLM2-135M** (per token; "
           + (f"every row under dram_budget {meta['budget'] / mb:.0f} MB; "
              if meta.get("budget") else "no budget; ") + "model = "
           f"{meta['model_bytes'] / mb:.0f} MB: {meta['resident_bytes'] / mb:.0f} MB resident + "
           f"{meta['ffn_bytes'] / mb:.0f} MB FFN bundles, 4 KiB records; DRAM (plan) = weights "
           "in DRAM + KV cache + the planned "
           f"{next(iter(rows.values()))['overhead_bytes'] / 2**20:.0f} MiB runtime overhead):", "",
           "| hybrid pred window bundle | DRAM (plan) | of which weights | flash->DRAM /token | reads/token (mean size) "
           "| effective GB/s | I/O latency | neurons needed (% FFN) | cache hit rate "
           "| time to first token (prompt bytes) | perplexity, fed tokens |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r not in rows:
            continue
        x = rows[r]
        size = x["bytes_per_token"] / x["reads_per_token"] / 1024 if x["reads_per_token"] else 0
        w = x["resident_bytes"] + x["predictor_bytes"] + x["cache_peak_bytes"]
        out.append(f"| {r} ({FLAGS[r]}) | {x['dram_bytes'] / mb:.0f} MB | {w / mb:.0f} MB | "
                   f"{x['bytes_per_token'] / mb:.1f} MB | {x['reads_per_token']:.0f} ({size:.0f} KiB) | "
                   f"{x['gbps']:.2f} | **{x['io_ms']:.1f} ± {x['io_ms_sd']:.1f} ms** | "
                   f"{100 * x['needed_frac']:.0f}% | {100 * x['hit_rate']:.0f}% | "
                   f"{x['ttft_ms']:.0f} ms ({x['prompt_bytes'] / mb:.0f} MB) | "
                   f"{x['perplexity']:.2f} |")
    out += ["", "**Table 3 split, SmolLM2-135M** (per token, ms; compute = the rest of the "
            "forward: attention, dense parts, the FFN kernel over the cached rows, LM head):", "",
            "| config | I/O | memory mgmt | predictor | compute | total | mgmt share |",
            "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r not in rows:
            continue
        x = rows[r]
        out.append(f"| {r} | {x['io_ms']:.1f} | {x['mm_ms']:.1f} | {x['predict_ms']:.1f} | "
                   f"{x['compute_ms']:.1f} | {x['total_ms']:.1f} ± {x['total_ms_sd']:.1f} | "
                   f"{100 * x['mm_ms'] / x['total_ms']:.1f}% |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per row")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each row, shuffled per round")
    ap.add_argument("--threads", type=int, default=1, help="compute threads (1: the machine is shared)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=parse_bytes, default=None,
                    help="dram_budget for every row (e.g. 250MB: below the model's size)")
    a = ap.parse_args()
    directory = table_dir()
    ensure_lowrank(directory)
    t_start, load0 = time.time(), os.getloadavg()[0]
    probe = load(directory)
    ids = eval_tokens(probe, PROMPT_TOKENS + a.tokens)
    del probe
    rows = [r for r in a.rows.split(",") if r]
    skip = RuntimeConfig().window
    rng = random.Random(a.seed)
    runs: dict[str, list] = {r: [] for r in rows}
    for rnd in range(a.rounds):
        order = rows[:]
        rng.shuffle(order)
        for r in order:
            res = run_row(r, directory, ids, a.threads, skip,
                          **({"dram_budget": a.budget} if a.budget else {}))
            runs[r].append(res)
            print(f"round {rnd} {r}: {res['io_ms']:.1f} ms I/O, {res['total_ms']:.1f} ms total, "
                  f"{res['bytes_per_token'] / 1e6:.1f} MB/token, load {res['load_end']:.2f}",
                  flush=True)
    combined = {r: combine(v) for r, v in runs.items()}
    any_row = next(iter(combined.values()))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit("flashinfer_py"),
            "machine": machine(),
            "load": [load0, os.getloadavg()[0]], "tokens": a.tokens, "rounds": a.rounds,
            "skip": skip, "wall_s": time.time() - t_start, "budget": a.budget, "model_bytes": any_row["model_bytes"],
            "command": "python benchmarks/smollm2_table.py " + " ".join(os.sys.argv[1:])}
    manifest = json.loads((directory / "manifest.json").read_text())
    res_b = int(manifest["checksums"][manifest["files"]["dense"]]["bytes"])
    meta["resident_bytes"], meta["ffn_bytes"] = res_b, any_row["model_bytes"] - res_b
    print()
    print(format_tables(combined, meta))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": combined, "runs": runs}, indent=1))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()

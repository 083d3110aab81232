"""Quality of sparse inference under a DRAM budget: perplexity against the FFN bytes read per
token, for each way of choosing neurons, at equal total DRAM, with the real runtime.

    python benchmarks/sparse_quality.py                   # SmolLM2 and Gemma-3-270M, ~2 h
    python benchmarks/sparse_quality.py --write --plot    # also RESULTS_sparse.md and figures
    python benchmarks/sparse_quality.py --models smollm2 --windows 2 --fractions 0.5  # quick

What is measured. Each setting loads the model with ``load(dir, dram_budget=B,
prefill_chunk=1, ...)`` and decodes held-out text token by token through the real runtime
(neuron cache, reads from the bundle file, the native kernels); perplexity is over every
predicted token. The budget B is chosen so that what the FFN gets in DRAM (the neuron cache
plus whatever the method keeps to choose neurons: the 4-bit sketch of the uncached neurons,
or the low-rank predictors) is a fixed fraction of the FFN's size in DRAM (``L * d_ff *
row_bytes``, the weights of every neuron, without the records' padding on flash): methods are
compared at equal total DRAM. Bytes read are a fraction of the FFN on flash (padded records). The first fill of the cache
(hottest neurons from the calibration, read once at load) is not counted per token; everything
read after it is. Windows run one after the other on one loaded model (a new KV cache each;
the neuron cache carries over, as in a server), so the numbers are the steady state.

Methods (`--methods`):
- ``exact``: ``selection="oracle", eviction="rank"``: the runtime's oracle ranks every neuron
  by its true contribution |h_j| * ||down_j|| (from a resident copy of the whole FFN that is
  not counted: a measuring instrument); the same cache and read limit: the ceiling.
- ``sketch``: the default for SwiGLU/GeGLU models (4-bit sketch, eviction "rank", per-layer
  cache sizes).
- ``sketch-uniform``: the same with equal cache sizes in every layer.
- ``lowrank-rank``: the paper's low-rank predictors (rank 64) ranking neurons under eviction
  "rank" (their logits as scores; their DRAM counted).
- ``lowrank-window``: the paper's method as it was the default before: predictors, sliding
  window k=4, compute on the cached union, the window shrunk to the budget.

Text: calibration on Shakespeare's plays (the default of `train-predictors`), evaluation on
the tail of the offline Wikipedia excerpt: text of another kind. Bytes read are shown as a
fraction of the FFN; the page cache is left warm (``use_direct_io=False``), since I/O speed
does not change which neurons are read (speed is measured in benchmarks/smollm2_table.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from common import git_commit, machine

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "sparse_quality.json"
EVAL_CHARS = 60_000
METHODS = {
    "exact": dict(selection="oracle", eviction="rank"),
    "sketch": dict(selection="sketch", eviction="rank"),
    "sketch-uniform": dict(selection="sketch", eviction="rank", per_layer_cache=False),
    "sketch-full": dict(selection="sketch", eviction="rank", sketch="full"),
    "sketch-gate": dict(selection="sketch", eviction="rank", sketch="gate"),
    "lowrank-rank": dict(selection="predictor", eviction="rank"),
    "lowrank-window": dict(selection="predictor", eviction="window"),
}
LABELS = {
    "exact": "exact contributions (oracle: the ceiling)",
    "sketch": "4-bit sketch, per-layer caches (default)",
    "sketch-uniform": "4-bit sketch, equal caches",
    "sketch-full": "4-bit sketch of gate and up rows",
    "sketch-gate": "4-bit sketch of the gate rows x mean|up.x|",
    "lowrank-rank": "low-rank predictor r=64, ranked",
    "lowrank-window": "low-rank predictor r=64, window k=4 (the paper)",
}


def model_dir(name: str, dtype: str = "") -> Path:
    """A benchmark copy of an embedded model: its files linked, its own predictors; with
    `dtype`, its GGUF converted to that storage format instead (block formats keep the GGUF's
    blocks where they match: SmolLM2's q4_1 is exactly the model llama.cpp runs)."""
    from flashinfer_py.default_model import (cache_root, default_gguf_path, default_model_dir,
                                             gemma3_gguf_path, gemma3_model_dir)

    if dtype:
        import flashinfer_py as fi

        dst = cache_root() / "bench" / "sparse_quality" / f"{name}-{dtype}"
        if not (dst / "manifest.json").exists():
            gguf = {"smollm2": default_gguf_path, "gemma3": gemma3_gguf_path}[name]()
            fi.convert(gguf, dst, dtype=dtype, resident_dtype="auto", force=dst.exists(),
                       progress=False)
        return dst
    src = {"smollm2": default_model_dir, "gemma3": gemma3_model_dir}[name]()
    dst = cache_root() / "bench" / "sparse_quality" / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in ("predictors.npz", "ffn_sketch.bin"):
            continue
        link = dst / f.name
        if not link.exists():
            link.symlink_to(f)
    return dst


def ensure_predictors(directory: Path, tokens: int, log) -> dict:
    """Sketch and rank-64 low-rank predictors calibrated on Shakespeare, trained once."""
    import flashinfer_py as fi
    from flashinfer_py.corpora import calibration_text
    from flashinfer_py.predictor import Predictors
    from flashinfer_py.train import TrainConfig, format_report, ids_digest, train_predictors

    model = fi.load(directory)
    cfg = TrainConfig(max_tokens=tokens, methods=("sketch", "lowrank"))
    ids = model.tokenizer.encode(calibration_text()[: tokens * 12])
    try:  # reused only if made by this configuration from these very ids
        p = Predictors.load(directory, model.manifest)
        if p.meta.get("config") == json.loads(json.dumps(vars(cfg))) and len(p.kinds) == 2 \
                and p.meta.get("calibration_ids_sha256") == ids_digest(ids) \
                and p.calibration.up_mean is not None:  # older files lack the gate sketch's means
            return p.meta
    except fi.FlashFormatError:
        pass
    log(f"  training on {tokens} Shakespeare tokens (sketch + low-rank) ...")
    p = train_predictors(model, ids, cfg, progress=False)
    log("  " + format_report(p).splitlines()[0])
    return p.meta


def eval_windows(directory: Path, n: int, length: int) -> list:
    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.evaluate import bos_id, windows_of

    model = fi.load(directory)
    # A tokenizer that starts every text with BOS (Gemma's) gets it at the start of every
    # window too: without it Gemma-3-270M's perplexity is ~145 instead of ~19.
    bos = bos_id(model)
    body = length - (bos is not None)
    ids = model.tokenizer.encode(wikipedia_excerpt()[-EVAL_CHARS:])[-n * body:]
    if len(ids) < n * body:
        raise SystemExit(f"the evaluation text has {len(ids)} tokens; lower --windows")
    return windows_of(ids, length, bos=bos)


def budget_for(directory: Path, cfg, fraction: float, basis: str = "dram") -> tuple[int, dict]:
    """The DRAM budget at which the FFN's share (cache + sketch + predictors) is `fraction`
    of the FFN's bytes (basis "dram"), or at which the neuron cache alone holds `fraction` of
    the FFN's neurons (basis "cache": what chooses neurons comes on top); and the plan's parts."""
    from flashinfer_py.config import ModelArgs
    from flashinfer_py.format import read_manifest
    from flashinfer_py.loader import prepare_sparse

    m = read_manifest(directory)
    args = ModelArgs.from_dict(m["model"])
    rt, _, plan = prepare_sparse(directory, m, args, cfg)
    outside = plan.total - plan.cache_bytes - plan.sketch_bytes - plan.predictors
    budget = int(outside + fraction * plan.ffn_dram_bytes)
    if basis == "cache":
        n_all = args.num_hidden_layers * args.intermediate_size
        cached = int(fraction * n_all)
        sketch = ((n_all - cached) * (plan.sketch_record_bytes + 12) + plan.sketch_fixed
                  if plan.sketch_record_bytes else 0)
        budget = outside + cached * plan.row_bytes + sketch + plan.predictors
    return budget, {
        "ffn_bytes": plan.ffn_dram_bytes,
        "ffn_flash_bytes": args.num_hidden_layers * args.intermediate_size * plan.record_bytes}


def run_setting(directory: Path, method: str, fraction: float, read_limit: float, windows,
                log, basis: str = "dram") -> dict:
    import flashinfer_py as fi
    from flashinfer_py.sampling import log_softmax

    # stream_resident "needed": every method gets the same FFN DRAM (the basis of the
    # comparison), not a share the default would take from the resident matrices
    cfg = fi.RuntimeConfig(sparse=True, prefill_chunk=1, use_direct_io=False,
                           read_limit=read_limit, max_context=max(len(w) for w in windows),
                           stream_resident="needed", **METHODS[method])
    if fraction >= 1.0:  # everything cached: the dense model through the sparse path
        budget, info = None, budget_for(directory, cfg, 1.0)[1]
    else:
        budget, info = budget_for(directory, cfg, fraction, basis)
    t0 = time.perf_counter()
    try:
        model = fi.load(directory, cfg.replace(dram_budget=budget))
    except ValueError as e:  # a budget below the method's own minimum
        log(f"  {method} {fraction:.0%}: cannot run ({e})")
        return {"method": method, "fraction": fraction, "read_limit": read_limit,
                "basis": basis, "error": str(e)}
    plan, ffn = model.plan, info["ffn_bytes"]
    nll = n = 0
    keys = ("bytes_read", "predict_ns", "io_ns", "mm_ns", "total_ns", "loaded")
    acc = dict.fromkeys(keys, 0)
    tokens = 0
    for w in windows:
        cache = model.new_cache()
        model.reset()
        for t in range(len(w)):
            logits = model.forward([w[t]], cache)[0]
            st = model.last_stats
            for k in keys:
                acc[k] += st[k]
            tokens += 1
            if t + 1 < len(w):
                nll -= float(log_softmax(logits)[w[t + 1]])
                n += 1
    wall = time.perf_counter() - t0
    L, f = model.args.num_hidden_layers, model.args.intermediate_size
    row = {
        "method": method, "fraction": fraction, "read_limit": read_limit, "basis": basis,
        "selection": model.runtime.selection, "eviction": model.runtime.eviction,
        "ppl": math.exp(nll / n), "tokens": n,
        "read_frac": acc["bytes_read"] / tokens / info["ffn_flash_bytes"],
        "read_mib": acc["bytes_read"] / tokens / 2**20,
        "cache_frac": sum(plan.cache_capacity) / (L * f),
        "sketch_frac": plan.sketch_bytes / ffn, "predictor_frac": plan.predictors / ffn,
        "ffn_dram_frac": (plan.cache_bytes + plan.sketch_bytes + plan.predictors) / ffn,
        "predict_ms": acc["predict_ns"] / tokens / 1e6, "token_ms": acc["total_ns"] / tokens / 1e6,
        "first_fill_mib": model.ffn.load_stats.bytes_read / 2**20,
        "caps": plan.cache_capacity, "budget": budget, "seconds": round(wall, 1),
    }
    log(f"  {method:15s} {fraction:4.0%} {basis} read_limit {read_limit:.2f}: ppl {row['ppl']:8.3f}  "
        f"read {row['read_frac']:6.2%}/token  cache {row['cache_frac']:.1%} + sketch "
        f"{row['sketch_frac']:.1%} + predictors {row['predictor_frac']:.1%}  predict "
        f"{row['predict_ms']:.2f} of {row['token_ms']:.1f} ms  ({wall:.0f} s)")
    return row


LOG_ROW = re.compile(
    r"^  (?P<method>\S+)\s+(?P<frac>\d+)% (?P<basis>\w+) read_limit (?P<rl>[\d.]+): ppl\s+"
    r"(?P<ppl>[\d.]+)\s+read\s+(?P<read>[\d.]+)%/token\s+cache (?P<cache>[\d.]+)% \+ sketch "
    r"(?P<sketch>[\d.]+)% \+ predictors (?P<pred>[\d.]+)%\s+predict (?P<pms>[\d.]+) of "
    r"(?P<tms>[\d.]+) ms\s+\((?P<sec>\d+) s\)")
LOG_ERROR = re.compile(r"^  (?P<method>\S+) (?P<frac>\d+)%: cannot run \((?P<error>.*)\)$")


def rows_from_log(path: Path, directory: Path, tokens: int) -> tuple[float, list]:
    """A stopped run's rows, from what it printed (the figures run_setting logs, rounded as
    printed; the caps and budget are not in the log): (dense perplexity, rows)."""
    from flashinfer_py.format import read_manifest

    m = read_manifest(directory)
    b = m["bundle"]
    flash_mib = b["n_layers"] * b["d_ff"] * b["record_bytes"] / 2**20
    dense, rows = None, []
    for line in path.read_text().splitlines():
        if line.startswith("  dense perplexity"):
            dense = float(line.split()[-1])
        elif (g := LOG_ROW.match(line)):
            c, sk, pr = (float(g[k]) / 100 for k in ("cache", "sketch", "pred"))
            rows.append({"method": g["method"], "fraction": int(g["frac"]) / 100,
                         "read_limit": float(g["rl"]), "basis": g["basis"],
                         **{k: v for k, v in METHODS[g["method"]].items()
                            if k in ("selection", "eviction")},
                         "ppl": float(g["ppl"]), "tokens": tokens,
                         "read_frac": float(g["read"]) / 100,
                         "read_mib": float(g["read"]) / 100 * flash_mib, "cache_frac": c,
                         "sketch_frac": sk, "predictor_frac": pr, "ffn_dram_frac": c + sk + pr,
                         "predict_ms": float(g["pms"]), "token_ms": float(g["tms"]),
                         "seconds": float(g["sec"]), "from_log": True})
        elif (g := LOG_ERROR.match(line)):
            rows.append({"method": g["method"], "fraction": int(g["frac"]) / 100,
                         "read_limit": None, "basis": "dram", "error": g["error"],
                         "from_log": True})
    return dense, rows


def dense_ppl(directory: Path, windows) -> float:
    import flashinfer_py as fi
    from flashinfer_py.evaluate import perplexity

    model = fi.load(directory)
    ids = [t for w in windows for t in w]
    return perplexity(model.logits, ids, len(windows[0])).perplexity


# --------------------------------------------------------------------------- report
def table(rows: list, dense: dict) -> str:
    """One table: model x method x total FFN DRAM at the default read limit."""
    out = ["| model | method | FFN DRAM (cache + chooser) | cache | chooser | perplexity | vs dense "
           "| read / token | predictor time / token |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {LABELS[r['method']]} | {r['fraction']:.0%} | - | - | "
                       f"cannot run: {r['error'].split(':')[0]} | | | |")
            continue
        base = dense[r["model"]]
        chooser = r["sketch_frac"] + r["predictor_frac"]
        out.append(
            f"| {r['model']} | {LABELS[r['method']]} | {r['ffn_dram_frac']:.0%} | "
            f"{r['cache_frac']:.1%} | {chooser:.1%} | {r['ppl']:.2f} | "
            f"{100 * (r['ppl'] / base - 1):+.1f}% | {r['read_frac']:.1%} "
            f"({r['read_mib']:.2f} MiB) | {r['predict_ms']:.1f} ms of {r['token_ms']:.0f} ms "
            f"({100 * r['predict_ms'] / r['token_ms']:.0f}%) |")
    return "\n".join(out)


def readme_table(results: dict) -> str:
    """The README's compact table: perplexity vs dense per method and FFN DRAM share, at the
    default read limit (each cell: the change, and the FFN read per token)."""
    fracs = [0.7, 0.5, 0.3, 0.2]
    models = list(results["rows"])
    head = ["| method | " + " | ".join(f"{m} {f:.0%}" for m in models for f in fracs) + " |",
            "|---|" + "---|" * (len(models) * len(fracs))]
    for method in METHODS:
        cells = []
        for m in models:
            base = results["dense"][m]
            for f in fracs:
                r = next((r for r in results["rows"][m] if r["method"] == method
                          and r["fraction"] == f and r["read_limit"] == results["read_limit"]
                          and r.get("basis", "dram") == "dram"), None)
                x = None if r is None or "error" in r else r["ppl"] / base
                cells.append("" if r is None else "does not fit" if x is None else
                             f"{100 * (x - 1):+.0f}%" if x < 2 else
                             f"x{x:.1f}" if x < 10 else f"x{x:,.0f}")
        head.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(head)


def plot(results: dict, out_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, rows in results["rows"].items():
        base = results["dense"][model]
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        main = [r for r in rows if "error" not in r and r["read_limit"] == results["read_limit"]
                and r.get("basis", "dram") == "dram"]
        for method in METHODS:
            pts = sorted((r["fraction"], r["ppl"]) for r in main if r["method"] == method)
            if pts:
                ax[0].plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-",
                           label=LABELS[method])
        ax[0].axhline(base, color="k", lw=0.8, ls=":", label=f"dense ({base:.2f})")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("FFN share of DRAM: cache + what chooses neurons (% of the FFN)")
        ax[0].set_ylabel("perplexity (Wikipedia, token by token)")
        ax[0].set_title(f"{model}: equal total DRAM, read limit {results['read_limit']:.0%}")
        ax[0].legend(fontsize=7)
        front = [r for r in rows if "error" not in r and r["method"] in ("exact", "sketch")
                 and r.get("basis", "dram") == "dram"]
        for frac in sorted({r["fraction"] for r in front if r["fraction"] < 1}, reverse=True):
            for method, style in (("exact", "-"), ("sketch", "--")):
                pts = sorted((r["read_frac"], r["ppl"]) for r in front
                             if r["method"] == method and r["fraction"] == frac)
                if len(pts) > 1:
                    ax[1].plot([100 * p[0] for p in pts], [p[1] for p in pts], "o" + style,
                               label=f"{LABELS[method].split(' (')[0]}, {frac:.0%} DRAM")
        ax[1].axhline(base, color="k", lw=0.8, ls=":")
        ax[1].set_yscale("log")
        ax[1].set_xlabel("FFN read from flash per token (% of the FFN)")
        ax[1].set_ylabel("perplexity")
        ax[1].set_title(f"{model}: the frontier (solid: exact ranking, dashed: sketch)")
        ax[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"sparse_quality_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(results: dict, cmd: str) -> None:
    path = HERE / "RESULTS_sparse.md"
    keep = ""  # the simulation's section and the hand-written findings survive a re-run
    text = path.read_text() if path.is_file() else ""
    marks = [text.index(m) for m in ("\n## Design exploration", "\n## Findings") if m in text]
    if marks:
        keep = text[min(marks):]
    main = [{**r, "model": model} for model, rows in results["rows"].items() for r in rows
            if r["read_limit"] == results["read_limit"] and r.get("basis", "dram") == "dram"]
    rk = ["| model | cache (of the FFN's neurons) | exact ranking (ceiling) | sketch (its 4-bit "
          "copies on top of the cache) | sketch vs ceiling | read / token (exact, sketch) |",
          "|---|---|---|---|---|---|"]
    for model, rows in results["rows"].items():
        ok = [r for r in rows if "error" not in r and r["read_limit"] == results["read_limit"]]
        for r in (r for r in ok if r.get("basis") == "cache"):
            ex = [e for e in ok if e["method"] == "exact" and e["fraction"] == r["fraction"]
                  and e.get("basis", "dram") == "dram"]
            if ex:
                e = ex[0]
                rk.append(f"| {model} | {r['fraction']:.0%} | {e['ppl']:.2f} | {r['ppl']:.2f} | "
                          f"{100 * (r['ppl'] / e['ppl'] - 1):+.1f}% | {e['read_frac']:.1%}, "
                          f"{r['read_frac']:.1%} |")
    fr = ["| model | method | FFN DRAM | read limit | read / token | perplexity | vs dense |",
          "|---|---|---|---|---|---|---|"]
    for model, rows in results["rows"].items():
        pts = sorted((r for r in rows if "error" not in r and r["method"] in ("exact", "sketch")
                      and r["fraction"] < 1 and r.get("basis", "dram") == "dram"),
                     key=lambda r: (r["method"], -r["fraction"], r["read_limit"]))
        for r in pts:
            base = results["dense"][model]
            fr.append(f"| {model} | {r['method']} | {r['fraction']:.0%} | {r['read_limit']:.2f} | "
                      f"{r['read_frac']:.1%} | {r['ppl']:.2f} | "
                      f"{100 * (r['ppl'] / base - 1):+.1f}% |")
    dense = ", ".join(f"{m} {p:.3f}" for m, p in results["dense"].items())
    head = [
        "# Sparse inference quality under a DRAM budget", "",
        f"- date: {results['date']}; git commit: {results['commit']}",
        f"- machine: {results['machine']}; load average {results['load'][0]:.1f} at the start, "
        f"{results['load'][1]:.1f} at the end",
        f"- command: `{cmd}` ({results['seconds'] / 60:.0f} min)",
        *[f"- {m}: measured {r['date']} at commit {r['commit']} by `{r['command']}`"
          for m, r in results.get("runs", {}).items() if r.get("command") != cmd],
        f"- text: calibration on {results['calibration_tokens']} tokens of Shakespeare's plays; "
        f"evaluation on {results['windows']} windows x {results['window_tokens']} tokens from "
        f"the tail of the Wikipedia excerpt, decoded token by token with the real runtime "
        f"(prefill_chunk=1); dense perplexity on the same tokens: {dense}",
        "- FFN DRAM: the neuron cache plus what chooses neurons (the sketch of the uncached "
        "neurons, or the low-rank predictors), as a fraction of the FFN's weights (L x d_ff x "
        "the bytes of one neuron's parts, as the packed cache holds them); every method at the "
        "same fraction has the same DRAM. The oracle's resident copy of the FFN is an "
        "instrument and is not counted.",
        "- read / token: bytes read from flash per token after the cache's first fill, as a "
        "fraction of the FFN (and MiB). Predictor time: scoring and choosing per token, beside "
        "the whole token's time (warm page cache).", "",
        f"## Equal total DRAM (read limit {results['read_limit']:.0%} of each layer per token "
        "for the ranked methods)", "",
        "Figures: " + ", ".join(f"[{m}](figures/sparse_quality_{m}.png)" for m in results["rows"]),
        "", table(main, results["dense"]), "",
        "## Ranking quality: the sketch against exact ranking at the same cache", "",
        "The same neuron cache and read limit; the exact ranking's oracle is free, the sketch's "
        "4-bit copies of the uncached neurons come on top of the cache here.", "",
        "\n".join(rk), "",
        "## The frontier: perplexity against bytes read per token", "",
        "Exact ranking (the ceiling) and the sketch under the same cache and read limits.", "",
        "\n".join(fr), ""]
    path.write_text("\n".join(head) + keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"],
                    choices=["smollm2", "gemma3"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.7, 0.5, 0.3, 0.2],
                    help="FFN share of DRAM (cache + chooser), fractions of the FFN")
    ap.add_argument("--read-limit", type=float, default=0.1,
                    help="read limit of the main table (the runtime's default)")
    ap.add_argument("--frontier", nargs="*", type=float, default=[0.02, 0.05, 0.2],
                    help="other read limits for the exact and sketch frontier")
    ap.add_argument("--frontier-fractions", nargs="*", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--same-cache", nargs="*", type=float, default=[0.7, 0.5, 0.3],
                    help="also run the sketch with its cache (not cache + sketch) at these "
                         "fractions: its ranking against the exact ranking at the same cache")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-tokens", type=int, default=256)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="", help="run the models converted from their GGUFs to "
                    "this storage format (e.g. q4_1; results in results/sparse_quality_DTYPE"
                    ".json, not the main table's file)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS_sparse.md")
    ap.add_argument("--plot", action="store_true", help="write benchmarks/figures/*.png")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the figures and tables from benchmarks/results/")
    ap.add_argument("--readme", action="store_true",
                    help="with --replot: print the README's compact table")
    ap.add_argument("--from-log", type=Path, metavar="LOG",
                    help="with --replot and one --models: take that model's rows from the "
                         "stderr of a stopped run (what it printed) into the results")
    ns = ap.parse_args(argv)
    cmd = "python benchmarks/sparse_quality.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if ns.replot:
        results = json.loads(RESULTS_JSON.read_text())
        if ns.from_log:
            name = ns.models[0]
            dense, rows = rows_from_log(ns.from_log, model_dir(name),
                                        results["windows"] * (results["window_tokens"] - 1))
            for r in rows:  # an error line does not print its read limit: the main one's
                if r.get("read_limit") is None:
                    r["read_limit"] = results["read_limit"]
            results["dense"][name], results["rows"][name] = dense, rows
            results.setdefault("runs", {})[name] = {
                "date": datetime.date.today().isoformat(), "commit": results["commit"],
                "command": f"rows read from the log of a stopped run ({ns.from_log.name})"}
            RESULTS_JSON.write_text(json.dumps(results, indent=1))
        if ns.readme:
            print(readme_table(results))
        if ns.write:
            write_results(results, results["command"])
        for p in plot(results, HERE / "figures"):
            log(f"wrote {p}")
        return 0
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    out_json = (RESULTS_JSON if not ns.dtype
                else RESULTS_JSON.with_name(f"sparse_quality_{ns.dtype}.json"))
    commit = git_commit("flashinfer_py", "csrc", "benchmarks/sparse_quality.py")
    results = {"date": datetime.date.today().isoformat(), "commit": commit,
               "machine": machine(), "read_limit": ns.read_limit, "windows": ns.windows,
               "window_tokens": ns.window_tokens, "calibration_tokens": ns.calibration_tokens,
               "dense": {}, "rows": {}, "command": cmd.strip()}
    if out_json.exists():  # keep the models not run now, if measured the same way
        old = json.loads(out_json.read_text())
        same = all(old.get(k) == results[k] for k in
                   ("read_limit", "windows", "window_tokens", "calibration_tokens"))
        for name in old.get("rows", {}):
            if same and name not in ns.models:
                results["rows"][name] = old["rows"][name]
                results["dense"][name] = old["dense"][name]
                results.setdefault("runs", {})[name] = old.get("runs", {}).get(
                    name, {k: old.get(k) for k in ("date", "commit", "command")})
    for name in ns.models:
        log(f"{name}:")
        d = model_dir(name, ns.dtype)
        ensure_predictors(d, ns.calibration_tokens, log)
        windows = eval_windows(d, ns.windows, ns.window_tokens)
        results["dense"][name] = dense_ppl(d, windows)
        log(f"  dense perplexity {results['dense'][name]:.3f}")
        rows = []
        for frac in ns.fractions:
            for method in ns.methods:
                if frac >= 1.0 and method != "sketch":
                    continue  # everything cached: every method is the dense model
                rows.append(run_setting(d, method, frac, ns.read_limit, windows, log))
        for frac in ns.same_cache:  # ranking quality: the sketch at the exact rows' caches
            if "sketch" in ns.methods:
                rows.append(run_setting(d, "sketch", frac, ns.read_limit, windows, log, "cache"))
        for frac in ns.frontier_fractions:
            for rl in ns.frontier:
                for method in ("exact", "sketch"):
                    if method in ns.methods:
                        rows.append(run_setting(d, method, frac, rl, windows, log))
        results["rows"][name] = rows
        results.setdefault("runs", {})[name] = {"date": results["date"], "commit": commit,
                                                "command": cmd.strip()}
        results["seconds"] = time.perf_counter() - t0
        results["load"] = [load0, os.getloadavg()[0]]
        out_json.parent.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))  # each model as it finishes
    main_rows = [{**r, "model": m} for m, rows in results["rows"].items() for r in rows
                 if r["read_limit"] == ns.read_limit and r.get("basis", "dram") == "dram"]
    print(table(main_rows, results["dense"]))
    if ns.write:
        write_results(results, cmd.strip())
    if ns.plot:
        for p in plot(results, HERE / "figures"):
            log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

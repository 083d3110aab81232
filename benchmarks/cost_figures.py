"""Where a token's time goes, and how it grows with the work: figures for benchmarks/RESULTS.md.

    python benchmarks/cost_figures.py breakdown   # latency_breakdown.png from smollm2_table.json
    python benchmarks/cost_figures.py sweep       # measure, then cost_vs_budget.png, cost_vs_context.png

``breakdown``: stacked per-token bars (I/O, memory management, predictor, compute) for each
Table 2 configuration: SmolLM2 from ``benchmarks/results/smollm2_table.json`` (written by
``smollm2_table.py --json``) and the OPT-6.7B-shaped Table 3 of RESULTS.md section 6 (numbers
copied below: the 40-token re-run of 2026-11-26 02:26 by ``paper_table.py``).

``sweep``: SmolLM2-135M with its trained predictors (smollm2_table.py's linked copy of the default
directory), everything on (``ablation="bundling"``,
threads=1), decoding Wikipedia text from the excerpt's tail token by token after a cold page
cache (posix_fadvise DONTNEED) and a 16-token prompt:
- against the DRAM budget: ``dram_budget`` = the fixed parts (resident tensors, predictors, KV
  cache for 512 tokens, runtime overhead) + a neuron cache of 5..100% of the FFN; x axis = the
  model's weights in DRAM (resident + cache capacity) as % of the model's bytes. Below the
  predicted set's size the predictor keeps only the cache's capacity of its top neurons
  (quality falls; RESULTS_sparse.md), and the window drops its oldest tokens.
- against context length: 64..1024 prompt tokens (prefilled in 16-token chunks), then decode.
Both measure ``--tokens`` decoded tokens and average those after the first 4 (window full),
once per ``--overlap`` mode (default ``off,layer``: reads in sequence with compute, and each
layer's reads on a worker while its FFN computes on the rows already cached; issue 16), the
modes of a point run one after the other in shuffled order, each with the same budget.

The two physical floors drawn in:
- disk: bytes read per token / the disk's best random-read throughput at the measured mean
  read size (best over engines and queue depths in RESULTS.md section 1, log-interpolated);
- memory: bytes a token must touch in DRAM (resident tensors incl. the tied LM head, the cached
  FFN rows it computes with, its KV cache) / the DRAM read rate measured when the sweep starts
  (``kernels.stream_sum`` on the sweep's one thread; sweeps before 2026-12-01 used 12.8 GB/s,
  the sparse FFN kernel's rate then, RESULTS.md section 5).
Their sum is the floor of a token whose reads and compute run one after the other; their
maximum, the floor with the reads overlapping compute (issue 16).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIG = HERE / "figures"
TABLE_JSON = HERE / "results" / "smollm2_table.json"
SWEEP_JSON = HERE / "results" / "cost_sweep.json"

# RESULTS.md section 6, Table 3 of the 40-token re-run (2026-11-26 02:26, commit 6cf596c;
# OPT-6.7B shape, per token, ms): I/O, mgmt, predictor, compute
OPT_T3 = {"naive": (5575, 3.4, 0, 701), "hybrid": (3725, 3.4, 0, 701),
          "predictor": (1296, 1.9, 27, 325), "window": (300, 42.0, 26, 322),
          "bundling": (255, 41.9, 26, 326)}
ROWS = ("naive", "hybrid", "predictor", "window", "bundling")
# RESULTS.md section 14, the quiet re-run (2026-11-30 00:12, commit 74796d0; OPT-6.7B shape,
# per token, ms): reads busy, waited for reads, memory management, compute (FFN + attention).
# "ahead" is given the trace's own sets as its guess: a bound, not a predictor's result.
OPT_OVERLAP = {"everything on": (356, 356, 5.8, 203), "+ overlap\n\"layer\"": (263, 233, 7.4, 258),
               "+ \"ahead\",\nperfect guess\n(bound)": (257, 26, 6.1, 252)}
# RESULTS.md section 1 (2026-11-26 00:37): best GB/s over queue depths 1..64 and both engines.
DISK_BEST = {4 << 10: 0.305, 8 << 10: 0.543, 16 << 10: 0.892, 32 << 10: 1.336,
             64 << 10: 1.681, 128 << 10: 1.901, 256 << 10: 2.048, 512 << 10: 2.184,
             1 << 20: 2.265}
MEM_GBPS = 12.8
PROMPT = 16


def disk_gbps(read_size: float) -> float:
    s = np.array(sorted(DISK_BEST), float)
    v = np.array([DISK_BEST[int(k)] for k in s])
    return float(np.interp(np.log2(max(read_size, s[0])), np.log2(s), v))


# ---------------------------------------------------------------- breakdown
def breakdown(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(TABLE_JSON.read_text())
    sm = {r: (x["io_ms"], x["mm_ms"], x["predict_ms"], x["compute_ms"])
          for r, x in data["rows"].items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [5, 5, 3]})
    names = ("I/O (flash reads)", "memory management", "predictor", "compute")
    colors = ("C3", "C1", "C2", "C0")
    for ax, vals, title in ((axes[0], sm, f"SmolLM2-135M, trained predictors "
                             f"({data['meta']['date']}, load {data['meta']['load'][0]:.1f}-"
                             f"{data['meta']['load'][1]:.1f})"),
                            (axes[1], OPT_T3, "OPT-6.7B shape, trace (RESULTS.md section 6)")):
        rows = [r for r in ROWS if r in vals]
        bottom = np.zeros(len(rows))
        for i, (n, c) in enumerate(zip(names, colors)):
            h = np.array([vals[r][i] for r in rows])
            ax.bar(rows, h, bottom=bottom, color=c, label=n)
            bottom += h
        for j, tot in enumerate(bottom):
            ax.text(j, tot, f"{tot:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("ms per token")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    # reads overlapping compute: the bars are the token's wall time (the I/O part is what the
    # token waited for); the reads' own busy time is the black tick, which sits above the
    # waited part where the reads ran during compute
    ax = axes[2]
    rows = list(OPT_OVERLAP)
    bottom = np.zeros(len(rows))
    for i, (n, c) in enumerate(zip(("waited for reads", "memory management", "compute"),
                                   ("C3", "C1", "C0"))):
        h = np.array([OPT_OVERLAP[r][i + 1] for r in rows])
        ax.bar(rows, h, bottom=bottom, color=c, label=n)
        bottom += h
    for j, r in enumerate(rows):
        ax.text(j, bottom[j], f"{bottom[j]:.0f}", ha="center", va="bottom", fontsize=8)
        ax.hlines(OPT_OVERLAP[r][0], j - 0.4, j + 0.4, color="k", lw=2,
                  label="reads busy" if j == 0 else None)
    ax.set_ylabel("ms per token")
    ax.set_title("OPT-6.7B shape, reads overlapping compute\n(RESULTS.md section 14, "
                 "quiet re-run)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 1.45 * bottom.max())
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.suptitle("Per-token latency by configuration (Table 2 rows; this 2-core VM)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


# ---------------------------------------------------------------- sweeps
def read_gbps(threads: int = 1) -> float:
    """This machine's DRAM read rate now, as a kernel on `threads` threads sees it: the best of
    five sums over 1 GiB (kernels.stream_sum: loads and adds only; bench_kernels' reference)."""
    from flashinfer_py import kernels as K

    buf = np.ones((1 << 30) // 4, np.float32)
    K.stream_sum(buf, threads=threads)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        K.stream_sum(buf, threads=threads)
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _decode(directory, rt, ids, n_prompt, skip=4, mem_gbps=MEM_GBPS):
    from flashinfer_py.runtime import load

    sys.path.insert(0, str(HERE))
    from smollm2_table import drop_cache

    model = load(directory, rt)
    plan = model.plan
    drop_cache(directory)
    cache = model.new_cache()
    model.reset()
    model.forward(ids[:n_prompt], cache, last_only=True)
    toks = []
    for pos, t in enumerate(ids[n_prompt:]):
        model.forward([t], cache, last_only=True)
        s = dict(model.last_stats)
        s["ctx"] = n_prompt + pos + 1
        toks.append(s)
    a = model.args
    del model, cache
    gc.collect()
    m = toks[skip:]
    mean = lambda k: float(np.mean([p[k] for p in m]))  # noqa: E731
    row_bytes = len(a.ffn_parts) * a.hidden_size * 2
    kv = mean("ctx") * 2 * a.num_hidden_layers * a.kv_dim * 4
    touched = plan.resident + mean("cached") * row_bytes + kv
    size = mean("bytes_read") / mean("reads") if mean("reads") else 4096
    return {"io_ms": mean("io_ns") / 1e6, "io_wait_ms": mean("io_wait_ns") / 1e6,
            "mm_ms": mean("mm_ns") / 1e6,
            "predict_ms": mean("predict_ns") / 1e6, "compute_ms": mean("compute_ns") / 1e6,
            "total_ms": mean("total_ns") / 1e6,
            "total_sd": float(np.std([p["total_ns"] / 1e6 for p in m], ddof=1)),
            "bytes": mean("bytes_read"), "read_size": size, "cached": mean("cached"),
            "needed": mean("needed"), "touched": touched,
            "disk_floor_ms": mean("bytes_read") / disk_gbps(size) / 1e6,
            "mem_floor_ms": touched / mem_gbps / 1e6, "mem_gbps": mem_gbps,
            "cache_bytes": plan.cache_bytes, "resident": plan.resident,
            "model_bytes": plan.resident + plan.d_ff * plan.record_bytes * a.num_hidden_layers,
            "ffn_bytes": plan.d_ff * plan.record_bytes * a.num_hidden_layers,
            "load": os.getloadavg()[0]}


def sweep(a) -> dict:
    from flashinfer_py.config import RuntimeConfig
    from flashinfer_py.loader import plan_memory
    from flashinfer_py.runtime import load

    sys.path.insert(0, str(HERE))
    from smollm2_table import ensure_lowrank, eval_tokens, table_dir

    # smollm2_table's linked copy of the default directory, with its low-rank predictors
    # (trained there once; the default directory's own predictors are left alone)
    directory = table_dir()
    ensure_lowrank(directory)
    probe = load(directory)
    ctxs = [int(c) for c in a.contexts.split(",")]
    ids = eval_tokens(probe, max(ctxs) + a.tokens + PROMPT)
    args, manifest = probe.args, probe.manifest
    del probe
    base = RuntimeConfig(ablation="bundling", max_context=512, threads=a.threads)
    from flashinfer_py.predictor import Predictors

    pred_bytes = Predictors.load(directory, manifest).nbytes
    p0 = plan_memory(args, manifest, base, pred_bytes)
    fixed = p0.resident + p0.predictors + p0.kv_cache + p0.overhead
    ffn = p0.d_ff * p0.record_bytes * args.num_hidden_layers
    fracs = [float(f) for f in a.fractions.split(",")]
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "load0": os.getloadavg()[0],
           "threads": a.threads,
           "budget": [], "context": []}
    t0 = time.time()
    modes = a.overlap.split(",")
    out["overlap_modes"] = modes
    # the memory floor's rate: measured now, on the sweep's one thread (12.8 GB/s, the
    # constant, was section 5's kernel rate of 2026-11-26, before the kernels read ahead)
    out["mem_gbps"] = mem = read_gbps(base.threads)
    print(f"DRAM read rate, {base.threads} thread: {mem:.1f} GB/s", flush=True)
    # interleave: budget points and context points alternate, in shuffled order, and the
    # overlap modes of a point in shuffled order; --rounds passes over all of it, each point's
    # figures the median over its rounds
    jobs = [("budget", f) for f in fracs] + [("context", c) for c in ctxs]
    rng = np.random.default_rng(a.seed)
    got: dict = {}
    for rnd in range(a.rounds):
        for i in rng.permutation(len(jobs)):
            kind, v = jobs[i]
            for m in rng.permutation(modes):
                if kind == "budget":
                    rt = base.replace(dram_budget=int(fixed + v * ffn) + 1, overlap=str(m))
                    r = _decode(directory, rt, ids[:PROMPT + a.tokens], PROMPT, mem_gbps=mem)
                    r["fraction"] = v
                else:
                    rt = base.replace(max_context=v + a.tokens + 1, overlap=str(m))
                    r = _decode(directory, rt, ids[:v + a.tokens], v, mem_gbps=mem)
                    r["context"] = v
                r["overlap"] = str(m)
                got.setdefault((kind, v, str(m)), []).append(r)
                print(f"round {rnd} {kind} {v} overlap {m}: {r['total_ms']:.1f} ms/token (I/O "
                      f"{r['io_ms']:.1f}, waited {r['io_wait_ms']:.1f}), {r['bytes'] / 1e6:.2f} "
                      f"MB/token, floors disk {r['disk_floor_ms']:.1f} mem {r['mem_floor_ms']:.1f} "
                      f"ms, load {r['load']:.2f}", flush=True)
    for (kind, _, _), rs in got.items():
        r = {k: (float(np.median([x[k] for x in rs])) if isinstance(v, float) else v)
             for k, v in rs[0].items()}
        r["rounds_total_ms"] = [x["total_ms"] for x in rs]
        out[kind].append(r)
    order = {m: i for i, m in enumerate(modes)}
    out["budget"].sort(key=lambda r: (order[r["overlap"]], r["fraction"]))
    out["context"].sort(key=lambda r: (order[r["overlap"]], r["context"]))
    out["load1"] = os.getloadavg()[0]
    out["wall_s"] = time.time() - t0
    return out


def plot_sweep(d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = d.get("overlap_modes", ["off"])
    for key, fname in (("budget", "cost_vs_budget.png"), ("context", "cost_vs_context.png")):
        xs = (lambda ps: [100 * (r["resident"] + r["cache_bytes"]) / r["model_bytes"] for r in ps]
              if key == "budget" else [r["context"] for r in ps])
        if key == "budget":
            xl = "weights in DRAM (resident + neuron cache), % of the model's 299 MB"
        else:
            xl = "context length (tokens)"
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5.4))
        for k, m in enumerate(modes):
            ps = [r for r in d[key] if r.get("overlap", "off") == m]
            lab = "" if modes == ["off"] else f", overlap {m}"
            ax.errorbar(xs(ps), [r["total_ms"] for r in ps], yerr=[r["total_sd"] for r in ps],
                        fmt="o-" if k == 0 else "D-", color=("C0", "C4", "C6")[k % 3],
                        label=f"measured total{lab}", capsize=3)
            ax.plot(xs(ps), [r["io_ms"] for r in ps], "s-" if k == 0 else "s--",
                    color=("C1", "C5", "C8")[k % 3], label=f"measured I/O (reads busy){lab}")
        # floors and the other panel from the first mode's points (the same work)
        pts = [r for r in d[key] if r.get("overlap", "off") == modes[0]]
        x = xs(pts)
        df = np.array([r["disk_floor_ms"] for r in pts])
        mf = np.array([r["mem_floor_ms"] for r in pts])
        ax.plot(x, df, "--", color="C3", label="floor: bytes read / disk GB/s")
        mg = d.get("mem_gbps", MEM_GBPS)
        ax.plot(x, mf, "--", color="C2", label=f"floor: bytes touched / {mg:.1f} GB/s DRAM")
        ax.plot(x, df + mf, ":", color="k", label="sum of floors (reads, then compute)")
        ax.plot(x, np.maximum(df, mf), "-.", color="k", lw=1,
                label="max of floors (reads overlapping compute)")
        ax.set_yscale("log")
        ax.set_ylabel("ms per token")
        ax.set_xlabel(xl)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        ax.grid(alpha=0.3, which="both")
        bx.plot(x, [r["bytes"] / 1e6 for r in pts], "o-", color="C1")
        bx.set_ylabel("flash -> DRAM MB per token")
        bx.set_xlabel(xl)
        bx.grid(alpha=0.3)
        if key == "budget":
            b2 = bx.twinx()
            b2.plot(x, [100 * r["needed"] / (r["ffn_bytes"] / 4096) for r in pts], "^:",
                    color="C4")
            b2.set_ylabel("neurons computed per token, % of FFN", color="C4")
        if key == "context":
            ax.set_xscale("log", base=2)
            bx.set_xscale("log", base=2)
        fig.suptitle(f"SmolLM2-135M, everything on, cost vs {key} ({d['date']}, load "
                     f"{d['load0']:.1f} -> {d['load1']:.1f})")
        fig.tight_layout()
        fig.savefig(FIG / fname, dpi=110)
        print(f"wrote {FIG / fname}")


def table(d: dict) -> str:
    out = ["| point | overlap | total ms | I/O ms (waited) | MB read/token | mean read | "
           "disk floor ms | DRAM floor ms | total / max(floors) | neurons computed | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("budget", "context"):
        for r in sorted(d[key], key=lambda r: (r.get("fraction", 0), r.get("context", 0))):
            if key == "budget":
                name = (f"weights {100 * (r['resident'] + r['cache_bytes']) / r['model_bytes']:.0f}% "
                        f"(cache {100 * r['fraction']:.0f}% of FFN)")
            else:
                name = f"context {r['context']}"
            waited = r.get("io_wait_ms", r["io_ms"])
            fl = max(r["disk_floor_ms"], r["mem_floor_ms"])
            out.append(f"| {name} | {r.get('overlap', 'off')} | {r['total_ms']:.1f} ± "
                       f"{r['total_sd']:.1f} | {r['io_ms']:.1f} ({waited:.1f}) | "
                       f"{r['bytes'] / 1e6:.2f} | {r['read_size'] / 1024:.0f} KiB | "
                       f"{r['disk_floor_ms']:.1f} | {r['mem_floor_ms']:.1f} | "
                       f"{r['total_ms'] / fl:.2f} | "
                       f"{100 * r['needed'] / (r['ffn_bytes'] / 4096):.0f}% | {r['load']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("breakdown", "sweep", "replot"))
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per sweep point")
    ap.add_argument("--fractions", default="0.05,0.1,0.2,0.35,0.5,0.75,1.0")
    ap.add_argument("--contexts", default="64,128,256,512,1024")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    ap.add_argument("--json", type=Path, default=SWEEP_JSON,
                    help="where the sweep's results go (replot reads them from there)")
    ap.add_argument("--no-plot", action="store_true", help="the table only, no PNGs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes over every point and mode (each point's figures: the median)")
    ap.add_argument("--overlap", default="off,layer",
                    help="overlap modes to measure at every point, comma-separated (off, layer, "
                         "ahead; default off,layer)")
    a = ap.parse_args()
    FIG.mkdir(parents=True, exist_ok=True)
    if a.what == "breakdown":
        breakdown(FIG / "latency_breakdown.png")
        return
    if a.what == "sweep":
        d = sweep(a)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(d, indent=1))
    else:
        d = json.loads(a.json.read_text())
    print(f"\n{d['date']}, load average {d['load0']:.1f} -> {d['load1']:.1f}, "
          f"{d.get('wall_s', 0):.0f} s\n")
    print(table(d))
    if not a.no_plot:
        plot_sweep(d)


if __name__ == "__main__":
    main()

"""How cost grows with model size: ms and bytes per token for OPT-1.3B/2.7B/6.7B shapes.

    python benchmarks/scaling_model_size.py            # build (once), measure, plot
    python benchmarks/scaling_model_size.py --replot   # figure and table again from the JSON

Reuses ``paper_table.py``'s machinery with its shape switched by ``paper_table.set_shape``:
per shape, a float16 up+down bundle file and a resident file of the shape's attention,
embeddings and norms, under ``<cache>/bench/opt-<size>-shape`` (the 6.7B files are the ones
``paper_table.py`` built), a trace with the paper's statistics (``make_trace``, same process
and parameters for every shape), and ``paper_table.run_row`` (ffn.SparseFFN, O_DIRECT,
QD32, cold page cache per row, threads=1) for the everything-on row (window 5, bundled:
``--warmup`` tokens to fill the window, then ``--tokens`` measured) and, unless
``--naive-tokens 0``, the naive row (1 warm-up + that many measured tokens).

Floors drawn in:
- disk: bytes read per token / the disk's random-read GB/s at the measured mean read size
  (RESULTS.md section 1, log-interpolated: the threads engine's QD32 column for 8-32 KiB, the
  bundled row's 8-16 KiB reads; the best over engines and depths for >= 64 KiB, the naive
  row's ~1.4 MiB reads, clamped at 1 MiB);
- memory: resident bytes (attention, embeddings incl. the tied LM head, norms) / 12.8 GB/s
  (RESULTS.md section 5, the fastest DRAM read rate measured here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import paper_table as pt  # noqa: E402

FIG = HERE / "figures" / "cost_vs_model_size.png"
OUT_JSON = HERE / "results" / "scaling_model_size.json"
SHAPES = {  # name: (layers, d_model, d_ff), OPT configs
    "1.3b": (24, 2048, 8192), "2.7b": (32, 2560, 10240), "6.7b": (32, 4096, 16384)}
# RESULTS.md section 1 (2026-11-26 00:37): GB/s, threads engine at QD32 for the 8-32 KiB reads
# of the bundled row; for the naive row's large reads (>= 64 KiB) the best over engines and
# depths, as cost_figures.py (QD32 alone would put the naive floor above its measured time).
DISK_GBPS = {8 << 10: 0.494, 16 << 10: 0.810, 32 << 10: 1.336, 64 << 10: 1.681,
             128 << 10: 1.901, 256 << 10: 2.048, 512 << 10: 2.184, 1 << 20: 2.265}
MEM_GBPS = 12.8


def disk_gbps(read_size: float) -> float:
    s = np.array(sorted(DISK_GBPS), float)
    v = np.array([DISK_GBPS[int(k)] for k in s])
    return float(np.interp(np.log2(np.clip(read_size, s[0], s[-1])), np.log2(s), v))


def workdir(name: str) -> Path:
    return pt.cache_root() / "bench" / f"opt-{name}-shape"


def measure(a) -> list[dict]:
    out = []
    for name in a.shapes:
        pt.set_shape(*SHAPES[name])
        wd = workdir(name)
        pt.build_files(wd)
        params = pt.RESIDENT_PARAMS + pt.L * 2 * pt.D * pt.F
        pred, _ = pt.make_trace(max(a.warmup + a.tokens, 1 + a.naive_tokens))
        compute = pt.ComputeModel(a.threads)
        rargs = argparse.Namespace(threads=a.threads, queue_depth=32, engine="auto")
        rows = [("bundling", a.warmup, a.tokens)]
        if a.naive_tokens:
            rows.append(("naive", 1, a.naive_tokens))
        for row, warm, toks in rows:
            print(f"{name}: {row}", file=sys.stderr)
            r = pt.run_row(row, wd, pred, compute, warm, toks, rargs)
            r.pop("per_token")
            out.append({"shape": name, "layers": pt.L, "d_model": pt.D, "d_ff": pt.F,
                        "params": params, "ffn_bytes": pt.FFN_BYTES,
                        "resident_bytes_model": pt.RESIDENT_BYTES, **r})
        del compute
    return out


def floors(r: dict) -> tuple[float, float, float]:
    g = disk_gbps(r["mean_read_bytes"])
    return g, r["bytes_per_token"] / g / 1e6, r["resident_bytes_model"] / MEM_GBPS / 1e6


def table(res: list[dict]) -> str:
    out = ["| shape (params) | row | tokens | total ms/token | I/O ms | mgmt ms | compute ms | "
           "GB read/token | mean read | disk GB/s | disk floor ms | memory floor ms | "
           "load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        g, fd, fm = floors(r)
        out.append(
            f"| OPT-{r['shape']} ({r['params'] / 1e9:.2f} B: {r['layers']}x{r['d_model']}, FFN "
            f"{r['d_ff']}) | {r['row']} | {r['warmup_tokens']}+{r['tokens']} | "
            f"{r['total_ms']:.0f} ± {r['total_ms_sd']:.0f} | {r['io_ms']:.0f} | "
            f"{r['mm_ms'] + r['lookup_ms']:.1f} | {r['compute_ms']:.0f} | "
            f"{r['bytes_per_token'] / 1e9:.3f} | {r['mean_read_bytes'] / 1024:.1f} KiB | "
            f"{g:.3f} | {fd:.0f} | {fm:.0f} | {r['load_avg'][0]:.1f} |")
    return "\n".join(out)


def plot(res: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.6))
    for row, style in (("bundling", "o-"), ("naive", "s--")):
        rs = sorted((r for r in res if r["row"] == row), key=lambda r: r["params"])
        if not rs:
            continue
        x = [r["params"] / 1e9 for r in rs]
        lab = "everything on (window 5, bundled)" if row == "bundling" else "naive"
        ax1.plot(x, [r["total_ms"] for r in rs], style, color="C0" if row == "bundling" else "C7",
                 label=f"{lab}: total")
        ax1.plot(x, [r["io_ms"] for r in rs], style, color="C3" if row == "bundling" else "C5",
                 label=f"{lab}: I/O", alpha=0.8)
        ax2.plot(x, [r["bytes_per_token"] / 1e9 for r in rs], style,
                 color="C3" if row == "bundling" else "C5", label=f"{lab}: read from flash")
        if row == "naive":
            ax1.plot(x, [floors(r)[1] for r in rs], ":", color="C5", lw=2,
                     label="naive disk floor: bytes read / best GB/s (~1 MiB reads)")
        if row == "bundling":
            ax1.plot(x, [floors(r)[1] for r in rs], ":", color="C3", lw=2,
                     label="disk floor: bytes read / disk GB/s (QD32)")
            ax1.plot(x, [floors(r)[2] for r in rs], ":", color="C2", lw=2,
                     label=f"memory floor: resident / {MEM_GBPS} GB/s")
            ax1.plot(x, [floors(r)[1] + floors(r)[2] for r in rs], "-.", color="k", lw=1,
                     label="disk + memory floors (I/O not overlapped with compute)")
            ax1.plot(x, [max(floors(r)[1], floors(r)[2]) for r in rs], "--", color="k", lw=1,
                     label="max(disk, memory floor): reads overlapping compute (issue 16)")
            ax2.plot(x, [r["resident_bytes_model"] / 1e9 for r in rs], ":", color="C2",
                     label="resident bytes (read from DRAM)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size (billion parameters, OPT shapes)")
        ax.set_xticks([1.3, 2.7, 6.7])
        ax.set_xticklabels(["1.3", "2.7", "6.7"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax1.set_ylabel("ms per token")
    ax2.set_ylabel("GB per token")
    ax1.set_title("latency per token (cold, O_DIRECT, 1 thread)")
    ax2.set_title("bytes per token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--naive-tokens", type=int, default=1, help="0 skips the naive row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=OUT_JSON)
    ap.add_argument("--plot", type=Path, default=FIG)
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--delete-below-gb", type=float, default=30.0,
                    help="afterwards delete the 1.3B/2.7B files if free space is below this")
    a = ap.parse_args()
    if a.replot:
        data = json.loads(a.json.read_text())
    else:
        load0 = os.getloadavg()
        t0 = time.time()
        res = measure(a)
        env = pt.environment(workdir(a.shapes[0]))
        data = {"meta": {**env, "load": [load0[0], os.getloadavg()[0]],
                         "seconds": round(time.time() - t0), "argv": sys.argv[1:]},
                "rows": res}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(data, indent=1))
        free = shutil.disk_usage(pt.cache_root()).free / 1e9
        if free < a.delete_below_gb:
            for name in ("1.3b", "2.7b"):
                shutil.rmtree(workdir(name), ignore_errors=True)
            print(f"free space {free:.0f} GB < {a.delete_below_gb} GB: deleted the 1.3B/2.7B "
                  f"files", file=sys.stderr)
    m = data["meta"]
    print(f"\n{m['date']}, commit {m['git']}, load average {m['load'][0]:.1f} -> "
          f"{m['load'][1]:.1f}, {m['seconds']} s; {m['cpu']}, {m['cores']} cores, "
          f"{m['ram_gib']} GiB, {m['device']}\n")
    print(table(data["rows"]))
    plot(data["rows"], a.plot)
    print(f"\nwrote {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

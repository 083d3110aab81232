"""The full and the gate sketch (RuntimeConfig.sketch) under whole DRAM budgets with today's
defaults: each budget's cache share and perplexity, for a model converted to a storage format.

    python benchmarks/sketch_budget.py --budgets 185,166,150 [--model smollm2] [--dtype q4_1]

The model directory and the evaluation windows are sparse_quality.py's (its GGUF converted
with --dtype; Wikipedia's tail, token by token through the runtime, page cache warm).
Results: benchmarks/RESULTS_sparse.md, "The gate sketch for 4-bit records".
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="185,166,150", help="MiB, comma-separated")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--dtype", default="q4_1")
    ap.add_argument("--windows", type=int, default=2)
    ns = ap.parse_args(argv)
    import flashinfer_py as fi
    from flashinfer_py.sampling import log_softmax
    from sparse_quality import ensure_predictors, eval_windows, model_dir

    d = model_dir(ns.model, ns.dtype)
    ensure_predictors(d, 4096, lambda s: print(s, file=sys.stderr))
    wins = eval_windows(d, ns.windows, 256)
    print("| budget | sketch | cache | sketch MiB | perplexity |\n|---|---|---|---|---|")
    for mib in [int(b) for b in ns.budgets.split(",")]:
        for kind in ("full", "gate"):
            t0 = time.time()
            m = fi.load(d, fi.RuntimeConfig(dram_budget=mib << 20, prefill_chunk=1,
                                            use_direct_io=False, max_context=256, sketch=kind))
            nll = n = 0
            for w in wins:
                cache = m.new_cache()
                m.reset()
                for t in range(len(w)):
                    logits = m.forward([w[t]], cache)[0]
                    if t + 1 < len(w):
                        nll -= float(log_softmax(logits)[w[t + 1]])
                        n += 1
            L, f = m.args.num_hidden_layers, m.args.intermediate_size
            print(f"| {mib} MiB | {kind} | {sum(m.plan.cache_capacity) / (L * f):.1%} | "
                  f"{m.plan.sketch_bytes / 2**20:.1f} | {math.exp(nll / n):.2f} |", flush=True)
            print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

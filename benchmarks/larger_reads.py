"""Fewer, larger reads for SmolLM2's 4 KiB records: a learned neuron order, and coalescing gaps.

    python benchmarks/larger_reads.py [--budget 340MB] [--tokens 400] [--json F]       # offline model
    python benchmarks/larger_reads.py --measure 0,4096,8192 [--rounds 3] [--measure-tokens 40]
    python benchmarks/larger_reads.py --measure 0,8192 --prefill 512 --scratch 1048576,67108864

Under a budget the sparse runtime on SmolLM2 is I/O bound by the number of reads, not bytes:
each token loads ~135 neurons a layer, one 4 KiB record each, and 4 KiB random reads run at
~75k a second on this disk (RESULTS section 1: 0.31 GB/s at QD32, 8 KiB 0.49, 16 KiB 0.81). The
reader merges neighbouring records into one read, but a converted model's neurons sit in the
checkpoint's order, so neighbours are rarely loaded together.

Offline part: records, from the real runtime (default selection and eviction, the given
budget, Wikipedia text token by token), every layer's loaded neuron ids per token, and counts
the reads those loads would take if the records were stored in another order: the identity
(today), orders computed on the first half of the tokens and scored on the second half, and a
random order (a control). A read is a run of loaded records that are adjacent in the file, or
with at most `gap` unloaded records between them (those are read too: `coalesce_gap_bytes`).
The time column prices each read with section 1's disk grid (threads engine, QD32), so it is a
model of the I/O, not a measurement. The runtime's loads do not depend on the order (neurons
are chosen by scores, not ids).

Measured part (``--measure``): the real runtime under the same budget with each
``coalesce_gap_bytes``, cold (O_DIRECT), rounds interleaved in shuffled order, per token: wall
time, the reads' busy time, reads, bytes; and each gap's logits against gap 0's (a gap changes
which bytes are read, never what is computed: they must be identical).

Prefill part (``--measure ... --prefill N``): one N-token prompt as one call on a fresh model
(every neuron it needs is read, many records a call), per gap and per reader scratch bound
(``--scratch``, loader.READER_SCRATCH_BYTES): a bound smaller than a call's merged runs makes
the reader work in rounds, each draining its queue; a large one measures the unbounded cost.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

# RESULTS section 1, threads engine, QD32: GB/s by read size (KiB)
DISK_QD32 = {4: 0.305, 8: 0.494, 16: 0.810, 32: 1.336, 64: 1.681, 128: 1.664, 256: 1.909}


def read_seconds(nbytes: np.ndarray) -> float:
    """Model of the time of reads of these sizes at QD32, interpolating section 1's grid."""
    kib = np.array(sorted(DISK_QD32), float)
    gbs = np.array([DISK_QD32[k] for k in sorted(DISK_QD32)])
    rate = np.interp(np.log2(np.maximum(nbytes / 1024, 4)), np.log2(kib), gbs) * 1e9
    return float((nbytes / rate).sum())


def record_loads(directory, budget: str, n_tokens: int):
    """Per token, per layer: the sorted neuron ids the runtime loaded."""
    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt

    m = fi.load(directory, dram_budget=budget)
    ffn = m.ffn
    L = m.args.num_hidden_layers
    loads: list[list[np.ndarray]] = []
    cur: list = [None] * L

    class Spy:  # the driver is a Cython class: wrap it rather than patch it
        def __init__(self, drv):
            self._drv = drv

        def __getattr__(self, name):
            return getattr(self._drv, name)

        def swap(self, layer, load, evict):
            cur[layer] = np.array(load, np.int64)
            return self._drv.swap(layer, load, evict)

    ffn.driver = Spy(ffn.driver)
    text = wikipedia_excerpt()
    ids = m.tokenizer.encode(text[:40_000])[:n_tokens + 1]
    cache = m.new_cache()
    m.reset()
    for t in ids:
        cur[:] = [np.zeros(0, np.int64)] * L
        m.forward([t], cache, last_only=True)
        loads.append(list(cur))
    info = {"record_bytes": m.manifest["bundle"]["record_bytes"], "layers": L,
            "d_ff": m.args.intermediate_size, "cache_capacity": m.plan.cache_capacity,
            "budget": budget}
    return loads[1:], info  # the first token fills the cache from nothing


def count_reads(loads, pos: np.ndarray, gap: int, rec: int):
    """(reads, records read, seconds by the disk model) for one layer's token loads under the
    order pos[neuron] = slot in the file."""
    n_reads = n_recs = 0
    sizes = []
    for ids in loads:
        if not len(ids):
            continue
        s = np.sort(pos[ids])
        brk = np.flatnonzero(np.diff(s) > gap + 1)
        starts = np.r_[s[0], s[brk + 1]]
        ends = np.r_[s[brk], s[-1]]
        n = ends - starts + 1
        n_reads += len(n)
        n_recs += int(n.sum())
        sizes.append(n * rec)
    t = read_seconds(np.concatenate(sizes).astype(float)) if sizes else 0.0
    return n_reads, n_recs, t


def co_matrix(loads, f: int) -> np.ndarray:
    """[f, f] counts of tokens on which both neurons were loaded."""
    a = np.zeros((len(loads), f), np.float32)
    for i, ids in enumerate(loads):
        a[i, ids] = 1
    return a.T @ a


def order_spectral(c: np.ndarray) -> np.ndarray:
    """Neurons sorted by the Fiedler vector of the co-load graph (normalised Laplacian)."""
    w = c.copy()
    np.fill_diagonal(w, 0)
    deg = w.sum(1) + 1e-6
    dn = 1 / np.sqrt(deg)
    lap = np.eye(len(w)) - dn[:, None] * w * dn[None, :]
    _, vec = np.linalg.eigh(lap)
    return np.argsort(vec[:, 1] * dn)


def order_greedy(c: np.ndarray) -> np.ndarray:
    """A chain: start at the most loaded neuron, repeatedly append the unplaced neuron most
    often loaded together with the last one (ties and strangers: the most loaded)."""
    f = len(c)
    diag = np.diag(c).copy()
    w = c.copy()
    np.fill_diagonal(w, -1)
    placed = np.zeros(f, bool)
    cur = int(np.argmax(diag))
    out = [cur]
    placed[cur] = True
    for _ in range(f - 1):
        row = np.where(placed, -np.inf, w[cur] + 1e-3 * diag / (diag.max() + 1))
        cur = int(np.argmax(row))
        out.append(cur)
        placed[cur] = True
    return np.array(out)


def order_frequency(c: np.ndarray) -> np.ndarray:
    return np.argsort(-np.diag(c), kind="stable")


def measure(directory, budget: str, gaps: list[int], rounds: int, n_tokens: int, warm: int):
    """Per gap: arrays of per-token stats over every round, and the logits of the first round."""
    import random

    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt

    m0 = fi.load(directory)
    ids = m0.tokenizer.encode(wikipedia_excerpt()[:40_000])[:warm + n_tokens]
    del m0
    keys = ("total_ns", "io_ns", "io_wait_ns", "reads", "bytes_read", "loaded")
    acc = {g: {k: [] for k in keys} for g in gaps}
    logits = {}
    order = list(gaps)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for g in order:
            m = fi.load(directory, dram_budget=budget, coalesce_gap_bytes=g)
            cache = m.new_cache()
            m.reset()
            out = []
            for i, t in enumerate(ids):
                out.append(m.forward([t], cache, last_only=True)[0])
                if i >= warm:
                    for k in keys:
                        acc[g][k].append(m.last_stats[k])
            logits.setdefault(g, np.asarray(out))
            del m, cache
    return {g: {k: np.asarray(v, np.float64) for k, v in a.items()} for g, a in acc.items()}, logits


def measure_prefill(directory, budget: str, configs: list, rounds: int, n_prompt: int):
    """Per (gap, scratch bound): the prompt call's stats over the rounds, its logits, and the
    largest scratch a reader held."""
    import random

    import flashinfer_py as fi
    import flashinfer_py.loader as loader
    from flashinfer_py.corpora import wikipedia_excerpt

    m0 = fi.load(directory)
    ids = m0.tokenizer.encode(wikipedia_excerpt()[:40_000])[:n_prompt]
    del m0
    # The bound changes what the reader gets, not the plan: every config caches the same
    # neurons, so the reads and logits compare (the plan counts the runtime's own bound).
    planned = loader.reader_scratch_bytes(0)
    loader.reader_scratch_bytes = lambda rec: max(planned, rec)
    keys = ("total_ns", "io_ns", "reads", "bytes_read")
    acc = {c: {k: [] for k in keys + ("scratch",)} for c in configs}
    logits, order = {}, list(configs)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for gap, scratch in order:
            loader.READER_SCRATCH_BYTES = scratch
            m = fi.load(directory, dram_budget=budget, coalesce_gap_bytes=gap)
            cache = m.new_cache()
            m.reset()
            lg = m.forward(ids, cache, last_only=True)[0]
            for k in keys:
                acc[gap, scratch][k].append(m.last_stats[k])
            for k in ("stream_bytes", "stream_wait_ns"):  # resident matrices read from flash
                acc[gap, scratch].setdefault(k, []).append(m.last_stats.get(k, 0))
            acc[gap, scratch]["scratch"].append(m.ffn.reader.scratch_bytes)
            logits.setdefault((gap, scratch), np.asarray(lg))
            del m, cache
    print(f"\nprefill of {len(ids)} tokens in one call, {rounds} rounds (min / median)")
    print("| gap | reader scratch bound | prompt ms | I/O busy ms | reads | MB read | "
          "streamed MB (waited ms) | scratch held | logits = first |")
    print("|---|---|---|---|---|---|---|---|---|")
    first, rows = logits[configs[0]], []
    for c in configs:
        a = {k: np.asarray(v, np.float64) for k, v in acc[c].items()}
        row = {"gap_bytes": c[0], "scratch_bound": c[1],
               "prompt_ms": [a["total_ns"].min() / 1e6, float(np.median(a["total_ns"])) / 1e6],
               "io_ms": [a["io_ns"].min() / 1e6, float(np.median(a["io_ns"])) / 1e6],
               "reads": float(a["reads"].mean()), "mb_read": a["bytes_read"].mean() / 1e6,
               "scratch_held": int(a["scratch"].max()),
               "stream_mb": a["stream_bytes"].mean() / 1e6,
               "stream_wait_ms": float(np.median(a["stream_wait_ns"])) / 1e6,
               "logits_equal": bool(np.array_equal(logits[c], first))}
        rows.append(row)
        print(f"| {c[0]} B | {c[1] / 2**20:g} MiB | {row['prompt_ms'][0]:.0f} / "
              f"{row['prompt_ms'][1]:.0f} | {row['io_ms'][0]:.0f} / {row['io_ms'][1]:.0f} | "
              f"{row['reads']:.0f} | {row['mb_read']:.1f} | "
              f"{row['stream_mb']:.0f} ({row['stream_wait_ms']:.0f}) | "
              f"{row['scratch_held'] / 2**20:.2f} MiB | "
              f"{'identical' if row['logits_equal'] else 'DIFFER'} |")
    return rows


def report_measured(res, logits, rec: int) -> list[dict]:
    base = res[min(res)]
    print("\n| coalesce gap | token ms (mean) | I/O busy ms | waited ms | reads / token | "
          "MB read / token | loaded / token | vs gap 0: token, I/O | logits = gap 0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for g, a in sorted(res.items()):
        same = np.array_equal(logits[g], logits[min(res)])
        row = {"gap_bytes": g, "gap_records": g / rec,
               "token_ms": a["total_ns"].mean() / 1e6, "io_ms": a["io_ns"].mean() / 1e6,
               "wait_ms": a["io_wait_ns"].mean() / 1e6, "reads": a["reads"].mean(),
               "mb_read": a["bytes_read"].mean() / 1e6, "loaded": a["loaded"].mean(),
               "token_ratio": a["total_ns"].mean() / base["total_ns"].mean(),
               "io_ratio": a["io_ns"].mean() / base["io_ns"].mean(), "logits_equal": same}
        rows.append(row)
        print(f"| {g} B ({g / rec:g} records) | {row['token_ms']:.1f} | {row['io_ms']:.1f} | "
              f"{row['wait_ms']:.1f} | {row['reads']:.0f} | {row['mb_read']:.2f} | "
              f"{row['loaded']:.0f} | {row['token_ratio']:.3f}, {row['io_ratio']:.3f} | "
              f"{'identical' if same else 'DIFFER'} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="340MB")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--gaps", default="0,1,2")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--measure", default=None,
                    help="comma list of coalesce_gap_bytes to run for real instead (e.g. "
                         "0,4096,8192)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure-tokens", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=0,
                    help="with --measure: time one prompt of this many tokens as one call "
                         "instead of decoding, per gap and --scratch bound")
    ap.add_argument("--scratch", default=None,
                    help="with --prefill: comma list of reader scratch bounds in bytes "
                         "(default: the runtime's, loader.READER_SCRATCH_BYTES)")
    args = ap.parse_args()
    from flashinfer_py.default_model import default_model_dir

    if args.measure:
        import flashinfer_py as fi

        d = args.dir or default_model_dir()
        rec = fi.load(d).manifest["bundle"]["record_bytes"]
        gaps = [int(g) for g in args.measure.split(",")]
        if args.prefill:
            from flashinfer_py.loader import READER_SCRATCH_BYTES

            bounds = ([int(b) for b in args.scratch.split(",")] if args.scratch
                      else [READER_SCRATCH_BYTES])
            rows = measure_prefill(d, args.budget, [(g, b) for g in gaps for b in bounds],
                                   args.rounds, args.prefill)
            if args.json:
                args.json.write_text(json.dumps({"budget": args.budget, "rounds": args.rounds,
                                                 "prefill": args.prefill, "rows": rows,
                                                 "load": os.getloadavg()}, indent=1))
            return
        res, logits = measure(d, args.budget, gaps, args.rounds, args.measure_tokens,
                              args.warmup)
        rows = report_measured(res, logits, rec)
        if args.json:
            args.json.write_text(json.dumps({"budget": args.budget, "rounds": args.rounds,
                                             "tokens": args.measure_tokens, "rows": rows,
                                             "load": os.getloadavg()}, indent=1))
        return

    t0 = time.time()
    loads, info = record_loads(args.dir or default_model_dir(), args.budget, args.tokens)
    print(f"recorded {len(loads)} tokens in {time.time() - t0:.0f} s: {info}")
    L, f, rec = info["layers"], info["d_ff"], info["record_bytes"]
    half = len(loads) // 2
    orders = {"identity": lambda c: np.arange(f),
              "random": lambda c: np.random.default_rng(0).permutation(f),
              "frequency": order_frequency, "spectral": order_spectral, "greedy": order_greedy}
    rows = []
    for gap in [int(g) for g in args.gaps.split(",")]:
        for name, fn in orders.items():
            tot = np.zeros(3)
            for layer in range(L):
                train = [tok[layer] for tok in loads[:half]]
                test = [tok[layer] for tok in loads[half:]]
                order = fn(co_matrix(train, f))
                pos = np.empty(f, np.int64)
                pos[order] = np.arange(f)
                tot += count_reads(test, pos, gap, rec)
            n_tok = len(loads) - half
            needed = sum(len(tok[layer]) for tok in loads[half:] for layer in range(L))
            row = {"order": name, "gap": gap, "reads_per_token": tot[0] / n_tok,
                   "records_per_read": tot[1] / tot[0], "needed_per_token": needed / n_tok,
                   "extra_records": tot[1] / needed - 1,
                   "model_io_ms_per_token": 1e3 * tot[2] / n_tok}
            rows.append(row)
            print(f"gap {gap} {name:10s} reads/token {row['reads_per_token']:7.0f}  "
                  f"records/read {row['records_per_read']:.3f}  extra {row['extra_records']:+.1%}  "
                  f"model I/O {row['model_io_ms_per_token']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

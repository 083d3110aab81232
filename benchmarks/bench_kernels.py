"""Kernel throughput against this machine's memory read bandwidth, measured in the same run.

Not part of the tests. Two ways to run the same case table:

    python benchmarks/bench_kernels.py [--threads 1,2] [--rounds 7] [--only TEXT]  # markdown
    python -m pytest benchmarks/bench_kernels.py --benchmark-only -q               # pytest-benchmark

Every matrix kernel of a decode step is here, one input (n = 1) unless the case says
otherwise: the dense GEMV of resident matrices (SmolLM2's attention projections, q/k/v fused,
and its 49152 x 576 tied LM head; a 1B Llama's), in 16 bits and in the block formats; the
FFN on bundle records (``ffn_rows``): a dense SwiGLU layer (every neuron) and the sparse FFN
on neuron-cache rows at the paper's sparsity (OPT-style up+down records, 10% of the cached
rows active), and a SwiGLU layer's predicted neurons (a quarter of the rows, picked in random
order: what the sparse runtime reads for a gated model). Records are packed as the neuron
cache packs them (parts rounded to 64 bytes).

The reference, ``read``: ``kernels.stream_sum`` over 1 GiB, nothing but loads and adds on
the kernels' own threads and pool (AVX2 loads). Each round runs every (case,
threads) pair once in shuffled order, so a kernel and the read bandwidth it is compared with
are measured in the same minutes; the table gives the median and best over rounds, and each
kernel's 2-thread median as a share of the 2-thread read median.

Cases marked ``x16`` run the 4-bit formats with 16 rows interleaved (``kernels.interleave``:
what the model does with resident 4-bit matrices and with a GGUF's dense 4-bit FFN layers on
a CPU with AVX-512 VNNI), beside the same shapes row-major.

Weights are cycled through copies totalling >= 96 MiB (3x the L3), so these are DRAM rates.
GB/s = weight bytes a call must read / time (ffn_rows: every used row's up and gate parts,
and the down parts of the rows whose activation is not zero).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from flashinfer_py import kernels as K

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

COLD_BYTES = 96 << 20  # cycle copies until this many bytes: 3x the L3
READ_BYTES = 1 << 30   # the read reference's buffer


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "read", "linear", "ffn" (ffn_rows on records), "ffn2" (kernels.ffn_dense)
    fmt: str = "float32"
    m: int = 0  # linear: out features; ffn: rows
    k: int = 0  # linear: in features; ffn: d_model
    n: int = 1  # inputs
    active: float = 1.0  # ffn: fraction of rows with h != 0 (< 1: fatrelu threshold)
    gated: bool = True   # ffn: up, gate, down parts (else up, down)
    x16: bool = False    # the 4-bit matrices with 16 rows interleaved (kernels.Interleaved):
                         # linear on one, or ffn2's two matrices
    picked: float = 1.0  # ffn: the fraction of the rows the call reads, picked by row_select
                         # in random order (a gated model's predicted neurons in the cache)
    split: bool = False  # ffn: the down parts in a matrix of their own (a split neuron cache,
                         # what the runtime keeps for FFNs without a gate), else whole records


def _linears(tag: str, shapes, fmts) -> list[Case]:
    return [Case(f"linear {tag} {m}x{k}", "linear", f, m, k) for (m, k) in shapes for f in fmts]


FMTS = ("float16", "q8_0", "q4_0", "q4_1")
CASES = [
    Case("read 1 GiB", "read"),
    *_linears("SmolLM2 o", [(576, 576)], FMTS),
    *_linears("SmolLM2 qkv", [(960, 576)], FMTS),
    *_linears("SmolLM2 head", [(49152, 576)], ("float16", "bfloat16", "q8_0", "q4_1")),
    *_linears("1B o", [(2048, 2048)], FMTS),
    *_linears("1B qkv", [(2560, 2048)], ("float16", "q4_1")),
    *_linears("1B head", [(32000, 2048)], ("float16", "q8_0", "q4_1")),
    *_linears("7B", [(4096, 4096)], ("float32", "float16", "bfloat16", "q4_1")),
    Case("linear prefill n=64 4096x4096", "linear", "float16", 4096, 4096, n=64),
    *(Case(f"ffn_rows SmolLM2 dense d=576 r=1536", "ffn", f, 1536, 576) for f in FMTS),
    *(Case(f"ffn_rows 1B dense d=2048 r=5632", "ffn", f, 5632, 2048) for f in
      ("float16", "q8_0", "q4_1")),
    *(Case(f"ffn_rows sparse d=4096 r=1600 10% active", "ffn", f, 1600, 4096, active=0.1,
           gated=False) for f in ("float16", "q8_0", "q4_0", "q4_1")),
    # the same in a split cache (up parts one matrix, down parts another): the runtime's rows
    # for FFNs without a gate since the cache splits them
    *(Case(f"ffn_rows sparse split d=4096 r=1600 10% active", "ffn", f, 1600, 4096,
           active=0.1, gated=False, split=True) for f in ("float16", "q8_0", "q4_0", "q4_1")),
    # a SwiGLU layer's predicted neurons in the cache: a quarter of the 1B's rows, half of
    # SmolLM2's, picked
    *(Case(f"ffn_rows picked d=2048 r=5632 25% picked", "ffn", f, 5632, 2048, picked=0.25)
      for f in ("float16", "q8_0", "q4_1")),
    *(Case(f"ffn_rows picked d=576 r=1536 50% picked", "ffn", f, 1536, 576, picked=0.5)
      for f in ("float16", "q8_0", "q4_1")),
    # the same shapes with 16 rows interleaved (resident 4-bit matrices, the dense 4-bit FFN
    # of a GGUF's blocks: csrc/kernels_x16.cpp)
    *(Case(f"linear {tag} {m}x{k}", "linear", f, m, k, x16=True)
      for tag, m, k in (("SmolLM2 o", 576, 576), ("SmolLM2 qkv", 960, 576),
                        ("SmolLM2 head", 49152, 576), ("1B o", 2048, 2048),
                        ("1B qkv", 2560, 2048), ("1B head", 32000, 2048), ("7B", 4096, 4096))
      for f in ("q4_0", "q4_1")),
    Case("linear prefill n=64 4096x4096", "linear", "q4_1", 4096, 4096, n=64),
    Case("linear prefill n=64 4096x4096", "linear", "q4_1", 4096, 4096, n=64, x16=True),
    # the dense FFN as two products (kernels.ffn_dense: up/gate rows, then down_proj), as a
    # dense model runs float layers and a GGUF's 4-bit ones (interleaved)
    *(Case(f"ffn_dense {tag}", "ffn2", f, r, d, x16=f.startswith("q4"))
      for tag, r, d in (("SmolLM2 d=576 r=1536", 1536, 576), ("1B d=2048 r=5632", 5632, 2048))
      for f in ("float16", "q4_0", "q4_1")),
]


def _store(a: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "float32":
        return np.ascontiguousarray(a, np.float32)
    if fmt in ("float16", "bfloat16"):
        return K.from_float32(np.ascontiguousarray(a, np.float32), fmt)
    return K.quantize(a, fmt)


def _copies(a: np.ndarray, read: float = 0.0) -> list[np.ndarray]:
    """a and copies of it, enough that the bytes a call reads (`read`, default all of a) over
    every copy exceed COLD_BYTES."""
    return [a] + [a.copy() for _ in range(max(1, math.ceil(COLD_BYTES / (read or a.nbytes))) - 1)]


def make_runner(case: Case) -> tuple[Callable[[int], None], float, int]:
    """(fn(threads), bytes, copies): fn runs the case once over every weight copy."""
    rng = np.random.default_rng(0)
    if case.kind == "read":
        buf = np.ones(READ_BYTES // 4, np.float32)
        return (lambda threads: K.stream_sum(buf, threads=threads)), float(buf.nbytes), 1
    fmt = None if case.fmt in ("float32", "float16", "bfloat16") else case.fmt
    if case.kind == "linear":
        w0 = _store(rng.standard_normal((case.m, case.k)) * 0.02, case.fmt)
        if case.x16:
            w0 = K.interleave(w0, case.fmt, case.k)
            copies = [w0] + [K.Interleaved(w0.data.copy(), w0.fmt, w0.rows, w0.k, w0.row_bytes)
                             for _ in range(max(1, math.ceil(COLD_BYTES / w0.nbytes)) - 1)]
            fmt = None
        else:
            copies = _copies(w0)
        x = rng.standard_normal((case.n, case.k)).astype(np.float32)
        out = np.empty((case.n, case.m), np.float32)

        def fn(threads: int) -> None:
            for w in copies:
                K.linear(x, w, out=out, threads=threads, fmt=fmt)

        return fn, float(w0.nbytes * len(copies)), len(copies)
    if case.kind == "ffn2":  # a dense gated FFN: up and gate rows, then down_proj (d x r)
        d, r = case.k, case.m
        ug = _store(rng.standard_normal((2 * r, d)) * 0.05, case.fmt)
        dn = _store(rng.standard_normal((d, r)) * 0.05, case.fmt)
        if case.x16:
            ug, dn = K.interleave(ug, case.fmt, d), K.interleave(dn, case.fmt, r)
            dup = lambda w: K.Interleaved(w.data.copy(), w.fmt, w.rows, w.k, w.row_bytes)  # noqa: E731
        else:
            dup = np.copy
        per = ug.nbytes + dn.nbytes
        copies = [(ug, dn)] + [(dup(ug), dup(dn))
                               for _ in range(max(1, math.ceil(COLD_BYTES / per)) - 1)]
        x = rng.standard_normal((1, d)).astype(np.float32)
        out = np.empty((1, d), np.float32)

        def fn(threads: int) -> None:
            for u, w in copies:
                K.ffn_dense(x, u, w, True, "silu", fmt=case.fmt, out=out, threads=threads)

        return fn, float(per * len(copies)), len(copies)

    # ffn_rows: records of parts (up, [gate,] down), each rounded up to 64 bytes
    d, r = case.k, case.m
    names = ("up", "gate", "down") if case.gated else ("up", "down")
    parts = [_store(rng.standard_normal((r, d)) * 0.05, case.fmt) for _ in names]
    eb = parts[0].itemsize
    part_elems = -(-parts[0].shape[1] * eb // 64) * 64 // eb
    rows0 = np.zeros((r, part_elems * len(names)), parts[0].dtype)
    for i, p in enumerate(parts):
        rows0[:, i * part_elems:i * part_elems + p.shape[1]] = p
    off = {nm: i * part_elems for i, nm in enumerate(names)}
    x = rng.standard_normal((1, d)).astype(np.float32)
    kw = dict(up_off=off["up"], down_off=off["down"], gate_off=off.get("gate", -1), fmt=fmt)
    if case.active < 1.0:  # a fatrelu threshold at the (1 - active) quantile of u
        u = K.linear(x, np.ascontiguousarray(rows0[:, :part_elems]), fmt=fmt, threads=1)[0]
        kw.update(activation="fatrelu", act_param=float(np.quantile(u, 1.0 - case.active)))
    else:
        kw.update(activation="silu")
    n_used = r
    if case.picked < 1.0:
        n_used = int(r * case.picked)
        kw["row_select"] = rng.permutation(r)[:n_used].astype(np.int32)
    if case.split:  # everything before the down part in one matrix, the down parts in another
        a0 = np.ascontiguousarray(rows0[:, :off["down"]])
        b0 = np.ascontiguousarray(rows0[:, off["down"]:])
        kw["down_off"] = 0
        n_copies = len(_copies(rows0, read=rows0.nbytes * n_used / r))
        copies = [(a0, b0)] + [(a0.copy(), b0.copy()) for _ in range(n_copies - 1)]
    else:
        copies = [(rows, None) for rows in _copies(rows0, read=rows0.nbytes * n_used / r)]
    out = np.empty((1, d), np.float32)
    act = np.empty((1, n_used), np.float32)

    def fn(threads: int) -> None:
        for rows, down in copies:
            K.ffn_rows(x, rows, d, out=out, act_out=act, threads=threads, down_rows=down, **kw)

    fn(1)
    n_active = int((act != 0).sum())
    part_bytes = parts[0].shape[1] * eb
    nbytes = (n_used * part_bytes * (len(names) - 1) + n_active * part_bytes) * len(copies)
    return fn, float(nbytes), len(copies)


def _fmt(c: Case) -> str:
    return f"{c.fmt} x16" if c.x16 else c.fmt


# ---- pytest-benchmark -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{_fmt(c)}".replace(" ", "-"))
def test_kernel_throughput(benchmark, case):
    fn, nbytes, _ = make_runner(case)
    benchmark.pedantic(fn, args=(0,), rounds=5, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(nbytes / t / 1e9, 2)
    benchmark.extra_info["isa"] = K.kernel_isa()


# ---- table mode -----------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="thread counts to compare (default 1,2)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="", help="substring filter on case names and formats "
                    "(the read reference always runs)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed")
    ap.add_argument("--isa", default="auto", choices=("auto", "scalar", "avx2", "avx512"),
                    help="the kernels' instruction set (default: the best this CPU has)")
    args = ap.parse_args()
    K.set_kernel_isa(args.isa)
    threads = [int(t) for t in args.threads.split(",")]
    cases = [c for c in CASES if c.kind == "read" or args.only in f"{c.name} {_fmt(c)}"]
    runners = {c: make_runner(c) for c in cases}
    load0 = os.getloadavg()[0]
    gbs: dict[tuple[Case, int], list[float]] = {(c, t): [] for c in cases for t in threads}
    pairs = list(gbs)
    rnd = random.Random(args.seed)
    for c, t in pairs:  # warm-up: page faults, pool threads
        runners[c][0](t)
    for _ in range(args.rounds):
        rnd.shuffle(pairs)
        for c, t in pairs:
            fn, nbytes, _ = runners[c]
            t0 = time.perf_counter()
            fn(t)
            gbs[(c, t)].append(nbytes / (time.perf_counter() - t0) / 1e9)
    load1 = os.getloadavg()[0]
    read = next(c for c in cases if c.kind == "read")
    ref = {t: statistics.median(gbs[(read, t)]) for t in threads}
    tmax = max(threads)
    print(f"# {machine()}; isa={K.kernel_isa()}; commit {git_commit()}; "
          f"load average {load0:.2f} -> {load1:.2f}; {args.rounds} rounds")
    head = " | ".join(f"{t} thr GB/s median (best)" for t in threads)
    print(f"| case | format | MB a call | {head} | {tmax} thr % of read |")
    print("|---|---|---|" + "---|" * len(threads) + "---|")
    for c in cases:
        fn, nbytes, copies = runners[c]
        cols = " | ".join(f"{statistics.median(gbs[(c, t)]):.1f} ({max(gbs[(c, t)]):.1f})"
                          for t in threads)
        mb = nbytes / 1e6 / copies
        pct = 100 * statistics.median(gbs[(c, tmax)]) / ref[tmax]
        fmt = "" if c.kind == "read" else _fmt(c)
        print(f"| {c.name} | {fmt} | {mb:.2f} | {cols} | {pct:.0f}% |", flush=True)


if __name__ == "__main__":
    main()

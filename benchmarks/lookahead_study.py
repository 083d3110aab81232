"""Can a trained look-ahead make overlap "ahead" pay on SmolLM2? (issue 16: Deja Vu's
asynchronous predictor, measured before it could become a default.)

    python benchmarks/lookahead_study.py [--rank 64] [--rounds 3] [--tokens 40] [--json F]

1. Offline, on activations recorded from the dense model (the calibration text, 4096 tokens
   in 256-token windows, 20% held out at random): how well does layer l's FFN input predict
   the top-k neurons (by |activation|) of layer l+1, the guess overlap "ahead" makes while
   layer l computes? Recall of the true top-k (k = 12.5% and 25% of a layer) on the held-out
   tokens for: (a) layer l+1's own weights on layer l's input (what "ahead" does today, up to
   the sketch's approximation), (b) a low-rank predictor (rank 128, the train module's
   fit_layer) trained on (x_l -> layer l+1's top 25%), (c) layer l+1's weights on a learned
   guess of its input: x_l + a rank-r linear map of x_l (ridge regression of x_{l+1} - x_l on
   x_l, reduced to rank r), and (d) the same map at full rank.
2. At run time (340 MB, sketch + rank, Wikipedia text token by token, as benchmarks/overlap.py):
   overlap "off", "ahead", and "ahead" with the guess made from (c), interleaved per round;
   the logits of each must equal "off"'s (the selection is made from the true input).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overlap as ov  # noqa: E402
from common import git_commit, machine  # noqa: E402

import flashinfer_py as fi  # noqa: E402
from flashinfer_py import corpora  # noqa: E402
from flashinfer_py.default_model import default_model_dir  # noqa: E402
from flashinfer_py.train import TrainConfig, _svd_init, fit_layer, record  # noqa: E402


def exact_h(w, x):
    g, u = w
    gx, ux = x @ g.T, x @ u.T
    return np.abs(gx / (1 + np.exp(-gx)) * ux)


def recall(score, truth, k):
    ps = np.argpartition(-score, k, axis=1)[:, :k]
    ts = np.argpartition(-truth, k, axis=1)[:, :k]
    return float(np.mean([len(np.intersect1d(p, t)) / k for p, t in zip(ps, ts)]))


def fit_map(x, y, rank):
    """(U [d + 1, r], V [r, d]): y ~ x + [x, 1] @ U @ V (ridge, then the fit's top r directions)."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    lam = 1e-2 * np.trace(xa.T @ xa) / (d + 1)
    dm = np.linalg.solve(xa.T @ xa + lam * np.eye(d + 1), xa.T @ (y - x))
    _, _, vt = np.linalg.svd(xa @ dm, full_matrices=False)
    p = vt[:rank].T @ vt[:rank]
    u, s, wt = np.linalg.svd(dm @ p, full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), wt[:rank].astype(np.float32)


def apply_map(m, x):
    u, v = m
    return (x + (x @ u[:-1] + u[-1]) @ v).astype(np.float32)


def offline(model, rank: int) -> tuple[list, list]:
    xs, hs, _ = record(model, model.tokenizer.encode(corpora.calibration_text()),
                       TrainConfig(), progress=False)
    L, N, _ = hs.shape
    order = np.random.default_rng(0).permutation(N)
    val, tr = np.sort(order[:N // 5]), np.sort(order[N // 5:])
    f = hs.shape[2]
    ks = (f // 8, f // 4)
    rows, maps = [], []
    for l in range(L - 1):
        w = (model.ffn.part_f32(l + 1, "gate"), model.ffn.part_f32(l + 1, "up"))
        x, xv = xs[l][tr].astype(np.float64), xs[l][val].astype(np.float32)
        truth = hs[l + 1][val].astype(np.float32)
        thr = np.quantile(hs[l + 1][tr].astype(np.float32).reshape(-1)[::7], 0.75)
        p = fit_layer(xs[l][tr].astype(np.float32), hs[l + 1][tr] > np.float16(thr),
                      *_svd_init(model, l + 1, 128), TrainConfig(rank=128), None)
        m = fit_map(x, xs[l + 1][tr].astype(np.float64), rank)
        full = fit_map(x, xs[l + 1][tr].astype(np.float64), xs.shape[2])
        maps.append(m)
        r = {"layer": l + 1}
        for name, s in (("own weights on x_l", exact_h(w, xv)), ("trained low-rank", p.scores(xv)),
                        (f"weights on mapped x_l (rank {rank})", exact_h(w, apply_map(m, xv))),
                        ("weights on mapped x_l (full)", exact_h(w, apply_map(full, xv)))):
            r[name] = [recall(s, truth, k) for k in ks]
        rows.append(r)
        print(f"layer {l + 1}: " + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in r.items()
                                              if k != "layer"), file=sys.stderr, flush=True)
    return rows, maps


def run(directory, budget, mode, ids, warm, maps):
    """benchmarks/overlap.py's run, with the guesses for layers 1.. made from the mapped input
    when `maps` is given; the per-token stats averaged."""
    def setup(m):  # the guess for layer l >= 1 is made from layer l-1's FFN input
        guess = m.ffn._guess
        m.ffn._guess = lambda layer, x: guess(layer, apply_map(maps[layer - 1], x)
                                              if layer > 0 else x)

    st, logits = ov.run(directory, budget, mode, ids, warm, setup if maps is not None else None)
    return {k: float(np.mean(st[k])) for k in ov.KEYS}, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--budget", default="340MB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    directory = default_model_dir()
    t0 = time.time()
    rows, maps = offline(fi.load(directory), a.rank)
    names = [k for k in rows[0] if k != "layer"]
    print(f"\n{machine()}, commit {git_commit()}; offline part {time.time() - t0:.0f} s\n")
    print("| guess of layer l+1's top neurons from layer l's FFN input | recall of the top 12.5% "
          "| of the top 25% |\n|---|---|---|")
    for n in names:
        v = np.array([r[n] for r in rows]).mean(0)
        print(f"| {n} | {v[0]:.3f} | {v[1]:.3f} |")
    ids = fi.load(directory).tokenizer.encode(corpora.wikipedia_excerpt())[:a.warmup + a.tokens]
    modes = (("off", None), ("ahead", None), (f"ahead + map (rank {a.rank})", maps))
    res = {n: [] for n, _ in modes}
    same = {n: True for n, _ in modes}
    for rnd in range(a.rounds):
        ref = None
        for name, mp in modes:
            st, lg = run(directory, a.budget, "off" if name == "off" else "ahead", ids,
                         a.warmup, mp)
            ref = lg if ref is None else ref
            same[name] &= bool(np.array_equal(lg, ref))
            res[name].append(st)
            print(f"round {rnd} {name}: {st['total_ns'] / 1e6:.1f} ms/token", file=sys.stderr,
                  flush=True)
    print(f"\n| overlap | token ms (per round) | I/O ms | waited ms | predictor ms | MB read / "
          f"token | of which read ahead | logits = off |\n|---|---|---|---|---|---|---|---|")
    for name, _ in modes:
        v = res[name]
        med = lambda k: float(np.median([s[k] for s in v]))  # noqa: E731
        per = ", ".join(f"{s['total_ns'] / 1e6:.1f}" for s in v)
        print(f"| {name} | {med('total_ns') / 1e6:.1f} ({per}) | {med('io_ns') / 1e6:.1f} | "
              f"{med('io_wait_ns') / 1e6:.1f} | {med('predict_ns') / 1e6:.1f} | "
              f"{med('bytes_read') / 1e6:.2f} | {med('ahead_bytes') / 1e6:.2f} | "
              f"{'bit-identical' if same[name] else 'DIFFERENT'} |")
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps({"commit": git_commit(), "machine": machine(), "rank": a.rank,
                                 "offline": rows, "runtime": res, "same": same}) + "\n")


if __name__ == "__main__":
    main()

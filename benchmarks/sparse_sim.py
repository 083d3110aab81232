"""Design exploration for sparse inference under a budget, by simulation: many ways of choosing
neurons on SmolLM2 in minutes, to pick what the runtime should do. The runtime's own numbers
come from benchmarks/sparse_quality.py; this script is how its design was chosen.

    python benchmarks/sparse_sim.py                     # the comparison table, ~25 min
    python benchmarks/sparse_sim.py --write             # also a section of RESULTS_sparse.md

How it simulates. Token-by-token decoding (prefill_chunk=1) is computed layer by layer over a
whole window at once: a layer's cache state depends only on that layer's inputs for the
earlier tokens, and those are known once the earlier layers have run for every token. So for
each layer, the policy walks the tokens in order with numpy (window.rank_swaps, the
runtime's own rule), producing each token's set of computed neurons (cached before the token
plus those read for it, as the runtime computes), and the FFN is one masked matrix product.
Equivalent to the runtime up to float rounding in the FFN sums.

Compared, at equal total DRAM (cache + what chooses neurons, as a fraction of the FFN's
packed cache rows, as the runtime's memory plan counts them), all with the same swap rule
and read limit:
- exact: every neuron's true contribution |h_j| * ||down_j|| (the ceiling);
- q4/q3/q2 sketches of gate and up (symmetric per-32 groups), one tier (a sketch of every
  neuron in DRAM) or two tiers (sketches of the uncached neurons only; the cached ones are
  scored exactly, as the runtime does);
- the paper's low-rank predictors (rank 64 and 128, trained on the same calibration text);
- GRIFFIN (sequence-level selection): the first 32 tokens of each window run dense, their
  summed contributions pick the cache for the rest; alone, and with sketch swaps after it.
Per-layer cache sizes (equalizing the calibrated FFN error, as the runtime's memory plan
does) against equal sizes, for each.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _qsym(w: np.ndarray, bits: int, group: int = 32) -> np.ndarray:
    """Symmetric per-group quantize-dequantize along rows (the sketch's format for bits=4)."""
    f, d = w.shape
    pad = -d % group
    g = np.pad(w, ((0, 0), (0, pad))).reshape(f, -1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(-1, keepdims=True) / qmax
    scale[scale == 0] = 1
    q = np.clip(np.floor(g / scale + 0.5), -qmax, qmax)
    return (q * scale).reshape(f, -1)[:, :d].astype(np.float32)


class Sim:
    """The dense model, its FFN replaced by a masked one per layer."""

    def __init__(self, directory):
        import flashinfer_py as fi

        self.m = fi.load(directory)
        a = self.m.args
        if not a.gated:
            raise SystemExit("this simulation is for gated (SwiGLU/GeGLU) models")
        self.W = [tuple(self.m.ffn.part_f32(layer, p) for p in ("up", "gate", "down"))
                  for layer in range(a.num_hidden_layers)]
        self.dn = [np.linalg.norm(w[2], axis=1) for w in self.W]
        self.L, self.f = a.num_hidden_layers, a.intermediate_size
        from flashinfer_py.kernels import ACTIVATIONS  # noqa: F401 (documents the names)

        self.act = {"silu": lambda g: g / (1 + np.exp(-g)),
                    "gelu_tanh": lambda g: 0.5 * g * (1 + np.tanh(0.7978845608 * (g + 0.044715 * g ** 3)))
                    }[a.hidden_act]

    def run(self, windows, policy=None, collect=None) -> float:
        """Mean NLL per predicted token; policy(layer, X, H) -> mask [T, f] or None (dense)."""
        from flashinfer_py.sampling import log_softmax

        tr = self.m.transformer

        class Masked:
            def forward(_, layer, x, act_out=None):
                up, gate, down = self.W[layer]
                h = self.act(x @ gate.T) * (x @ up.T)
                if act_out is not None:
                    act_out[:] = h
                if collect is not None:
                    collect(layer, x, h)
                mask = policy(layer, x, h) if policy is not None else None
                return (h if mask is None else h * mask) @ down

        real, tr.ffn = tr.ffn, Masked()
        nll = n = 0
        try:
            for w in windows:
                logits = tr.forward(w, self.m.new_cache())
                for t in range(len(w) - 1):
                    nll -= float(log_softmax(logits[t])[w[t + 1]])
                n += len(w) - 1
        finally:
            tr.ffn = real
        return nll / n


class Policy:
    """The runtime's rank rule per layer over a window: caps[l] cached, at most `reads` swaps
    per token; est(layer, X, H) gives the scores; `tiered`: cached neurons scored exactly."""

    def __init__(self, sim, caps, reads, est, hot, tiered=False, prompt=0):
        from flashinfer_py.window import rank_swaps

        self.rank_swaps = rank_swaps
        self.sim, self.caps, self.reads, self.est = sim, caps, reads, est
        self.hot, self.tiered, self.prompt = hot, tiered, prompt
        self.cached = [None] * sim.L
        self.loads = self.tokens = 0

    def __call__(self, layer, X, H):
        f, T = self.sim.f, X.shape[0]
        exact = np.abs(H) * self.sim.dn[layer]
        E = exact if self.est is None else self.est(layer, X, H)
        c = self.cached[layer]
        if c is None:
            c = np.zeros(f, bool)
            c[np.argsort(-self.hot[layer], kind="stable")[:self.caps[layer]]] = True
            self.cached[layer] = c
        M = np.zeros((T, f), bool)
        t0 = 0
        if self.prompt:  # GRIFFIN: the prompt runs dense and picks the cache
            M[:self.prompt] = True
            c[:] = False
            c[np.argsort(-exact[:self.prompt].sum(0))[:self.caps[layer]]] = True
            self.loads += f
            t0 = self.prompt
        for t in range(t0, T):
            e = np.where(c, exact[t], E[t]) if self.tiered else E[t]
            held = np.flatnonzero(c)
            cand = np.flatnonzero(~c)
            load, rows = self.rank_swaps(e[held], cand, e[cand], self.reads[layer])
            M[t] = c
            M[t, load] = True  # the runtime computes the newcomers for this token too
            c[held[rows]] = False
            c[load] = True
            self.loads += load.size
        if layer == 0:
            self.tokens += T
        return M


def calibrate(sim, windows):
    """Hot ranking and per-layer FFN error curves, as train.calibrate computes them."""
    from flashinfer_py.train import calibrate as cal_fn

    hs = [[] for _ in range(sim.L)]
    refs = [[] for _ in range(sim.L)]
    tr = sim.m.transformer

    def observe(layer, x, act, ref):
        hs[layer].append(np.abs(act).astype(np.float16))
        refs[layer].append(ref)

    tr.observer = observe
    try:
        sim.run(windows, policy=None)
    finally:
        tr.observer = None
    hs = np.stack([np.concatenate(h) for h in hs])
    refs = np.stack([np.concatenate(r) for r in refs])
    return cal_fn(sim.m, hs, refs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--totals", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--read-limit", type=float, default=0.1)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--lowrank", nargs="*", default=["64", "128", "64/256"],
                    help="low-rank predictors to train and compare (needs torch): a rank, or "
                         "RANK/LAST for a larger rank in the last 3 layers (the paper's "
                         "per-layer ranks)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--record-bytes", type=int, default=0,
                    help="price DRAM as if a cached neuron took this many bytes (e.g. 1008, a "
                         "SmolLM2 q4_1 record's parts) instead of this model's packed row; the "
                         "choosers' bytes are the same in every format")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the "
                    "methods whose name has one")
    ap.add_argument("--allocs", default="equal,per-layer")
    ns = ap.parse_args(argv)
    import flashinfer_py as fi  # noqa: F401
    from flashinfer_py.corpora import calibration_text, wikipedia_excerpt
    from flashinfer_py.default_model import default_model_dir
    from flashinfer_py.loader import allocate_caps, cache_row_bytes
    from flashinfer_py.sketch import sketch_record_bytes

    sim = Sim(default_model_dir())
    a, tok = sim.m.args, sim.m.tokenizer
    ev = tok.encode(wikipedia_excerpt()[-60_000:])[-ns.windows * 256:]
    evw = [ev[i * 256:(i + 1) * 256] for i in range(ns.windows)]
    cal_ids = tok.encode(calibration_text()[:60_000])[:4096]
    calw = [cal_ids[i * 256:(i + 1) * 256] for i in range(len(cal_ids) // 256)]
    t0 = time.time()
    cal = calibrate(sim, calw)
    base = math.exp(sim.run(evw))
    rec = cache_row_bytes(sim.m.manifest)  # a cached neuron's DRAM, as the runtime plans it
    sketch_check = sketch_record_bytes(a) / rec
    rec = ns.record_bytes or rec
    L, f, d = sim.L, sim.f, a.hidden_size
    methods = {"exact (ceiling)": (None, 0.0, False, 0)}
    for bits in (4, 3, 2):
        Q = [(_qsym(w[0], bits), _qsym(w[1], bits)) for w in sim.W]
        est = (lambda Q: lambda l, X, H: np.abs(sim.act(X @ Q[l][1].T) * (X @ Q[l][0].T)) * sim.dn[l])(Q)
        cost = 2 * -(-d // 32) * (bits * 4 + 2) / rec
        methods[f"q{bits} sketch, one tier"] = (est, cost, False, 0)
        methods[f"q{bits} sketch, two tiers"] = (est, cost, True, 0)
    assert ns.record_bytes or abs(methods["q4 sketch, two tiers"][1] - sketch_check) < 1e-9
    # The gate part alone (half the sketch), as CATS thresholds |act(gate . x)|: scored
    # |act(gate~ . x)| * ||down|| * mean|up . x| (the mean over the calibration tokens), or
    # without the mean (a control).
    mu = [np.zeros(f) for _ in range(L)]

    def _mean_up(layer, x, h):
        mu[layer] += np.abs(x @ sim.W[layer][0].T).sum(0) / (len(cal_ids))

    sim.run(calw, collect=_mean_up)
    Qg = [_qsym(w[1], 4) for w in sim.W]
    cost_g = -(-d // 32) * 18 / rec
    methods["q4 gate sketch x mean|u|, two tiers"] = (
        lambda l, X, H: np.abs(sim.act(X @ Qg[l].T)) * sim.dn[l] * mu[l], cost_g, True, 0)
    un = [np.linalg.norm(w[0], axis=1) for w in sim.W]
    methods["q4 gate sketch x ||up||, two tiers"] = (
        lambda l, X, H: np.abs(sim.act(X @ Qg[l].T)) * sim.dn[l] * un[l], cost_g, True, 0)
    methods["q4 gate sketch, no u, two tiers"] = (
        lambda l, X, H: np.abs(sim.act(X @ Qg[l].T)) * sim.dn[l], cost_g, True, 0)
    if ns.lowrank:
        from flashinfer_py.train import TrainConfig, train_predictors

        for r in ns.lowrank:
            rank, _, last = str(r).partition("/")
            p = train_predictors(sim.m, cal_ids, TrainConfig(
                rank=int(rank), rank_last=int(last or rank), last_layers=3, methods=("lowrank",)),
                progress=False, save=False)
            methods[f"low-rank r={r} (the paper's)"] = (
                (lambda p: lambda l, X, H: p.layers[l].scores(X))(p), p.nbytes / (L * f * rec),
                False, 0)
    methods["GRIFFIN (32-token prompt, then static)"] = (None, 0.0, False, 32)
    methods["GRIFFIN + q4 sketch swaps"] = (methods["q4 sketch, two tiers"][0],
                                           methods["q4 sketch, two tiers"][1], True, 32)
    if ns.only:
        keep = [k for k in ns.only.split(",") if k]
        methods = {n: v for n, v in methods.items() if any(k in n for k in keep)}
    rows = []
    reads = [max(1, int(math.ceil(ns.read_limit * f)))] * L
    for tot in ns.totals:
        for name, (est, cost, tiered, prompt) in methods.items():
            cap = (tot - cost) / (1 - cost) if tiered else tot - cost
            if cap <= 0.01:
                continue
            for alloc in ns.allocs.split(","):
                total = int(cap * f) * L
                caps = ([total // L] * L if alloc == "equal" else
                        allocate_caps(cal.err, cal.err_k, total, f, max(16, f // 100)))
                no_swaps = "static" in name
                pol = Policy(sim, caps, [0] * L if no_swaps else reads, est, cal.hot, tiered, prompt)
                ppl = math.exp(sim.run(evw, pol))
                row = (tot, name, alloc, cost, cap, ppl, pol.loads / max(pol.tokens, 1) / (L * f))
                rows.append(row)
                print(f"{tot:.0%} | {name} | {alloc} | chooser {cost:.1%} cache {cap:.1%} | "
                      f"ppl {ppl:.2f} ({ppl / base - 1:+.1%}) | read {row[-1]:.1%}",
                      file=sys.stderr, flush=True)
    head = ("| FFN DRAM | method | cache sizes | chooser (% of FFN) | cache | perplexity | vs dense "
            "| read / token |\n|---|---|---|---|---|---|---|---|")
    body = "\n".join(f"| {t:.0%} | {n} | {al} | {c:.1%} | {cap:.1%} | {p:.2f} | "
                     f"{100 * (p / base - 1):+.1f}% | {r:.1%} |"
                     for t, n, al, c, cap, p, r in rows)
    print(head + "\n" + body)
    if ns.write:
        import datetime
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                capture_output=True).stdout.strip()
        section = (
            "\n## Design exploration (simulation, SmolLM2)\n\n"
            f"`python benchmarks/sparse_sim.py --write` ({datetime.date.today().isoformat()}, "
            f"commit {commit}, {(time.time() - t0) / 60:.0f} min): {ns.windows} Wikipedia "
            f"windows of 256 tokens, calibration on 4096 Shakespeare tokens, read limit "
            f"{ns.read_limit:.0%} per layer per token, dense perplexity {base:.3f}. Simulated "
            "layer by layer (see the script's docstring); the runtime's own measurements are "
            "the tables above.\n\n" + head + "\n" + body + "\n")
        path = HERE / "RESULTS_sparse.md"
        text = path.read_text()
        marker = "\n## Design exploration (simulation, SmolLM2)\n"
        if marker in text:
            start = text.index(marker)
            nxt = text.find("\n## ", start + len(marker))
            text = text[:start] + (text[nxt:] if nxt >= 0 else "")
        if "\n## Findings" in text:
            i = text.index("\n## Findings")
            text = text[:i] + section + text[i:]
        else:
            text += section
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality of sparse inference on SmolLM2-135M: perplexity vs FFN bytes read per token.

One command trains (or reuses) the predictors of the default model and prints a markdown table:

    python benchmarks/sparse_quality.py                  # table on stdout
    python benchmarks/sparse_quality.py --write          # also benchmarks/RESULTS_sparse.md

Text. Predictors are calibrated on the head of the offline Wikipedia excerpt (what
`flashinfer-py train-predictors` uses: the first ~12 characters per calibration token);
perplexity is measured on windows taken from the excerpt's *tail*, never seen in training.

Method. Every setting is scored token by token, exactly as decoding with ``prefill_chunk=1``
would run it: token t's FFN in layer l uses only the neurons of its own predicted set
(``compute="predicted"``) or of the window's union of the last k tokens' sets
(``compute="cached"``), and the bytes read are the neurons that enter the window's union
(``SlidingWindow`` semantics, no DRAM budget, so nothing is evicted early). To make eight
256-token windows per setting affordable on two cores, the per-token masks are applied in a
batched numpy FFN (h = silu(gate.x) * up.x, masked, then down) instead of 256 separate
runtime calls; ``--check`` (on by default) runs the real runtime (`FlashModel` with
``prefill_chunk=1``, reading the bundle file through the neuron cache) on the first tokens of
the first window and prints how far its logits and ``last_stats["loaded"]`` are from the
simulation's.

Columns: perplexity; change vs dense; FFN neurons computed per token (% of all layers' FFN);
FFN bytes read from flash per token (% of the FFN and MiB, averaged over all tokens including
each window's cold first token); cache size (mean neurons held, % of the FFN).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EVAL_CHARS = 60_000       # the excerpt's tail these windows are taken from
KS = (1, 2, 4, 8)


def _silu(g):
    return g / (1.0 + np.exp(-g))


@dataclass
class Setting:
    name: str
    kind: str                    # dense | oracle | predictor
    sparsity: float = 0.0        # oracle
    threshold: float = 0.5       # predictor
    compute: str = "predicted"   # predicted | cached
    k: int = 0                   # cached: the window whose union is computed
    cap: float = 0.0             # > 0: neuron cache capacity as a fraction of each layer


@dataclass
class Result:
    setting: Setting
    nll: float = 0.0
    tokens: int = 0
    computed: float = 0.0                              # neurons computed, summed
    loaded: dict = field(default_factory=dict)         # k -> neurons loaded, summed
    held: dict = field(default_factory=dict)           # k -> window union size, summed
    n_tok: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))


class Simulator:
    """Dense model whose FFN applies per-token neuron masks (see the module docstring)."""

    def __init__(self, model, predictors=None):
        from flashinfer_py.format import to_float32

        self.m, self.p = model, predictors
        a = model.args
        if not a.gated or a.hidden_act != "silu":
            raise SystemExit("this benchmark simulates SwiGLU models (SmolLM2)")
        d = a.hidden_size
        self.W = []
        for rows in model.ffn.rows_by_layer:
            r = to_float32(rows, model.dtype)
            self.W.append((np.ascontiguousarray(r[:, :d].T), np.ascontiguousarray(r[:, d:2 * d].T),
                           np.ascontiguousarray(r[:, 2 * d:3 * d])))  # up^T, gate^T, down
        self.L, self.f = a.num_hidden_layers, a.intermediate_size

    def _sets(self, s: Setting, layer: int, x, h):
        """Per-token active sets [T, f] bool (None: every neuron)."""
        if s.kind == "dense":
            return None
        if s.kind == "oracle":
            keep = max(1, int(round(self.f * (1.0 - s.sparsity))))
            idx = np.argpartition(-np.abs(h), keep - 1, axis=1)[:, :keep]
            m = np.zeros(h.shape, bool)
            np.put_along_axis(m, idx, True, axis=1)
            return m
        lp = self.p.layers[layer]
        return lp.scores(x) > math.log(s.threshold / (1 - s.threshold))

    @staticmethod
    def _union(S, k):
        U = S.copy()
        for j in range(1, k):
            U[j:] |= S[:-j]
        return U

    def _capped(self, s: Setting, layer: int, x, h, S, res: Result, down):
        """A DRAM budget: a cache of `cap` neurons per layer, as loader.SparseFFN.rows runs
        it token by token: keep the top-scoring `cap` predicted neurons, add the token to the
        window (k tokens), then forget the oldest tokens until the union fits."""
        cap = max(1, int(self.f * s.cap))
        scores = self.p.layers[layer].scores(x) if s.kind == "predictor" else np.abs(h)
        k = s.k or 4
        counts = np.zeros(self.f, np.int32)
        hist: list = []
        M = np.zeros_like(S)
        loaded = held = 0
        for t in range(S.shape[0]):
            ids = np.flatnonzero(S[t])
            if ids.size > cap:
                ids = ids[np.argpartition(-scores[t, ids], cap - 1)[:cap]]
            loaded += int((counts[ids] == 0).sum())
            counts[ids] += 1
            hist.append(ids)
            if len(hist) > k:
                counts[hist.pop(0)] -= 1
            while len(hist) > 1 and int((counts > 0).sum()) > cap:
                counts[hist.pop(0)] -= 1
            if s.compute == "cached":
                M[t] = counts > 0
            else:
                M[t, ids] = True
            held += int((counts > 0).sum())
        res.computed += M.sum()
        res.loaded[k] = res.loaded.get(k, 0) + loaded
        res.held[k] = res.held.get(k, 0) + held
        return (h * M) @ down

    def run(self, s: Setting, windows, keep_logits=None) -> Result:
        res = Result(s)
        tr = self.m.transformer

        def ffn(layer, x):
            up_t, gate_t, down = self.W[layer]
            h = _silu(x @ gate_t) * (x @ up_t)
            S = self._sets(s, layer, x, h)
            if S is None:
                res.computed += h.size
                return h @ down
            if s.cap:
                return self._capped(s, layer, x, h, S, res, down)
            M = S if s.compute == "predicted" else self._union(S, s.k)
            res.computed += M.sum()
            for k in ((s.k,) if s.compute == "cached" else KS):
                # loaded_t = S_t minus what the window held: the union of tokens t-k..t-1
                held_before = np.zeros_like(S)
                for j in range(1, k + 1):
                    held_before[j:] |= S[:-j]
                res.loaded[k] = res.loaded.get(k, 0) + int((S & ~held_before).sum())
                res.held[k] = res.held.get(k, 0) + int(self._union(S, k).sum())
            return (h * M) @ down

        tr._ffn = ffn
        try:
            from flashinfer_py.sampling import log_softmax

            for w in windows:
                logits = tr.forward(w, self.m.new_cache())
                if keep_logits is not None:
                    keep_logits.append(logits)
                for t in range(len(w) - 1):
                    res.nll -= float(log_softmax(logits[t])[w[t + 1]])
                res.tokens += len(w) - 1
                res.n_tok += len(w)
        finally:
            del tr._ffn
        return res


def check_against_runtime(directory, sim: Simulator, s: Setting, ids, n: int) -> str:
    """Run the real sparse runtime token by token on ids[:n]; compare with the simulation."""
    import flashinfer_py as fi

    cfg = fi.RuntimeConfig(
        sparse=True, selection=s.kind if s.kind != "dense" else "all",
        oracle_sparsity=s.sparsity, predictor_threshold=s.threshold, compute=s.compute,
        window=s.k or 4, prefill_chunk=1)
    if s.cap:  # the budget whose neuron cache holds int(cap * d_ff) neurons per layer
        from flashinfer_py.loader import plan_memory

        a = sim.m.args
        base = plan_memory(a, sim.m.manifest, cfg, sim.p.nbytes if s.kind == "predictor" else 0)
        cfg = cfg.replace(dram_budget=base.total - base.cache_bytes
                          + int(sim.f * s.cap) * a.num_hidden_layers * base.record_bytes)
    rt = fi.load(directory, cfg)
    if s.cap:
        assert rt.plan.cache_capacity[0] == int(sim.f * s.cap), rt.plan.cache_capacity[0]
    cache = rt.new_cache()
    rt.reset()
    got, loaded = [], 0
    for t in ids[:n]:
        got.append(rt.forward([t], cache)[0])
        loaded += rt.last_stats["loaded"]
    kept: list = []
    sim_res = sim.run(s, [ids[:n]], kept)
    diff = float(np.max(np.abs(np.stack(got) - kept[0])))
    k = s.k or 4
    sim_loaded = sim_res.loaded[k]
    return (f"runtime vs simulation on {n} tokens ({s.name}, k={k}): max |logit diff| "
            f"{diff:.3g} (logits up to {float(np.abs(kept[0]).max()):.3g}); neurons loaded "
            f"{loaded} vs {sim_loaded} ({100 * (loaded / max(sim_loaded, 1) - 1):+.2f}%)")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
            f"load average {load:.1f} at the end")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                             capture_output=True, check=True).stdout.strip()
        files = [f"flashinfer_py/{m}.py" for m in ("train", "predictor", "model", "loader",
                                                   "runtime", "window", "config", "kernels")]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files,
                                "benchmarks/sparse_quality.py"], cwd=HERE.parent, text=True,
                               capture_output=True).stdout.strip()
        return out + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="flash directory (default: embedded SmolLM2)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-tokens", type=int, default=256)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    ap.add_argument("--cached-thresholds", type=float, nargs="*", default=[0.5, 0.7])
    ap.add_argument("--oracle", type=float, nargs="*", default=[0.3, 0.5])
    ap.add_argument("--caps", type=float, nargs="*", default=[],
                    help="also run the default setting (p>0.5, cached, k=4) with a neuron cache "
                         "of these fractions of each layer (what a DRAM budget does)")
    ap.add_argument("--retrain", action="store_true", help="train even if predictors exist")
    ap.add_argument("--train", default="", help="TrainConfig overrides, e.g. 'recall=0.95'")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="only compare with the runtime")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS_sparse.md")
    ns = ap.parse_args(argv)
    commit, load0 = git_commit(), (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)

    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.predictor import Predictors
    from flashinfer_py.train import TrainConfig, format_report, train_predictors

    if ns.dir is None:
        from flashinfer_py.default_model import default_model_dir

        ns.dir = str(default_model_dir())
    model = fi.load(ns.dir)
    text = wikipedia_excerpt()
    kw = {k.strip(): ast.literal_eval(v) for k, v in
          (item.split("=", 1) for item in ns.train.replace(",", " ").split())}
    cfg = TrainConfig(**kw)
    train_chars = cfg.max_tokens * 12
    if train_chars > len(text) - EVAL_CHARS:
        raise SystemExit("calibration and evaluation text would overlap")
    preds, t_train = None, None
    if not ns.retrain:
        try:
            preds = Predictors.load(ns.dir, model.manifest)
            if preds.meta.get("config") != asdict(cfg):  # other knobs: retrain
                preds = None
        except fi.FlashFormatError:
            preds = None
    if preds is None:
        t0 = time.perf_counter()
        ids = model.tokenizer.encode(text[:train_chars])
        preds = train_predictors(model, ids, cfg, progress=False)
        t_train = time.perf_counter() - t0
    report = format_report(preds)
    print(report.splitlines()[-2] if "mean" in report else report, file=sys.stderr)

    ids = model.tokenizer.encode(text[-EVAL_CHARS:])
    need = ns.windows * ns.window_tokens
    ids = ids[-need:]
    windows = [ids[i * ns.window_tokens:(i + 1) * ns.window_tokens] for i in range(ns.windows)]
    sim = Simulator(model, preds)
    if ns.check_only:
        for c in ns.caps:
            s = Setting("capped", "predictor", compute="cached", k=4, cap=c)
            print(check_against_runtime(ns.dir, sim, s, windows[0], 48))
        return 0

    settings = [Setting("dense", "dense")]
    settings += [Setting(f"oracle {int(100 * s)}% sparse", "oracle", sparsity=s) for s in ns.oracle]
    settings += [Setting(f"predictor p>{t:g}, predicted", "predictor", threshold=t)
                 for t in ns.thresholds]
    settings += [Setting(f"predictor p>{t:g}, cached k={k}", "predictor", threshold=t,
                         compute="cached", k=k) for t in ns.cached_thresholds for k in KS]
    settings += [Setting(f"predictor p>0.5, cached k=4, cache {int(100 * c)}% of FFN",
                         "predictor", compute="cached", k=4, cap=c) for c in ns.caps]
    settings += [Setting(f"oracle 50% sparse, cached k=4, cache {int(100 * c)}% of FFN",
                         "oracle", sparsity=0.5, compute="cached", k=4, cap=c)
                 for c in ns.caps if c >= 0.5]
    L, f = sim.L, sim.f
    rec = int(model.manifest["bundle"]["record_bytes"])
    ffn_mib = L * f * rec / 2**20
    rows, base = [], None
    t_eval = time.perf_counter()
    for s in settings:
        r = sim.run(s, windows)
        if base is None:
            base = r.ppl
        n = r.n_tok
        comp = 100 * r.computed / (n * L * f)
        ks = [s.k] if s.compute == "cached" else (KS if s.kind != "dense" else [])
        if not ks:
            rows.append((s.name, "-", r.ppl, "", f"{comp:.1f}", "0 (resident)", "100"))
        for k in ks:
            ld = r.loaded[k] / (n * L * f)
            rows.append((s.name, k, r.ppl, f"{100 * (r.ppl / base - 1):+.1f}%", f"{comp:.1f}",
                         f"{100 * ld:.1f}% / {ld * ffn_mib:.2f} MiB",
                         f"{100 * r.held[k] / (n * L * f):.1f}"))
        print(f"  {s.name}: ppl {r.ppl:.3f}", file=sys.stderr, flush=True)
    t_eval = time.perf_counter() - t_eval

    head = ("| setting | window k | perplexity | vs dense | FFN computed / token (%) | "
            "FFN read from flash / token (% of FFN / MiB) | cache size (% of FFN) |\n"
            "|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(
        f"| {a} | {b} | {c:.3f} | {d} | {e} | {g} | {h} |" for a, b, c, d, e, g, h in rows)
    print(table)
    check = ""
    if not ns.no_check:
        s = Setting("predictor p>0.5, predicted", "predictor", threshold=0.5, k=4)
        check = check_against_runtime(ns.dir, sim, s, windows[0], 48)
        s2 = Setting("predictor p>0.5, cached k=2", "predictor", threshold=0.5,
                     compute="cached", k=2)
        check += "\n" + check_against_runtime(ns.dir, sim, s2, windows[0], 48)
        print(check, file=sys.stderr)
    if ns.write:
        cmd = "python benchmarks/sparse_quality.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
        meta = preds.meta
        out = [
            "# Sparse inference quality on SmolLM2-135M-Instruct (fp16)", "",
            f"- date: {datetime.date.today().isoformat()}; git commit: {commit}",
            f"- machine: {machine()}, {load0:.1f} at the start (shared with another "
            "engineer's disk benchmarks)",
            f"- command: `{cmd.strip()}`",
            f"- predictors: {meta.get('tokens')} calibration tokens from the head of the "
            f"Wikipedia excerpt, config {meta.get('config')}; training took "
            f"{meta.get('seconds', {}).get('total', float('nan')):.1f} s"
            + (f" (this run: {t_train:.1f} s)" if t_train else " (reused)"),
            f"- perplexity: {ns.windows} windows x {ns.window_tokens} tokens from the last "
            f"{EVAL_CHARS} characters of the excerpt (not used for training); each setting is "
            f"decoded token by token (per-token masks, see the script's docstring); "
            f"evaluation took {t_eval:.0f} s",
            "- bytes: neurons entering the window's union per token x record size "
            f"({rec} B), averaged over every token (each window starts cold); the FFN is "
            f"{ffn_mib:.1f} MiB", "",
            "Training report (held-out 10% of the calibration tokens, mean over layers):", "",
            "```", "\n".join(report.splitlines()[-2:]), "```", "",
            table, "",
            "Simulation vs runtime:", "", "```", check, "```", ""]
        path = HERE / "RESULTS_sparse.md"
        keep = ""  # hand-written analysis below the generated part survives a re-run
        if path.is_file() and "\n## Findings" in path.read_text():
            keep = path.read_text()[path.read_text().index("\n## Findings"):]
        path.write_text("\n".join(out) + keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training the low-rank activation predictors on calibration text (needs torch: the `torch` extra).

1. Record, with the dense model, every layer's FFN input x and activations h on the text (the
   LM head is skipped: recording needs no logits).
2. Label a neuron active when h != 0 (ReLU/FATReLU models) or when |h| exceeds the layer's
   threshold t_l, calibrated so that a `sparsity` fraction of activations falls below it
   (non-ReLU models: |act(gate.x) * up.x|, CATS/TEAL-style).
3. Per layer, fit score = (x @ A) @ B + b with the paper's balanced loss (binary cross-entropy
   with positives weighted by negatives/positives), starting from a truncated SVD of the
   gate (or up) projection, with Adam on small random batches.
4. Optionally shift each layer's bias so that at probability 0.5 the predictor finds a
   `recall` fraction of the training tokens' active neurons (the runtime's
   predictor_threshold then moves around that point).
5. Report recall, precision, predicted-active fraction and the share of |h| the predicted
   neurons carry ("mass") on held-out tokens.

Measured on SmolLM2-135M (benchmarks/RESULTS_sparse.md): a linear low-rank predictor of
SwiGLU magnitudes ranks neurons only moderately well, and neither rank (32..256), calibration
tokens (2k..8k) nor more optimizer steps move it; the operating point (`recall`) is what
decides perplexity. The defaults are chosen from that table.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .predictor import Calibration, LayerPredictor, Predictors


@dataclass
class TrainConfig:
    """Predictor training knobs (defaults measured on SmolLM2-135M: RESULTS_sparse.md)."""

    rank: int = 64                 # rank of most layers
    rank_last: int = 64            # rank of the last `last_layers` layers
    last_layers: int = 3
    sparsity: float = 0.5          # non-ReLU models: fraction of |activation| labelled inactive
    recall: Optional[float] = 0.9  # shift biases to this training recall at p=0.5 (None: off)
    max_tokens: int = 4096         # calibration tokens recorded
    window: int = 256              # tokens per recorded sequence
    epochs: int = 6                # passes over the training tokens
    batch: int = 256               # tokens per Adam step
    lr: float = 1e-2
    holdout: float = 0.1           # fraction of tokens kept for the report
    seed: int = 0
    threads: int = 0               # torch threads while training (0: all cores)
    # What to build: "sketch" (4-bit gate/up copy: ranks neurons under a DRAM budget; no
    # training, no torch) and/or "lowrank" (the paper's predictors; needs torch). Empty: the
    # default for the model (default_methods).
    methods: tuple = ()


METHODS = ("sketch", "lowrank")


def default_methods(args) -> tuple:
    """ReLU models: the paper's low-rank predictors (exact zeros are what they learn). Gated
    non-ReLU models (SwiGLU, GeGLU): the 4-bit sketch, which ranks their activations far better
    under a budget (benchmarks/RESULTS_sparse.md)."""
    return ("lowrank",) if args.hidden_act in ("relu", "fatrelu") else ("sketch",)


def ids_digest(token_ids) -> str:
    """What a set of predictors was calibrated on (their meta keeps it): sha256 of the ids."""
    import hashlib

    return hashlib.sha256(np.asarray(list(token_ids), np.int64).tobytes()).hexdigest()


class _Recorded(Exception):
    """Raised by the recording observer after the last layer: no LM head needed."""


def record(model, token_ids: Sequence[int], cfg: TrainConfig, progress: bool = True):
    """Run the dense model over the text; return (x float16 [L, N, d], |h| float16 [L, N, f],
    the residual stream's norm at each FFN float32 [L, N])."""
    from tqdm.auto import tqdm

    from .evaluate import bos_id, windows_of

    if model.sparse:
        raise ValueError("record activations with a dense model: load(dir) without sparse options")
    a = model.args
    L = a.num_hidden_layers
    # every window starts with BOS where the tokenizer starts texts with one (Gemma): the
    # activations recorded are those of text as the model sees it (only the first window had
    # it before, so 15 of 16 windows recorded off-distribution activations)
    wins = windows_of(token_ids, cfg.window, max(1, cfg.max_tokens // cfg.window),
                      bos=bos_id(model))
    if not wins:
        raise ValueError(f"calibration text has {len(token_ids)} tokens; "
                         f"need at least {cfg.window}")
    n = sum(len(w) for w in wins)
    xs = np.empty((L, n, a.hidden_size), np.float16)
    hs = np.empty((L, n, a.intermediate_size), np.float16)
    rs = np.empty((L, n), np.float32)
    pos = 0

    def observe(layer, x, h, ref_norm):
        xs[layer, pos:pos + len(x)] = x
        np.abs(h, out=h)
        hs[layer, pos:pos + len(x)] = h
        rs[layer, pos:pos + len(x)] = ref_norm
        if layer == L - 1:
            raise _Recorded

    tr = model.transformer
    tr.observer = observe
    try:
        for w in tqdm(wins, desc="recording activations", disable=not progress, leave=False):
            try:
                tr.forward(w, model.new_cache())
            except _Recorded:
                pass
            pos += len(w)
    finally:
        tr.observer = None
    return xs, hs, rs


def label_thresholds(model, hs, sparsity: float) -> tuple[str, list[float]]:
    """("nonzero", zeros) for ReLU models, else ("magnitude", per-layer |h| quantiles)."""
    if model.args.hidden_act in ("relu", "fatrelu"):
        return "nonzero", [0.0] * len(hs)
    out = []
    for h in hs:  # a strided sample keeps the quantile cheap and its error ~1e-3
        flat = np.asarray(h).reshape(-1)
        step = max(1, flat.size // 1_000_000)
        out.append(float(np.quantile(flat[::step].astype(np.float32), sparsity)))
    return "magnitude", out


def calibrate(model, hs, resid_norms, points: int = 64, xs=None) -> Calibration:
    """Per-layer statistics of the neurons' contributions |h_j| * ||down_j|| on the recorded
    tokens (hs: |h| [L, N, f]; resid_norms [L, N]): the mean contribution of each neuron, and
    the FFN output error when each token keeps only its k largest contributions, as
    sqrt(sum of the dropped contributions squared) / ||residual stream||, at points + 1
    values of k. The error is what the memory plan equalizes across layers when it sizes
    each layer's neuron cache (per-layer budgets). With the FFN inputs `xs` [L, N, d] of a
    gated model, also each neuron's mean |up_j . x| (the gate sketch's scale)."""
    from .sketch import down_norms

    a = model.args
    f = a.intermediate_size
    dn = down_norms(model.ffn.kernel, model.ffn.rows_by_layer)
    ks = np.unique(np.round(np.linspace(0, f, points + 1)).astype(np.int64))
    hot = np.empty((len(hs), f), np.float32)
    err = np.empty((len(hs), ks.size), np.float32)
    for layer in range(len(hs)):
        s = np.asarray(hs[layer], np.float32) * dn[layer]          # [N, f]
        hot[layer] = s.mean(0)
        s2 = np.sort(np.square(s, dtype=np.float64), axis=1)         # ascending
        small = np.concatenate([np.zeros((s2.shape[0], 1)), np.cumsum(s2, axis=1)], axis=1)
        dropped = small[:, f - ks]                                   # keep k: drop the f-k smallest
        norm = np.maximum(np.asarray(resid_norms[layer], np.float64), 1e-30)[:, None]
        err[layer] = (np.sqrt(dropped) / norm).mean(0)
    up_mean = None
    if xs is not None and a.gated and len(xs) and np.asarray(xs[0]).shape[0]:
        up_mean = np.empty((len(hs), f), np.float32)
        for layer in range(len(hs)):
            up = model.ffn.part_f32(layer, "up")                     # [f, d]
            x = np.asarray(xs[layer])
            acc = np.zeros(f, np.float64)
            for t in range(0, x.shape[0], 1024):                     # [<=1024, f] at a time
                acc += np.abs(x[t:t + 1024].astype(np.float32) @ up.T).sum(0)
            up_mean[layer] = acc / x.shape[0]
    return Calibration(hot, ks, err, dn, up_mean)


def _svd_init(model, layer: int, rank: int):
    """A, B from the truncated SVD of the gate (gated) or up projection: score ~ preactivation."""
    a = model.args
    w = model.ffn.part_f32(layer, "gate" if a.gated else "up").astype(np.float64)  # [f, d]
    # The top right singular vectors from the d x d Gram matrix: ~5x faster than an SVD of w.
    evals, v = np.linalg.eigh(w.T @ w)
    r = min(rank, w.shape[0], w.shape[1])
    v = v[:, ::-1][:, :r]
    A = v.astype(np.float32)                # [d, r]
    B = (w @ v).T.astype(np.float32)        # [r, f] = (U S)^T
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def fit_layer(x: np.ndarray, y: np.ndarray, A0: np.ndarray, B0: np.ndarray, cfg: TrainConfig,
              recall: Optional[float] = None, center: bool = True) -> LayerPredictor:
    """Train one layer's predictor; x [N, d] float, y [N, f] bool.

    The SVD start is scaled to unit score spread and, with `center` (magnitude labels), its
    bias set to minus the mean score, so that a few hundred small Adam steps suffice (for
    ReLU labels the uncentred start, the pre-activation itself, is already the right
    boundary). With `recall`, the bias is then shifted so that the predictor (p > 0.5) finds
    that fraction of the active neurons in x.
    """
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    Y = torch.from_numpy(np.ascontiguousarray(y, np.float32))
    A = torch.nn.Parameter(torch.from_numpy(np.array(A0, np.float32)))
    B = torch.nn.Parameter(torch.from_numpy(np.array(B0, np.float32)))
    b = torch.nn.Parameter(torch.zeros(B0.shape[1]))
    n = X.shape[0]
    with torch.no_grad():
        s = (X @ A) @ B
        scale = 1.0 / max(float(s.std()), 1e-12)
        B.mul_(scale)
        if center:
            b.copy_(-s.mean(0) * scale)
    pos = float(Y.mean())
    pos_weight = torch.tensor(min(max((1 - pos) / max(pos, 1e-6), 1.0), 50.0))
    opt = torch.optim.Adam([A, B, b], lr=cfg.lr)
    steps = max(0, math.ceil(cfg.epochs * n / cfg.batch))  # 0 epochs: the SVD start only
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        idx = torch.randint(0, n, (min(cfg.batch, n),), generator=g)
        loss = bce((X[idx] @ A) @ B + b, Y[idx], pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        if recall is not None and 0 < recall < 1:
            s = ((X @ A) @ B + b)[Y.bool()].numpy()
            if s.size:
                # shift so that `recall` of the positive scores end up above 0
                b.sub_(float(np.quantile(s, 1 - recall)))
    return LayerPredictor(A.detach().numpy().copy(), B.detach().numpy().copy(),
                          b.detach().numpy().copy())


def evaluate_layer(p: LayerPredictor, x: np.ndarray, h: np.ndarray, truth: np.ndarray,
                   threshold: float = 0.5) -> dict:
    """Recall, precision, predicted fraction and |h| mass of p's per-token sets on (x, h)."""
    pred = p.scores(np.asarray(x, np.float32)) > math.log(threshold / (1 - threshold))
    tp = float((pred & truth).sum())
    h = np.asarray(h, np.float32)
    return {"recall": tp / max(float(truth.sum()), 1.0),
            "precision": tp / max(float(pred.sum()), 1.0),
            "true_active": float(truth.mean()), "predicted_active": float(pred.mean()),
            "mass": float((h * pred).sum() / max(float(h.sum()), 1e-30))}


def train_predictors(model, token_ids: Sequence[int], cfg: Optional[TrainConfig] = None,
                     progress: bool = True, save: bool = True) -> Predictors:
    """Record the dense model on `token_ids`, calibrate, build what `cfg.methods` asks for (the
    4-bit sketch file and/or one low-rank predictor per layer), save it into the model directory
    (``predictors.npz``, ``ffn_sketch.bin``) and return it with a report in ``meta``."""
    from tqdm.auto import tqdm

    if getattr(model, "backend", "native") != "native" or getattr(model, "sparse", False):
        raise ValueError("train_predictors records the dense model on the native backend: "
                         f"load {model.directory} with flashinfer_py.load(dir) (no backend, "
                         "device or budget options); the predictors it writes serve every "
                         "backend")
    cfg = cfg or TrainConfig()
    methods = tuple(cfg.methods) or default_methods(model.args)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, not {list(methods)}")
    torch = None
    if "lowrank" in methods:
        try:
            import torch
        except ImportError:
            raise ImportError('training the low-rank predictors needs torch: pip install '
                              '"flashinfer_py[train]" (the default for SwiGLU/GeGLU models, '
                              'the 4-bit sketch, needs no torch)') from None
        torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    xs, hs, rs = record(model, token_ids, cfg, progress)
    t_record = time.perf_counter() - t0
    cal = calibrate(model, hs, rs, xs=xs)
    label, thresholds = label_thresholds(model, hs, cfg.sparsity)
    L = model.args.num_hidden_layers
    n = xs.shape[1]
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = min(max(1, int(n * cfg.holdout)), n - 1) if n > 1 else 0
    val, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
    report = []
    sketch_meta = None
    if "sketch" in methods:
        sketch_meta = _build_sketch(model, save)
        if n_val:
            report += evaluate_sketch(model, xs[:, val], hs[:, val], cal.down_norm)
            if cal.up_mean is not None:  # what --sketch gate would rank (4-bit records' default)
                report += evaluate_sketch(model, xs[:, val], hs[:, val], cal.down_norm,
                                          kind="gate", up_mean=cal.up_mean)
    layers = []
    if "lowrank" in methods:
        # ReLU labels are exact zeros: no recall shift needed (or wanted) at the paper's 0.5.
        recall = cfg.recall if label == "magnitude" else None
        old_threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            for layer in tqdm(range(L), desc="training predictors", disable=not progress,
                              leave=False):
                x = xs[layer].astype(np.float32)
                y = (hs[layer] > np.float16(thresholds[layer]) if label == "magnitude"
                     else hs[layer] > 0)
                rank = cfg.rank_last if layer >= L - cfg.last_layers else cfg.rank
                rank = min(rank, model.args.hidden_size)
                A0, B0 = _svd_init(model, layer, rank)
                p = fit_layer(x[tr], y[tr], A0, B0, cfg, recall, center=label == "magnitude")
                r = {"layer": layer, "rank": rank}
                if n_val:
                    r.update(evaluate_layer(p, x[val], hs[layer][val], y[val]))
                report.append(r)
                layers.append(p)
        finally:
            torch.set_num_threads(old_threads)
    manifest = model.manifest
    sha = manifest["checksums"][manifest["files"]["bundles"]]["sha256"]
    preds = Predictors(layers, label, thresholds, sha, meta={
        "report": report, "config": asdict(cfg), "methods": list(methods), "tokens": int(n),
        "heldout_tokens": int(n_val), "calibration_ids_sha256": ids_digest(token_ids),
        "seconds": {"record": round(t_record, 2),
                    "total": round(time.perf_counter() - t0, 2)}},
        calibration=cal, sketch=sketch_meta)
    if save:
        preds.save(model.directory)
    return preds


def _build_sketch(model, save: bool) -> dict:
    """Write ``ffn_sketch.bin`` next to the weights (when saving); its description."""
    from .format import file_digest
    from .sketch import SKETCH_BITS, SKETCH_FILE, sketch_parts, sketch_record_bytes, write_sketch

    a = model.args
    meta = {"file": SKETCH_FILE, "bits": SKETCH_BITS, "parts": sketch_parts(a),
            "record_bytes": sketch_record_bytes(a), "sha256": None}
    if save:
        path = model.directory / SKETCH_FILE
        write_sketch(a, model.ffn.kernel.layout, model.ffn.rows_by_layer, path)
        meta["sha256"] = file_digest(path)["sha256"]
    return meta


def evaluate_sketch(model, xs, hs, down_norm, keep: float = 0.5, kind: str = "full",
                    up_mean=None) -> list[dict]:
    """Per layer, on held-out tokens: the share of the true contribution mass that the sketch's
    top `keep` fraction of neurons carries, against the true top `keep` fraction's share.
    kind "gate": the gate sketch (RuntimeConfig.sketch), scaled by `up_mean` as the runtime
    scales it."""
    from .sketch import quantize_rows, score_scale, sketch_record_bytes, sketch_scores

    a = model.args
    f = a.intermediate_size
    k = max(1, int(round(keep * f)))
    ids = np.arange(f, dtype=np.int64)
    out = []
    for layer, rows in enumerate(model.ffn.rows_by_layer):
        sk = np.empty((f, sketch_record_bytes(a, kind)), np.uint8)
        quantize_rows(a, model.ffn.kernel.layout, rows, ids, sk, ids, kind)
        scale = score_scale(kind, down_norm[layer], None if up_mean is None else up_mean[layer])
        got = best = 0.0
        for x, h in zip(np.asarray(xs[layer], np.float32), np.asarray(hs[layer], np.float32)):
            s = h * down_norm[layer]
            est = sketch_scores(a, kind, x, sk, scale)
            got += s[np.argpartition(-est, k - 1)[:k]].sum()
            best += s[np.argpartition(-s, k - 1)[:k]].sum()
        out.append({"layer": layer, "method": "sketch" if kind == "full" else "gate sketch",
                    "keep": keep, "sketch_mass": float(got / max(best, 1e-30))})
    return out


def format_report(preds: Predictors) -> str:
    """Per-layer held-out recall / precision / predicted fraction, and the mean over layers."""
    rows = []
    for method, name in (("sketch", "4-bit sketch"),
                         ("gate sketch", "gate sketch (--sketch gate, half the bytes)")):
        sk = [r for r in preds.meta.get("report", [])
              if "sketch_mass" in r and r.get("method", "sketch") == method]
        if not sk:
            continue
        m = [r["sketch_mass"] for r in sk]
        rows.append(f"{name}: on held-out calibration tokens its top "
                    f"{100 * sk[0]['keep']:.0f}% of each "
                    f"layer's neurons carry {100 * np.mean(m):.1f}% of the contribution the true "
                    f"top {100 * sk[0]['keep']:.0f}% carries (layers {100 * min(m):.1f}-"
                    f"{100 * max(m):.1f}%)")
    rep = [r for r in preds.meta.get("report", []) if "recall" in r]
    if rep:
        rows.append("layer  rank  recall  precision  true-active  predicted-active   mass")
    for r in rep:
        rows.append(f"{r['layer']:5d}  {r['rank']:4d}  {r['recall']:6.3f}  {r['precision']:9.3f}  "
                    f"{r['true_active']:11.3f}  {r['predicted_active']:16.3f}  "
                    f"{r.get('mass', float('nan')):5.3f}")
    if rep:
        m = {k: float(np.mean([r.get(k, np.nan) for r in rep]))
             for k in ("recall", "precision", "true_active", "predicted_active", "mass")}
        rows.append(f"mean         {m['recall']:6.3f}  {m['precision']:9.3f}  "
                    f"{m['true_active']:11.3f}  {m['predicted_active']:16.3f}  {m['mass']:5.3f}")
    sec = preds.meta.get("seconds")
    if sec:
        rows.append(f"({preds.meta.get('tokens', 0)} calibration tokens, "
                    f"{preds.meta.get('heldout_tokens', 0)} of them held out at random: the "
                    f"calibration text's own tokens, so these figures are in-domain, not a "
                    f"measure on other text; recorded in {sec['record']:.1f} s, "
                    f"{sec['total']:.1f} s in all)")
    return "\n".join(rows)


def read_texts(paths: Iterable[str]) -> str:
    """Concatenate calibration text files (UTF-8; undecodable bytes replaced)."""
    out = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return "\n\n".join(out)

"""Training the low-rank activation predictors on calibration text (needs torch: the `torch` extra).

1. Record, with the dense model, every layer's FFN input x and activations h on the text.
2. Label a neuron active when h != 0 (ReLU/FATReLU models) or when |h| exceeds the layer's
   threshold t_l, calibrated so that a `sparsity` fraction of activations falls below it
   (non-ReLU models, CATS/TEAL-style).
3. Per layer, fit score = (x @ A) @ B + b with the paper's balanced loss (binary cross-entropy
   with positives weighted by negatives/positives), starting from a truncated SVD of the
   gate (or up) projection. Report recall, precision and predicted-active fraction on held-out
   tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .predictor import LayerPredictor, Predictors


@dataclass
class TrainConfig:
    """Predictor training knobs (defaults measured on SmolLM2-135M; see README)."""

    rank: int = 64                 # rank of most layers
    rank_last: int = 256           # rank of the last `last_layers` layers (the sensitive ones)
    last_layers: int = 3
    sparsity: float = 0.5          # non-ReLU models: fraction of |activation| treated as zero
    max_tokens: int = 8192         # calibration tokens recorded
    window: int = 256              # tokens per recorded sequence
    epochs: int = 12
    batch: int = 512
    lr: float = 3e-3
    holdout: float = 0.1           # fraction of tokens kept for the report
    seed: int = 0


def record(model, token_ids: Sequence[int], cfg: TrainConfig, progress: bool = True):
    """Run the dense model over the text; return per-layer (x float16 [N, d], |h| float16 [N, f])."""
    from tqdm.auto import tqdm

    from .evaluate import windows_of

    if model.sparse:
        raise ValueError("record activations with a dense model: load(dir) without sparse options")
    L = model.args.num_hidden_layers
    xs: list = [[] for _ in range(L)]
    hs: list = [[] for _ in range(L)]

    def observe(layer, x, h):
        xs[layer].append(x.astype(np.float16))
        hs[layer].append(np.abs(h).astype(np.float16))

    wins = windows_of(token_ids, cfg.window, max(1, cfg.max_tokens // cfg.window))
    if not wins:
        raise ValueError(f"calibration text has {len(token_ids)} tokens; need at least {cfg.window}")
    model.transformer.observer = observe
    try:
        for w in tqdm(wins, desc="recording activations", disable=not progress, leave=False):
            model.logits(w)
    finally:
        model.transformer.observer = None
    return [np.concatenate(x) for x in xs], [np.concatenate(h) for h in hs]


def label_thresholds(model, hs: list, sparsity: float) -> tuple[str, list[float]]:
    if model.args.hidden_act in ("relu", "fatrelu"):
        return "nonzero", [0.0] * len(hs)
    return "magnitude", [float(np.quantile(h.astype(np.float32), sparsity)) for h in hs]


def _svd_init(model, layer: int, rank: int):
    """A, B from the truncated SVD of the gate (gated) or up projection: score ~ preactivation."""
    a = model.args
    rows = model.ffn.rows_by_layer[layer]
    part = a.hidden_size if a.gated else 0
    from .format import to_float32

    w = to_float32(rows[:, part:part + a.hidden_size], model.dtype).astype(np.float32)  # [f, d]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    r = min(rank, len(s))
    return vt[:r].T.copy(), (u[:, :r] * s[:r]).T.copy()  # A [d, r], B [r, f]


def fit_layer(x: np.ndarray, y: np.ndarray, A0: np.ndarray, B0: np.ndarray, cfg: TrainConfig):
    """Train one layer's predictor; x [N, d] float, y [N, f] bool."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.from_numpy(x.astype(np.float32))
    Y = torch.from_numpy(y.astype(np.float32))
    A = torch.nn.Parameter(torch.from_numpy(A0))
    B = torch.nn.Parameter(torch.from_numpy(B0))
    b = torch.nn.Parameter(torch.zeros(B0.shape[1]))
    pos = float(Y.mean())
    pos_weight = torch.tensor(min(max((1 - pos) / max(pos, 1e-6), 1.0), 50.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam([A, B, b], lr=cfg.lr)
    n = X.shape[0]
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch):
            idx = perm[i:i + cfg.batch]
            loss = loss_fn((X[idx] @ A) @ B + b, Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return LayerPredictor(A.detach().numpy().copy(), B.detach().numpy().copy(),
                          b.detach().numpy().copy())


def train_predictors(model, token_ids: Sequence[int], cfg: Optional[TrainConfig] = None,
                     progress: bool = True, save: bool = True) -> Predictors:
    """Record activations on `token_ids`, train one predictor per layer, save them into the
    model directory (``predictors.npz``) and return them with a per-layer report in ``meta``."""
    try:
        import torch
    except ImportError:
        raise ImportError('training predictors needs torch: pip install "flashinfer_py[torch]"') from None
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    xs, hs = record(model, token_ids, cfg, progress)
    label, thresholds = label_thresholds(model, hs, cfg.sparsity)
    L = model.args.num_hidden_layers
    layers, report = [], []
    rng = np.random.default_rng(cfg.seed)
    for layer in tqdm(range(L), desc="training predictors", disable=not progress, leave=False):
        x, h = xs[layer], hs[layer].astype(np.float32)
        y = h > thresholds[layer]
        n = x.shape[0]
        order = rng.permutation(n)
        n_val = max(1, int(n * cfg.holdout))
        val, tr = order[:n_val], order[n_val:]
        rank = cfg.rank_last if layer >= L - cfg.last_layers else cfg.rank
        rank = min(rank, model.args.hidden_size)
        A0, B0 = _svd_init(model, layer, rank)
        p = fit_layer(x[tr], y[tr], A0, B0, cfg)
        pred = p.scores(x[val].astype(np.float32)) > 0
        truth = y[val]
        tp = float((pred & truth).sum())
        report.append({
            "layer": layer, "rank": rank,
            "recall": tp / max(float(truth.sum()), 1.0),
            "precision": tp / max(float(pred.sum()), 1.0),
            "true_active": float(truth.mean()), "predicted_active": float(pred.mean()),
        })
        layers.append(p)
    manifest = model.manifest
    sha = manifest["checksums"][manifest["files"]["bundles"]]["sha256"]
    preds = Predictors(layers, label, thresholds, sha, meta={
        "report": report, "config": cfg.__dict__, "tokens": int(sum(x.shape[0] for x in xs[:1]))})
    if save:
        preds.save(model.directory)
    return preds


def format_report(preds: Predictors) -> str:
    rows = ["layer  rank  recall  precision  true-active  predicted-active"]
    for r in preds.meta["report"]:
        rows.append(f"{r['layer']:5d}  {r['rank']:4d}  {r['recall']:6.3f}  {r['precision']:9.3f}  "
                    f"{r['true_active']:11.3f}  {r['predicted_active']:16.3f}")
    rep = preds.meta["report"]
    rows.append(f"mean         {np.mean([r['recall'] for r in rep]):6.3f}  "
                f"{np.mean([r['precision'] for r in rep]):9.3f}  "
                f"{np.mean([r['true_active'] for r in rep]):11.3f}  "
                f"{np.mean([r['predicted_active'] for r in rep]):16.3f}")
    return "\n".join(rows)


def read_texts(paths: Iterable[str]) -> str:
    """Concatenate calibration text files (UTF-8; undecodable bytes replaced)."""
    out = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return "\n\n".join(out)

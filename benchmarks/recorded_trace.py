"""A trace of predicted neuron sets recorded from a real model, mapped to the OPT-6.7B shape.

``paper_table.py --trace smollm2`` drives its rows with this trace instead of the synthetic
one (``paper_table.make_trace``, whose reuse statistics are chosen parameters). Here the
per-token sets come from SmolLM2-135M-Instruct (the embedded model,
``flashinfer_py.default_model``: 30 layers, d_ff 1536, SwiGLU) decoding real text one token at
a time, so the token-to-token reuse and the popularity skew are the model's own; only the
fraction of the FFN per layer is still chosen (the paper's, as in the synthetic trace).

**What "predicted set" means for a gated model.** OPT is ReLU: a neuron is truly active when
its activation is non-zero, and the paper's predictors predict ~3x the truly active neurons
(~10% of the FFN per token). SmolLM2 is SwiGLU and has no exact zeros (DATA.md: 13% of
|down_proj input| < 1e-2), so "active" has to be a threshold. We use each neuron's exact
contribution to the FFN output, ``|silu(gate.x) * (up.x)| * ||down_j||`` (the quantity
``train.calibrate`` ranks neurons by and DATA.md found far cheaper in perplexity to threshold
than |silu(gate)| alone), and, per layer, a fixed threshold (not a per-token top-k: a
predictor's sigmoid > 0.5, like a ReLU, lets the count vary from token to token):
- predicted set: contribution above the layer's (1 - 3 a_l) quantile,
- truly active set: contribution above the layer's (1 - a_l) quantile (a subset),
with a_l the paper's truly active fraction at that depth (``paper_table.active_fractions``:
1.5% in the first layer to 5.4% in the last, mean 3.3%), so each layer's mean fraction is the
synthetic trace's and the two traces differ only in *which* neurons each token uses. The
quantiles are taken over the recorded tokens themselves (in-sample; the first token, which
has no context, is left out of them), so the mean fraction is exact and the per-token count
varies as the model's contributions do.
We use the exact sets rather than the trained predictors' (``predictors.npz``): those are
trained on labels at 50% sparsity (|h| above the layer median), five times the paper's
predicted fraction, and thresholding their scores at 10% would rank by a predictor calibrated
for another operating point. Exact sets are what a perfect predictor at the paper's fraction
would return; a real one adds misses and false positives, which lower reuse, so this trace's
reuse is an upper bound in that respect. At ~10% kept, SmolLM2's own perplexity would suffer
(DATA.md: 80% sparse already raises KJV 12.7 -> 23): the trace is a record of set dynamics,
not a claim that SmolLM2 runs well at this sparsity.

**Text.** ``corpora.wikipedia_excerpt()``, from the first line break after its last 200 000
characters (the part the predictors were not calibrated on), tokenized, the first N tokens
decoded one at a time through a KV cache (``Transformer.forward`` of the dense model with its
``observer`` hook, which hands over every neuron's activation per layer).

**Mapping to the OPT shape** (``opt_layer_map`` and ``widen``):
- Layers 30 -> 32: OPT layer l takes SmolLM2 layer round(l * 29 / 31), the nearest layer at
  the same relative depth; SmolLM2 layers 7 and 22 each serve two OPT layers (7, 8 and 23,
  24), all others one. The two OPT layers of a shared layer are thresholded at their own
  fractions (nested sets of one layer's contributions, so highly correlated), and the
  layer-mean statistics weight those two SmolLM2 layers twice.
- Neurons 1536 -> 16384 (10.67 each): SmolLM2 neuron j becomes a block of 10 or 11 OPT
  neurons (1024 blocks of 11, 512 of 10; which neurons get 11 is a seeded random choice, so
  block size is independent of popularity), and each OPT layer's 16384 ids are a seeded
  random permutation of the blocks' ids, so a block is scattered over the file and reads stay
  16 KiB records at random offsets, as in the synthetic trace (contiguous blocks would merge
  into 176 KiB reads and flatter the I/O). A set maps to the union of its neurons' blocks.
- What this preserves: per-token fraction (exactly in expectation; the 10/11 block sizes add
  a small noise, ~1% relative), token-to-token reuse and the window's new / union fractions
  (the same, up to the same block-size noise, since every set operation acts on whole
  blocks), and the popularity skew as a distribution (each SmolLM2 neuron's frequency is
  repeated by ~10.67 OPT neurons).
- What it distorts: the granularity. The 10-11 OPT neurons of a block are always used
  together, whereas a real OPT layer has 16384 neurons with partial correlation; per-token
  counts vary like 1536 neurons' (about 3.3x the relative spread 16384 independent neurons
  would give), and nothing finer than a block is ever reused or missed. The runtime's cache
  and window treat each OPT neuron on its own, so the block structure changes no mechanism,
  only the statistics' granularity.

**The look-ahead guess** (``guess``, for issue 16's "lookahead" row of paper_table.py): what
``overlap="ahead"`` does on a real model, recorded. While layer s - 1 computes, the runtime
guesses layer s's neurons from layer s - 1's FFN input; recorded here as layer s's exact
contribution rule applied to that input, ``|silu(gate_s.x_{s-1}) * (up_s.x_{s-1})| *
||down_j||``, thresholded at its own (1 - 3 a_l) quantile (``guess``: as large as the
predicted set on average) and at its (1 - a_l) quantile (``guess_top``: its most confident
third, fewer wrong reads for fewer right ones). Source layer 0 has no layer before it: no
guess (the runtime guesses layer 0 from its attention input; not recorded). Widened with the
same blocks and permutations as the predicted sets, so a right guess is the same OPT ids. The
two OPT layers of a shared source layer (7, 8 and 23, 24) both get source s's guess from
source s - 1's input, though in OPT order the second follows the same source layer: both
omissions make the recorded look-ahead slightly worse than the runtime's.

The recorded sets are saved under ``cache_root()/bench`` (``smollm2-trace-32layers.npz``: bit-packed
predicted, truly active and guessed masks at SmolLM2's width, per OPT layer, plus the layer map,
thresholds and token ids; about 1.5 MB for 320 tokens) and recorded again when missing, shorter than needed
or made with other parameters. The widening to 16384 runs at load (deterministic, seeded).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

VERSION = 3  # 2: the look-ahead guess; 3: and its most confident third
SMOL_LAYERS, SMOL_FF = 30, 1536
TEXT_TAIL = 200_000
DEFAULT_TOKENS = 320


def trace_path(n_opt_layers: int = 32) -> Path:
    """The saved trace for `n_opt_layers` target layers (the thresholds are per target
    layer, so each layer count has its own file)."""
    from flashinfer_py.default_model import cache_root

    return cache_root() / "bench" / f"smollm2-trace-{n_opt_layers}layers.npz"


def opt_layer_map(n_opt: int, n_src: int) -> np.ndarray:
    """Source layer of each of `n_opt` layers: the nearest at the same relative depth."""
    if n_opt == 1:
        return np.zeros(1, np.int64)
    return np.rint(np.arange(n_opt) * (n_src - 1) / (n_opt - 1)).astype(np.int64)


def _np_act(name: str, param: float = 0.0):
    """The FFN activation in numpy (float32), as the kernels compute it (kernels.h), for the
    guesses' own products."""
    if name == "silu":
        return lambda z: z / (1.0 + np.exp(-z))
    if name == "relu":
        return lambda z: np.maximum(z, 0.0)
    if name == "fatrelu":
        return lambda z: np.where(z > param, z, 0.0).astype(np.float32)
    if name == "gelu":  # exact, with erf
        from math import erf

        verf = np.vectorize(erf, otypes=[np.float64])
        return lambda z: (0.5 * z * (1.0 + verf(z / np.sqrt(2.0)))).astype(np.float32)
    if name == "gelu_tanh":
        return lambda z: 0.5 * z * (1.0 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))
    raise ValueError(f"no numpy activation for {name!r}")


def contributions(model, ids, progress=None):
    """Decode `ids` one token at a time through a dense `model` (flashinfer_py.load) and
    return two float32 [layers, len(ids), d_ff] arrays: each neuron's |act(gate.x) * up.x| *
    ||down_j|| (act(x) alone for an ungated FFN) per layer and token, from the transformer's
    ``observer`` hook; and the look-ahead guess of it, layer s's rule on layer s - 1's FFN
    input (zeros for layer 0)."""
    from flashinfer_py.sketch import down_norms

    a = model.args
    dn = down_norms(model.ffn.kernel, model.ffn.rows_by_layer)  # [L, d_ff]
    c = np.empty((a.num_hidden_layers, len(ids), a.intermediate_size), np.float32)
    g = np.zeros_like(c)
    up = [model.ffn.part_f32(i, "up") for i in range(a.num_hidden_layers)]
    gate = ([model.ffn.part_f32(i, "gate") for i in range(a.num_hidden_layers)] if a.gated
            else None)
    act = _np_act(a.hidden_act, a.act_param)
    bias = getattr(model.ffn, "bias", [None] * a.num_hidden_layers)  # OPT's fc1 bias
    pos = 0

    def observe(layer, x, h, ref_norm):  # one token per forward: h is [1, d_ff]
        np.multiply(np.abs(h[0]), dn[layer], out=c[layer, pos])
        n = layer + 1
        if n < a.num_hidden_layers:  # the next layer's neurons, guessed from this input
            u = up[n] @ x[0]
            if bias[n] is not None:
                u = u + bias[n]
            hh = act(gate[n] @ x[0]) * u if gate is not None else act(u)
            np.multiply(np.abs(hh), dn[n], out=g[n, pos])

    tr = model.transformer
    tr.observer = observe
    cache = model.new_cache()
    try:
        for pos, t in enumerate(ids):
            tr.forward([int(t)], cache, last_only=True)
            if progress and pos % 64 == 63:
                progress(pos + 1)
    finally:
        tr.observer = None
    return c, g


def record_contributions(n_tokens: int, threads: int = 1, progress=None):
    """`contributions` (and their guesses) of the embedded SmolLM2 over the first `n_tokens`
    tokens of the held-out Wikipedia text; and the token ids."""
    import flashinfer_py as fi
    from flashinfer_py.corpora import wikipedia_excerpt
    from flashinfer_py.default_model import default_model_dir

    model = fi.load(default_model_dir(), threads=threads)
    text = wikipedia_excerpt()[-TEXT_TAIL:]
    ids = model.tokenizer.encode(text[text.index("\n") + 1:])[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, {n_tokens} asked")
    c, g = contributions(model, ids, progress)
    return c, g, np.asarray(ids, np.int32)


def threshold_sets(c: np.ndarray, layer_map: np.ndarray, fractions: np.ndarray,
                   skip: int = 1):
    """Masks [len(layer_map), T, d_ff] of the neurons whose contribution in source layer
    layer_map[l] exceeds that layer's (1 - fractions[l]) quantile over tokens >= `skip`; and
    the thresholds."""
    n, t, f = len(layer_map), c.shape[1], c.shape[2]
    masks = np.empty((n, t, f), bool)
    th = np.empty(n, np.float64)
    for i, s in enumerate(layer_map):
        th[i] = np.quantile(c[s, skip:], 1.0 - fractions[i])
        masks[i] = c[s] > th[i]
    return masks, th


def record(n_tokens: int, n_opt_layers: int, active: np.ndarray, predicted_over_active: float,
           path: Path | None = None, log=print) -> Path:
    """Record the trace and save it (see the module docstring); `active` [n_opt_layers]: the
    truly active fraction of each OPT layer."""
    path = path or trace_path(n_opt_layers)
    t0 = time.time()
    c, g, ids = record_contributions(
        n_tokens, progress=lambda n: log(f"  recording SmolLM2's sets: {n}/{n_tokens} tokens"))
    lmap = opt_layer_map(n_opt_layers, c.shape[0])
    pred, th_p = threshold_sets(c, lmap, predicted_over_active * active)
    true, th_t = threshold_sets(c, lmap, active)
    guess, th_g = threshold_sets(g, lmap, predicted_over_active * active)  # layer 0: empty
    top, th_gt = threshold_sets(g, lmap, active)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(tmp, version=VERSION, d_ff=c.shape[2], n_src_layers=c.shape[0],
                        pred=np.packbits(pred, axis=-1), true=np.packbits(true, axis=-1),
                        guess=np.packbits(guess, axis=-1), threshold_guess=th_g,
                        guess_top=np.packbits(top, axis=-1), threshold_guess_top=th_gt,
                        layer_map=lmap, threshold_pred=th_p, threshold_true=th_t,
                        active=np.asarray(active, np.float64),
                        predicted_over_active=predicted_over_active, token_ids=ids)
    tmp.rename(path)
    log(f"  recorded {n_tokens} tokens of SmolLM2 in {time.time() - t0:.0f} s -> {path}")
    return path


def _matches(z, n_tokens: int, n_opt_layers: int, active, predicted_over_active) -> bool:
    return (int(z["version"]) == VERSION and z["pred"].shape[0] == n_opt_layers
            and z["pred"].shape[1] >= n_tokens
            and z["active"].shape == np.shape(active) and np.allclose(z["active"], active)
            and float(z["predicted_over_active"]) == predicted_over_active)


def load_masks(n_tokens: int, n_opt_layers: int, active: np.ndarray,
               predicted_over_active: float, path: Path | None = None, log=print) -> dict:
    """The saved masks (unpacked, [n_opt_layers, T >= n_tokens, d_ff] bool) and metadata,
    recording them first when the file is missing or does not fit."""
    path = path or trace_path(n_opt_layers)
    z = None
    if path.exists():
        try:
            z = np.load(path)
            if not _matches(z, n_tokens, n_opt_layers, active, predicted_over_active):
                z = None
        except (OSError, ValueError, KeyError):
            z = None
    if z is None:
        record(max(n_tokens, DEFAULT_TOKENS), n_opt_layers, active, predicted_over_active,
               path, log)
        z = np.load(path)
    f = int(z["d_ff"])
    masks = ("pred", "true", "guess", "guess_top")
    out = {k: z[k] for k in z.files if k not in masks}
    for k in masks:
        out[k] = np.unpackbits(z[k], axis=-1, count=f).astype(bool)
    return out


def block_map(d_src: int, d_dst: int, seed: int = 0) -> list[np.ndarray]:
    """For each of d_src source neurons, its block of destination ids before the per-layer
    permutation: sizes d_dst // d_src or one more (the larger ones at seeded random neurons),
    together a partition of range(d_dst)."""
    base, extra = divmod(d_dst, d_src)
    sizes = np.full(d_src, base, np.int64)
    sizes[np.random.default_rng(seed).choice(d_src, extra, replace=False)] += 1
    ends = np.cumsum(sizes)
    return [np.arange(e - s, e) for s, e in zip(sizes, ends)]


def widen(masks: np.ndarray, d_dst: int, seed: int = 0):
    """Sets at width d_src (bool masks [layers, T, d_src]) -> [layer][token] sorted int32 ids
    at width d_dst: each source neuron's block (``block_map``) under a per-layer random
    permutation of range(d_dst)."""
    n_layers, n_tok, d_src = masks.shape
    blocks = block_map(d_src, d_dst, seed)
    width = max(b.size for b in blocks)
    rng = np.random.default_rng(seed + 1)
    out = []
    for layer in range(n_layers):
        perm = rng.permutation(d_dst).astype(np.int32)
        table = np.full((d_src, width), -1, np.int32)  # each source neuron's ids, -1 padded
        for j, b in enumerate(blocks):
            table[j, :b.size] = perm[b]
        per_tok = []
        for t in range(n_tok):
            ids = table[masks[layer, t]].ravel()
            per_tok.append(np.sort(ids[ids >= 0]))
        out.append(per_tok)
    return out


def masks_to_sets(masks: np.ndarray):
    """bool [layers, T, d] -> [layer][token] sorted int32 ids (no widening)."""
    return [[np.flatnonzero(m).astype(np.int32) for m in layer] for layer in masks]


def smollm2_trace(n_tokens: int, n_opt_layers: int, d_ff: int, active: np.ndarray,
                  predicted_over_active: float, path: Path | None = None, log=print,
                  start: int = 0):
    """(pred, true, guess) at the OPT shape, [layer][token] -> sorted int32 ids, for recorded
    tokens start .. start + n_tokens - 1 (guess: {"guess": ..., "guess_top": ...}); and the
    native (unwidened) masks' dict."""
    m = load_masks(start + n_tokens, n_opt_layers, active, predicted_over_active, path, log)
    sl = slice(start, start + n_tokens)
    pred = widen(m["pred"][:, sl], d_ff, seed=0)
    true = widen(m["true"][:, sl], d_ff, seed=0)  # the same blocks: true stays in pred
    guess = {k: widen(m[k][:, sl], d_ff, seed=0)  # and a right guess is the same ids
             for k in ("guess", "guess_top")}
    return pred, true, guess, m


def guess_stats(pred, guess, skip: int = 0) -> dict:
    """How good the look-ahead guess is, [layer][token] id sets: recall (the share of a
    layer's predicted set the guess held) and precision (the share of the guess the layer
    then predicted), means over tokens >= `skip` and over the layers that have a guess."""
    rec, prec = [], []
    for p_l, g_l in zip(pred, guess):
        pairs = list(zip(p_l, g_l))[skip:]
        if not any(q.size for _, q in pairs):  # a layer without a guess (layer 0)
            continue
        for p, q in pairs:  # an empty guess of a guessed layer: recall 0
            hit = np.intersect1d(p, q, assume_unique=True).size
            rec.append(hit / max(p.size, 1))
            if q.size:
                prec.append(hit / q.size)
    return {"recall": float(np.mean(rec)) if rec else 0.0,
            "precision": float(np.mean(prec)) if prec else 0.0}

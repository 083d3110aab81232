"""The transformer forward pass on CPU: numpy for the small ops, the native kernels for every
product with a stored weight (kept in its storage format: float or blocks of 8 or 4 bits), and
an FFN that reads its neurons from bundle records (all resident here; streamed from flash by
the sparse runtime).

Shapes: T = tokens in this call, d = hidden_size, H/Hkv = heads, hd = head_dim.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import kernels
from .config import ModelArgs, RuntimeConfig
from .dtypes import storage_format, to_float32

if TYPE_CHECKING:
    from .resident_stream import ResidentStream


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """`tokens` as a flat int64 array, or a ValueError when empty, not one sequence, or out
    of the vocabulary."""
    arr = np.asarray(tokens)
    if arr.ndim > 1:  # a batch would be run as one long sequence: refuse it
        raise ValueError(f"token ids must be one sequence (a 1-D list or array), got shape "
                         f"{arr.shape}; run each sequence on its own")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {arr.dtype}")
    tokens = arr.astype(np.int64).reshape(-1)
    if tokens.size == 0:
        raise ValueError("forward() needs at least one token")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}); got "
                         f"{tokens.min()}..{tokens.max()}")
    return tokens


class KVCache:
    """Per-layer keys and values in float32, grown in steps of `step` positions."""

    def __init__(self, args: ModelArgs, max_context: int, step: int = 256):
        self.n_layers, self.h, self.hd = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.max_context, self.step = max_context, step
        self.k = [self._empty((self.h, 0, self.hd)) for _ in range(self.n_layers)]
        self.v = [self._empty((self.h, 0, self.hd)) for _ in range(self.n_layers)]
        self.size = 0

    def _empty(self, shape):
        """A new key or value buffer (a device cache makes its own: backends/common.py)."""
        return np.empty(shape, np.float32)

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [Hkv, T, hd] at positions size..size+T; return all keys/values so far."""
        start, t = self.size, k.shape[1]
        end = start + t
        if end > self.max_context:
            raise ValueError(f"context of {end} tokens exceeds max_context={self.max_context}; "
                             "raise RuntimeConfig.max_context (or --max-context) or start a new session")
        if end > self.k[layer].shape[1]:
            cap = min(self.max_context, -(-end // self.step) * self.step)
            for buf in (self.k, self.v):
                grown = self._empty((self.h, cap, self.hd))
                grown[:, :start] = buf[layer][:, :start]
                buf[layer] = grown
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def append1(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store one position's k, v [Hkv, hd] (append for a single token, decode)."""
        pos = self.size
        if pos + 1 > self.k[layer].shape[1]:
            self.append(layer, k[:, None], v[:, None])
            return
        self.k[layer][:, pos] = k
        self.v[layer][:, pos] = v

    def advance(self, t: int) -> None:
        self.size += t

    def reset(self) -> None:
        self.size = 0

    def truncate(self, size: int) -> None:
        """Forget every position from `size` on (the next append writes there)."""
        if not 0 <= size <= self.size:
            raise ValueError(f"cannot truncate a cache of {self.size} positions to {size}")
        self.size = size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def _rope_inv_freq(dim: int, theta: float, scaling: Optional[dict],
                   long: bool = False) -> np.ndarray:
    """Inverse frequencies of RoPE over `dim` rotated elements, with llama3, linear or
    longrope scaling (`long`: longrope's factors for sequences past the original context)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind = scaling.get("rope_type", "llama3") if scaling else None  # older manifests: llama3
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "longrope":
        return inv / np.asarray(scaling["long_factor" if long else "short_factor"], np.float64)
    if kind == "llama3":  # long wavelengths slowed by `factor`, a smooth ramp in between
        factor, lo, hi, old = (scaling["factor"], scaling["low_freq_factor"],
                               scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [H, T, hd]; rotate-half convention of Hugging Face Llama on the first cos.shape[-1]
    elements of each head (all of them unless the rotary factor is partial)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    out = rot * cos + np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1) * sin
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _softcap(x: np.ndarray, cap: Optional[float]) -> np.ndarray:
    return x if cap is None else np.float32(cap) * np.tanh(x / np.float32(cap))


class _Rope:
    """Each layer's rotary frequencies. Sliding-window layers may have their own base (Gemma 3);
    longrope switches to its long factors, and scales cos/sin, once a call's sequence passes
    the original context (as transformers decides it: per call)."""

    def __init__(self, a: ModelArgs):
        s = a.rope_scaling or {}
        longrope = s.get("rope_type") == "longrope"
        self.long_after = s["original_max_position_embeddings"] if longrope else None
        self.gain = float(s["attention_factor"]) if longrope else 1.0
        self.short = self._per_layer(a, long=False)
        self.long = self._per_layer(a, long=True) if longrope else self.short
        self._tables: dict = {}  # id(inverse frequencies) -> (cos, sin) [positions, dim]

    @staticmethod
    def _per_layer(a: ModelArgs, long: bool) -> list[np.ndarray]:
        full = _rope_inv_freq(a.rotary_dim, a.rope_theta, a.rope_scaling, long)
        local = full
        if a.rope_local_base_freq is not None:
            local = _rope_inv_freq(a.rotary_dim, a.rope_local_base_freq, None)
        return [local if a.window(i) else full for i in range(a.num_hidden_layers)]

    def cos_sin(self, layer: int, pos0: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, rotary_dim] float32 for positions pos0..pos0+t-1."""
        end = pos0 + t
        long = self.long_after is not None and end > self.long_after
        return self._angles((self.long if long else self.short)[layer], pos0, end)

    def _angles(self, inv: np.ndarray, pos0: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        ang = np.arange(pos0, end, dtype=np.float64)[:, None] * inv
        ang = np.concatenate([ang, ang], axis=-1)
        return (np.cos(ang) * self.gain).astype(np.float32), (np.sin(ang) * self.gain).astype(np.float32)

    def row(self, layer: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [rotary_dim] of one position (decode): rows of a table per frequency set,
        computed as cos_sin computes them and grown by doubling, so a token does not pay for
        a dozen numpy calls per layer."""
        long = self.long_after is not None and pos + 1 > self.long_after
        inv = (self.long if long else self.short)[layer]
        tab = self._tables.get(id(inv))
        if tab is None or pos >= len(tab[0]):
            n = max(256, 2 * (pos + 1), 0 if tab is None else 2 * len(tab[0]))
            tab = self._angles(inv, 0, n)
            self._tables[id(inv)] = tab
        return tab[0][pos], tab[1][pos]


class Transformer:
    """Decoder-only transformer over resident tensors and an FFN row provider.

    `ffn` is any object with ``forward(layer, x, act_out=None) -> out [T, d]``: layer
    `layer`'s FFN (without the output bias) for the normalized input x [T, d], computed on
    bundle records (all resident for a dense model; the neuron cache for sparse inference).
    `act_out` [T, d_ff], when given, receives every neuron's activation (dense models only).
    """

    def __init__(self, args: ModelArgs, dense: dict, formats: dict, ffn, runtime: RuntimeConfig,
                 streamed: Optional[tuple] = None):
        """`formats`: the storage format of each resident matrix (format.resident_formats).
        `streamed`: (path of dense.safetensors, its header entries, the names of the matrices
        left there), read every token by a resident_stream.ResidentStream; `dense` lacks
        them."""
        self.args, self.w, self.ffn, self.runtime = args, dense, ffn, runtime
        self.threads = runtime.threads  # the kernels' compute threads (0: every core)
        self.formats = {n: storage_format(f).name for n, f in formats.items()}
        self.rope = _Rope(args) if args.uses_rope else None
        self.stream = self._open_stream(*streamed) if streamed and streamed[2] else None
        head = "tok_embeddings" if args.tie_word_embeddings else "lm_head"
        self._fuse_qkv()
        self._interleave()
        self.lm_head, self.lm_head_fmt = self.w[head], self.formats[head]
        # each layer's norm weights for the one-token block (_block1): pre-norm RMSNorm models
        a = args
        self._norms1 = None
        if a.pre_norm and a.norm == "rmsnorm":
            self._norms1 = [
                (dense[f"layers.{i}.attn_norm"], dense[f"layers.{i}.ffn_norm"],
                 dense.get(f"layers.{i}.attn_post_norm") if a.post_norms else None,
                 dense.get(f"layers.{i}.ffn_post_norm") if a.post_norms else None,
                 dense.get(f"layers.{i}.ffn_down_bias") if a.ffn_bias else None)
                for i in range(a.num_hidden_layers)]
        # each layer's constants of the one-token attention (_attention1), looked up once
        dims = (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.q_dim, a.kv_dim,
                a.norm_eps, a.attn_logit_softcapping or 0.0)
        self._dec = []
        for i in range(a.num_hidden_layers):
            p = f"layers.{i}."
            self._dec.append((dims, a.window(i), dense.get(p + "q_norm") if a.qk_norm else None,
                              dense.get(p + "k_norm") if a.qk_norm else None,
                              (dense[p + "wo"], self.formats[p + "wo"],
                               dense.get(p + "bo") if a.attention_out_bias else None)))
        self.scale = 1.0 / math.sqrt(args.query_pre_attn_scalar or args.head_dim)
        # observer(layer, ffn_input [T, d], activations [T, d_ff], ref_norm [T]): set to
        # record activations (predictor training, dense models); ref_norm is the norm of the
        # residual stream the FFN output joins, in units of the FFN's own output.
        self.observer = None
        # ffn.prefetch(layer, guess [T, d]): the FFN provider starts reading what the layer
        # will probably need from the attention's input, normalized as the FFN's input will
        # be, before the attention runs (RuntimeConfig.overlap="ahead")
        self._ahead = ffn.prefetch if getattr(ffn, "wants_prefetch", False) else None

    def _open_stream(self, path, entries: dict, names) -> "ResidentStream":
        """The stream of the matrices `names` left in dense.safetensors (resident_stream.py):
        each gets a StreamedMatrix in self.w, and the stream reads them in the order a
        forward pass uses them (per layer q/k/v, fused as _fuse_qkv fuses them, then o; the
        LM head last). The input embedding, when left there, is read a row at a time."""
        from .resident_stream import ResidentStream, streamed_matrix

        names, a = set(names), self.args
        head = "tok_embeddings" if a.tie_word_embeddings else "lm_head"
        mats, order = {}, []

        def add(key, tensors):
            m = streamed_matrix(key, tensors, entries, self.formats[tensors[0]])
            mats[key] = m
            order.append(key)
            return m

        for i in range(a.num_hidden_layers):
            p = f"layers.{i}."
            qkv = [p + "wq", p + "wk", p + "wv"]
            if not any(n in names for n in qkv + [p + "wo"]):
                continue
            if len({self.formats[n] for n in qkv}) == 1:
                try:
                    m = add(p + "qkv", qkv)
                    for n in qkv:  # the fused matrix stands for the three (see _fuse_qkv)
                        self.w[n] = m
                except ValueError:  # not one run of rows in the file: three matrices
                    pass
            for n in qkv + [p + "wo"]:
                if n not in self.w:
                    self.w[n] = add(n, [n])
        if head in names:
            self.w[head] = add(head, [head])
        embed = None
        if "tok_embeddings" in names:
            embed = (mats[head] if head == "tok_embeddings"
                     else streamed_matrix("tok_embeddings", ["tok_embeddings"], entries,
                                          self.formats["tok_embeddings"]))
            self.w["tok_embeddings"] = embed
        return ResidentStream(path, mats, order, self.runtime.use_direct_io, embed)

    def _fuse_qkv(self) -> None:
        """Each layer's q, k and v projections as one matrix (rows stacked; their biases too),
        so a token makes one kernel call instead of three: SmolLM2's k and v are 192 x 576,
        too small to stream well on their own. The dict's wq/wk/wv become views of it. (A
        layer whose matrices stay on flash is fused by _open_stream.)"""
        from .resident_stream import StreamedMatrix

        self.qkv = []
        for i in range(self.args.num_hidden_layers):
            p = f"layers.{i}."
            names = [p + "wq", p + "wk", p + "wv"]
            ws = [self.w[n] for n in names]
            fmt = self.formats[names[0]]
            bias = None
            if self.args.attention_bias:
                bias = np.concatenate([self.w[p + "bq"], self.w[p + "bk"], self.w[p + "bv"]])
            if isinstance(ws[0], StreamedMatrix):
                self.qkv.append((ws[0], fmt, bias) if ws[0] is ws[1] else None)
                continue
            if any(self.formats[n] != fmt for n in names) or len({w.shape[1] for w in ws}) != 1:
                self.qkv.append(None)  # mixed formats: three calls
                continue
            w = np.concatenate(ws, axis=0)
            rows = np.cumsum([0] + [x.shape[0] for x in ws])
            for n, a, b in zip(names, rows[:-1], rows[1:]):
                self.w[n] = w[a:b]
            self.qkv.append((w, fmt, bias))

    def _interleave(self) -> None:
        """Resident 4-bit matrices with 16 rows interleaved (kernels.Interleaved) where the
        CPU runs the interleaved kernels (kernels.interleaves): the fused q/k/v, the output
        projections and the LM head (the embedding lookup of a tied one reads its rows back).
        Each is interleaved in its row-major array's own memory (kernels.interleave consume),
        or, with rows not a multiple of 16, into a new array that replaces it."""
        self._fused_rows = {}  # name -> (layer, first row, end) in an interleaved qkv
        if not any(kernels.interleaves(f) for f in self.formats.values()):
            return
        a = self.args

        def il(w, fmt, k):
            if not isinstance(w, np.ndarray) or not kernels.interleaves(fmt):
                return w  # streamed from flash, or a format without interleaving
            return kernels.interleave(w, fmt, k, consume=True)  # the model holds the only copy

        for i, fused in enumerate(self.qkv):
            p = f"layers.{i}."
            if fused is not None:
                w, fmt, bias = fused
                w2 = il(w, fmt, a.hidden_size)
                if w2 is not w:
                    self.qkv[i] = (w2, fmt, bias)
                    r0 = 0
                    for n in ("wq", "wk", "wv"):  # only the fused matrix is used: its rows
                        r1 = r0 + self.w[p + n].shape[0]
                        self._fused_rows[p + n] = (i, r0, r1)
                        del self.w[p + n]
                        r0 = r1
            self.w[p + "wo"] = il(self.w[p + "wo"], self.formats[p + "wo"], a.q_dim)
        head = "tok_embeddings" if a.tie_word_embeddings else "lm_head"
        self.w[head] = il(self.w[head], self.formats[head], a.embed_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of the resident tensors (a fused q/k/v counted once: through its q/k/v views,
        or, interleaved, as the matrix that replaced them)."""
        return (sum(v.nbytes for v in self.w.values())
                + sum(self.qkv[layer][0].nbytes
                      for layer in {i for i, _, _ in self._fused_rows.values()}))

    def weight(self, name: str) -> np.ndarray:
        """Resident tensor `name` as stored (a block-format matrix: its row-major uint8 blocks,
        even where the model keeps it interleaved)."""
        if name in self._fused_rows:
            layer, r0, r1 = self._fused_rows[name]
            return self.qkv[layer][0].take(np.arange(r0, r1))
        w = self.w[name]
        if isinstance(w, kernels.Interleaved):
            return w.take(np.arange(w.rows))
        return w

    def _mm(self, x: np.ndarray, w, fmt: str, bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x @ w.T (+ bias): w resident, or left on flash (a StreamedMatrix) and read now."""
        x = np.ascontiguousarray(x)
        if self.stream is not None and not isinstance(w, (np.ndarray, kernels.Interleaved)):
            return self.stream.linear(x, w, bias, self.threads)
        return kernels.linear(x, w, bias=bias, fmt=fmt, threads=self.threads)

    # ------------------------------------------------------------------ small ops
    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMSNorm or LayerNorm over the last axis (q/k norms: per head, x [H, T, hd])."""
        w = self.w[name]
        if self.args.norm == "rmsnorm":
            if x.flags.c_contiguous and x.dtype == np.float32:
                return kernels.rms_norm(x, w, self.args.norm_eps)
            var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
            return (x / np.sqrt(var + self.args.norm_eps)) * w
        mu = x.mean(-1, keepdims=True)
        var = np.mean(np.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.args.norm_eps) * w + self.w[name + "_bias"]

    def _linear(self, x: np.ndarray, name: str, bias: Optional[str] = None) -> np.ndarray:
        b = self.w[bias] if bias is not None else None
        w = self.w[name]
        if (not isinstance(w, (np.ndarray, kernels.Interleaved))
                and w.key != name):  # q, k or v of a fused streamed matrix
            raise RuntimeError(f"{name} is streamed as part of {w.key}")
        return self._mm(x, w, self.formats[name], b)

    def _rows(self, name: str, idx: np.ndarray, width: int) -> np.ndarray:
        """Rows `idx` (of `width` values) of an embedding matrix as float32."""
        w = self.w[name]
        if isinstance(w, np.ndarray):
            rows = w[idx]
        elif isinstance(w, kernels.Interleaved):
            rows = w.take(idx)
        else:
            rows = self.stream.rows(idx)
        return to_float32(rows, self.formats[name], width)

    def _embed(self, tokens: np.ndarray, pos0: int) -> np.ndarray:
        a = self.args
        x = self._rows("tok_embeddings", tokens, a.embed_dim)
        if a.embed_scale != 1.0:
            x *= np.float32(a.embed_scale)
        if a.projects_embeddings:  # OPT-350m: embeddings are narrower than the model
            x = self._linear(x, "project_in")
        if not a.uses_rope:
            idx = np.arange(pos0, pos0 + len(tokens)) + a.learned_pos_offset
            x = x + self._rows("pos_embeddings", idx, a.hidden_size)
        return np.ascontiguousarray(x, np.float32)

    # ------------------------------------------------------------------ blocks
    def _attention(self, layer: int, x: np.ndarray, cache: KVCache) -> np.ndarray:
        a, p = self.args, f"layers.{layer}."
        t, pos0 = x.shape[0], cache.size
        bias = a.attention_bias
        fused = self.qkv[layer]
        if fused is not None:
            w, fmt, b = fused
            qkv = self._mm(x, w, fmt, b)
            if t == 1:
                return self._attention1(layer, qkv[0], cache)
            qd, kd = a.q_dim, a.kv_dim
            q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
        else:
            q = self._linear(x, p + "wq", p + "bq" if bias else None)
            k = self._linear(x, p + "wk", p + "bk" if bias else None)
            v = self._linear(x, p + "wv", p + "bv" if bias else None)
        q = q.reshape(t, a.num_attention_heads, a.head_dim).transpose(1, 0, 2)  # [H, T, hd]
        k = k.reshape(t, a.num_key_value_heads, a.head_dim).transpose(1, 0, 2)
        v = v.reshape(t, a.num_key_value_heads, a.head_dim).transpose(1, 0, 2)
        if a.qk_norm:
            q, k = self._norm(q, p + "q_norm"), self._norm(k, p + "k_norm")
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(layer, pos0, t)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        keys, values = cache.append(layer, k, v)  # [Hkv, S, hd], S = pos0 + T
        out = self._attend(layer, q, keys, values, pos0)  # [T, H * hd]
        return self._linear(out, p + "wo", p + "bo" if a.attention_out_bias else None)

    def _attention1(self, layer: int, qkv: np.ndarray, cache: KVCache) -> np.ndarray:
        """_attention for one token (decode), on the fused q/k/v output qkv [q_dim + 2 kv_dim]:
        the norms, RoPE and attention in native code (ops.h), in place on qkv."""
        pos = cache.size
        (h, hkv, hd, qd, kd, eps, softcap), window, q_norm, k_norm, wo = self._dec[layer]
        q = qkv[:qd].reshape(h, hd)
        k = qkv[qd:qd + kd].reshape(hkv, hd)
        v = qkv[qd + kd:].reshape(hkv, hd)
        if q_norm is not None:
            kernels.rms_norm(q, q_norm, eps, out=q)
            kernels.rms_norm(k, k_norm, eps, out=k)
        if self.rope is not None:
            cos, sin = self.rope.row(layer, pos)
            kernels.rope(q, cos, sin)
            kernels.rope(k, cos, sin)
        cache.append1(layer, k, v)
        first = max(0, pos - window + 1) if window else 0
        out = kernels.attend1(q, cache.k[layer], cache.v[layer], first, pos + 1, self.scale,
                              softcap)
        return self._mm(out.reshape(1, qd), wo[0], wo[1], wo[2])

    def _attend(self, layer: int, q: np.ndarray, keys: np.ndarray, values: np.ndarray,
                pos0: int) -> np.ndarray:
        """Softmax attention of q [H, T, hd] over the cached keys/values [Hkv, S, hd]."""
        a = self.args
        t, hkv, window = q.shape[1], a.num_key_value_heads, a.window(layer)
        first = max(0, pos0 - window + 1) if window else 0  # older keys are outside every window
        keys, values = keys[:, first:], values[:, first:]
        g = a.num_attention_heads // hkv
        scores = (q.reshape(hkv, g * t, a.head_dim) @ keys.transpose(0, 2, 1))
        scores = _softcap(scores * np.float32(self.scale), a.attn_logit_softcapping)
        scores = scores.reshape(hkv, g, t, -1)  # [Hkv, g, T, S']
        s = scores.shape[-1]
        query_pos = (pos0 + np.arange(t))[:, None]
        key_pos = first + np.arange(s)[None, :]
        hidden = key_pos > query_pos  # [T, S']: causal
        if window:
            hidden |= key_pos <= query_pos - window
        scores = np.where(hidden, np.float32(-np.inf), scores)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        out = probs.reshape(hkv, g * t, s) @ values  # [Hkv, g*T, hd]
        return out.reshape(a.num_attention_heads, t, a.head_dim).transpose(1, 0, 2).reshape(t, a.q_dim)

    def _ffn(self, layer: int, x: np.ndarray, resid: np.ndarray, post: Optional[str] = None):
        """FFN output for the normalized input x, then the post-FFN norm `post` if any;
        tells the observer about the neurons and the stream the output joins (resid)."""
        act = None
        if self.observer is not None:
            act = np.empty((x.shape[0], self.args.intermediate_size), np.float32)
        f = self.ffn.forward(layer, x, act)
        if self.args.ffn_bias:
            f += self.w[f"layers.{layer}.ffn_down_bias"]
        added = self._norm(f, post) if post else f
        if self.observer is not None:
            # the residual's norm in units of the raw FFN output (a post-norm rescales it)
            ref = np.linalg.norm(resid, axis=-1)
            if post:
                ref *= np.linalg.norm(f, axis=-1) / np.maximum(np.linalg.norm(added, axis=-1),
                                                               1e-30)
            self.observer(layer, x, act, ref)
        return added

    def _block(self, layer: int, x: np.ndarray, cache: KVCache) -> np.ndarray:
        a, p = self.args, f"layers.{layer}."
        if self._ahead is not None:
            self._ahead(layer, self._norm(x, p + "ffn_norm") if a.pre_norm else x)
        if not a.pre_norm:  # OPT's post-LayerNorm (opt-350m)
            x = self._norm(x + self._attention(layer, x, cache), p + "attn_norm")
            return self._norm(x + self._ffn(layer, x, x), p + "ffn_norm")
        h = self._attention(layer, self._norm(x, p + "attn_norm"), cache)
        if a.post_norms:  # Gemma normalizes each sublayer's output too
            h = self._norm(h, p + "attn_post_norm")
        x = x + h
        return x + self._ffn(layer, self._norm(x, p + "ffn_norm"), x,
                             p + "ffn_post_norm" if a.post_norms else None)

    def _block1(self, layer: int, x: np.ndarray, cache: KVCache) -> np.ndarray:
        """_block for one token of a pre-norm RMSNorm model (every family but OPT): the same
        operations with the layer's norm weights looked up once, the residual added in place
        (x is this forward's own array), no observer."""
        attn_norm, ffn_norm, attn_post, ffn_post, ffn_bias = self._norms1[layer]
        eps = self.args.norm_eps
        if self._ahead is not None:
            self._ahead(layer, kernels.rms_norm(x, ffn_norm, eps))
        h = self._attention(layer, kernels.rms_norm(x, attn_norm, eps), cache)
        if attn_post is not None:
            kernels.rms_norm(h, attn_post, eps, out=h)
        x += h
        f = self.ffn.forward(layer, kernels.rms_norm(x, ffn_norm, eps), None)
        if ffn_bias is not None:
            f += ffn_bias
        if ffn_post is not None:
            kernels.rms_norm(f, ffn_post, eps, out=f)
        x += f
        return x

    def _head_input(self, x, last_only: bool):
        """What the LM head reads: the last position only with `last_only`, after the final
        norm (pre-norm models) and the output projection (OPT-350m)."""
        a = self.args
        if last_only:
            x = x[-1:]
        if a.pre_norm:
            x = self._norm(x, "norm")
        if a.projects_embeddings:
            x = self._linear(x, "project_out")
        return x

    def forward(self, tokens, cache: KVCache, last_only: bool = False,
                head: bool = True) -> Optional[np.ndarray]:
        """Run `tokens` (continuing the sequence in `cache`) and return float32 logits
        [T, vocab] (or [1, vocab] with last_only); with head=False only the cache is
        extended and None returned (a prompt's chunks before its last: no LM head, which
        may be a matrix read from flash)."""
        a = self.args
        tokens = check_tokens(tokens, a.vocab_size)
        if self.stream is not None:
            self.stream.begin()
        x = self._embed(tokens, cache.size)
        block = (self._block1 if len(tokens) == 1 and self._norms1 is not None
                 and self.observer is None else self._block)
        for i in range(a.num_hidden_layers):
            x = block(i, x, cache)
        cache.advance(len(tokens))
        if not head:
            return None
        x = self._head_input(x, last_only)
        logits = self._mm(x, self.lm_head, self.lm_head_fmt)
        return _softcap(logits, a.final_logit_softcapping)

"""The transformer forward pass on CPU: numpy for the small ops, the native kernels for every
product with a stored weight (kept in its storage dtype), and an FFN that reads its neurons
from bundle records (all resident here; streamed from flash by the sparse runtime).

Shapes: T = tokens in this call, d = hidden_size, H/Hkv = heads, hd = head_dim.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import kernels
from .config import ModelArgs, RuntimeConfig
from .format import to_float32


class KVCache:
    """Per-layer keys and values in float32, grown in steps of `step` positions."""

    def __init__(self, args: ModelArgs, max_context: int, step: int = 256):
        self.n_layers, self.h, self.hd = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.max_context, self.step = max_context, step
        self.k = [np.empty((self.h, 0, self.hd), np.float32) for _ in range(self.n_layers)]
        self.v = [np.empty((self.h, 0, self.hd), np.float32) for _ in range(self.n_layers)]
        self.size = 0

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
                grown = np.empty((self.h, cap, self.hd), np.float32)
                grown[:, :start] = buf[layer][:, :start]
                buf[layer] = grown
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, t: int) -> None:
        self.size += t

    def reset(self) -> None:
        self.size = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def _rope_inv_freq(args: ModelArgs) -> np.ndarray:
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    s = args.rope_scaling
    if s:  # llama3: long wavelengths slowed by `factor`, a smooth ramp in between
        factor, lo, hi, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                               s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [H, T, hd]; rotate-half convention of Hugging Face Llama."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = np.concatenate([-x2, x1], axis=-1)
    return x * cos + rot * sin


class Transformer:
    """Decoder-only transformer over resident tensors and an FFN row provider.

    `ffn` is any object with ``rows(layer, x) -> (rows, up_bias, row_select)``: the bundle
    records to compute layer `layer`'s FFN with for the normalized input x [T, d] (all neurons
    for a dense model; the neuron cache for sparse inference, with row_select the rows this
    token uses, or None for all).
    """

    def __init__(self, args: ModelArgs, dense: dict, dtype: str, ffn, runtime: RuntimeConfig):
        self.args, self.w, self.dtype, self.ffn, self.runtime = args, dense, dtype, ffn, runtime
        self.part_off = args.ffn_part_offsets
        self.inv_freq = _rope_inv_freq(args) if args.uses_rope else None
        self.lm_head = dense["tok_embeddings"] if args.tie_word_embeddings else dense["lm_head"]
        self.scale = 1.0 / math.sqrt(args.head_dim)
        # observer(layer, ffn_input [T, d], activations [T, rows]): set to record activations
        # (predictor training); rows are in the FFN provider's order (neuron id for dense).
        self.observer = None

    # ------------------------------------------------------------------ small ops
    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.w[name]
        if self.args.norm == "rmsnorm":
            var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
            return (x / np.sqrt(var + self.args.norm_eps)) * w
        mu = x.mean(-1, keepdims=True)
        var = np.mean(np.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.args.norm_eps) * w + self.w[name + "_bias"]

    def _linear(self, x: np.ndarray, name: str, bias: Optional[str] = None) -> np.ndarray:
        b = self.w[bias] if bias is not None else None
        return kernels.linear(x, self.w[name], bias=b)

    def _embed(self, tokens: np.ndarray, pos0: int) -> np.ndarray:
        x = to_float32(self.w["tok_embeddings"][tokens], self.dtype)
        if not self.args.uses_rope:
            idx = np.arange(pos0, pos0 + len(tokens)) + self.args.learned_pos_offset
            x = x + to_float32(self.w["pos_embeddings"][idx], self.dtype)
        return np.ascontiguousarray(x, np.float32)

    # ------------------------------------------------------------------ blocks
    def _attention(self, layer: int, x: np.ndarray, cache: KVCache) -> np.ndarray:
        a, p = self.args, f"layers.{layer}."
        t, pos0 = x.shape[0], cache.size
        bias = a.attention_bias
        q = self._linear(x, p + "wq", p + "bq" if bias else None)
        k = self._linear(x, p + "wk", p + "bk" if bias else None)
        v = self._linear(x, p + "wv", p + "bv" if bias else None)
        q = q.reshape(t, a.num_attention_heads, a.head_dim).transpose(1, 0, 2)  # [H, T, hd]
        k = k.reshape(t, a.num_key_value_heads, a.head_dim).transpose(1, 0, 2)
        v = v.reshape(t, a.num_key_value_heads, a.head_dim).transpose(1, 0, 2)
        if self.inv_freq is not None:
            ang = np.arange(pos0, pos0 + t, dtype=np.float64)[:, None] * self.inv_freq[None, :]
            ang = np.concatenate([ang, ang], axis=-1)
            cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        keys, values = cache.append(layer, k, v)  # [Hkv, S, hd], S = pos0 + T
        g = a.num_attention_heads // a.num_key_value_heads
        qg = q.reshape(a.num_key_value_heads, g * t, a.head_dim)
        scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(self.scale)  # [Hkv, g*T, S]
        scores = scores.reshape(a.num_key_value_heads, g, t, -1)
        s = scores.shape[-1]
        causal = np.arange(s)[None, :] > (pos0 + np.arange(t))[:, None]  # [T, S]
        scores = np.where(causal, np.float32(-np.inf), scores)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        out = probs.reshape(a.num_key_value_heads, g * t, s) @ values  # [Hkv, g*T, hd]
        out = out.reshape(a.num_attention_heads, t, a.head_dim).transpose(1, 0, 2).reshape(t, a.q_dim)
        return self._linear(np.ascontiguousarray(out), p + "wo", p + "bo" if bias else None)

    def _ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        a, off = self.args, self.part_off
        rows, up_bias, select = self.ffn.rows(layer, x)
        act = None
        if self.observer is not None:
            act = np.empty((x.shape[0], rows.shape[0] if select is None else len(select)), np.float32)
        out = kernels.ffn_rows(x, rows, a.hidden_size, up_off=off["up"], down_off=off["down"],
                               gate_off=off.get("gate", -1), activation=a.hidden_act,
                               act_param=a.act_param, up_bias=up_bias, row_select=select,
                               act_out=act)
        if self.observer is not None:
            self.observer(layer, x, act)
        if a.ffn_bias:
            out += self.w[f"layers.{layer}.ffn_down_bias"]
        return out

    def forward(self, tokens, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Run `tokens` (continuing the sequence in `cache`) and return float32 logits
        [T, vocab] (or [1, vocab] with last_only)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= self.args.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.args.vocab_size}); got "
                             f"{tokens.min()}..{tokens.max()}")
        x = self._embed(tokens, cache.size)
        pre = self.args.pre_norm
        for i in range(self.args.num_hidden_layers):
            p = f"layers.{i}."
            h = self._attention(i, self._norm(x, p + "attn_norm") if pre else x, cache)
            x = x + h if pre else self._norm(x + h, p + "attn_norm")
            f = self._ffn(i, self._norm(x, p + "ffn_norm") if pre else x)
            x = x + f if pre else self._norm(x + f, p + "ffn_norm")
        cache.advance(len(tokens))
        if last_only:
            x = x[-1:]
        if pre:
            x = self._norm(x, "norm")
        return kernels.linear(np.ascontiguousarray(x), self.lm_head)


class ResidentFFN:
    """Every neuron resident in DRAM: the dense model. Rows are read once from the bundle file
    (direct I/O) into one aligned matrix per layer."""

    def __init__(self, bundle_path: str, args: ModelArgs, dense: dict, runtime: RuntimeConfig):
        from .bundles import BundleReader, ReaderParams, aligned_empty

        reader = BundleReader(bundle_path, ReaderParams(engine=runtime.io_engine,
                                                        queue_depth=runtime.queue_depth,
                                                        use_direct_io=runtime.use_direct_io))
        self.rows_by_layer = []
        ids = np.arange(args.intermediate_size, dtype=np.int32)
        for layer in range(args.num_hidden_layers):
            rows = aligned_empty((args.intermediate_size, reader.record_elems), reader.numpy_dtype)
            reader.read(layer, ids, rows)
            self.rows_by_layer.append(rows)
        self.io_stats = reader.stats()
        self.is_direct = reader.is_direct
        self.bias = [dense.get(f"layers.{i}.ffn_up_bias") for i in range(args.num_hidden_layers)]

    def rows(self, layer: int, x: np.ndarray):
        return self.rows_by_layer[layer], self.bias[layer], None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows_by_layer)

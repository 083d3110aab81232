"""The transformer forward pass on torch (cpu, cuda or mps): model.py's structure, op for op.

Every resident matrix is dequantized once, at load, from its storage format (float or the
q8_0/q4_0/q4_1 blocks) to the compute dtype on the device; norm weights stay float32 and the
norms, the softmax and the logits are computed in float32 whatever the compute dtype. The
FFN is a provider as in model.py (``backends/torch_ffn.py``): ``forward(layer, x [T, d]
tensor, act_out=None) -> [T, d] tensor``. `forward` returns float32 numpy logits, as
model.Transformer does, so the runtime, the sampler and the server do not know which
backend ran.

Shapes: T = tokens in this call, d = hidden_size, H/Hkv = heads, hd = head_dim.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs, RuntimeConfig
from ..dtypes import storage_format, to_float32
from ..model import _Rope

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"compute_dtype must be one of {', '.join(DTYPES)}, not {name!r}") from None


class TorchKVCache:
    """model.KVCache on a device: per-layer keys and values [Hkv, S, hd] in the compute
    dtype, grown in steps of `step` positions."""

    def __init__(self, args: ModelArgs, max_context: int, device, dtype, step: int = 256):
        self.n_layers, self.h, self.hd = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
        self.max_context, self.step = max_context, step
        self.device, self.dtype = device, dtype
        self.k = [torch.empty((self.h, 0, self.hd), dtype=dtype, device=device)
                  for _ in range(self.n_layers)]
        self.v = [torch.empty((self.h, 0, self.hd), dtype=dtype, device=device)
                  for _ in range(self.n_layers)]
        self.size = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [Hkv, T, hd] at positions size..size+T; return all keys/values so far."""
        start, t = self.size, k.shape[1]
        end = start + t
        if end > self.max_context:
            raise ValueError(f"context of {end} tokens exceeds max_context={self.max_context}; "
                             "raise RuntimeConfig.max_context (or --max-context) or start a new session")
        if end > self.k[layer].shape[1]:
            cap = min(self.max_context, -(-end // self.step) * self.step)
            for buf in (self.k, self.v):
                grown = torch.empty((self.h, cap, self.hd), dtype=self.dtype, device=self.device)
                grown[:, :start] = buf[layer][:, :start]
                buf[layer] = grown
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

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
        return sum(a.numel() * a.element_size() for a in self.k + self.v)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, hd]; rotate-half RoPE on the first cos.shape[-1] elements of each head."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    out = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


class _TorchRope:
    """model._Rope's tables (the same float64 angles, cast to float32) kept on the device and
    grown by doubling; positions are rows of them."""

    def __init__(self, args: ModelArgs, device):
        self.rope, self.device = _Rope(args), device
        self._tables: dict = {}  # id(inverse frequencies) -> (cos, sin) [positions, dim]

    def cos_sin(self, layer: int, pos0: int, t: int):
        r, end = self.rope, pos0 + t
        long = r.long_after is not None and end > r.long_after  # per call, as _Rope.cos_sin
        inv = (r.long if long else r.short)[layer]
        tab = self._tables.get(id(inv))
        if tab is None or end > len(tab[0]):
            n = max(256, 2 * end, 0 if tab is None else 2 * len(tab[0]))
            cos, sin = r._angles(inv, 0, n)
            tab = (torch.from_numpy(cos).to(self.device), torch.from_numpy(sin).to(self.device))
            self._tables[id(inv)] = tab
        return tab[0][pos0:end], tab[1][pos0:end]


# the input width of each resident matrix (its stored rows may be padded blocks)
def _matrix_width(args: ModelArgs, name: str) -> int:
    base = name.rsplit(".", 1)[-1]
    if base in ("tok_embeddings", "lm_head", "project_in"):
        return args.embed_dim
    if base == "wo":
        return args.q_dim
    return args.hidden_size  # wq, wk, wv, pos_embeddings, project_out


class TorchTransformer:
    """model.Transformer on torch tensors; `ffn` is a torch FFN provider (torch_ffn.py)."""

    def __init__(self, args: ModelArgs, dense: dict, formats: dict, ffn, runtime: RuntimeConfig,
                 device="cpu", dtype="float32"):
        self.args, self.ffn, self.runtime = args, ffn, runtime
        self.device, self.dtype = torch.device(device), torch_dtype(dtype)
        self.formats = {n: storage_format(f).name for n, f in formats.items()}
        self.w: dict = {}
        for name, arr in dense.items():
            if name.endswith("ffn_down_scales"):
                continue  # the FFN provider's
            if name in self.formats:  # a matrix: dequantized to the compute dtype
                w = to_float32(arr, self.formats[name], _matrix_width(args, name))
                self.w[name] = torch.from_numpy(w).to(self.device, self.dtype)
            elif name.endswith("norm") or name.endswith("norm_bias"):
                self.w[name] = torch.from_numpy(np.asarray(arr, np.float32)).to(self.device)
            else:  # biases join the compute dtype's stream
                self.w[name] = torch.from_numpy(np.asarray(arr, np.float32)).to(self.device, self.dtype)
        self.rope = _TorchRope(args, self.device) if args.uses_rope else None
        self.lm_head = self.w["tok_embeddings" if args.tie_word_embeddings else "lm_head"]
        self._fuse_qkv()
        self.scale = 1.0 / math.sqrt(args.query_pre_attn_scalar or args.head_dim)
        self.observer = None  # as model.Transformer's (numpy arrays)
        self._ahead = ffn.prefetch if getattr(ffn, "wants_prefetch", False) else None

    def _fuse_qkv(self) -> None:
        """Each layer's q, k and v projections as one matrix (and bias): one matmul a layer."""
        self.qkv = []
        for i in range(self.args.num_hidden_layers):
            p = f"layers.{i}."
            w = torch.cat([self.w.pop(p + "wq"), self.w.pop(p + "wk"), self.w.pop(p + "wv")])
            bias = None
            if self.args.attention_bias:
                bias = torch.cat([self.w.pop(p + "bq"), self.w.pop(p + "bk"), self.w.pop(p + "bv")])
            self.w[p + "wqkv"] = w
            if bias is not None:
                self.w[p + "bqkv"] = bias
            self.qkv.append((w, bias))

    def new_cache(self, max_context: int) -> TorchKVCache:
        return TorchKVCache(self.args, max_context, self.device, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    # ------------------------------------------------------------------ small ops
    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """RMSNorm or LayerNorm over the last axis in float32 (q/k norms: per head)."""
        w, eps = self.w[name], self.args.norm_eps
        xf = x.float()
        if self.args.norm == "rmsnorm":
            y = xf / torch.sqrt(xf.square().mean(-1, keepdim=True) + eps) * w
        else:
            mu = xf.mean(-1, keepdim=True)
            var = (xf - mu).square().mean(-1, keepdim=True)
            y = (xf - mu) / torch.sqrt(var + eps) * w + self.w[name + "_bias"]
        return y.to(self.dtype)

    def _linear(self, x: torch.Tensor, name: str, bias: Optional[str] = None) -> torch.Tensor:
        return F.linear(x, self.w[name], self.w[bias] if bias is not None else None)

    def _embed(self, tokens: torch.Tensor, pos0: int) -> torch.Tensor:
        a = self.args
        x = self.w["tok_embeddings"][tokens]
        if a.embed_scale != 1.0:
            x = (x.float() * float(np.float32(a.embed_scale))).to(self.dtype)
        if a.projects_embeddings:  # OPT-350m: embeddings are narrower than the model
            x = self._linear(x, "project_in")
        if not a.uses_rope:
            idx = torch.arange(pos0, pos0 + len(tokens), device=self.device) + a.learned_pos_offset
            x = x + self.w["pos_embeddings"][idx]
        return x

    # ------------------------------------------------------------------ blocks
    def _attention(self, layer: int, x: torch.Tensor, cache: TorchKVCache) -> torch.Tensor:
        a, p = self.args, f"layers.{layer}."
        t, pos0 = x.shape[0], cache.size
        w, b = self.qkv[layer]
        qkv = F.linear(x, w, b)
        qd, kd = a.q_dim, a.kv_dim
        q = qkv[:, :qd].reshape(t, a.num_attention_heads, a.head_dim).transpose(0, 1)  # [H, T, hd]
        k = qkv[:, qd:qd + kd].reshape(t, a.num_key_value_heads, a.head_dim).transpose(0, 1)
        v = qkv[:, qd + kd:].reshape(t, a.num_key_value_heads, a.head_dim).transpose(0, 1)
        if a.qk_norm:
            q, k = self._norm(q, p + "q_norm"), self._norm(k, p + "k_norm")
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(layer, pos0, t)
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        keys, values = cache.append(layer, k, v)  # [Hkv, S, hd], S = pos0 + T
        out = self._attend(layer, q, keys, values, pos0)  # [T, H * hd]
        return self._linear(out, p + "wo", p + "bo" if a.attention_out_bias else None)

    def _attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                pos0: int) -> torch.Tensor:
        """Softmax attention of q [H, T, hd] over the cached keys/values [Hkv, S, hd]
        (grouped-query: head h reads kv head h // (H / Hkv)); scores in float32."""
        a = self.args
        t, hkv, window = q.shape[1], a.num_key_value_heads, a.window(layer)
        first = max(0, pos0 - window + 1) if window else 0  # older keys are outside every window
        keys, values = keys[:, first:], values[:, first:]
        g = a.num_attention_heads // hkv
        scores = (q.reshape(hkv, g * t, a.head_dim) @ keys.transpose(1, 2)).float()
        scores = _softcap(scores * self.scale, a.attn_logit_softcapping)
        scores = scores.reshape(hkv, g, t, -1)  # [Hkv, g, T, S']
        s = scores.shape[-1]
        query_pos = (pos0 + torch.arange(t, device=self.device))[:, None]
        key_pos = first + torch.arange(s, device=self.device)[None, :]
        hidden = key_pos > query_pos  # [T, S']: causal
        if window:
            hidden |= key_pos <= query_pos - window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        out = probs.reshape(hkv, g * t, s) @ values  # [Hkv, g*T, hd]
        return out.reshape(a.num_attention_heads, t, a.head_dim).transpose(0, 1).reshape(t, a.q_dim)

    def _ffn(self, layer: int, x: torch.Tensor, resid: torch.Tensor, post: Optional[str] = None):
        """FFN output for the normalized input x, then the post-FFN norm `post` if any;
        tells the observer (numpy arrays) about the neurons and the stream they join."""
        act = None
        if self.observer is not None:
            act = np.empty((x.shape[0], self.args.intermediate_size), np.float32)
        f = self.ffn.forward(layer, x, act)
        if self.args.ffn_bias:
            f = f + self.w[f"layers.{layer}.ffn_down_bias"]
        added = self._norm(f, post) if post else f
        if self.observer is not None:
            ref = torch.linalg.vector_norm(resid.float(), dim=-1)
            if post:
                ref = ref * (torch.linalg.vector_norm(f.float(), dim=-1)
                             / torch.linalg.vector_norm(added.float(), dim=-1).clamp_min(1e-30))
            self.observer(layer, _numpy(x), act, _numpy(ref))
        return added

    def _block(self, layer: int, x: torch.Tensor, cache: TorchKVCache) -> torch.Tensor:
        a, p = self.args, f"layers.{layer}."
        if self._ahead is not None:
            self._ahead(layer, _numpy(self._norm(x, p + "ffn_norm") if a.pre_norm else x))
        if not a.pre_norm:  # OPT's post-LayerNorm (opt-350m)
            x = self._norm(x + self._attention(layer, x, cache), p + "attn_norm")
            return self._norm(x + self._ffn(layer, x, x), p + "ffn_norm")
        h = self._attention(layer, self._norm(x, p + "attn_norm"), cache)
        if a.post_norms:  # Gemma normalizes each sublayer's output too
            h = self._norm(h, p + "attn_post_norm")
        x = x + h
        return x + self._ffn(layer, self._norm(x, p + "ffn_norm"), x,
                             p + "ffn_post_norm" if a.post_norms else None)

    @torch.no_grad()
    def forward(self, tokens, cache: TorchKVCache, last_only: bool = False) -> np.ndarray:
        """Run `tokens` (continuing the sequence in `cache`) and return float32 numpy logits
        [T, vocab] (or [1, vocab] with last_only)."""
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise ValueError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= a.vocab_size:
            raise ValueError(f"token ids must be in [0, {a.vocab_size}); got "
                             f"{tokens.min()}..{tokens.max()}")
        if not isinstance(cache, TorchKVCache):
            raise TypeError("the torch backend needs its own KV cache: model.new_cache()")
        x = self._embed(torch.from_numpy(tokens).to(self.device), cache.size)
        for i in range(a.num_hidden_layers):
            x = self._block(i, x, cache)
        cache.advance(len(tokens))
        if last_only:
            x = x[-1:]
        if a.pre_norm:
            x = self._norm(x, "norm")
        if a.projects_embeddings:
            x = self._linear(x, "project_out")
        logits = _softcap(F.linear(x, self.lm_head).float(), a.final_logit_softcapping)
        return _numpy(logits)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a device tensor (waits for the device)."""
    return t.detach().to("cpu", torch.float32).numpy()

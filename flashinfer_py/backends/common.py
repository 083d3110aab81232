"""What every device backend (torch, mlx) shares and nothing framework-specific: which dtype
each resident tensor takes on the device and its width, the KV cache's bookkeeping, the RoPE
tables, and the transformer's block structure (the attention, norm and matmul ops are each
backend's own).

A backend hands these an `ops` object (`torch_ffn.TorchOps`, `mlx_ffn.MlxOps`) that makes
its arrays: ``ops.array(np_array, float32=False)`` (the compute dtype unless `float32`),
``ops.raw(np_array)`` (the array as it is, any dtype), ``ops.zeros(shape, float32=False)``,
``ops.bytes(shape)`` (uint8 zeros), ``ops.index(np_ints)``, ``ops.mask(np_bools)``,
``ops.cat(arrays, axis=0)``, ``ops.numpy(a, float32=True)`` (a float32 numpy copy, or one as
it is), ``ops.nbytes(a)``, ``ops.esize`` and ``ops.dtype_name`` (the compute dtype's bytes and
name), ``ops.bitcast(a, name)`` (a uint8 array's last axis read as values: "float16", "int8",
or None for the compute dtype), ``ops.float32(a)`` and ``ops.compute(a)`` (casts),
``ops.settle(arrays)`` (mlx: evaluate them) and ``ops.context()``, which every call into the
framework runs inside (mlx: the device's stream; torch: no autograd and RuntimeConfig.threads
intra-op threads). Arrays of both frameworks slice, reshape, index, assign (``a[i] = b``),
multiply and mask bits (``&``, ``>>``) with the same Python syntax, which is what the code
below and device_ffn.py use.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ..config import ModelArgs
from ..dtypes import storage_format, to_float32
from ..model import KVCache, Transformer, _Rope, check_tokens


def pick_dtype(table: dict, name):
    """A framework dtype from its name in `table` (a framework dtype passes through)."""
    if name in table.values():
        return name
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"compute_dtype must be one of {', '.join(table)}, not {name!r}") from None


def causal_mask(t: int, s: int, pos0: int, first: int, window: int) -> np.ndarray:
    """[T, S'] True where query pos0+i must not see key first+j: later keys, and keys
    outside a sliding `window` (0: none)."""
    query_pos = (pos0 + np.arange(t))[:, None]
    key_pos = first + np.arange(s)[None, :]
    hidden = key_pos > query_pos
    if window:
        hidden |= key_pos <= query_pos - window
    return hidden


def matrix_width(args: ModelArgs, name: str) -> int:
    """The input width (values per row) of resident matrix `name`; its stored rows may be
    padded quantized blocks."""
    base = name.rsplit(".", 1)[-1]
    if base in ("tok_embeddings", "lm_head", "project_in"):
        return args.embed_dim
    if base == "wo":
        return args.q_dim
    return args.hidden_size  # wq, wk, wv, pos_embeddings, project_out


def resident_kind(name: str, formats: dict) -> Optional[str]:
    """How resident tensor `name` lives on a device: "matrix" (dequantized to the compute
    dtype), "norm" (float32), "bias" (compute dtype), or None (the FFN provider's)."""
    if name.endswith("ffn_down_scales"):
        return None
    if name in formats:
        return "matrix"
    if name.endswith("norm") or name.endswith("norm_bias"):
        return "norm"
    return "bias"


def device_resident_bytes(args: ModelArgs, entries: dict, formats: dict, esize: int) -> int:
    """Bytes of the resident tensors on a device: `entries` maps names to stored shapes;
    matrices take rows x width compute-dtype values (esize bytes), norms float32, and the
    scales of a down part in the codes layout float16 as stored (the FFN provider's, used
    where it dequantizes the down codes on the device)."""
    total = 0
    for name, shape in entries.items():
        if name.endswith("ffn_down_scales"):
            total += int(np.prod(shape)) * 2
            continue
        kind = resident_kind(name, formats)
        if kind == "matrix":
            total += int(shape[0]) * matrix_width(args, name) * esize
        elif kind is not None:
            total += (int(np.prod(shape)) if shape else 1) * (4 if kind == "norm" else esize)
    return total


def resident_float32(args: ModelArgs, dense: dict, formats: dict) -> Iterator[tuple]:
    """(name, float32 values, kind) of each resident tensor a device transformer keeps."""
    formats = {n: storage_format(f).name for n, f in formats.items()}
    for name, arr in dense.items():
        kind = resident_kind(name, formats)
        if kind == "matrix":
            yield name, to_float32(arr, formats[name], matrix_width(args, name)), kind
        elif kind is not None:
            yield name, np.asarray(arr, np.float32), kind


class DeviceKVCache(KVCache):
    """model.KVCache (the same bookkeeping) with its keys and values [Hkv, S, hd] in device
    arrays of the compute dtype."""

    def __init__(self, args: ModelArgs, max_context: int, ops, step: int = 256):
        self.ops = ops
        super().__init__(args, max_context, step)

    def _empty(self, shape):
        return self.ops.zeros(shape)

    def append1(self, layer: int, k, v) -> None:
        raise NotImplementedError("a device cache appends [Hkv, T, hd] blocks: append()")

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.k + self.v)


class DeviceRope:
    """model._Rope's tables (the same float64 angles, cast to float32) kept on the device and
    grown by doubling; positions are rows of them."""

    def __init__(self, args: ModelArgs, ops):
        self.rope, self.ops = _Rope(args), ops
        self._tables: dict = {}  # id(inverse frequencies) -> (cos, sin) [positions, dim]

    def cos_sin(self, layer: int, pos0: int, t: int):
        r, end = self.rope, pos0 + t
        long = r.long_after is not None and end > r.long_after  # per call, as _Rope.cos_sin
        inv = (r.long if long else r.short)[layer]
        tab = self._tables.get(id(inv))
        if tab is None or end > len(tab[0]):
            n = max(256, 2 * end, 0 if tab is None else 2 * len(tab[0]))
            cos, sin = r._angles(inv, 0, n)
            tab = (self.ops.array(cos, float32=True), self.ops.array(sin, float32=True))
            self._tables[id(inv)] = tab
        return tab[0][pos0:end], tab[1][pos0:end]


class DeviceTransformer:
    """model.Transformer's structure for a device backend: the weights, the fused q/k/v
    projections, the blocks, the observer and `forward`'s checks. A subclass supplies the ops
    (`_norm`, `_linear`, `_embed`, `_attention`, `_logits`, `_rownorm`) and `cache_type`;
    `ffn` is a device FFN provider: ``forward(layer, x [T, d], act_out=None) -> [T, d]``."""

    cache_type = DeviceKVCache

    def __init__(self, args: ModelArgs, dense: dict, formats: dict, ffn, runtime, ops):
        import math

        self.args, self.ffn, self.runtime, self.ops = args, ffn, runtime, ops
        self.w: dict = {}
        for name, w, kind in resident_float32(args, dense, formats):
            self.w[name] = ops.array(w, float32=(kind == "norm"))
        self.rope = DeviceRope(args, ops) if args.uses_rope else None
        self.lm_head = self.w["tok_embeddings" if args.tie_word_embeddings else "lm_head"]
        self._fuse_qkv()
        self.scale = 1.0 / math.sqrt(args.query_pre_attn_scalar or args.head_dim)
        self.observer = None  # as model.Transformer's (numpy arrays)
        self._ahead = None
        if getattr(ffn, "wants_prefetch", False):  # the host predicts from a numpy copy
            self._ahead = lambda layer, x: ffn.prefetch(layer, ops.numpy(x))

    def _fuse_qkv(self) -> None:
        """Each layer's q, k and v projections as one matrix (and bias): one matmul a layer."""
        self.qkv = []
        for i in range(self.args.num_hidden_layers):
            p = f"layers.{i}."
            w = self.ops.cat([self.w.pop(p + "wq"), self.w.pop(p + "wk"), self.w.pop(p + "wv")])
            bias = None
            if self.args.attention_bias:
                bias = self.ops.cat([self.w.pop(p + "bq"), self.w.pop(p + "bk"),
                                     self.w.pop(p + "bv")])
            self.w[p + "wqkv"] = w
            if bias is not None:
                self.w[p + "bqkv"] = bias
            self.qkv.append((w, bias))

    def new_cache(self, max_context: int) -> DeviceKVCache:
        return self.cache_type(self.args, max_context, self.ops)

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(t) for t in self.w.values())

    def _linear(self, x, name: str, bias: Optional[str] = None):
        return self._matmul_t(x, self.w[name], self.w[bias] if bias is not None else None)

    def _attention(self, layer: int, x, cache: DeviceKVCache):
        a, p = self.args, f"layers.{layer}."
        t, pos0 = x.shape[0], cache.size
        w, b = self.qkv[layer]
        qkv = self._matmul_t(x, w, b)
        qd, kd = a.q_dim, a.kv_dim
        q = self._heads(qkv[:, :qd], a.num_attention_heads)  # [H, T, hd]
        k = self._heads(qkv[:, qd:qd + kd], a.num_key_value_heads)
        v = self._heads(qkv[:, qd + kd:], a.num_key_value_heads)
        if a.qk_norm:
            q, k = self._norm(q, p + "q_norm"), self._norm(k, p + "k_norm")
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(layer, pos0, t)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys, values = cache.append(layer, k, v)  # [Hkv, S, hd], S = pos0 + T
        out = self._attend(layer, q, keys, values, pos0)  # [T, H * hd]
        return self._linear(out, p + "wo", p + "bo" if a.attention_out_bias else None)

    def _attend(self, layer: int, q, keys, values, pos0: int):
        """Softmax attention of q [H, T, hd] over the cached keys/values [Hkv, S, hd]
        (grouped-query: head h reads kv head h // (H / Hkv)); scores in float32."""
        a = self.args
        t, hkv, window = q.shape[1], a.num_key_value_heads, a.window(layer)
        first = max(0, pos0 - window + 1) if window else 0  # older keys are outside every window
        keys, values = keys[:, first:], values[:, first:]
        g = a.num_attention_heads // hkv
        scores = self._scores(q.reshape(hkv, g * t, a.head_dim), keys)  # float32
        scores = self._softcap(scores * self.scale, a.attn_logit_softcapping)
        scores = scores.reshape(hkv, g, t, -1)  # [Hkv, g, T, S']
        s = scores.shape[-1]
        hidden = self.ops.mask(causal_mask(t, s, pos0, first, window))
        probs = self._softmax(scores, hidden)  # in the compute dtype
        out = probs.reshape(hkv, g * t, s) @ values  # [Hkv, g*T, hd]
        return self._merge_heads(out.reshape(a.num_attention_heads, t, a.head_dim))

    def _ffn(self, layer: int, x, resid, post: Optional[str] = None):
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
            n = self.ops.numpy
            ref = n(self._rownorm(resid))
            if post:
                ref = ref * (n(self._rownorm(f)) / np.maximum(n(self._rownorm(added)), 1e-30))
            self.observer(layer, n(x), act, ref)
        return added

    # model.Transformer's block, as it is: pre/post-norm, Gemma's sublayer norms, the
    # read-ahead hook (`_ahead`, given numpy inputs by the wrapper __init__ installs)
    _block = Transformer._block
    _head_input = Transformer._head_input

    def _run(self, tokens, cache, last_only: bool, head: bool = True):
        """`forward`'s body (inside ops.context())."""
        a = self.args
        tokens = check_tokens(tokens, a.vocab_size)
        if not isinstance(cache, self.cache_type):
            raise TypeError(f"the {self.ops.name} backend needs its own KV cache: "
                            "model.new_cache()")
        x = self._embed(tokens, cache.size)
        for i in range(a.num_hidden_layers):
            x = self._block(i, x, cache)
        cache.advance(len(tokens))
        if not head:
            return None
        x = self._head_input(x, last_only)
        logits = self._matmul_t(x, self.lm_head, None)
        return self.ops.numpy(self._softcap(self._float(logits), a.final_logit_softcapping))

    def forward(self, tokens, cache, last_only: bool = False, head: bool = True):
        """Run `tokens` (continuing the sequence in `cache`) and return float32 numpy logits
        [T, vocab] (or [1, vocab] with last_only); None with head=False (model.Transformer)."""
        with self.ops.context():
            out = self._run(tokens, cache, last_only, head)
            self.ops.settle(cache.k + cache.v)  # mlx: the cache's writes done, no graph kept
        return out

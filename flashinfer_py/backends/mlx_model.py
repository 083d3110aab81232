"""The transformer forward pass on mlx (Apple's Metal GPU, or mlx's CPU device): torch_model.py
ported op for op to mlx.core over the shared structure (common.DeviceTransformer).

Every resident matrix is dequantized once, at load, to the compute dtype; norm weights stay
float32 and the norms, the softmax and the logits are computed in float32. Everything runs on
the stream of the chosen device (``mx.stream``); `forward` returns float32 numpy logits.

Shapes: T = tokens in this call, d = hidden_size, H/Hkv = heads, hd = head_dim.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from ..config import ModelArgs, RuntimeConfig
from .common import DeviceTransformer
from .mlx_ffn import MlxOps


def _apply_rope(x, cos, sin):
    """x [H, T, hd]; rotate-half RoPE on the first cos.shape[-1] elements of each head."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    out = rot * cos + mx.concatenate([-rot[..., half:], rot[..., :half]], axis=-1) * sin
    return mx.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _softcap(x, cap: Optional[float]):
    return x if cap is None else cap * mx.tanh(x / cap)


class MlxTransformer(DeviceTransformer):
    """model.Transformer on mlx arrays; `ffn` is a device FFN provider (device_ffn.py) over
    MlxOps. `device` is mx.cpu or mx.gpu."""

    def __init__(self, args: ModelArgs, dense: dict, formats: dict, ffn, runtime: RuntimeConfig,
                 ops: MlxOps):
        self.device, self.dtype = ops.device, ops.dtype
        with ops.context():  # the casts and the q/k/v concatenation on the device's stream
            super().__init__(args, dense, formats, ffn, runtime, ops)
            mx.eval(*self.w.values())

    # ------------------------------------------------------------------ small ops
    def _norm(self, x, name: str):
        """RMSNorm or LayerNorm over the last axis in float32 (q/k norms: per head)."""
        w, eps = self.w[name], self.args.norm_eps
        xf = x.astype(mx.float32)
        if self.args.norm == "rmsnorm":
            y = xf / mx.sqrt(mx.mean(mx.square(xf), axis=-1, keepdims=True) + eps) * w
        else:
            mu = mx.mean(xf, axis=-1, keepdims=True)
            var = mx.mean(mx.square(xf - mu), axis=-1, keepdims=True)
            y = (xf - mu) / mx.sqrt(var + eps) * w + self.w[name + "_bias"]
        return y.astype(self.dtype)

    def _matmul_t(self, x, w, b):
        y = x @ w.T
        return y if b is None else y + b

    def _rownorm(self, t):
        return mx.sqrt(mx.sum(mx.square(t.astype(mx.float32)), axis=-1))

    def _embed(self, tokens: np.ndarray, pos0: int):
        a = self.args
        x = self.w["tok_embeddings"][mx.array(tokens)]
        if a.embed_scale != 1.0:
            x = (x.astype(mx.float32) * float(np.float32(a.embed_scale))).astype(self.dtype)
        if a.projects_embeddings:  # OPT-350m: embeddings are narrower than the model
            x = self._linear(x, "project_in")
        if not a.uses_rope:
            idx = mx.arange(pos0, pos0 + len(tokens)) + a.learned_pos_offset
            x = x + self.w["pos_embeddings"][idx]
        return x

    # ------------------------------------------------------------------ attention
    def _heads(self, x, n: int):
        """[T, n * hd] -> [n, T, hd]."""
        return x.reshape(x.shape[0], n, self.args.head_dim).transpose(1, 0, 2)

    def _rope(self, x, cos, sin):
        return _apply_rope(x, cos.astype(self.dtype), sin.astype(self.dtype))

    @staticmethod
    def _scores(q, keys):
        return (q @ keys.transpose(0, 2, 1)).astype(mx.float32)

    _softcap = staticmethod(_softcap)

    def _softmax(self, scores, hidden):
        scores = mx.where(hidden, mx.array(-np.inf, mx.float32), scores)
        return mx.softmax(scores, axis=-1).astype(self.dtype)

    @staticmethod
    def _merge_heads(out):
        """[H, T, hd] -> [T, H * hd]."""
        return out.transpose(1, 0, 2).reshape(out.shape[1], -1)

    @staticmethod
    def _float(x):
        return x.astype(mx.float32)

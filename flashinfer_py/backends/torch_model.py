"""The transformer forward pass on torch (cpu, cuda or mps): model.py's structure, op for op.

Every resident matrix is dequantized once, at load, from its storage format (float or the
q8_0/q4_0/q4_1 blocks) to the compute dtype on the device; norm weights stay float32 and the
norms, the softmax and the logits are computed in float32 whatever the compute dtype. The
FFN is a provider as in model.py (``backends/device_ffn.py``): ``forward(layer, x [T, d]
tensor, act_out=None) -> [T, d] tensor``. Every call into torch runs inside ``ops.context()``
(no autograd; RuntimeConfig.threads as torch's intra-op thread count, see
``torch_ffn.intra_op_threads``). `forward` returns float32 numpy logits, as
model.Transformer does, so the runtime, the sampler and the server do not know which
backend ran.

Shapes: T = tokens in this call, d = hidden_size, H/Hkv = heads, hd = head_dim.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs, RuntimeConfig
from .common import DeviceTransformer
from .torch_ffn import TorchOps


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, hd]; rotate-half RoPE on the first cos.shape[-1] elements of each head."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    out = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


class TorchTransformer(DeviceTransformer):
    """model.Transformer on torch tensors (common.DeviceTransformer's structure with torch's
    ops); `ffn` is a device FFN provider (device_ffn.py) over the same TorchOps."""

    def __init__(self, args: ModelArgs, dense: dict, formats: dict, ffn, runtime: RuntimeConfig,
                 ops: TorchOps):
        self.device, self.dtype = ops.device, ops.dtype
        with ops.context():  # the casts and the q/k/v concatenation on `threads` threads
            super().__init__(args, dense, formats, ffn, runtime, ops)

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

    def _matmul_t(self, x: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
        return F.linear(x, w, b)

    def _embed(self, tokens: np.ndarray, pos0: int) -> torch.Tensor:
        a = self.args
        x = self.w["tok_embeddings"][torch.from_numpy(tokens).to(self.device)]
        if a.embed_scale != 1.0:
            x = (x.float() * float(np.float32(a.embed_scale))).to(self.dtype)
        if a.projects_embeddings:  # OPT-350m: embeddings are narrower than the model
            x = self._linear(x, "project_in")
        if not a.uses_rope:
            idx = torch.arange(pos0, pos0 + len(tokens), device=self.device) + a.learned_pos_offset
            x = x + self.w["pos_embeddings"][idx]
        return x

    # ------------------------------------------------------------------ attention
    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[T, n * hd] -> [n, T, hd]."""
        return x.reshape(x.shape[0], n, self.args.head_dim).transpose(0, 1)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _apply_rope(x, cos.to(self.dtype), sin.to(self.dtype))

    def _scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (q @ keys.transpose(1, 2)).float()

    _softcap = staticmethod(_softcap)

    def _softmax(self, scores: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).to(self.dtype)

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[H, T, hd] -> [T, H * hd]."""
        return out.transpose(0, 1).reshape(out.shape[1], -1)

    @staticmethod
    def _float(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def _rownorm(self, t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.float(), dim=-1)

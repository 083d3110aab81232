"""The FFN providers of the torch backend: every neuron on the device (`TorchResidentFFN`), and
the neurons streamed from flash through a neuron cache mirrored on the device
(`TorchSparseFFN`).

A neuron's record (up row, gate row, down column) becomes one row of each of the layer's
per-part device matrices [n, d], dequantized from the storage format to the compute dtype.
The FFN of inputs x [T, d] over rows S is then three matmuls::

    h = act(x @ gate[S].T) * (x @ up[S].T + b[S])      (ungated: act(x @ up[S].T + b[S]))
    out = h @ down[S]

Sparse mode keeps everything SparseFFN decides on the host (selection, window, ranking, the
native NeuronCache that reads records from flash into host rows) and mirrors the host cache on
the device: `DeviceNeuronCache` holds, per layer, preallocated device matrices in the host
cache's slot order. Before rows are used it brings them level with the host: the rows the host
compacted (move-last-row, csrc/neuron_cache.cpp) are moved the same way on the device, and the
rows newly read from flash are dequantized into a host staging buffer (pinned on CUDA) and
copied to the device in one transfer per layer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs, RuntimeConfig
from ..ffn import FfnOnRows
from .torch_model import torch_dtype

STAGING_BYTES = 32 << 20  # the host staging buffer: at most this much per transfer


def _activation(name: str, param: float):
    if name == "relu":
        return torch.relu
    if name == "fatrelu":
        return lambda v: torch.where(v > param, v, torch.zeros_like(v))
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda v: F.gelu(v, approximate="tanh")
    raise ValueError(f"activation {name!r} is not supported by the torch backend")


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _RowsFFN:
    """The FFN of x [T, d] over rows of per-part device matrices (activations in float32)."""

    def __init__(self, args: ModelArgs):
        self.gated = args.gated
        self.act = _activation(args.hidden_act, args.act_param)

    def __call__(self, x, up, gate, down, bias=None, want_h: bool = False):
        u = F.linear(x, up, bias)
        if self.gated:
            h = self.act(F.linear(x, gate).float()) * u.float()
        else:
            h = self.act(u.float())
        out = h.to(x.dtype) @ down
        return out, (h if want_h else None)


class TorchResidentFFN:
    """Every neuron of every layer on the device: up/gate/down as [d_ff, d] matrices (and
    OPT's up bias), read once from the bundle file and dequantized to the compute dtype."""

    def __init__(self, bundle_path: str, args: ModelArgs, dense: dict, runtime: RuntimeConfig,
                 device="cpu", dtype="float32"):
        from ..bundles import BundleReader, ReaderParams, aligned_empty

        self.args, self.device, self.dtype = args, torch.device(device), torch_dtype(dtype)
        reader = BundleReader(bundle_path, ReaderParams(engine=runtime.io_engine,
                                                        queue_depth=runtime.queue_depth,
                                                        use_direct_io=runtime.use_direct_io,
                                                        read_timeout_ms=runtime.read_timeout_ms))
        self.kernel = FfnOnRows(args, reader.layout, dense)
        self.part_names = list(reader.layout.parts)
        f, d = args.intermediate_size, args.hidden_size
        eb = np.dtype(reader.numpy_dtype).itemsize
        chunk = max(1, min(f, STAGING_BYTES // (reader.record_elems * eb)))
        staging = aligned_empty((chunk, reader.record_elems), reader.numpy_dtype)
        self.parts = []  # per layer: {part: [d_ff, d] tensor}
        for layer in range(args.num_hidden_layers):
            mats = {p: torch.empty((f, d), dtype=self.dtype, device=self.device)
                    for p in self.part_names}
            for i in range(0, f, chunk):
                ids = np.arange(i, min(f, i + chunk), dtype=np.int32)
                reader.read(layer, ids, staging[:len(ids)])
                for p in self.part_names:
                    vals = self.kernel.part_f32(layer, staging[:len(ids)], p, ids)
                    mats[p][i:i + len(ids)] = torch.from_numpy(vals).to(self.device, self.dtype)
            self.parts.append(mats)
        self.io_stats = reader.stats()
        self.is_direct = reader.is_direct
        self.bias = [None if dense.get(f"layers.{i}.ffn_up_bias") is None else
                     torch.from_numpy(np.asarray(dense[f"layers.{i}.ffn_up_bias"], np.float32))
                     .to(self.device, self.dtype) for i in range(args.num_hidden_layers)]
        self.ffn = _RowsFFN(args)

    def forward(self, layer: int, x: torch.Tensor, act_out=None) -> torch.Tensor:
        m = self.parts[layer]
        out, h = self.ffn(x, m["up"], m.get("gate"), m["down"], self.bias[layer],
                          want_h=act_out is not None)
        if act_out is not None:
            act_out[...] = h.cpu().numpy()
        return out

    def part_f32(self, layer: int, part: str) -> np.ndarray:
        """float32 [d_ff, d] values of one part ("up", "gate", "down") of every neuron."""
        return self.parts[layer][part].to("cpu", torch.float32).numpy()

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for m in self.parts for t in m.values())
        return n + sum(b.numel() * b.element_size() for b in self.bias if b is not None)

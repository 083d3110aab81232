"""The torch backend's ops (`TorchOps`: arrays, the staging bytes, the FFN over rows, the
thread count) for the code every device backend shares: the FFN providers in device_ffn.py
(every neuron on the device, or the neurons streamed from flash through a neuron cache
mirrored on the device) and the transformer's structure in common.py. On CUDA the staging
buffer is pinned host memory and the copy out of it is asynchronous (an event guards its
reuse).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelArgs
from .common import pick_dtype

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name) -> torch.dtype:
    return pick_dtype(DTYPES, name)


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to `n` for the block (0: left as it is), and the
    previous count put back after it.

    ``torch.set_num_threads`` is process-wide: while the block runs, any other torch work in
    the process (another thread, another model) runs with `n` threads too; between blocks
    the process's own setting is back. The backend enters this around each call into torch
    (loading, `forward`), so RuntimeConfig.threads holds for this model's work without
    changing what the rest of the program set. (Concurrent forward passes from several
    Python threads with different counts would see each other's; the server runs one at a
    time.)"""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class _Staging:
    """Host bytes [rows, width] (pinned for CUDA) that device rows are staged in
    (device_ffn.Staging writes them) and copied to the device from, one transfer per batch.
    Before it is written again the previous asynchronous copy out of it must be done (an
    event)."""

    def __init__(self, rows: int, width: int, device: torch.device):
        self.device, self.rows, self.width = device, rows, width
        self.buf = torch.empty((rows, width), dtype=torch.uint8,
                               pin_memory=device.type == "cuda")
        self.host = self.buf.numpy()  # the same memory
        self._event = None

    def ready(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def send(self, k: int) -> torch.Tensor:
        """The first k rows on the device (an asynchronous copy on CUDA)."""
        if self.device.type == "cpu":
            return self.buf[:k]
        out = self.buf[:k].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # mps: no pinned memory; wait, so the buffer may be reused
            _sync_device(self.device)
        return out

    @property
    def nbytes(self) -> int:
        return self.buf.numel()


NUMPY_VIEWS = {"float16": torch.float16, "int8": torch.int8}


class TorchOps:
    """What the shared device code (common.py, device_ffn.py) needs from torch."""

    name = "torch"

    def __init__(self, device, dtype, threads: int = 0):
        self.device, self.dtype = torch.device(device), torch_dtype(dtype)
        self.dtype_name = next(n for n, t in DTYPES.items() if t == self.dtype)
        self.esize = self.dtype.itemsize
        self.threads = threads  # RuntimeConfig.threads: torch's intra-op threads (0: torch's)

    def array(self, a: np.ndarray, float32: bool = False) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a)).to(self.device,
                                                  torch.float32 if float32 else self.dtype)

    def raw(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def zeros(self, shape, float32: bool = False) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32 if float32 else self.dtype,
                           device=self.device)

    def bytes(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.uint8, device=self.device)

    def bitcast(self, a: torch.Tensor, name=None) -> torch.Tensor:
        dt = self.dtype if name is None else NUMPY_VIEWS[name]
        if dt.itemsize > 1 and not a.is_contiguous():  # a wider view needs aligned rows
            a = a.contiguous()
        return a.view(dt)

    @staticmethod
    def float32(a: torch.Tensor) -> torch.Tensor:
        return a.float()

    def compute(self, a: torch.Tensor) -> torch.Tensor:
        return a.to(self.dtype)

    def index(self, ints: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ints, np.int64)).to(self.device)

    def mask(self, hidden: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(hidden).to(self.device)

    def cat(self, arrays: list, axis: int = 0) -> torch.Tensor:
        return torch.cat(arrays, dim=axis)

    @staticmethod
    def numpy(t: torch.Tensor, float32: bool = True) -> np.ndarray:
        """A numpy copy of a device tensor, float32 or as it is (waits for the device; on the
        cpu device a float32 tensor is not copied)."""
        return t.detach().to("cpu", torch.float32 if float32 else t.dtype).numpy()

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def settle(self, arrays: list) -> None:
        pass  # torch runs eagerly

    @contextlib.contextmanager
    def context(self):
        """Where this model's torch work runs: without autograd, on `threads` intra-op threads
        (intra_op_threads: set for the block, then put back)."""
        with torch.no_grad(), intra_op_threads(self.threads):
            yield

    def staging(self, rows: int, width: int) -> _Staging:
        return _Staging(rows, width, self.device)

    def rows_ffn(self, args: ModelArgs) -> _RowsFFN:
        return _RowsFFN(args)


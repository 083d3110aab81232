"""The mlx backend's FFN pieces: its ops (`MlxOps`: arrays, the staging bytes, the FFN over
rows) for the providers in device_ffn.py, which every device backend shares (the resident FFN,
and the sparse FFN whose neuron cache is mirrored in mlx arrays, row for row as on torch).

mlx is lazy: an assignment into an array records it, and `settle` evaluates the arrays once a
batch of assignments is made, so the mirror's graphs never grow from token to token.
"""
from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
from .common import pick_dtype

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mlx_dtype(name):
    return pick_dtype(DTYPES, name)


def _gelu(v):
    return 0.5 * v * (1.0 + mx.erf(v * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v * v * v)))


def _activation(name: str, param: float):
    if name == "relu":
        return lambda v: mx.maximum(v, 0.0)
    if name == "fatrelu":
        return lambda v: mx.where(v > param, v, mx.zeros_like(v))
    if name == "silu":
        return lambda v: v * mx.sigmoid(v)
    if name == "gelu":
        return _gelu
    if name == "gelu_tanh":
        return _gelu_tanh
    raise ValueError(f"activation {name!r} is not supported by the mlx backend")


class _RowsFFN:
    """The FFN of x [T, d] over rows of per-part mlx matrices (activations in float32)."""

    def __init__(self, args: ModelArgs):
        self.gated = args.gated
        self.act = _activation(args.hidden_act, args.act_param)

    def __call__(self, x, up, gate, down, bias=None, want_h: bool = False):
        u = x @ up.T
        if bias is not None:
            u = u + bias
        if self.gated:
            h = self.act((x @ gate.T).astype(mx.float32)) * u.astype(mx.float32)
        else:
            h = self.act(u.astype(mx.float32))
        out = h.astype(x.dtype) @ down
        return out, (h if want_h else None)


class _Staging:
    """Host bytes [rows, width] that device rows are staged in (device_ffn.Staging writes
    them); `send` turns the first k into an mlx array.

    On Apple's unified memory there is no separate device memory to transfer to: the one copy
    per layer, from these staging rows into the mlx array's own buffer, is the whole
    "host-to-device" step (mlx cannot adopt a numpy buffer without copying it, so the reader
    cannot write straight into the array)."""

    def __init__(self, rows: int, width: int):
        self.rows, self.width = rows, width
        self.host = np.empty((rows, width), np.uint8)

    def ready(self) -> None:
        pass  # send() copies synchronously: the rows may be rewritten at once

    def send(self, k: int):
        return mx.array(self.host[:k])

    @property
    def nbytes(self) -> int:
        return self.host.nbytes


NUMPY_VIEWS = {"float16": mx.float16, "int8": mx.int8}


class MlxOps:
    """What the shared device code (common.py, device_ffn.py) needs from mlx. Arrays live in
    unified memory; `device` (mx.cpu or mx.gpu) is the stream the ops run on."""

    name = "mlx"

    def __init__(self, device, dtype):
        self.device, self.dtype = device, mlx_dtype(dtype)
        self.dtype_name = next(n for n, t in DTYPES.items() if t == self.dtype)
        self.esize = self.dtype.size

    def array(self, a: np.ndarray, float32: bool = False):
        out = mx.array(np.ascontiguousarray(a, np.float32))
        return out if float32 or self.dtype == mx.float32 else out.astype(self.dtype)

    @staticmethod
    def raw(a: np.ndarray):
        return mx.array(np.ascontiguousarray(a))

    def zeros(self, shape, float32: bool = False):
        return mx.zeros(shape, dtype=mx.float32 if float32 else self.dtype)

    @staticmethod
    def bytes(shape):
        return mx.zeros(shape, dtype=mx.uint8)

    def bitcast(self, a, name=None):
        return mx.view(a, self.dtype if name is None else NUMPY_VIEWS[name])

    @staticmethod
    def float32(a):
        return a.astype(mx.float32)

    def compute(self, a):
        return a.astype(self.dtype)

    @staticmethod
    def index(ints: np.ndarray):
        return mx.array(np.asarray(ints, np.int64))

    @staticmethod
    def mask(hidden: np.ndarray):
        return mx.array(hidden)

    @staticmethod
    def cat(arrays: list, axis: int = 0):
        return mx.concatenate(arrays, axis=axis)

    @staticmethod
    def numpy(a, float32: bool = True) -> np.ndarray:
        """A numpy copy of an mlx array, float32 or as it is (evaluates it)."""
        return np.array(a.astype(mx.float32) if float32 else a)

    @staticmethod
    def nbytes(a) -> int:
        return a.nbytes

    @staticmethod
    def settle(arrays: list) -> None:
        mx.eval(*arrays)

    def context(self):
        return mx.stream(self.device) if self.device is not None else contextlib.nullcontext()

    @staticmethod
    def staging(rows: int, width: int) -> _Staging:
        return _Staging(rows, width)

    @staticmethod
    def rows_ffn(args: ModelArgs) -> _RowsFFN:
        return _RowsFFN(args)

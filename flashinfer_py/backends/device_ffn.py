"""The FFN providers of a device backend (torch, mlx), written once over the backend's `ops`
(common.py lists what it offers; ``ops.staging(rows, width)`` and ``ops.rows_ffn(args)`` are
the two pieces below that are the framework's own): every neuron on the device
(`DeviceResidentFFN`), and the neurons streamed from flash through a neuron cache mirrored on
the device (`DeviceSparseFFN`).

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
rows newly read from flash are dequantized into a host staging buffer and copied to the device
in one transfer per layer (the staging buffer is the backend's: pinned for CUDA).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import ModelArgs, RuntimeConfig
from ..ffn import FfnOnRows, SparseFFN, TokenStats
from ..loader import STAGING_BYTES, device_staging_rows


def _stage(kernel: FfnOnRows, part_names: list, d: int, layer: int, f32: np.ndarray,
           rows: np.ndarray, ids: np.ndarray, bias) -> None:
    """Dequantize host records `rows` (neurons `ids`) into staging rows f32[:len(rows)]: the
    parts side by side, then the up bias."""
    k = len(rows)
    for p, name in enumerate(part_names):
        f32[:k, p * d:(p + 1) * d] = kernel.part_f32(layer, rows, name, ids)
    if bias is not None:
        f32[:k, -1] = bias


class DeviceResidentFFN:
    """Every neuron of every layer on the device: up/gate/down as [d_ff, d] matrices (and
    OPT's up bias), read once from the bundle file and dequantized to the compute dtype."""

    def __init__(self, bundle_path: str, args: ModelArgs, dense: dict, runtime: RuntimeConfig,
                 ops):
        from ..bundles import BundleReader, ReaderParams, aligned_empty

        self.args, self.ops = args, ops
        reader = BundleReader(bundle_path, ReaderParams(engine=runtime.io_engine,
                                                        queue_depth=runtime.queue_depth,
                                                        use_direct_io=runtime.use_direct_io,
                                                        read_timeout_ms=runtime.read_timeout_ms))
        self.kernel = FfnOnRows(args, reader.layout, dense, runtime.threads)
        self.part_names = list(reader.layout.parts)
        f, d = args.intermediate_size, args.hidden_size
        eb = np.dtype(reader.numpy_dtype).itemsize
        chunk = max(1, min(f, STAGING_BYTES // (reader.record_elems * eb)))
        staging = aligned_empty((chunk, reader.record_elems), reader.numpy_dtype)
        self.parts = []  # per layer: {part: [d_ff, d] device array}
        with ops.context():
            for layer in range(args.num_hidden_layers):
                mats = {p: ops.zeros((f, d)) for p in self.part_names}
                for i in range(0, f, chunk):
                    ids = np.arange(i, min(f, i + chunk), dtype=np.int32)
                    reader.read(layer, ids, staging[:len(ids)])
                    for p in self.part_names:
                        vals = self.kernel.part_f32(layer, staging[:len(ids)], p, ids)
                        mats[p][i:i + len(ids)] = ops.array(vals)
                ops.settle(list(mats.values()))
                self.parts.append(mats)
        self.io_stats = reader.stats()
        self.is_direct = reader.is_direct
        self.bias = [None if dense.get(f"layers.{i}.ffn_up_bias") is None else
                     ops.array(np.asarray(dense[f"layers.{i}.ffn_up_bias"], np.float32))
                     for i in range(args.num_hidden_layers)]
        self.ffn = ops.rows_ffn(args)

    def forward(self, layer: int, x, act_out=None):
        m = self.parts[layer]
        out, h = self.ffn(x, m["up"], m.get("gate"), m["down"], self.bias[layer],
                          want_h=act_out is not None)
        if act_out is not None:
            act_out[...] = self.ops.numpy(h)
        return out

    def part_f32(self, layer: int, part: str) -> np.ndarray:
        """float32 [d_ff, d] values of one part ("up", "gate", "down") of every neuron."""
        return self.ops.numpy(self.parts[layer][part])

    @property
    def nbytes(self) -> int:
        n = sum(self.ops.nbytes(t) for m in self.parts for t in m.values())
        return n + sum(self.ops.nbytes(b) for b in self.bias if b is not None)


@dataclass
class DeviceTokenStats(TokenStats):
    """TokenStats plus the host-to-device copies of newly read rows."""

    transfer_ns: int = 0      # staging, copying and placing new rows on the device
    transfer_bytes: int = 0   # bytes copied to the device
    moved_rows: int = 0       # rows moved on the device by compaction

    _SUMMED = TokenStats._SUMMED + ("transfer_ns", "transfer_bytes", "moved_rows")


class DeviceNeuronCache:
    """The host NeuronCache's rows, dequantized, in device matrices of the same slot order.

    Per layer: one preallocated [capacity, d] matrix per part (and [capacity] up biases),
    the neuron id of each device slot, and each neuron's device slot. `sync(layer)` brings the
    device level with the host after SparseFFN changed it: a neuron the host moved to another
    slot (compaction) is moved on the device; a neuron the host read from flash is sent from
    the staging buffer; nothing is reallocated.
    """

    def __init__(self, cache, kernel: FfnOnRows, args: ModelArgs, has_bias: list, ops):
        self.cache, self.kernel, self.ops = cache, kernel, ops
        self.part_names = list(kernel.layout.parts)
        d, f = args.hidden_size, args.intermediate_size
        self.d = d
        L = cache.n_layers
        caps = [cache.capacity(i) for i in range(L)]
        self.parts = [[ops.zeros((caps[i], d)) for _ in self.part_names] for i in range(L)]
        self.bias = [ops.zeros((caps[i],)) if has_bias[i] else None for i in range(L)]
        self.ids = [np.full(caps[i], -1, np.int32) for i in range(L)]
        self.n = [0] * L
        self.slot_of = [np.full(f, -1, np.int64) for _ in range(L)]
        self.width = len(self.part_names) * d + 1  # the parts, then the up bias
        self.staging = ops.staging(device_staging_rows(self.width, ops.esize, max(caps + [1])),
                                   self.width)

    def _mats(self, layer: int) -> list:
        return self.parts[layer] + ([self.bias[layer]] if self.bias[layer] is not None else [])

    def sync(self, layer: int, st: Optional[DeviceTokenStats] = None) -> None:
        host = self.cache.ids(layer)
        n, m, cur = len(host), self.n[layer], self.ids[layer]
        if n == m and np.array_equal(host, cur[:n]):
            return
        t0 = time.perf_counter_ns()
        slot_of = self.slot_of[layer]
        old = slot_of[host]  # where each neuron the host holds is on the device (-1: absent)
        s = np.arange(n, dtype=np.int64)
        moved = np.flatnonzero((old >= 0) & (old != s))
        new = np.flatnonzero(old < 0)
        ops = self.ops
        if moved.size:  # the host's compaction, on the device (sources gathered first)
            dst, src = ops.index(moved), ops.index(old[moved])
            for t in self._mats(layer):
                t[dst] = t[src]
        nbytes = 0
        if new.size:
            rows = self.cache.rows(layer)[new]
            bias = self.cache.bias(layer)[new] if self.bias[layer] is not None else None
            nbytes = self._send(layer, new, rows, host[new], bias)
        ops.settle(self._mats(layer))
        slot_of[cur[:m]] = -1
        slot_of[host] = s
        cur[:n] = host
        self.n[layer] = n
        if st is not None:
            st.transfer_ns += time.perf_counter_ns() - t0
            st.transfer_bytes += nbytes
            st.moved_rows += int(moved.size)

    def _send(self, layer: int, slots: np.ndarray, rows: np.ndarray, ids: np.ndarray,
              bias: Optional[np.ndarray]) -> int:
        """Dequantize host records `rows` (neurons `ids`) into device `slots`; bytes sent."""
        stg, d, sent = self.staging, self.d, 0
        for a in range(0, len(slots), stg.rows):
            b = min(len(slots), a + stg.rows)
            k = b - a
            stg.ready()
            _stage(self.kernel, self.part_names, d, layer, stg.f32, rows[a:b], ids[a:b],
                   None if bias is None else bias[a:b])
            dev = stg.send(k)
            idx = self.ops.index(np.ascontiguousarray(slots[a:b], np.int64))
            for p, t in enumerate(self.parts[layer]):
                t[idx] = dev[:, p * d:(p + 1) * d]
            if bias is not None:
                self.bias[layer][idx] = dev[:, -1]
            sent += k * self.width * stg.esize
        return sent

    def rows(self, layer: int, select):
        """(parts, bias) of device slots `select`: a slice (views) or int64 indices."""
        mats, b = self.parts[layer], self.bias[layer]
        if not isinstance(select, slice):
            select = self.ops.index(select)
        return [t[select] for t in mats], (None if b is None else b[select])

    @property
    def nbytes(self) -> int:
        n = sum(self.ops.nbytes(t) for ms in self.parts for t in ms)
        n += sum(self.ops.nbytes(b) for b in self.bias if b is not None)
        return n + self.staging.nbytes


class DeviceKernel:
    """Stands in for SparseFFN's FfnOnRows: called with the same arguments (host rows of the
    neuron cache, or of the no-reuse layer buffer), it computes on the device. Cache rows are
    found by their place in the cache's matrix and taken from the device mirror (brought level
    first); other rows are dequantized and sent. Everything else is the host kernel's."""

    def __init__(self, owner: "DeviceSparseFFN", host: FfnOnRows):
        self.owner, self.host = owner, host
        self.layout, self.down_scales = host.layout, host.down_scales

    def part_f32(self, *a, **kw):
        return self.host.part_f32(*a, **kw)

    def _cache_slot(self, layer: int, rows: np.ndarray) -> Optional[int]:
        """The cache slot of rows[0] when `rows` is a view into the layer's cache rows."""
        cache = self.owner.cache
        if cache is None:
            return None
        base = cache.rows(layer)
        if base.shape[0] == 0 or rows.strides != base.strides or rows.shape[1:] != base.shape[1:]:
            return None
        off = rows.ctypes.data - base.ctypes.data
        stride = base.strides[0]
        if off < 0 or off % stride or off // stride + rows.shape[0] > base.shape[0]:
            return None
        return off // stride

    def __call__(self, layer: int, x, rows: np.ndarray, up_bias=None, row_select=None,
                 act_out=None, row_ids=None):
        o = self.owner
        xt = o._xt
        n_out = rows.shape[0] if row_select is None else len(row_select)
        if n_out == 0:
            return o.ops.zeros((xt.shape[0], o.args.hidden_size))
        start = self._cache_slot(layer, rows)
        if start is not None:
            o.mirror.sync(layer, o.tok)
            if row_select is None:
                sel = slice(start, start + rows.shape[0])
            else:
                sel = start + np.asarray(row_select, np.int64)
            parts, bias = o.mirror.rows(layer, sel)
            if up_bias is None:
                bias = None
        else:  # rows outside the cache (reuse=False): dequantize and send them
            if row_select is not None:
                rows = rows[np.asarray(row_select, np.int64)]
                row_ids = None if row_ids is None else np.asarray(row_ids)[row_select]
                up_bias = None if up_bias is None else np.asarray(up_bias)[row_select]
            parts, bias = o._upload(layer, rows, row_ids, up_bias)
        p = dict(zip(o.part_names, parts))
        out, h = o.rows_ffn(xt, p["up"], p.get("gate"), p["down"], bias,
                            want_h=act_out is not None)
        if act_out is not None:
            act_out[...] = o.ops.numpy(h)
        return out


class DeviceSparseFFN(SparseFFN):
    """SparseFFN with the FFN computed on a device: the host decides and reads as SparseFFN
    does; the rows it computes on are the device mirror's (DeviceNeuronCache)."""

    def __init__(self, directory, manifest: dict, args: ModelArgs, dense: dict,
                 runtime: RuntimeConfig, predictors, plan, ops):
        super().__init__(directory, manifest, args, dense, runtime, predictors, plan)
        self.ops = ops
        self.part_names = list(self.kernel.layout.parts)
        self.rows_ffn = ops.rows_ffn(args)
        self.host_kernel = self.kernel
        self.kernel = DeviceKernel(self, self.host_kernel)
        self._xt = None
        self.mirror = self._upload_buf = None
        if self.cache is not None:
            self.mirror = DeviceNeuronCache(self.cache, self.host_kernel, args,
                                            [b is not None for b in self.bias], ops)
            st = DeviceTokenStats(**vars(self.load_stats))
            with ops.context():
                for layer in range(args.num_hidden_layers):  # the first fill (rank: calibration)
                    self.mirror.sync(layer, st)
            self.load_stats = st
        else:
            width = len(self.part_names) * args.hidden_size + 1
            self._upload_buf = ops.staging(
                device_staging_rows(width, ops.esize, args.intermediate_size), width)
        self.tok = DeviceTokenStats()
        self.total = DeviceTokenStats()

    def _upload(self, layer: int, rows: np.ndarray, ids, bias):
        """Device parts [n, d] (and bias) of host records `rows` of neurons `ids`."""
        n, d, ops = rows.shape[0], self.args.hidden_size, self.ops
        ids = np.arange(n) if ids is None else np.asarray(ids, np.int64)
        t0 = time.perf_counter_ns()
        out = [ops.zeros((n, d)) for _ in self.part_names]
        b_out = None if bias is None else ops.zeros((n,))
        stg = self._upload_buf
        for a in range(0, n, stg.rows):
            b = min(n, a + stg.rows)
            k = b - a
            stg.ready()
            _stage(self.host_kernel, self.part_names, d, layer, stg.f32, rows[a:b], ids[a:b],
                   None if bias is None else np.asarray(bias)[a:b])
            dev = stg.send(k)
            for p, t in enumerate(out):
                t[a:b] = dev[:, p * d:(p + 1) * d]
            if b_out is not None:
                b_out[a:b] = dev[:, -1]
            self.tok.transfer_bytes += k * stg.width * stg.esize
        ops.settle(out + ([b_out] if b_out is not None else []))
        self.tok.transfer_ns += time.perf_counter_ns() - t0
        return out, b_out

    def forward(self, layer: int, x, act_out=None):
        """Layer `layer`'s FFN for inputs x [T, d] (a device array): the host selects and
        reads from a float32 copy of x, the device computes."""
        self._xt = x
        try:
            return super().forward(layer, self.ops.numpy(x), act_out)
        finally:
            self._xt = None

    def _ffn_on(self, layer, x, rows, select, has_bias):
        if select is not None and select.size == 0:
            return self.ops.zeros((x.shape[0], self.args.hidden_size))
        return super()._ffn_on(layer, x, rows, select, has_bias)

    def start_token(self) -> None:
        super().start_token()
        self.tok = DeviceTokenStats(**vars(self.tok))

    @property
    def nbytes(self) -> int:
        dev = self.mirror.nbytes if self.mirror is not None else self._upload_buf.nbytes
        return super().nbytes + dev

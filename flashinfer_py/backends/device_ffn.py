"""The FFN providers of a device backend (torch, mlx), written once over the backend's `ops`
(common.py lists what it offers; ``ops.staging(rows, width)`` and ``ops.rows_ffn(args)`` are
the two pieces below that are the framework's own): every neuron on the device
(`DeviceResidentFFN`), and the neurons streamed from flash through a neuron cache mirrored on
the device (`DeviceSparseFFN`).

How a neuron's record (up row, gate row, down column) is held on the device is `DeviceRows`'
(loader.DeviceRow): records in a block format (q8_0, q4_0, q4_1) keep their payload as stored,
one uint8 row [payload bytes] a neuron, and are dequantized on the device, the rows a layer
uses just before its FFN runs (`dequantize_blocks`, `codes_to_float`: vectorized framework
ops, the native dequantize's arithmetic); records in a float format are dequantized on the
host into one row of each part's [n, d] matrix in the compute dtype. Either way the FFN of
inputs x [T, d] over rows S is then three matmuls::

    h = act(x @ gate[S].T) * (x @ up[S].T + b[S])      (ungated: act(x @ up[S].T + b[S]))
    out = h @ down[S]

Sparse mode keeps everything SparseFFN decides on the host (selection, window, ranking, the
native NeuronCache that reads records from flash into host rows) and mirrors the host cache on
the device: `DeviceNeuronCache` holds, per layer, preallocated device matrices in the host
cache's slot order. Before rows are used it brings them level with the host: the rows the host
compacted (move-last-row, csrc/neuron_cache.cpp) are moved the same way on the device, and the
rows newly read from flash are staged as device rows in a host buffer of bytes and copied to
the device in one transfer per layer (the staging buffer is the backend's: pinned for CUDA).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import ModelArgs, RuntimeConfig
from ..dtypes import to_storage
from ..ffn import FfnOnRows, SparseFFN, TokenStats
from ..loader import STAGING_BYTES, DeviceRow, device_row, device_staging_rows


# ---- block formats on the device (dtypes.py's table, csrc/kernels_q8.h, kernels_q4.h) -------


def _nibbles(ops, g):
    """Codes 0..15 of 4-bit groups g [..., 16] (uint8) -> [..., 32]: byte i holds value i in
    its low nibble and value i + 16 in its high one."""
    return ops.cat([g & 0xF, g >> 4], axis=-1)


def dequantize_blocks(ops, raw, fmt, n: int):
    """float32 [k, n] values of k rows of blocks raw [k, blocks * block_bytes] (uint8):
    q8_0 d * q; q4_0 d * (q - 8); q4_1 d * q + m (d, m float16 at the block's start)."""
    k = raw.shape[0]
    b = raw.reshape(k, -1, fmt.block_bytes)
    d = ops.float32(ops.bitcast(b[:, :, 0:2], "float16"))  # [k, blocks, 1]
    if fmt.code_bits == 8:
        v = d * ops.float32(ops.bitcast(b[:, :, 2:], "int8"))
    elif fmt.name == "q4_1":
        m = ops.float32(ops.bitcast(b[:, :, 2:4], "float16"))
        v = d * ops.float32(_nibbles(ops, b[:, :, 4:])) + m
    else:  # q4_0
        v = d * (ops.float32(_nibbles(ops, b[:, :, 2:])) - 8.0)
    return v.reshape(k, -1)[:, :n]


def codes_to_float(ops, codes, fmt, n: int, scales, ids):
    """float32 [k, n] down columns in the codes layout (dtypes.codes_to_float32 on the
    device): codes [k, code bytes] (uint8) of neurons `ids` (a device index), the layer's
    float16 scales [d_ff / 32, 1 or 2, n] on the device."""
    k = codes.shape[0]
    if fmt.code_bits == 8:
        q = ops.float32(ops.bitcast(codes, "int8"))
    else:
        q = ops.float32(_nibbles(ops, codes.reshape(k, -1, 16))).reshape(k, -1)
    q = q[:, :n]
    sc = ops.float32(scales[ids // 32])  # [k, 1 or 2, n]
    if fmt.name == "q4_1":
        return sc[:, 0] * q + sc[:, 1]
    if fmt.name == "q4_0":
        return sc[:, 0] * (q - 8.0)
    return sc[:, 0] * q


class DeviceRows:
    """How neurons' records live on the device (loader.DeviceRow) and get there.

    `empty(n, bias)` makes the device matrices of n rows: block formats one uint8 [n, payload]
    of the records' parts as stored, float formats one [n, d] compute-dtype matrix a part;
    then the up bias [n] where asked. `stage` writes host records into staging rows (block
    formats: their payload bytes copied; float formats: dequantized, then cast to the compute
    dtype; then the bias), `place` puts rows sent to the device into the matrices, and `parts`
    gives the (up, gate, down) [rows, d] compute-dtype values and the bias of rows `select`,
    dequantizing block formats there, on the device."""

    def __init__(self, kernel: FfnOnRows, args: ModelArgs, ops, bias: bool):
        self.kernel, self.ops = kernel, ops
        self.layout = kernel.layout
        self.fmt = self.layout.fmt
        self.part_names = list(self.layout.parts)
        self.d = args.hidden_size
        self.row: DeviceRow = device_row(self.layout, ops.esize, bias)
        self.quantized = self.fmt.quantized
        self.n_mats = 1 if self.quantized else len(self.part_names)  # before the bias
        self.needs_ids = self.quantized and self.layout.codes
        self.scales = None  # the codes layout's per-layer scales, float16 on the device
        if self.needs_ids:
            self.scales = [ops.raw(np.asarray(sc).view(np.float16)) for sc in kernel.down_scales]

    def empty(self, n: int, bias: bool) -> list:
        ops = self.ops
        mats = ([ops.bytes((n, self.row.raw))] if self.quantized
                else [ops.zeros((n, self.d)) for _ in self.part_names])
        return mats + ([ops.zeros((n,))] if bias else [])

    def stage(self, stg: "Staging", layer: int, rows: np.ndarray, ids: np.ndarray,
              bias: Optional[np.ndarray]) -> None:
        """Host records `rows` (neurons `ids`; the up bias `bias` or None) into staging rows
        [:len(rows)]."""
        k, r, d = len(rows), self.row, self.d
        if r.raw:
            stg.host[:k, :r.raw] = rows.view(np.uint8)[:, :r.raw]
        if not r.values:
            return
        f32 = stg.f32[:k]
        if not self.quantized:
            for p, name in enumerate(self.part_names):
                f32[:, p * d:(p + 1) * d] = self.kernel.part_f32(layer, rows, name, ids)
        if bias is not None:
            f32[:, -1] = bias
        stg.cast(k)

    def place(self, mats: list, dst, dev) -> None:
        """Rows `dev` [k, row bytes] (uint8, on the device) into rows `dst` of `mats`."""
        r, d = self.row, self.d
        if r.raw:
            mats[0][dst] = dev[:, :r.raw]
        if not r.values:
            return
        vals = self.ops.bitcast(dev[:, r.raw:])  # [k, values] in the compute dtype
        if not self.quantized:
            for p in range(len(self.part_names)):
                mats[p][dst] = vals[:, p * d:(p + 1) * d]
        if len(mats) > self.n_mats:
            mats[-1][dst] = vals[:, -1]

    def parts(self, layer: int, mats: list, select, ids=None):
        """({part: [rows, d]} in the compute dtype, bias or None) of rows `select` of `mats`
        (a slice, or a device index); the codes layout needs the rows' neuron `ids` (a
        device index)."""
        taken = [m[select] for m in mats]
        bias = taken[-1] if len(mats) > self.n_mats else None
        if not self.quantized:
            return dict(zip(self.part_names, taken)), bias
        raw, lay, ops, out = taken[0], self.layout, self.ops, {}
        for i, name in enumerate(self.part_names):
            o = lay.part_offsets[i]
            seg = raw[:, o:o + lay.part_bytes[i]]
            if name == "down" and self.needs_ids:
                v = codes_to_float(ops, seg, self.fmt, self.d, self.scales[layer], ids)
            else:
                v = dequantize_blocks(ops, seg, self.fmt, self.d)
            out[name] = ops.compute(v)
        return out, bias

    @property
    def scales_nbytes(self) -> int:
        return sum(self.ops.nbytes(s) for s in self.scales) if self.scales else 0


class Staging:
    """The host staging buffer of device rows (the backend's bytes, pinned for CUDA) and the
    float32 values written before their cast to the compute dtype (the same memory when the
    compute dtype is float32 and the values lie aligned): `ready()` before writing, `cast(k)`
    after, `send(k)` the first k rows to the device as uint8 [k, row bytes]."""

    def __init__(self, ops, row: DeviceRow, rows: int):
        self.row, self.rows, self.dtype = row, rows, ops.dtype_name
        self.buf = ops.staging(rows, row.nbytes)
        self.host = self.buf.host
        self._direct = row.direct
        self.f32 = (self.host.view(np.float32)[:, row.raw // 4:] if self._direct
                    else np.empty((rows, row.values), np.float32))
        self.ready, self.send = self.buf.ready, self.buf.send

    def cast(self, k: int) -> None:
        if not self._direct:
            self.host[:k, self.row.raw:] = to_storage(self.f32[:k], self.dtype).view(np.uint8)

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes + (0 if self._direct else self.f32.nbytes)


class DeviceResidentFFN:
    """Every neuron of every layer on the device (`DeviceRows`: block formats as stored,
    dequantized a layer at a time when it runs; float formats as [d_ff, d] matrices in the
    compute dtype) and OPT's up bias, read once from the bundle file."""

    def __init__(self, bundle_path: str, args: ModelArgs, dense: dict, runtime: RuntimeConfig,
                 ops):
        from ..bundles import BundleReader, ReaderParams, aligned_empty

        self.args, self.ops = args, ops
        reader = BundleReader(bundle_path, ReaderParams(engine=runtime.io_engine,
                                                        queue_depth=runtime.queue_depth,
                                                        use_direct_io=runtime.use_direct_io,
                                                        read_timeout_ms=runtime.read_timeout_ms))
        self.kernel = FfnOnRows(args, reader.layout, dense, runtime.threads)
        f = args.intermediate_size
        eb = np.dtype(reader.numpy_dtype).itemsize
        chunk = max(1, min(f, STAGING_BYTES // (reader.record_elems * eb)))
        records = aligned_empty((chunk, reader.record_elems), reader.numpy_dtype)
        with ops.context():
            self.rows = DeviceRows(self.kernel, args, ops, bias=False)
            stg = Staging(ops, self.rows.row, chunk)
            self.mats = []  # per layer: DeviceRows' matrices of every neuron
            for layer in range(args.num_hidden_layers):
                mats = self.rows.empty(f, bias=False)
                for i in range(0, f, chunk):
                    ids = np.arange(i, min(f, i + chunk), dtype=np.int32)
                    reader.read(layer, ids, records[:len(ids)])
                    stg.ready()
                    self.rows.stage(stg, layer, records[:len(ids)], ids, None)
                    self.rows.place(mats, slice(i, i + len(ids)), stg.send(len(ids)))
                ops.settle(mats)
                self.mats.append(mats)
            stg.ready()
            self.ids = ops.index(np.arange(f)) if self.rows.needs_ids else None
        self.io_stats = reader.stats()
        self.is_direct = reader.is_direct
        self.bias = [None if dense.get(f"layers.{i}.ffn_up_bias") is None else
                     ops.array(np.asarray(dense[f"layers.{i}.ffn_up_bias"], np.float32))
                     for i in range(args.num_hidden_layers)]
        self.ffn = ops.rows_ffn(args)

    def _parts(self, layer: int) -> dict:
        return self.rows.parts(layer, self.mats[layer], slice(None), self.ids)[0]

    def forward(self, layer: int, x, act_out=None):
        m = self._parts(layer)
        out, h = self.ffn(x, m["up"], m.get("gate"), m["down"], self.bias[layer],
                          want_h=act_out is not None)
        if act_out is not None:
            act_out[...] = self.ops.numpy(h)
        return out

    def part_f32(self, layer: int, part: str) -> np.ndarray:
        """float32 [d_ff, d] values of one part ("up", "gate", "down") of every neuron."""
        with self.ops.context():
            return self.ops.numpy(self._parts(layer)[part])

    @property
    def nbytes(self) -> int:
        n = sum(self.ops.nbytes(t) for m in self.mats for t in m) + self.rows.scales_nbytes
        return n + sum(self.ops.nbytes(b) for b in self.bias if b is not None)


@dataclass
class DeviceTokenStats(TokenStats):
    """TokenStats plus the host-to-device copies of newly read rows."""

    transfer_ns: int = 0      # staging, copying and placing new rows on the device
    transfer_bytes: int = 0   # bytes copied to the device
    moved_rows: int = 0       # rows moved on the device by compaction

    _SUMMED = TokenStats._SUMMED + ("transfer_ns", "transfer_bytes", "moved_rows")


class DeviceNeuronCache:
    """The host NeuronCache's rows as device rows (`DeviceRows`: block formats their payload
    bytes as stored, float formats dequantized) in device matrices of the same slot order.

    Per layer: the preallocated matrices of `capacity` rows (and [capacity] up biases), the
    neuron id of each device slot, and each neuron's device slot. `sync(layer)` brings the
    device level with the host after SparseFFN changed it: a neuron the host moved to another
    slot (compaction) is moved on the device; a neuron the host read from flash is sent from
    the staging buffer; nothing is reallocated.
    """

    def __init__(self, cache, kernel: FfnOnRows, args: ModelArgs, has_bias: list, ops):
        self.cache, self.ops = cache, ops
        self.fmt = DeviceRows(kernel, args, ops, any(has_bias))
        self.part_names = self.fmt.part_names
        f, L = args.intermediate_size, cache.n_layers
        caps = [cache.capacity(i) for i in range(L)]
        self.mats = [self.fmt.empty(caps[i], has_bias[i]) for i in range(L)]
        self.ids = [np.full(caps[i], -1, np.int32) for i in range(L)]
        self.n = [0] * L
        self.slot_of = [np.full(f, -1, np.int64) for _ in range(L)]
        self.staging = Staging(ops, self.fmt.row,
                               device_staging_rows(self.fmt.row, max(caps + [1])))

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
        ops, mats = self.ops, self.mats[layer]
        if moved.size:  # the host's compaction, on the device (sources gathered first)
            dst, src = ops.index(moved), ops.index(old[moved])
            for t in mats:
                t[dst] = t[src]
        nbytes = 0
        if new.size:
            rows = self.cache.rows(layer)[new]
            bias = self.cache.bias(layer)[new] if len(mats) > self.fmt.n_mats else None
            nbytes = self._send(layer, new, rows, host[new], bias)
        ops.settle(mats)
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
        """Host records `rows` (neurons `ids`) into device `slots`; bytes sent."""
        stg, sent = self.staging, 0
        for a in range(0, len(slots), stg.rows):
            b = min(len(slots), a + stg.rows)
            stg.ready()
            self.fmt.stage(stg, layer, rows[a:b], ids[a:b], None if bias is None else bias[a:b])
            dev = stg.send(b - a)
            self.fmt.place(self.mats[layer], self.ops.index(slots[a:b]), dev)
            sent += (b - a) * self.fmt.row.nbytes
        return sent

    def rows(self, layer: int, select):
        """({part: [rows, d]} in the compute dtype, bias or None) of device slots `select` (a
        slice or int64 indices); block formats dequantized here, on the device."""
        ids = self.ids[layer][select]
        if not isinstance(select, slice):
            select = self.ops.index(select)
        return self.fmt.parts(layer, self.mats[layer], select,
                              self.ops.index(ids) if self.fmt.needs_ids else None)

    @property
    def device_bytes(self) -> int:
        """What the mirror holds on the device: its matrices (and the codes layout's scales)."""
        return (sum(self.ops.nbytes(t) for ms in self.mats for t in ms)
                + self.fmt.scales_nbytes)

    @property
    def nbytes(self) -> int:
        return self.device_bytes + self.staging.nbytes


class DeviceKernel:
    """Stands in for SparseFFN's FfnOnRows: called with the same arguments (host rows of the
    neuron cache, or of the no-reuse layer buffer), it computes on the device. Cache rows are
    found by their place in the cache's matrix and taken from the device mirror (brought level
    first); other rows are sent as device rows. Everything else is the host kernel's."""

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
            p, bias = o.mirror.rows(layer, sel)
            if up_bias is None:
                bias = None
        else:  # rows outside the cache (reuse=False): dequantize and send them
            if row_select is not None:
                rows = rows[np.asarray(row_select, np.int64)]
                row_ids = None if row_ids is None else np.asarray(row_ids)[row_select]
                up_bias = None if up_bias is None else np.asarray(up_bias)[row_select]
            p, bias = o._upload(layer, rows, row_ids, up_bias)
        out, h = o.rows_ffn(xt, p["up"], p.get("gate"), p["down"], bias,
                            want_h=act_out is not None)
        if act_out is not None:
            act_out[...] = o.ops.numpy(h)
        return out


class DeviceSparseFFN(SparseFFN):
    """SparseFFN with the FFN computed on a device: the host decides and reads as SparseFFN
    does; the rows it computes on are the device mirror's (DeviceNeuronCache)."""

    SPLIT_CACHE = False  # the device mirror is made of whole rows

    def __init__(self, directory, manifest: dict, args: ModelArgs, dense: dict,
                 runtime: RuntimeConfig, predictors, plan, ops):
        super().__init__(directory, manifest, args, dense, runtime, predictors, plan)
        self.ops = ops
        self.part_names = list(self.kernel.layout.parts)
        self.rows_ffn = ops.rows_ffn(args)
        self.host_kernel = self.kernel
        self.kernel = DeviceKernel(self, self.host_kernel)
        self._xt = None
        self.mirror = self._rows = self._upload_buf = None
        if self.cache is not None:
            self.mirror = DeviceNeuronCache(self.cache, self.host_kernel, args,
                                            [b is not None for b in self.bias], ops)
            st = DeviceTokenStats(**vars(self.load_stats))
            with ops.context():
                for layer in range(args.num_hidden_layers):  # the first fill (rank: calibration)
                    self.mirror.sync(layer, st)
            self.load_stats = st
        else:
            self._rows = DeviceRows(self.host_kernel, args, ops,
                                    any(b is not None for b in self.bias))
            self._upload_buf = Staging(ops, self._rows.row,
                                       device_staging_rows(self._rows.row, args.intermediate_size))
        self.tok = DeviceTokenStats()
        self.total = DeviceTokenStats()

    def _upload(self, layer: int, rows: np.ndarray, ids, bias):
        """({part: [n, d]}, bias) on the device of host records `rows` of neurons `ids`."""
        n, ops, fmt = rows.shape[0], self.ops, self._rows
        ids = np.arange(n) if ids is None else np.asarray(ids, np.int64)
        t0 = time.perf_counter_ns()
        mats = fmt.empty(n, bias is not None)
        stg = self._upload_buf
        for a in range(0, n, stg.rows):
            b = min(n, a + stg.rows)
            stg.ready()
            fmt.stage(stg, layer, rows[a:b], ids[a:b],
                      None if bias is None else np.asarray(bias)[a:b])
            fmt.place(mats, slice(a, b), stg.send(b - a))
            self.tok.transfer_bytes += (b - a) * fmt.row.nbytes
        ops.settle(mats)
        self.tok.transfer_ns += time.perf_counter_ns() - t0
        return fmt.parts(layer, mats, slice(None), ops.index(ids) if fmt.needs_ids else None)

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

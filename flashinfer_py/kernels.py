"""CPU kernels for weights kept in their storage format (float32, float16, bfloat16, and the
block formats q8_0, q4_0, q4_1: ``flashinfer_py.dtypes``).

numpy has no fast float16/bfloat16 matmul and no quantized one, so the model keeps weights as
stored and every product goes through these native kernels (AVX2+FMA+F16C when the CPU has it,
AVX-512 VNNI for the block formats' integer dots and 512-bit vectors for their decode
accumulation, portable scalar code otherwise). Threads: the process's kernel pool
(csrc/thread_pool.h), whose workers spin briefly between calls and whose caller takes work
items itself, so a decode step's ~150 small calls pay no thread wake-up each. Inputs,
activations and outputs are float32; accumulation is float32. With a block format, x is
quantized to 16 bits per block of 32 for the dot products (kernels_quant.h says why not 8).

Weight arrays: ``np.float32``, ``np.float16``, ``np.uint16`` holding bfloat16 bits (numpy
has no bfloat16), or ``np.uint8`` rows of blocks with ``fmt`` naming the format. Every array
must be C-contiguous; bad arguments raise ``ValueError`` naming the argument. ``threads=0``
uses as many threads as OpenMP would (``OMP_NUM_THREADS``, else every core).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ._core import attend1 as _attend1
from ._core import dequantize as _dequantize
from ._core import dequantize_q4 as _dequantize_q4
from ._core import deinterleave16 as _deinterleave16
from ._core import ffn_rows as _ffn_rows
from ._core import ffn_dense as _ffn_dense
from ._core import interleave16 as _interleave16
from ._core import interleave16_in_place as _interleave16_in_place
from ._core import from_float32 as _from_float32
from ._core import kernel_isa as _kernel_isa
from ._core import linear as _linear
from ._core import linear_x16 as _linear_x16
from ._core import q4_scores as _q4_scores
from ._core import quantize as _quantize
from ._core import quantize_q4 as _quantize_q4
from ._core import rms_norm as _rms_norm
from ._core import rope as _rope
from ._core import set_kernel_isa as _set_kernel_isa
from ._core import stream_sum as _stream_sum
from ._core import to_float32 as _to_float32

__all__ = [
    "ACTIVATIONS",
    "attend1",
    "dequantize",
    "dequantize_q4",
    "ffn_dense",
    "ffn_rows",
    "from_float32",
    "Interleaved",
    "interleave",
    "interleaves",
    "kernel_isa",
    "linear",
    "q4_scores",
    "quantize",
    "quantize_q4",
    "rms_norm",
    "rope",
    "set_kernel_isa",
    "stream_sum",
    "to_float32",
]

Activation = Literal["relu", "fatrelu", "silu", "gelu", "gelu_tanh"]
StorageDType = Literal["float32", "float16", "bfloat16"]
BlockFormat = Literal["q8_0", "q4_0", "q4_1"]
ACTIVATIONS: tuple[str, ...] = ("relu", "fatrelu", "silu", "gelu", "gelu_tanh")


def linear(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    out: np.ndarray | None = None,
    threads: int = 0,
    fmt: str | None = None,
) -> np.ndarray:
    """Return ``x @ w.T + bias`` in float32.

    Args:
        x: ``(n, k)`` or ``(k,)`` float32 inputs.
        w: ``(m, k)`` weights: float32, float16 or uint16 (bfloat16 bits); or, with ``fmt``
            a block format, ``(m, row bytes)`` uint8 rows of blocks along k; or an
            :class:`Interleaved` matrix (its own format).
        bias: ``(m,)`` float32 or None.
        out: optional ``(n, m)`` (or ``(m,)`` for 1-D ``x``) float32 buffer, overwritten
            and returned; lets the decode loop run without allocation.
        threads: threads (the caller and pool workers); 0 means all.
        fmt: the storage format of ``w`` (needed for block formats; else from its dtype).
            Several rows of x are a blocked GEMM: each block of w is unpacked once for up
            to 4 inputs.

    Returns:
        ``(n, m)`` float32, or ``(m,)`` when ``x`` is 1-D.
    """
    if x.ndim == 1:
        out2 = None if out is None else out.reshape(1, -1)
        return linear(x.reshape(1, -1), w, bias, out=out2, threads=threads, fmt=fmt).reshape(-1)
    if isinstance(w, Interleaved):
        if fmt is not None and fmt != w.fmt:
            raise ValueError(f"fmt is {fmt!r} but w holds interleaved {w.fmt} rows")
        if x.ndim != 2 or x.shape[1] != w.k:
            raise ValueError(f"x has shape {x.shape} but w has {w.k} values a row: x must be "
                             f"(n, {w.k})")
        return _linear_x16(x, w.data, w.fmt, w.rows, bias, out, threads)
    return _linear(x, w, bias, out, threads, fmt)


# Formats whose resident matrices the model interleaves (csrc/kernels_x16.cpp).
INTERLEAVED_FORMATS = ("q4_0", "q4_1")


class Interleaved:
    """A resident q4_0 / q4_1 matrix with its rows interleaved 16 at a time (the layout of
    csrc/kernels_x16.cpp, made by :func:`interleave`): ``linear`` reads it as it reads the
    row-major rows, with the same integer dots and one core's unpacking shared by 16 rows, so
    a decode step's products run at memory speed where the row-major 4-bit kernel is
    compute-bound (benchmarks/RESULTS.md section 13). ``take(idx)`` gives row-major blocks
    back (an embedding lookup of a tied LM head)."""

    __slots__ = ("data", "fmt", "rows", "k", "row_bytes")

    def __init__(self, data: np.ndarray, fmt: str, rows: int, k: int, row_bytes: int):
        self.data, self.fmt, self.rows, self.k, self.row_bytes = data, fmt, rows, k, row_bytes

    @property
    def shape(self) -> tuple:
        """The row-major matrix's shape: (rows, bytes a row)."""
        return (self.rows, self.row_bytes)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def take(self, idx) -> np.ndarray:
        """Rows ``idx`` as row-major uint8 blocks ``(len(idx), row_bytes)`` (one native call
        per run of consecutive rows)."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows):
            raise IndexError(f"row ids must be in [0, {self.rows}), got {idx.min()}..{idx.max()}")
        out = np.empty((idx.size, self.row_bytes), np.uint8)
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, idx.size]):
            if hi > lo:
                r0 = int(idx[lo])
                out[lo:hi] = _deinterleave16(self.data, self.fmt, self.rows, self.k, r0,
                                             r0 + int(hi - lo))
        return out


def interleave(w: np.ndarray, fmt: str, k: int, *, consume: bool = False) -> Interleaved:
    """``w`` (m, row bytes) uint8 q4_0/q4_1 rows of ``k`` values, interleaved for ``linear``.

    With ``consume`` the rows are interleaved in ``w``'s own memory when ``m`` is a multiple of
    16 (no second copy of the matrix while loading a model; ``w`` no longer holds row-major
    blocks afterwards: pass only an array nothing else reads); otherwise into a new array."""
    m, rb = int(w.shape[0]), int(w.shape[1])
    if (consume and m % 16 == 0 and w.flags.c_contiguous and w.flags.writeable
            and w.dtype == np.uint8):
        _interleave16_in_place(w, fmt, k)
        return Interleaved(w.reshape(-1), fmt, m, int(k), rb)
    return Interleaved(_interleave16(w, fmt, k), fmt, m, int(k), rb)


def ffn_dense(x: np.ndarray, ug, down, gated: bool, activation: Activation,
              act_param: float = 0.0, *, fmt: str | None = None, out: np.ndarray | None = None,
              act_out: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """A dense FFN as two products: ``ug`` the up rows (then, gated, the gate rows) of ``f``
    neurons, ``down`` down_proj ``(d, f)``; returns ``down @ h`` ``(n, d)`` with ``h = act(gate
    . x) * (up . x)`` or ``act(up . x)`` (``act_out`` receives h, ``(n, f)``). Both matrices
    :class:`Interleaved`, or both arrays as ``linear`` takes them (``fmt`` for block rows)."""
    x16 = isinstance(ug, Interleaved)
    if x16 != isinstance(down, Interleaved):
        raise ValueError("ug and down must both be interleaved, or neither")
    if x16:
        f = down.k
        if ug.fmt != down.fmt or ug.rows != (2 * f if gated else f) or down.rows != ug.k:
            raise ValueError(f"ug ({ug.rows} x {ug.k} {ug.fmt}) and down ({down.rows} x "
                             f"{down.k} {down.fmt}) are not one FFN's matrices")
        return _ffn_dense(x, ug.data, down.data, ug.fmt, f, gated, activation, act_param, out,
                          act_out, threads, True)
    f = (ug.shape[0] // 2) if gated else ug.shape[0]
    return _ffn_dense(x, ug, down, fmt, f, gated, activation, act_param, out, act_out, threads,
                      False)


def interleaves(fmt: str) -> bool:
    """Whether the model interleaves resident matrices of ``fmt`` on this CPU: the 4-bit
    formats, where the kernels run AVX-512 VNNI or AVX2 (the portable code keeps the row-major
    kernels: the interleaved layout has no gain without vectors). A model decides when it is
    loaded: after ``set_kernel_isa("scalar")`` its interleaved matrices still give the same
    results to float rounding (the portable loop multiplies and adds where the vector paths
    fuse them), several times slower."""
    return fmt in INTERLEAVED_FORMATS and kernel_isa() in ("avx512", "avx2")


def ffn_rows(
    x: np.ndarray,
    rows: np.ndarray,
    d_model: int,
    up_off: int,
    down_off: int,
    gate_off: int = -1,
    activation: Activation = "relu",
    act_param: float = 0.0,
    *,
    up_bias: np.ndarray | None = None,
    row_select: np.ndarray | None = None,
    out: np.ndarray | None = None,
    act_out: np.ndarray | None = None,
    threads: int = 0,
    fmt: str | None = None,
    down_scales: np.ndarray | None = None,
    row_ids: np.ndarray | None = None,
    down_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Feed-forward block computed straight from neuron-cache rows.

    Each row is one neuron's bundle record: ``d_model``-element parts (up, optional gate,
    down) at element offsets ``up_off``, ``gate_off``, ``down_off``, then padding. For
    every input ``t`` and used row ``j``::

        u = rows[j, up:up+d] . x[t] (+ up_bias[j])
        h = act(rows[j, gate:gate+d] . x[t]) * u   if gated else   act(u)
        out[t] = sum_j h * rows[j, down:down+d]

    Rows with ``h == 0`` cost no down-part traffic (ReLU sparsity). With every row of a
    layer present this is the dense FFN.

    Args:
        x: ``(n, d_model)`` or ``(d_model,)`` float32.
        rows: ``(r, record_elems)`` float32/float16/uint16 (bfloat16 bits) cache matrix.
        d_model: elements per part.
        up_off, down_off: element offsets of the up and down parts inside a row.
        gate_off: element offset of the gate part, or -1 when the FFN is not gated.
        activation: ``relu``, ``fatrelu`` (``h = v if v > act_param else 0``), ``silu``,
            ``gelu`` (exact erf) or ``gelu_tanh``; applied to the gate when gated.
        act_param: the fatrelu threshold; ignored by the other activations.
        up_bias: ``(r,)`` float32 added to the up dot product (OPT fc1 bias), indexed by row.
        row_select: ``(n_used,)`` int32 indices into ``rows``; None uses all ``r`` rows.
        out: optional ``(n, d_model)`` float32 buffer, overwritten and returned.
        act_out: optional ``(n, n_used)`` float32 buffer that receives ``h``; column ``i``
            belongs to row ``row_select[i]`` (or row ``i``). Use it to find active neurons.
        threads: threads (the caller and pool workers); 0 means all.
        fmt: the rows' storage format; a block format makes ``rows`` uint8 and every offset
            a byte offset (``dtypes.RecordLayout.offsets``).
        down_scales: block formats whose down part holds codes only (a GGUF's down_proj
            kept exactly): the layer's float16 ``(d_ff / 32, 1 or 2, d_model)`` scales (and
            q4_1 minimums) per 32-neuron block.
        row_ids: ``(r,)`` int32 neuron id of each row (which block of ``down_scales`` it
            uses); None when row ``i`` is neuron ``i``.
        down_rows: ``(r, down_elems)``, the rows' down parts in a matrix of their own (a split
            neuron cache keeps a ReLU layer's up parts contiguous: the sparse FFN reads them
            as one stream); ``down_off`` is then an offset in its rows. None: in ``rows``.
            ``rows`` may also be a split cache's :class:`~flashinfer_py.dtypes.SplitRows`, with
            the offsets of the whole record.

    Returns:
        ``(n, d_model)`` float32, or ``(d_model,)`` when ``x`` is 1-D.
    """
    if not isinstance(rows, np.ndarray):  # a split cache's rows (dtypes.SplitRows), record offsets
        if down_rows is not None:
            raise ValueError("rows are a split cache's (SplitRows, with their down rows); "
                             "pass down_rows only with a plain rows array")
        rows, down_rows, down_off = rows.up, rows.down, down_off - rows.split
    squeeze = x.ndim == 1
    if squeeze:
        x = x.reshape(1, -1)
        out = None if out is None else out.reshape(1, -1)
        act_out = None if act_out is None else act_out.reshape(1, -1)
    y = _ffn_rows(
        x, rows, d_model, up_off, gate_off, down_off, activation, act_param,
        up_bias, out, act_out, row_select, threads, fmt, down_scales, row_ids, down_rows,
    )
    return y.reshape(-1) if squeeze else y


def quantize(a: np.ndarray, fmt: BlockFormat, *, threads: int = 0) -> np.ndarray:
    """Rows of float32 ``a`` ``(n, len)`` as uint8 rows of blocks ``(n, row bytes)``.

    llama.cpp's reference quantizers, bit for bit (q8_0: d = max|w| / 127, q = round(w / d);
    q4_0: d = w* / -8 with w* the value of largest magnitude, q = min(15, trunc(w / d + 8.5));
    q4_1: d = (max - min) / 15, m = min, q = min(15, trunc((w - m) / d + 0.5))); a last
    partial block is zero padded first.
    """
    return _quantize(np.ascontiguousarray(a, np.float32), fmt, threads)


def dequantize(a: np.ndarray, fmt: BlockFormat, length: int, *, threads: int = 0) -> np.ndarray:
    """float32 ``(n, length)`` values of uint8 rows of blocks ``a`` (at least the row bytes)."""
    return _dequantize(a, fmt, length, threads)


def quantize_q4(
    rows: np.ndarray,
    part_offsets,
    length: int,
    src_rows,
    out: np.ndarray,
    dst_rows,
    *,
    threads: int = 0,
    fmt: str | None = None,
) -> None:
    """4-bit block copies (csrc/kernels_q4.h) of parts of bundle records.

    For each i, the parts of ``rows[src_rows[i]]`` starting at the element offsets
    ``part_offsets`` (``length`` elements each) are quantized one after the other into the
    uint8 record ``out[dst_rows[i]]`` (blocks of 32: fp16 scale d = max|w| / 7, then 16 bytes
    of nibbles; value = (q - 8) * d). Rows in a block format (``fmt``; offsets in bytes) are
    expanded to float32 block by block first.
    """
    _quantize_q4(rows, np.asarray(part_offsets, np.int64), length,
                 np.ascontiguousarray(src_rows, np.int64), out,
                 np.ascontiguousarray(dst_rows, np.int64), threads, fmt)


def dequantize_q4(record: np.ndarray, n_parts: int, length: int) -> np.ndarray:
    """float32 values ``(n_parts * length,)`` of one 4-bit record (tests and tools)."""
    return _dequantize_q4(np.ascontiguousarray(record, np.uint8), n_parts, length)


def q4_scores(
    x: np.ndarray,
    sketch: np.ndarray,
    length: int,
    gated: bool,
    activation: Activation,
    act_param: float = 0.0,
    *,
    scale: np.ndarray | None = None,
    out: np.ndarray | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Estimated ``max_t |h_t| * scale`` of every 4-bit record (``(n_rec,)`` float32).

    ``h = act(gate~ . x_t) * (up~ . x_t)`` (gated: records hold up then gate) or
    ``act(up~ . x_t)``, with x quantized to 16 bits per block of 32 on the fly.
    """
    x = np.ascontiguousarray(np.atleast_2d(x), np.float32)
    return _q4_scores(x, sketch, length, gated, activation, act_param, scale, out, threads)


def to_float32(
    a: np.ndarray, *, out: np.ndarray | None = None, threads: int = 0
) -> np.ndarray:
    """Return a float32 copy of ``a`` (float32, float16 or uint16 bfloat16 bits), any shape."""
    return _to_float32(a, out, threads)


def from_float32(
    a: np.ndarray,
    dtype: StorageDType,
    *,
    out: np.ndarray | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Convert float32 ``a`` to a storage dtype, any shape.

    ``float16`` rounds to nearest even (IEEE, overflow to inf, like numpy ``astype``);
    ``bfloat16`` rounds to nearest even (like torch) and is returned as uint16 bits.
    """
    return _from_float32(a, dtype, out, threads)


# ---- the small ops of a decode step (csrc/ops.h) ----------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, *,
             out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * w`` (float32, C-contiguous;
    ``out`` may be ``x`` itself)."""
    return _rms_norm(x, w, eps, out)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate-half RoPE in place on the first ``len(cos)`` values of every row of ``x``
    (Hugging Face's convention; ``cos``/``sin``: one position's table row, float32)."""
    _rope(x, cos, sin)


def attend1(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first: int, end: int,
            scale: float, softcap: float = 0.0, *, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax attention of one token: ``q`` ``(heads, hd)`` over ``keys``/``values``
    ``(kv_heads, cap, hd)`` (a KV cache) at positions ``[first, end)``, grouped-query (head h
    reads kv head ``h // (heads // kv_heads)``), scores ``scale * q.k`` soft-capped at
    ``softcap`` when > 0. Returns ``(heads, hd)`` float32."""
    return _attend1(q, keys, values, first, end, scale, softcap, out)


def stream_sum(a: np.ndarray, *, threads: int = 0) -> float:
    """Sum of a float32 array (any shape, C-contiguous), read once on the kernels' threads.

    Nothing but loads and adds (AVX2 where the CPU has it): the memory read bandwidth a
    kernel can reach on this machine, the reference ``benchmarks/bench_kernels.py`` compares
    every kernel with.
    """
    return _stream_sum(a, threads)


def kernel_isa() -> str:
    """The instruction set the kernels use now: ``"avx512"`` (AVX-512 F/BW/VL/VNNI: the block
    formats' dots use VNNI, the rest its AVX2 code), ``"avx2"`` or ``"scalar"``."""
    return _kernel_isa()


def set_kernel_isa(name: Literal["auto", "scalar", "avx2", "avx512"]) -> None:
    """Force the kernels' instruction set (tests and ablations); ``"auto"`` picks the best."""
    _set_kernel_isa(name)

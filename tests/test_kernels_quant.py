"""The block formats' kernels (csrc/kernels_quant.h) against references from outside the
project: gguf-py (llama.cpp's own numpy quantizers and dequantizers) for the bytes, and
numpy dequantize-then-matmul in float64 for the products.

The products quantize x to 16 bits per block of 32 (d = max|x| / 32767, q = round(x / d) half
away from zero; llama.cpp uses 8 bits, kernels_quant.h says why not). Each case is checked
twice: tightly (float32 rounding only) against the reference run on that quantized x, and
against the unquantized x within the error the 16-bit x can cause (half a step per element). Odd sizes everywhere: rows whose
length is not a multiple of 32 (the last block zero padded), row and token counts that leave
partial register tiles. Every case runs on each instruction set the CPU has.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest

from flashinfer_py import kernels as K
from flashinfer_py.convert import split_down_blocks
from test_kernels import act_ref, assert_close

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gg_dequantize  # noqa: E402
from gguf.quants import quantize as gg_quantize  # noqa: E402

SEED = 777
FORMATS = ["q8_0", "q4_0", "q4_1"]
GG = {f: getattr(gguf.GGMLQuantizationType, f.upper()) for f in FORMATS}
BLOCK = 32


# ---- references ----------------------------------------------------------------------------


def padded(w: np.ndarray) -> np.ndarray:
    """Rows zero padded to whole blocks (the documented treatment of a last partial block)."""
    return np.pad(np.asarray(w, np.float32), ((0, 0), (0, -w.shape[1] % BLOCK)))


def gg_blocks(w: np.ndarray, fmt: str) -> np.ndarray:
    """llama.cpp's quantization of the rows of w (gguf-py), uint8 [rows, row bytes]."""
    return gg_quantize(padded(w), GG[fmt])


def gg_values(blocks: np.ndarray, fmt: str, n: int) -> np.ndarray:
    """float64 values of rows of blocks (gguf-py's dequantizer), the padding cut off."""
    return gg_dequantize(blocks, GG[fmt]).astype(np.float64)[:, :n]


def ref_quantize_x(x: np.ndarray):
    """x [T, n] as the kernels see it: (dequantized float64 [T, n], step dx [T, n])."""
    t, n = x.shape
    b = padded(x).reshape(t, -1, BLOCK)
    d = (np.abs(b).max(axis=2) / np.float32(32767)).astype(np.float32)
    inv = np.zeros_like(d)
    inv[d > 0] = np.float32(1) / d[d > 0]
    v = (b * inv[..., None]).astype(np.float64)                  # a float32 product, exactly
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)                   # round half away from zero
    deq = (q * d[..., None].astype(np.float64)).reshape(t, -1)[:, :n]
    step = np.repeat(d.astype(np.float64), BLOCK, axis=1)[:, :n]
    return deq, step


def random_weights(rng, rows: int, n: int) -> np.ndarray:
    """Rows with a spread of scales, an all-zero block, a lone value, a negative maximum."""
    w = rng.standard_normal((rows, n)) * rng.uniform(0.01, 2.0, (rows, 1))
    w[0, :BLOCK] = 0.0
    if rows > 2:
        w[1, :BLOCK], w[1, 3] = 0.0, 0.7
        w[2, 5] = -9.0
    return w.astype(np.float32)


def random_x(rng, t: int, n: int) -> np.ndarray:
    x = (rng.standard_normal((t, n)) * 1.5).astype(np.float32)
    x[0, :BLOCK] = 0.0
    return x


# ---- the bytes: quantize / dequantize -----------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [32, 77, 200, 576])
def test_quantize_is_llama_cpp_bit_for_bit(isa, fmt, n):
    rng = np.random.default_rng(SEED)
    w = random_weights(rng, 23, n)
    got = K.quantize(w, fmt)
    assert got.dtype == np.uint8 and got.shape == (23, -(-n // BLOCK) * {"q8_0": 34, "q4_0": 18, "q4_1": 20}[fmt])
    np.testing.assert_array_equal(got, gg_blocks(w, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_llama_cpp_bit_for_bit(fmt):
    rng = np.random.default_rng(SEED + 1)
    n = 147
    blocks = gg_blocks(random_weights(rng, 11, n), fmt)
    wide = np.zeros((11, blocks.shape[1] + 7), np.uint8)   # rows wider than their blocks
    wide[:, :blocks.shape[1]] = blocks
    got = K.dequantize(wide, fmt, n)
    assert got.dtype == np.float32 and got.shape == (11, n)
    np.testing.assert_array_equal(got, gg_dequantize(blocks, GG[fmt])[:, :n])


# ---- linear: GEMV and the blocked GEMM ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 3, 4, 9])
@pytest.mark.parametrize("k", [64, 200, 600])  # 2, 7, 19 blocks: the dots take chunks of 8
def test_linear_matches_dequantize_then_matmul(isa, fmt, n, k):
    rng = np.random.default_rng(SEED + n + k)
    m = 37  # an odd number of rows: a partial row tile
    w = gg_blocks(random_weights(rng, m, k), fmt)
    wf = gg_values(w, fmt, k)
    x = random_x(rng, n, k)
    bias = rng.standard_normal(m).astype(np.float32)
    y = K.linear(x, w, bias, fmt=fmt)
    assert y.dtype == np.float32 and y.shape == (n, m)
    xq, step = ref_quantize_x(x)
    assert_close(y, xq @ wf.T + bias, np.abs(xq) @ np.abs(wf).T + np.abs(bias))
    # the 16-bit x moves each product by at most half a step per element
    err = np.abs(y - (x.astype(np.float64) @ wf.T + bias))
    assert (err <= (step / 2) @ np.abs(wf).T * (1 + 1e-3) + 1e-5 * (np.abs(x) @ np.abs(wf).T + 1)).all()


def test_linear_threads_out_buffer_and_1d_input(isa):
    rng = np.random.default_rng(SEED + 2)
    k, m = 96, 301
    w = gg_blocks(random_weights(rng, m, k), "q4_1")
    x = random_x(rng, 6, k)
    one = K.linear(x, w, fmt="q4_1", threads=1)
    np.testing.assert_allclose(K.linear(x, w, fmt="q4_1", threads=2), one, rtol=1e-6, atol=1e-6)
    out = np.full((6, m), np.nan, np.float32)
    assert K.linear(x, w, fmt="q4_1", out=out) is out
    np.testing.assert_array_equal(out, one)
    # a token alone gives what it gets among others (a GEMV is the n = 1 GEMM)
    np.testing.assert_allclose(K.linear(x[4], w, fmt="q4_1"), one[4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [200, 256, 600])
def test_a_token_alone_gets_exactly_its_row_of_the_gemm(isa, fmt, k):
    """The one-row kernel and the register tiles of a level run each (input, row) through the
    same operations in the same order (chunks of 8 blocks, the partial last one included): a
    token's GEMV is bit for bit its row of the prompt's GEMM."""
    rng = np.random.default_rng(SEED + k)
    w = gg_blocks(random_weights(rng, 45, k), fmt)
    x = random_x(rng, 7, k)
    y = K.linear(x, w, fmt=fmt, threads=1)
    for t in range(7):
        np.testing.assert_array_equal(K.linear(x[t], w, fmt=fmt, threads=1), y[t])


# ---- resident 4-bit matrices with 16 rows interleaved (csrc/kernels_x16.cpp) ----------------

X16 = ["q4_0", "q4_1"]


@pytest.mark.parametrize("fmt", X16)
@pytest.mark.parametrize("m,k", [(1, 32), (37, 200), (48, 64)])
def test_interleaved_rows_come_back_as_stored(fmt, m, k):
    """interleave keeps every byte: the rows read back (in any order) are llama.cpp's blocks;
    the padding of the last group adds at most 15 rows' worth of bytes."""
    rng = np.random.default_rng(SEED + m)
    w = gg_blocks(random_weights(rng, m, k), fmt)
    il = K.interleave(w, fmt, k)
    assert il.shape == w.shape and il.rows == m and il.k == k
    assert w.nbytes <= il.nbytes < w.nbytes + 16 * w.shape[1]
    idx = rng.permutation(m)
    np.testing.assert_array_equal(il.take(idx), w[idx])
    # consumed: in the rows' own memory when they are whole groups of 16, else a new array
    mine = w.copy()
    il2 = K.interleave(mine, fmt, k, consume=True)
    assert np.shares_memory(il2.data, mine) == (m % 16 == 0)
    np.testing.assert_array_equal(il2.data, il.data)


@pytest.mark.parametrize("fmt", X16)
@pytest.mark.parametrize("n", [1, 3, 4, 9])
@pytest.mark.parametrize("m,k", [(37, 200), (64, 64)])
def test_interleaved_linear_matches_dequantize_then_matmul(isa, fmt, n, m, k):
    """The interleaved product against numpy on the blocks' values (as the row-major one is
    checked above), and against the row-major kernel: the same integer dots, so they agree to
    float rounding; a token alone gets exactly what it gets among others."""
    rng = np.random.default_rng(SEED + 11 * n + m)
    w = gg_blocks(random_weights(rng, m, k), fmt)
    wf = gg_values(w, fmt, k)
    il = K.interleave(w, fmt, k)
    x = random_x(rng, n, k)
    bias = rng.standard_normal(m).astype(np.float32)
    y = K.linear(x, il, bias)
    assert y.dtype == np.float32 and y.shape == (n, m)
    xq, step = ref_quantize_x(x)
    assert_close(y, xq @ wf.T + bias, np.abs(xq) @ np.abs(wf).T + np.abs(bias))
    row_major = K.linear(x, w, bias, fmt=fmt)
    np.testing.assert_allclose(y, row_major, rtol=1e-5,
                               atol=1e-6 * (np.abs(xq) @ np.abs(wf).T).max())
    for t in range(n):
        np.testing.assert_array_equal(K.linear(x[t], il, bias), y[t])
    out = np.full((n, m), np.nan, np.float32)
    assert K.linear(x, il, bias, out=out, threads=2) is out
    np.testing.assert_array_equal(out, y)  # the split between threads changes no sum


def vector_isas() -> list:
    """The vector instruction sets of the kernels this CPU has ("avx2", "avx512")."""
    have = []
    for isa in ("avx2", "avx512"):
        try:
            K.set_kernel_isa(isa)
            have.append(isa)
        except ValueError:
            pass
    K.set_kernel_isa("auto")
    return have


def on_each_isa(isas, fn) -> dict:
    """{isa: fn()} with the kernels set to each of `isas` in turn (then back to auto)."""
    got = {}
    try:
        for isa in isas:
            K.set_kernel_isa(isa)
            got[isa] = fn()
    finally:
        K.set_kernel_isa("auto")
    return got


@pytest.mark.parametrize("fmt", X16)
def test_interleaved_vector_paths_give_the_same_floats(fmt):
    """AVX2 and AVX-512 VNNI run each row's lane through the same operations in the same
    order: the same floats, for a token alone and a prompt (the portable loop: within float
    rounding, checked above)."""
    have = vector_isas()
    if len(have) < 2:
        pytest.skip("needs both AVX2 and AVX-512 VNNI")
    rng = np.random.default_rng(SEED + 5)
    m, k = 53, 160
    il = K.interleave(gg_blocks(random_weights(rng, m, k), fmt), fmt, k)
    x = random_x(rng, 7, k)
    got = on_each_isa(have, lambda: (K.linear(x, il), K.linear(x[3], il)))
    for a, b in zip(got["avx2"], got["avx512"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_major_block_dots_read_only_their_rows_at_every_chunk_length(fmt):
    """The VNNI dots gather a chunk's 8 block scales with 64-byte loads (quant_tiles.h,
    vnni_scales8); a row's last chunk has 1-8 blocks and must load only its own bytes. Rows
    of every block count 1-17 (every last-chunk length, q4_1's block 7 inserted alone), the
    matrix's last row followed by NaN scales: any byte read past a row would poison its sum.
    The AVX2 level (scalar loads of the same scales) gives the same floats. And with the last
    row ending at an inaccessible page: a read past it would fault."""
    have = vector_isas()
    rng = np.random.default_rng(SEED + 9)
    for nb in range(1, 18):
        k = nb * BLOCK
        blocks = gg_blocks(random_weights(rng, 5, k), fmt)
        buf = np.full(blocks.size + 256, 0xFF, np.uint8)  # fp16 0xFFFF: NaN
        buf[: blocks.size] = blocks.reshape(-1)
        w = buf[: blocks.size].reshape(blocks.shape)
        x = random_x(rng, 3, k)
        ref = gg_values(blocks, fmt, k) @ x.astype(np.float64).T
        got = on_each_isa(have, lambda: (K.linear(x, w, fmt=fmt), K.linear(x[1], w, fmt=fmt)))
        for y, y1 in got.values():
            assert np.isfinite(y).all() and np.isfinite(y1).all(), f"{nb} blocks: a NaN read"
            np.testing.assert_allclose(y, ref.T, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
            np.testing.assert_array_equal(y1, y[1])
        if len(got) == 2:
            for a, b in zip(got["avx2"], got["avx512"]):
                np.testing.assert_array_equal(a, b)
        with _before_a_guard_page(blocks.nbytes) as buf:
            buf[:] = blocks.reshape(-1)
            np.testing.assert_array_equal(K.linear(x, buf.reshape(blocks.shape), fmt=fmt),
                                          got[have[-1]][0] if have else K.linear(x, w, fmt=fmt))


@contextlib.contextmanager
def _before_a_guard_page(nbytes: int):
    """A uint8 array of `nbytes` that ends where a PROT_NONE page begins (Linux)."""
    import ctypes
    import mmap

    if not sys.platform.startswith("linux"):
        pytest.skip("mprotect through ctypes: Linux only")
    page = mmap.PAGESIZE
    n = -(-nbytes // page) + 1
    m = mmap.mmap(-1, n * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    guard = ctypes.c_void_p(base + (n - 1) * page)
    assert libc.mprotect(guard, ctypes.c_size_t(page), 0) == 0, ctypes.get_errno()
    try:
        start = (n - 1) * page - nbytes
        yield np.frombuffer(m, np.uint8)[start:start + nbytes]
    finally:
        libc.mprotect(guard, ctypes.c_size_t(page), 3)  # read + write again before unmapping


@pytest.mark.parametrize("n", [1, 5, 9000])
def test_ffn_dense_float_rows_against_numpy(n):
    """kernels.ffn_dense on float16 rows: up/gate then down_proj against numpy in float64;
    act_out receives h, and the output is the same with or without it (9000 inputs: the
    prompt-sized scratch, freed after the call)."""
    rng = np.random.default_rng(SEED + n)
    d, f = 32, 64
    ug = (rng.standard_normal((2 * f, d)) * 0.2).astype(np.float16)
    down = (rng.standard_normal((d, f)) * 0.2).astype(np.float16)
    x = rng.standard_normal((n, d)).astype(np.float32)
    u = x.astype(np.float64) @ ug[:f].astype(np.float64).T
    g = x.astype(np.float64) @ ug[f:].astype(np.float64).T
    h = g / (1 + np.exp(-g)) * u
    want = h @ down.astype(np.float64).T
    act = np.empty((n, f), np.float32)
    got = K.ffn_dense(x, ug, down, True, "silu", act_out=act)
    np.testing.assert_allclose(act, h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(K.ffn_dense(x, ug, down, True, "silu"), got)


def test_interleaved_arguments_are_checked():
    w = np.zeros((20, 36), np.uint8)
    with pytest.raises(ValueError, match="interleaved rows exist for q4_0 and q4_1, not 'q8_0'"):
        K.interleave(np.zeros((20, 68), np.uint8), "q8_0", 64)
    with pytest.raises(ValueError, match=r"w has shape \(20, 36\): rows of 32 q4_0 values are "
                                         r"18 bytes"):
        K.interleave(w, "q4_0", 32)
    il = K.interleave(w, "q4_0", 64)
    with pytest.raises(ValueError, match=r"x must be \(n, 64\)"):
        K.linear(np.ones((2, 32), np.float32), il)
    with pytest.raises(ValueError, match="fmt is 'q4_1' but w holds interleaved q4_0 rows"):
        K.linear(np.ones((2, 64), np.float32), il, fmt="q4_1")
    from flashinfer_py import _core
    with pytest.raises(ValueError, match="w16 has 1151 bytes; 20 interleaved q4_0 rows of 64 "
                                         "values are 1152"):
        _core.linear_x16(np.ones((1, 64), np.float32), il.data[:-1].copy(), "q4_0", 20)
    with pytest.raises(ValueError, match=r"rows \[3, 21\) are not within \[0, 20\)"):
        _core.deinterleave16(il.data, "q4_0", 20, 64, 3, 21)
    with pytest.raises(IndexError, match=r"row ids must be in \[0, 20\)"):
        il.take([0, 20])
    # a dense FFN's buffers: act_out may not share memory with out
    ug = K.interleave(np.zeros((32, 36), np.uint8), "q4_0", 64)
    dn = K.interleave(np.zeros((64, 18), np.uint8), "q4_0", 32)
    buf = np.zeros(64 + 32, np.float32)
    with pytest.raises(ValueError, match="act_out must not share memory with out"):
        K.ffn_dense(np.ones((1, 64), np.float32), ug, dn, False, "relu",
                          out=buf[:64].reshape(1, 64), act_out=buf[32:64].reshape(1, 32))
    with pytest.raises(ValueError, match="are not one FFN's matrices"):
        K.ffn_dense(np.ones((1, 64), np.float32), ug, dn, True, "silu")


# ---- ffn_rows on records of blocks -----------------------------------------------------------


def records(rng, fmt: str, f: int, d: int, gated: bool):
    """Records (up, [gate,] down column) of blocks along d, and their float64 values."""
    parts = [random_weights(rng, f, d) * 0.3 for _ in range(3 if gated else 2)]
    blocks = [gg_blocks(p, fmt) for p in parts]
    vals = [gg_values(b, fmt, d) for b in blocks]
    pad = np.zeros((f, 5), np.uint8)  # a row stride wider than the parts
    return np.ascontiguousarray(np.concatenate(blocks + [pad], axis=1)), vals, blocks[0].shape[1]


def assert_h_close(h, xq, vals, gated: bool, act: str = "silu", bias=None):
    """h against float64 on the quantized x, within 1e-4 of the terms that make it (a silu of
    the gate times the up product: both products' |terms|, the activation's slope <= 1.2)."""
    up = xq @ vals[0].T + (0 if bias is None else bias)
    eu = np.abs(xq) @ np.abs(vals[0]).T
    if gated:
        g = xq @ vals[1].T
        ref = act_ref(act, g, 0.0) * up
        scale = np.abs(act_ref(act, g, 0.0)) * eu + 1.2 * (np.abs(xq) @ np.abs(vals[1]).T) * np.abs(up)
    else:
        ref, scale = act_ref(act, up, 0.0), 1.2 * eu
    assert (np.abs(h - ref) <= 1e-4 * scale + 1e-6).all(), np.max(np.abs(h - ref) / (scale + 1e-30))


def ref_ffn(x64, vals, gated: bool, act: str, param: float, bias=None):
    """h [T, f] and out [T, d] in float64, with the scale of the terms (error bound)."""
    u = x64 @ vals[0].T + (0 if bias is None else bias)
    if gated:
        a = act_ref(act, x64 @ vals[1].T, param)
        h = a * u
    else:
        h = act_ref(act, u, param)
    return h, h @ vals[-1], np.abs(h) @ np.abs(vals[-1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated,act", [(True, "silu"), (True, "gelu_tanh"), (False, "relu")])
@pytest.mark.parametrize("n", [1, 5])
def test_ffn_rows_matches_dequantize_then_matmul(isa, fmt, gated, act, n):
    rng = np.random.default_rng(SEED + 3 + n)
    f, d = 71, 200
    rows, vals, pb = records(rng, fmt, f, d, gated)
    x = random_x(rng, n, d)
    h = np.empty((n, f), np.float32)
    out = K.ffn_rows(x, rows, d, up_off=0, gate_off=pb if gated else -1,
                     down_off=(2 if gated else 1) * pb, activation=act, act_out=h, fmt=fmt)
    xq, _ = ref_quantize_x(x)
    h_ref, o_ref, scale = ref_ffn(xq, vals, gated, act, 0.0)
    # h: the up / gate dot products are exact up to float32 rounding on the quantized x
    assert_h_close(h, xq, vals, gated, act)
    assert_close(out, h.astype(np.float64) @ vals[-1], np.abs(h) @ np.abs(vals[-1]))
    assert_close(out, o_ref, scale, rel=1e-3)


@pytest.mark.parametrize("n", [1, 3])
def test_ffn_rows_row_select_bias_and_threads(isa, n):
    """Rows picked in random order (run sorted by row inside, h back in the caller's order);
    one input takes the fused per-neuron path, which reads records ahead."""
    rng = np.random.default_rng(SEED + 4)
    f, d = 97, 77
    rows, vals, pb = records(rng, "q4_0", f, d, True)
    x = random_x(rng, n, d)
    bias = rng.standard_normal(f).astype(np.float32) * 0.1
    sel = rng.permutation(f)[:41].astype(np.int32)
    h = np.empty((n, 41), np.float32)
    got = K.ffn_rows(x, rows, d, 0, 2 * pb, pb, "silu", up_bias=bias, row_select=sel,
                     act_out=h, fmt="q4_0", threads=2)
    xq, _ = ref_quantize_x(x)
    assert_h_close(h, xq, [v[sel] for v in vals], True, bias=bias[sel])
    assert_close(got, h.astype(np.float64) @ vals[2][sel], np.abs(h) @ np.abs(vals[2][sel]))
    one = K.ffn_rows(x, rows, d, 0, 2 * pb, pb, "silu", up_bias=bias, row_select=sel,
                     fmt="q4_0", threads=1)
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_ffn_on_picked_rows(isa, fmt):
    """The sparse FFN on neuron-cache rows as the runtime calls it: ReLU-family records (up,
    down) picked out of order by row_select, a FATReLU threshold leaving few active, one token
    (the one-row kernel reading ahead of the picked rows) and a prompt: both against numpy,
    and the token's h bit for bit what it gets in the prompt."""
    rng = np.random.default_rng(SEED + 9)
    f, d = 150, 600
    rows, vals, pb = records(rng, fmt, f, d, False)
    x = random_x(rng, 3, d)
    sel = rng.permutation(f)[:90].astype(np.int32)
    xq, _ = ref_quantize_x(x)
    u = xq @ vals[0][sel].T
    thr = float(np.quantile(u[1], 0.8))  # about a fifth of the picked rows active
    kw = dict(up_off=0, down_off=pb, activation="fatrelu", act_param=thr, row_select=sel,
              fmt=fmt)
    h = np.empty((3, 90), np.float32)
    out = K.ffn_rows(x, rows, d, act_out=h, threads=2, **kw)
    h_ref, o_ref, scale = ref_ffn(xq, [v[sel] for v in vals], False, "fatrelu", thr)
    near = np.abs(u - thr) < 1e-4 * (np.abs(xq) @ np.abs(vals[0][sel]).T)  # rounding may tip
    assert ((h != 0) == (h_ref != 0))[~near].all() and 0 < (h[1] != 0).sum() < 40
    assert_close(out, h.astype(np.float64) @ vals[1][sel], np.abs(h) @ np.abs(vals[1][sel]))
    h1 = np.empty((1, 90), np.float32)
    one = K.ffn_rows(x[1:2], rows, d, act_out=h1, threads=1, **kw)
    np.testing.assert_array_equal(h1[0], h[1])
    np.testing.assert_allclose(one[0], out[1], rtol=1e-5, atol=1e-6 * scale[1].max())


# ---- ffn_rows with the down part as codes (a GGUF's down_proj kept exactly) ----------------


def codes_case(rng, fmt: str, f: int, d: int):
    """Records (up, gate, down codes), the scales, and the float64 values of every part:
    down_proj [d, f] quantized along f as a GGUF holds it, split by the converter."""
    up, gate = (random_weights(rng, f, d) * 0.3 for _ in range(2))
    down = random_weights(rng, d, f) * 0.3                       # [d, f] like down_proj
    bu, bg, bd = gg_blocks(up, fmt), gg_blocks(gate, fmt), gg_quantize(down, GG[fmt])
    codes, scales = split_down_blocks(bd, fmt, d, f)
    rows = np.ascontiguousarray(np.concatenate([bu, bg, codes], axis=1))
    down_vals = gg_dequantize(bd, GG[fmt]).astype(np.float64).T  # [f, d]: neuron j's column
    return rows, scales, [gg_values(bu, fmt, d), gg_values(bg, fmt, d), down_vals], bu.shape[1]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 6])
def test_ffn_rows_down_codes_match_the_gguf_down_proj(isa, fmt, n):
    rng = np.random.default_rng(SEED + 5 + n)
    f, d = 128, 200  # four 32-neuron blocks; d with a partial block of codes
    rows, scales, vals, pb = codes_case(rng, fmt, f, d)
    x = random_x(rng, n, d)
    h = np.empty((n, f), np.float32)
    got = K.ffn_rows(x, rows, d, 0, 2 * pb, pb, "silu", act_out=h, fmt=fmt, down_scales=scales)
    xq, _ = ref_quantize_x(x)
    assert_h_close(h, xq, vals, True)
    assert_close(got, h.astype(np.float64) @ vals[2], np.abs(h) @ np.abs(vals[2]))
    # the cache's view: rows in any order with their neuron ids, a subset selected
    perm = rng.permutation(f).astype(np.int32)
    sel = rng.permutation(f)[:53].astype(np.int32)
    hs = np.empty((n, 53), np.float32)
    got2 = K.ffn_rows(x, np.ascontiguousarray(rows[perm]), d, 0, 2 * pb, pb, "silu",
                      row_select=sel, act_out=hs, fmt=fmt, down_scales=scales, row_ids=perm,
                      threads=2)
    ids = perm[sel]
    np.testing.assert_allclose(hs, h[:, ids], rtol=1e-5, atol=1e-6)  # the caller's order kept
    assert_close(got2, hs.astype(np.float64) @ vals[2][ids], np.abs(hs) @ np.abs(vals[2][ids]))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,act", [(1, "silu"), (1, "relu"), (4, "silu")])
def test_codes_layout_with_a_split_down_matrix_is_bit_identical(isa, fmt, n, act):
    """The codes layout with the down codes in a matrix of their own (a split cache): the same
    sums as inside the records, rows in any order with their ids, a subset selected."""
    rng = np.random.default_rng(SEED + 7)
    f, d = 96, 200
    rows, scales, vals, pb = codes_case(rng, fmt, f, d)
    a, b = np.ascontiguousarray(rows[:, :2 * pb]), np.ascontiguousarray(rows[:, 2 * pb:])
    x = random_x(rng, n, d)
    perm = rng.permutation(f).astype(np.int32)
    sel = rng.permutation(f)[:53].astype(np.int32)
    kw = dict(activation=act, row_select=sel, fmt=fmt, down_scales=scales, row_ids=perm,
              threads=2)
    want = K.ffn_rows(x, np.ascontiguousarray(rows[perm]), d, 0, 2 * pb, pb, **kw)
    got = K.ffn_rows(x, np.ascontiguousarray(a[perm]), d, 0, 0, pb,
                     down_rows=np.ascontiguousarray(b[perm]), **kw)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0


def test_split_down_blocks_is_exact():
    """The converter's split of down_proj's blocks loses nothing: the codes and the scales
    rebuild every value gguf-py reads from the blocks."""
    from flashinfer_py.dtypes import codes_to_float32

    rng = np.random.default_rng(SEED + 6)
    for fmt in FORMATS:
        d, f = 77, 96
        bd = gg_quantize(random_weights(rng, d, f), GG[fmt])
        codes, scales = split_down_blocks(bd, fmt, d, f)
        assert scales.dtype == np.float16 and scales.shape == (3, 2 if fmt == "q4_1" else 1, d)
        got = codes_to_float32(codes, fmt, d, scales, np.arange(f))
        np.testing.assert_array_equal(got, gg_dequantize(bd, GG[fmt]).T)


# ---- the sketch of quantized records ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_sketch_of_block_records_equals_sketch_of_their_values(isa, fmt):
    """quantize_q4 on records of blocks expands them first: the same sketch bytes as from the
    float32 values those blocks hold."""
    rng = np.random.default_rng(SEED + 7)
    f, d = 29, 200
    rows, vals, pb = records(rng, fmt, f, d, True)
    ids = np.arange(f)
    a = np.zeros((f, 2 * 7 * 18), np.uint8)
    K.quantize_q4(rows, [0, pb], d, ids, a, ids, fmt=fmt)
    flt = np.ascontiguousarray(np.concatenate([vals[0], vals[1]], axis=1), np.float32)
    b = np.zeros_like(a)
    K.quantize_q4(flt, [0, d], d, ids, b, ids)
    np.testing.assert_array_equal(a, b)


# ---- argument checks -------------------------------------------------------------------------


def test_block_arguments_are_checked():
    x = np.ones((2, 64), np.float32)
    w = np.zeros((3, 36), np.uint8)
    with pytest.raises(ValueError, match=r"uint8 rows of blocks need fmt='q8_0', 'q4_0' or 'q4_1'"):
        K.linear(x, w)
    with pytest.raises(ValueError, match=r"w has shape \(3, 40\).*q4_0 rows of 64 values are "
                                         r"36 bytes"):
        K.linear(x, np.zeros((3, 40), np.uint8), fmt="q4_0")
    with pytest.raises(ValueError, match="w must be uint8 rows of q4_1 blocks, got float16"):
        K.linear(x, np.zeros((3, 64), np.float16), fmt="q4_1")
    with pytest.raises(ValueError, match="dtype must be one of"):
        K.linear(x, w, fmt="q5_0")
    with pytest.raises(ValueError, match="use from_float32"):
        K.quantize(x, "float16")
    with pytest.raises(ValueError, match=r"rows of at least 36 bytes"):
        K.dequantize(np.zeros((2, 35), np.uint8), "q4_0", 64)


def test_codes_arguments_are_checked():
    rows = np.zeros((64, 36 + 36 + 32), np.uint8)
    x = np.ones((1, 64), np.float32)
    sc = np.zeros((2, 1, 64), np.float16)
    kw = dict(d_model=64, up_off=0, gate_off=36, down_off=72, activation="silu", fmt="q4_0")
    K.ffn_rows(x, rows, down_scales=sc, **kw)  # the right shapes run
    with pytest.raises(ValueError, match=r"down_scales has shape \(2, 2, 64\), expected \(d_ff / 32, 1, 64\)"):
        K.ffn_rows(x, rows, down_scales=np.zeros((2, 2, 64), np.float16), **kw)
    with pytest.raises(ValueError, match="down_scales must be float16"):
        K.ffn_rows(x, rows, down_scales=sc.astype(np.float32), **kw)
    with pytest.raises(ValueError, match=r"row_ids\[3\]=64 is out of range for down_scales of 64"):
        ids = np.arange(64, dtype=np.int32)
        ids[3] = 64
        K.ffn_rows(x, rows, down_scales=sc, row_ids=ids, **kw)
    with pytest.raises(ValueError, match="pass row_ids"):
        K.ffn_rows(x, np.zeros((65, 104), np.uint8), down_scales=sc, **kw)
    with pytest.raises(ValueError, match="down_off=72 .* does not fit"):
        K.ffn_rows(x, rows, **kw)  # without scales the down part is whole blocks: 36 bytes
    with pytest.raises(ValueError, match="down_scales belong to block formats"):
        K.ffn_rows(x, np.zeros((64, 192), np.float32), 64, 0, 64, 128, down_scales=sc)

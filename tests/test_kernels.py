"""Native kernels vs float64 numpy references on the same (upcast) storage-dtype weights.

Every case runs on each instruction set the CPU has (scalar always, avx2 when present), so
the portable fallback is tested on x86 machines too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashinfer_py import kernels as K

DTYPES = ["float32", "float16", "bfloat16"]
SEED = 1234


# ---- helpers ---------------------------------------------------------------------------


def to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> storage array (bf16 as truncated uint16 bits; exact value irrelevant,
    the reference upcasts what is stored)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16)
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def upcast(w: np.ndarray) -> np.ndarray:
    """Storage array -> float64 exactly (uint16 = bfloat16 bits)."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w.astype(np.float64)


def assert_close(y, ref, scale, rel=1e-5):
    """|y - ref| <= rel * scale elementwise; scale = sum of |terms| (the error bound)."""
    err = np.abs(y.astype(np.float64) - ref)
    bound = rel * scale + 1e-30
    worst = np.max(err / bound) if err.size else 0.0
    assert worst <= 1.0, f"max error {err.max():.3g} exceeds {rel} x |terms| (ratio {worst:.3g})"


def act_ref(name: str, v: np.ndarray, param: float) -> np.ndarray:
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "fatrelu":
        return np.where(v > param, v, 0.0)
    if name == "silu":
        return v / (1.0 + np.exp(-v))
    if name == "gelu":
        return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    raise AssertionError(name)


# ---- linear ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64_reference(isa, dtype, n, with_bias):
    rng = np.random.default_rng(SEED + n)
    k, m = 200, 97
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = to_storage(rng.standard_normal((m, k)) * 0.1, dtype)
    bias = rng.standard_normal(m).astype(np.float32) if with_bias else None
    y = K.linear(x, w, bias)
    assert y.shape == (n, m) and y.dtype == np.float32
    wd = upcast(w)
    ref = x.astype(np.float64) @ wd.T + (0.0 if bias is None else bias.astype(np.float64))
    scale = np.abs(x.astype(np.float64)) @ np.abs(wd).T + (0 if bias is None else np.abs(bias))
    assert_close(y, ref, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_k_blocking_and_tails(isa, dtype):
    # n * k above the L2 budget forces k-chunking; k % 8 != 0 exercises the scalar tails.
    rng = np.random.default_rng(SEED)
    n, k, m = 40, 4001, 13
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = to_storage(rng.standard_normal((m, k)) * 0.05, dtype)
    y = K.linear(x, w)
    wd = upcast(w)
    assert_close(y, x.astype(np.float64) @ wd.T, np.abs(x) @ np.abs(wd).T)


def test_linear_out_buffer_1d_input_and_threads(isa):
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(200).astype(np.float32)
    w = to_storage(rng.standard_normal((97, 200)), "float16")
    out = np.full(97, np.nan, dtype=np.float32)
    y = K.linear(x, w, out=out)
    assert y is not None and np.shares_memory(y, out) and y.shape == (97,)
    for threads in (1, 2):
        np.testing.assert_allclose(K.linear(x, w, threads=threads), out, rtol=1e-6, atol=1e-6)


def test_linear_empty_k_gives_bias():
    x = np.zeros((2, 0), np.float32)
    w = np.zeros((3, 0), np.float16)
    b = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(K.linear(x, w, b), np.tile(b, (2, 1)))


# ---- ffn_rows --------------------------------------------------------------------------


def make_rows(rng, r, d, dtype, gated, pad):
    """(r, record_elems) rows [up, gate?, down, padding] and the part offsets."""
    n_parts = 3 if gated else 2
    rec = n_parts * d + pad
    f = (rng.standard_normal((r, rec)) * 0.1).astype(np.float32)
    f[:, n_parts * d :] = np.nan  # padding must never be read into the result
    rows = to_storage(f, dtype)
    offs = dict(up_off=0, gate_off=d if gated else -1, down_off=(n_parts - 1) * d)
    return rows, offs


def ffn_ref(x, rows, d, up_off, gate_off, down_off, act, param, bias, sel):
    rd = upcast(rows)
    if sel is not None:
        rd = rd[sel]
        bias = None if bias is None else bias[sel]
    up, down = rd[:, up_off : up_off + d], rd[:, down_off : down_off + d]
    xd = x.astype(np.float64)
    u = xd @ up.T + (0.0 if bias is None else bias)
    if gate_off >= 0:
        gate = rd[:, gate_off : gate_off + d]
        g = xd @ gate.T
        h = act_ref(act, g, param) * u
        u_scale = np.abs(xd) @ (np.abs(up) + np.abs(gate)).T
    else:
        h = act_ref(act, u, param)
        u_scale = np.abs(xd) @ np.abs(up).T
    out = h @ down
    scale = np.abs(h) @ np.abs(down) + (u_scale * 0.5) @ np.abs(down)
    return out, h, scale, u_scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 33])
@pytest.mark.parametrize("gated,act", [(False, "relu"), (False, "fatrelu"), (False, "gelu"),
                                       (True, "silu"), (True, "gelu_tanh"), (True, "relu")])
def test_ffn_rows_matches_float64_reference(isa, dtype, n, gated, act):
    rng = np.random.default_rng(SEED + 7 * n)
    d, r = 200, 97
    rows, offs = make_rows(rng, r, d, dtype, gated, pad=56)
    x = rng.standard_normal((n, d)).astype(np.float32)
    param = 0.1 if act == "fatrelu" else 0.0
    act_out = np.full((n, r), np.nan, np.float32)
    y = K.ffn_rows(x, rows, d, activation=act, act_param=param, act_out=act_out, **offs)
    ref, h, scale, u_scale = ffn_ref(x, rows, d, **offs, act=act, param=param, bias=None,
                                     sel=None)
    assert y.shape == (n, d) and y.dtype == np.float32
    assert_close(y, ref, scale)
    assert_close(act_out, h, u_scale * (1 + np.abs(h)) + 1e-6)
    if act in ("relu", "fatrelu") and not gated:
        np.testing.assert_array_equal(act_out == 0, h == 0)  # sparsity statistics exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_ffn_rows_row_select_bias_and_act_out(isa, dtype, gated, n):
    """Rows picked in random order (run sorted by row inside, act_out back in the caller's
    order); one gated input takes the fused per-neuron path, which reads records ahead."""
    rng = np.random.default_rng(SEED)
    d, r = 200, 97
    act = "silu" if gated else "relu"
    rows, offs = make_rows(rng, r, d, dtype, gated, pad=8)
    x = rng.standard_normal((n, d)).astype(np.float32)
    bias = rng.standard_normal(r).astype(np.float32) * 0.1
    sel = rng.permutation(r)[:41].astype(np.int32)
    act_out = np.empty((n, sel.size), np.float32)
    out = np.full((n, d), np.nan, np.float32)
    y = K.ffn_rows(x, rows, d, **offs, activation=act, up_bias=bias, row_select=sel, out=out,
                   act_out=act_out)
    assert np.shares_memory(y, out)
    ref, h, scale, u_scale = ffn_ref(x, rows, d, **offs, act=act, param=0.0, bias=bias,
                                     sel=sel)
    assert_close(out, ref, scale + np.abs(bias[sel]).sum())
    assert_close(act_out, h, u_scale * (1 + np.abs(h)) + np.abs(bias[sel]) + 1e-6)


def test_ffn_rows_all_rows_equals_dense_ffn(isa):
    # With every row present the sparse kernel is the dense FFN: relu(x W1^T) W2.
    rng = np.random.default_rng(SEED)
    d, r, n = 64, 97, 5
    w1 = rng.standard_normal((r, d)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((d, r)).astype(np.float32) * 0.2  # HF down_proj (d, d_ff)
    rows = np.ascontiguousarray(np.concatenate([w1, w2.T], axis=1))
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = K.ffn_rows(x, rows, d, up_off=0, down_off=d)
    ref = np.maximum(x.astype(np.float64) @ w1.T, 0) @ w2.T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_ffn_rows_column_chunks_and_threads(isa, threads):
    # d > 2 x 256 splits the down accumulation into column chunks; n > 4 uses several
    # input tiles; bf16 and a 1-D input for the decode path.
    rng = np.random.default_rng(SEED)
    d, r, n = 600, 41, 9
    rows, offs = make_rows(rng, r, d, "bfloat16", gated=False, pad=0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = K.ffn_rows(x, rows, d, **offs, threads=threads)
    ref, _, scale, _ = ffn_ref(x, rows, d, **offs, act="relu", param=0.0, bias=None, sel=None)
    assert_close(y, ref, scale)
    y1 = K.ffn_rows(x[4], rows, d, **offs, threads=threads)
    assert y1.shape == (d,)
    assert_close(y1, ref[4], scale[4])


def _split_case(rng, fmt: str, f: int, d: int, gated: bool):
    """Records (up, [gate,] down, padding) in `fmt`, and the same parts as a split cache
    holds them: up [and gate] in one matrix, down in another (each with padding)."""
    n_up = 2 if gated else 1
    vals = [rng.standard_normal((f, d)).astype(np.float32) * 0.2 for _ in range(n_up + 1)]
    if fmt in ("q8_0", "q4_0", "q4_1"):
        parts = [K.quantize(v, fmt) for v in vals]
    else:
        parts = [to_storage(v, fmt) for v in vals]
    pad = np.zeros((f, 3), parts[0].dtype)
    rec = np.ascontiguousarray(np.concatenate(parts + [pad], axis=1))
    a = np.ascontiguousarray(np.concatenate(parts[:n_up] + [pad], axis=1))
    b = np.ascontiguousarray(np.concatenate([pad[:, :2], parts[-1], pad], axis=1))
    p = parts[0].shape[1]
    return rec, a, b, p


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "relu"), (False, "fatrelu")])
@pytest.mark.parametrize("n", [1, 5])
def test_ffn_rows_split_down_matrix_is_bit_identical(isa, fmt, gated, act, n):
    """The down parts in a matrix of their own (a split neuron cache) give exactly the sums of
    the same parts inside records: one input fused per neuron (SiLU) and in block passes
    (ReLU, FATReLU), a prompt, rows picked out of order. One exception, within float
    rounding: one 16-bit input of a layer without a gate, whose up rows are then a matrix of
    their own that the one-row kernel streams (four partial sums a row, not the tiles' one)."""
    rng = np.random.default_rng(31)
    f, d = 75, 96 if fmt.startswith("q") else 90
    rec, a, b, p = _split_case(rng, fmt, f, d, gated)
    blk = fmt if fmt.startswith("q") else None
    x = rng.standard_normal((n, d)).astype(np.float32)
    sel = rng.permutation(f)[:40].astype(np.int32)
    for row_select in (None, sel):
        kw = dict(activation=act, act_param=0.1, row_select=row_select, fmt=blk, threads=2)
        h0 = np.empty((n, f if row_select is None else 40), np.float32)
        h1 = np.empty_like(h0)
        gate = p if gated else -1
        want = K.ffn_rows(x, rec, d, up_off=0, gate_off=gate, down_off=(2 if gated else 1) * p,
                          act_out=h0, **kw)
        got = K.ffn_rows(x, a, d, up_off=0, gate_off=gate, down_off=2, down_rows=b,
                         act_out=h1, **kw)
        if n == 1 and not gated and fmt in ("float16", "bfloat16"):
            np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(h1, h0)
            np.testing.assert_array_equal(got, want)
        assert np.abs(want).max() > 0


def test_ffn_rows_split_down_matrix_arguments_are_checked():
    rng = np.random.default_rng(2)
    rec, a, b, p = _split_case(rng, "float16", 6, 16, False)
    x = np.zeros((1, 16), np.float32)
    with pytest.raises(ValueError, match=r"down_rows has 5 rows but rows has 6"):
        K.ffn_rows(x, a, 16, up_off=0, down_off=2, down_rows=b[:5].copy())
    with pytest.raises(ValueError, match=r"down_off=6 with d_model=16 does not fit in a row of "
                                         r"down_rows \(21 elements"):
        K.ffn_rows(x, a, 16, up_off=0, down_off=6, down_rows=b)
    with pytest.raises(ValueError, match=r"down_rows must hold the same format as rows"):
        K.ffn_rows(x, a, 16, up_off=0, down_off=2, down_rows=b.astype(np.float32))


def test_ffn_rows_empty_selection_gives_zeros():
    rows, offs = make_rows(np.random.default_rng(0), 5, 16, "float16", False, 0)
    x = np.ones((2, 16), np.float32)
    out = np.full((2, 16), 7.0, np.float32)
    K.ffn_rows(x, rows, 16, **offs, row_select=np.zeros(0, np.int32), out=out)
    np.testing.assert_array_equal(out, 0)


# ---- conversion ------------------------------------------------------------------------


def special_floats(rng) -> np.ndarray:
    vals = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 65504.0, 65520.0, 1e5, 6e-8, 3e-8, 1e-40,
            3.4028235e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11]
    x = np.concatenate([np.array(vals, np.float32),
                        rng.standard_normal(1000).astype(np.float32),
                        (rng.standard_normal(500) * 1e-6).astype(np.float32),
                        rng.integers(0, 2**32, 1003, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    return x[~np.isnan(x)]


def test_from_float32_float16_matches_numpy(isa):
    x = special_floats(np.random.default_rng(SEED))
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    got = K.from_float32(x, "float16")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))


def test_from_float32_bfloat16_matches_torch(isa):
    torch = pytest.importorskip("torch")
    x = special_floats(np.random.default_rng(SEED))
    ref = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = K.from_float32(x, "bfloat16")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, ref)
    nan = K.from_float32(np.array([np.nan, -np.nan] * 5, np.float32), "bfloat16")
    assert np.isnan(K.to_float32(nan)).all()


def test_to_float32_every_16bit_pattern(isa):
    torch = pytest.importorskip("torch")
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f16 = K.to_float32(bits.view(np.float16))
    ref16 = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(f16), np.isnan(ref16))
    ok16 = ~np.isnan(ref16)
    np.testing.assert_array_equal(f16[ok16].view(np.uint32), ref16[ok16].view(np.uint32))
    bf = K.to_float32(bits)
    ref_bf = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    okbf = ~np.isnan(ref_bf)
    np.testing.assert_array_equal(bf[okbf].view(np.uint32), ref_bf[okbf].view(np.uint32))
    # round trips are exact for every non-NaN pattern
    back16 = K.from_float32(f16, "float16").view(np.uint16)
    np.testing.assert_array_equal(back16[ok16], bits[ok16])
    np.testing.assert_array_equal(K.from_float32(bf, "bfloat16")[okbf], bits[okbf])


def test_conversion_keeps_shape_and_out():
    a = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    h = K.from_float32(a, "float16")
    assert h.shape == a.shape
    out = np.empty_like(a)
    assert K.to_float32(h, out=out) is not None
    np.testing.assert_array_equal(out, a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(K.from_float32(a, "float32"), a)


# ---- argument validation ---------------------------------------------------------------


def _lin_args():
    return np.zeros((2, 8), np.float32), np.zeros((4, 8), np.float16)


@pytest.mark.parametrize("case,match", [
    (lambda x, w: K.linear(x.astype(np.float64), w), r"x must be float32"),
    (lambda x, w: K.linear(x, w.astype(np.int8)), r"w must be float32, float16 or uint16"),
    (lambda x, w: K.linear(x, np.zeros((4, 16), np.float16)[:, ::2]), r"w must be C-contig"),
    (lambda x, w: K.linear(x, np.zeros((4, 9), np.float16)), r"w has shape \(4, 9\)"),
    (lambda x, w: K.linear(x, w, np.zeros(5, np.float32)), r"bias has shape \(5,\), expected \(4,\)"),
    (lambda x, w: K.linear(x, w, out=np.zeros((2, 5), np.float32)), r"out has shape"),
    (lambda x, w: K.linear(x[None], w), r"x must be 2-D"),
])
def test_linear_rejects_bad_arguments(case, match):
    with pytest.raises(ValueError, match=match):
        case(*_lin_args())


def _ffn_args():
    rows, offs = make_rows(np.random.default_rng(0), 6, 16, "float16", True, 8)
    return np.zeros((2, 16), np.float32), rows, offs


@pytest.mark.parametrize("kw,match", [
    (dict(down_off=41), r"down_off=41 with d_model=16 does not fit"),
    (dict(gate_off=-2), r"gate_off must be -1"),
    (dict(activation="tanh"), r"activation must be one of"),
    (dict(row_select=np.array([0, 6], np.int32)), r"row_select\[1\]=6 is out of range"),
    (dict(row_select=np.array([0, 1], np.int64)), r"row_select must be int32"),
    (dict(act_out=np.zeros((2, 5), np.float32)), r"act_out has shape \(2, 5\), expected \(2, 6\)"),
    (dict(up_bias=np.zeros(6, np.float64)), r"up_bias must be float32"),
    (dict(out=np.zeros((2, 16), np.float32).T.copy().T), r"out must be C-contiguous"),
])
def test_ffn_rows_rejects_bad_arguments(kw, match):
    x, rows, offs = _ffn_args()
    offs.update(kw)
    with pytest.raises(ValueError, match=match):
        K.ffn_rows(x, rows, 16, **offs)


def test_ffn_rows_rejects_wrong_x_width_and_bad_rows_dtype():
    x, rows, offs = _ffn_args()
    with pytest.raises(ValueError, match=r"x has shape \(2, 15\), expected \(2, 16\)"):
        K.ffn_rows(x[:, :15].copy(), rows, 16, **offs)
    with pytest.raises(ValueError, match=r"rows must be float32, float16 or uint16"):
        K.ffn_rows(x, rows.astype(np.float64), 16, **offs)


def test_conversion_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16, "
                                         r"q8_0, q4_0, q4_1"):
        K.from_float32(np.zeros(3, np.float32), "int8")
    with pytest.raises(ValueError, match=r"a must be float32"):
        K.from_float32(np.zeros(3, np.float16), "float16")
    with pytest.raises(ValueError, match=r"a must be C-contiguous"):
        K.to_float32(np.zeros((4, 4), np.float16)[:, ::2])
    with pytest.raises(ValueError, match=r"isa must be"):
        K.set_kernel_isa("neon9000")


# ---- the kernels' thread pool and the read reference ----------------------------------------


def test_compute_pool_runs_every_item_and_rethrows_the_first_error():
    from flashinfer_py._core import FlashIOError, testing

    ran, slots = testing.compute_pool_fail(2, 1000, -1)
    assert ran == 1000 and 1 <= slots <= 2
    with pytest.raises(FlashIOError, match="injected failure at item 7"):
        testing.compute_pool_fail(2, 1000, 7)
    # the other items still ran, and the pool serves the next call
    assert testing.compute_pool_fail(2, 1000, -1)[0] == 1000
    assert testing.compute_pool_fail(1, 50, -1) == (50, 1)  # one thread: the caller alone


def test_kernels_from_concurrent_python_threads():
    """The GIL is released in the kernels: calls from several threads at once share the pool
    (a caller that finds it busy runs its call alone) and each gets its own result."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(SEED + 9)
    ws = [to_storage(rng.standard_normal((300, 256)), "float16") for _ in range(4)]
    xs = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(4)]
    want = [K.linear(x, w, threads=1) for x, w in zip(xs, ws)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: [K.linear(xs[i], ws[i], threads=2) for _ in range(50)],
                          range(4)))
    for i in range(4):
        for y in got[i]:
            np.testing.assert_allclose(y, want[i], rtol=1e-6, atol=1e-6)


def test_stream_sum(isa):
    a = np.arange(1 << 20, dtype=np.float32) % 7 - 3
    assert K.stream_sum(a) == pytest.approx(float(a.astype(np.float64).sum()), abs=1e-3)
    assert K.stream_sum(a[:37], threads=1) == pytest.approx(float(a[:37].sum()))


# ---- the small ops of a decode step ----------------------------------------------------------


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(SEED + 10)
    x = rng.standard_normal((3, 5, 37)).astype(np.float32) * 3
    w = rng.standard_normal(37).astype(np.float32)
    ref = x / np.sqrt(np.mean(np.square(x, dtype=np.float64), -1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(K.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-6)
    y = x.copy()
    assert K.rms_norm(y, w, 1e-6, out=y) is not None  # in place
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last axis"):
        K.rms_norm(x[..., :36].copy(), w, 1e-6)


def test_rope_is_rotate_half_on_the_rotated_part():
    rng = np.random.default_rng(SEED + 11)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    ang = rng.standard_normal(3)
    cos = np.cos(np.concatenate([ang, ang])).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang])).astype(np.float32)
    rot = x[:, :6]
    ref = x.copy()
    ref[:, :6] = rot * cos + np.concatenate([-rot[:, 3:], rot[:, :3]], axis=1) * sin
    y = x.copy()
    K.rope(y, cos, sin)  # partial rotary: the last 4 values of each row stay
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_attend1_matches_softmax_attention(isa, softcap):
    rng = np.random.default_rng(SEED + 12)
    h, hkv, hd, cap = 6, 2, 40, 50
    q = rng.standard_normal((h, hd)).astype(np.float32)
    keys = rng.standard_normal((hkv, cap, hd)).astype(np.float32)
    values = rng.standard_normal((hkv, cap, hd)).astype(np.float32)
    for first, end in ((0, 1), (3, 20), (0, 50)):
        got = K.attend1(q, keys, values, first, end, 0.3, softcap)
        k = keys[:, first:end].astype(np.float64)
        s = (q.astype(np.float64).reshape(hkv, h // hkv, hd) @ k.transpose(0, 2, 1)) * 0.3
        if softcap:
            s = softcap * np.tanh(s / softcap)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = (p @ values[:, first:end].astype(np.float64)).reshape(h, hd)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not within"):
        K.attend1(q, keys, values, 10, 60, 0.3)

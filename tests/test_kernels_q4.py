"""The 4-bit block kernels (csrc/kernels_q4.h) against a numpy implementation of the documented
format, written from the header's description and not from the kernel:

  per 32 elements of a part: uint16 fp16 scale d = max|w| / 7, then 16 bytes, byte i holding
  element i in its low nibble and element i + 16 in its high nibble; value (q - 8) * d with
  q = trunc(w / d + 8.5) clamped to [1, 15]; the last block zero padded.

q4_scores is checked against float64 numpy on the dequantized sketch with x quantized the
documented way (16 bits per 32-block, d = max|x| / 32767, round half away from zero, as every
block format's kernels do), tightly, and against the
exact float activations of the dequantized sketch within the error that quantizing x can cause.
Every case runs on each instruction set the CPU has.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashinfer_py import kernels as K
from test_kernels import act_ref, to_storage, upcast

SEED = 4321
BLOCK, BLOCK_BYTES = 32, 18
DTYPES = ["float32", "float16", "bfloat16"]
ACTS = ["silu", "gelu", "gelu_tanh", "relu", "fatrelu"]
LIPSCHITZ = 1.2  # max |act'| of every activation above (GELU's is ~1.13)


# ---- the reference -----------------------------------------------------------------------


def ref_quantize_part(v: np.ndarray) -> np.ndarray:
    """One part (float32 values) -> its 4-bit blocks as bytes, the documented way."""
    n = v.size
    nb = -(-n // BLOCK)
    blocks = np.zeros(nb * BLOCK, np.float32)
    blocks[:n] = v
    blocks = blocks.reshape(nb, BLOCK)
    d = (np.abs(blocks).max(axis=1) / np.float32(7)).astype(np.float32)
    inv = np.zeros_like(d)
    inv[d > 0] = np.float32(1) / d[d > 0]
    q = np.floor(blocks * inv[:, None] + np.float32(8.5))       # float32 ops, as documented
    q = np.clip(q, 1, 15).astype(np.uint8)
    out = np.empty((nb, BLOCK_BYTES), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)  # little-endian fp16
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(-1)


def ref_record(row_f32: np.ndarray, offsets, length: int) -> np.ndarray:
    return np.concatenate([ref_quantize_part(row_f32[o:o + length]) for o in offsets])


def ref_dequantize(record: np.ndarray, n_parts: int, length: int) -> np.ndarray:
    """float64 values of one record's parts, [n_parts, length]."""
    nb = -(-length // BLOCK)
    blk = record[:n_parts * nb * BLOCK_BYTES].reshape(n_parts, nb, BLOCK_BYTES)
    d = blk[..., :2].copy().view(np.float16).astype(np.float64)            # [p, nb, 1]
    q = np.concatenate([blk[..., 2:] & 0xF, blk[..., 2:] >> 4], axis=-1)   # [p, nb, 32]
    return ((q.astype(np.float64) - 8) * d).reshape(n_parts, nb * BLOCK)[:, :length]


def ref_quantize_x(x: np.ndarray):
    """x [T, n] float32 -> (x as its 16-bit blocks dequantized, float64 [T, n]; dx [T, nb])."""
    t, n = x.shape
    nb = -(-n // BLOCK)
    blocks = np.zeros((t, nb * BLOCK), np.float32)
    blocks[:, :n] = x
    blocks = blocks.reshape(t, nb, BLOCK)
    dx = (np.abs(blocks).max(axis=2) / np.float32(32767)).astype(np.float32)
    inv = np.zeros_like(dx)
    inv[dx > 0] = np.float32(1) / dx[dx > 0]
    v = (blocks * inv[..., None]).astype(np.float64)                 # the float32 product
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)                       # round half away from 0
    deq = (q.astype(np.float64) * dx[..., None].astype(np.float64)).reshape(t, nb * BLOCK)
    return deq[:, :n], dx


def ref_scores(x_used: np.ndarray, w: np.ndarray, gated: bool, act: str, param: float):
    """max_t |h| over the rows of x_used [T, n] for weights w [R, parts, n] (float64), and
    the bound on how far a float32 evaluation may stray from it: per record, with relative
    precision 1e-5 on every dot product and activation."""
    u = np.einsum("rn,tn->rt", w[:, 0], x_used)
    eu = 1e-5 * np.einsum("rn,tn->rt", np.abs(w[:, 0]), np.abs(x_used)) + 1e-30
    if gated:
        g = np.einsum("rn,tn->rt", w[:, 1], x_used)
        eg = 1e-5 * np.einsum("rn,tn->rt", np.abs(w[:, 1]), np.abs(x_used)) + 1e-30
        a = act_ref(act, g, param)
        h = a * u
        err = np.abs(a) * eu + LIPSCHITZ * eg * (np.abs(u) + eu) + 1e-5 * np.abs(h)
        err += _jump(act, g, eg, param) * (np.abs(u) + eu)
    else:
        h = act_ref(act, u, param)
        err = LIPSCHITZ * eu + 1e-5 * np.abs(h) + _jump(act, u, eu, param)
    return np.abs(h).max(axis=1), err.max(axis=1)


def _jump(act: str, v: np.ndarray, ev: np.ndarray, param: float) -> np.ndarray:
    """FATReLU jumps by `param` at v = param: within the error of v, either side may be taken."""
    if act != "fatrelu":
        return np.zeros_like(v)
    return np.where(np.abs(v - param) <= ev, param, 0.0)


def random_rows(rng, n_rows: int, width: int, dtype: str, scale: float = 0.5):
    """Rows in a storage dtype, with an all-zero block, a lone value and a negative maximum
    planted so the edge cases of the scale are always there."""
    w = (rng.standard_normal((n_rows, width)) * scale).astype(np.float32)
    w[0, :BLOCK] = 0.0
    w[1, :BLOCK] = 0.0
    w[1, 5] = 0.3
    w[2, 7] = -5.0
    return to_storage(w, dtype)


def sketch_of(rows, offsets, length):
    n = rows.shape[0]
    out = np.zeros((n, len(offsets) * -(-length // BLOCK) * BLOCK_BYTES), np.uint8)
    K.quantize_q4(rows, offsets, length, np.arange(n), out, np.arange(n))
    return out


# ---- quantize_q4 -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,offsets,width", [
    (77, [0], 80),               # one part, a padded tail (77 = 2 * 32 + 13)
    (64, [64, 0], 192),          # two parts in reverse order, whole blocks
    (100, [0, 100, 200], 300),   # three parts (up, gate, down), 4 blocks with a 4-element tail
    (5, [3], 11),                # shorter than a block, at an odd offset
    (200, [200, 0], 611),        # the tiny models' width; a record wider than its parts
])
def test_quantize_matches_the_documented_format(isa, dtype, length, offsets, width):
    rng = np.random.default_rng(SEED)
    rows = random_rows(rng, 9, width, dtype)
    src = np.array([4, 0, 8, 1, 2, 2])          # any rows, repeats allowed
    dst = np.array([0, 5, 2, 3, 6, 1])          # any records, out of order
    rec_bytes = len(offsets) * -(-length // BLOCK) * BLOCK_BYTES
    out = np.full((7, rec_bytes + 5), 0xAB, np.uint8)   # records wider than needed
    K.quantize_q4(rows, offsets, length, src, out, dst)
    f32 = upcast(rows).astype(np.float32)
    for s, t in zip(src, dst):
        np.testing.assert_array_equal(out[t, :rec_bytes], ref_record(f32[s], offsets, length))
    assert (out[:, rec_bytes:] == 0xAB).all()          # the record tails are not written
    assert (out[4] == 0xAB).all()                       # nor the records nobody asked for


def test_quantize_edge_blocks_by_hand():
    """The layout itself, on values whose bytes are known: zeros give d = 0 and q = 8 (0x88);
    a block holding +-7 at elements 0 and 16 gives d = 1.0 (0x3c00) and q = 15 and 1."""
    rows = np.zeros((2, 40), np.float32)
    rows[1, 0], rows[1, 16], rows[1, 1], rows[1, 33] = 7.0, -7.0, 3.0, 2.0
    out = np.zeros((2, 2 * BLOCK_BYTES), np.uint8)
    K.quantize_q4(rows, [0], 40, [0, 1], out, [0, 1])
    assert out[0].tolist() == [0, 0] + [0x88] * 16 + [0, 0] + [0x88] * 16
    assert out[1, :2].tolist() == [0x00, 0x3C]
    assert out[1, 2] == (15 | 1 << 4)                 # elements 0 and 16
    assert out[1, 3] == (11 | 8 << 4)                 # element 1: 3 / 1 + 8 = 11
    assert (out[1, 4:18] == 0x88).all()
    # tail block: only element 33 (its element 1) is set: d = 2 / 7 in fp16, q = 15
    assert out[1, 18:20].tobytes() == np.float16(np.float32(2.0) / np.float32(7)).tobytes()
    assert out[1, 21] == (15 | 8 << 4) and out[1, 20] == 0x88 and (out[1, 22:] == 0x88).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_and_avx2_give_identical_bytes(dtype):
    """The quantizer also runs on neurons leaving the cache: its bytes must not depend on the
    instruction set, or the store would drift from ffn_sketch.bin."""
    try:
        K.set_kernel_isa("avx2")
    except ValueError:
        pytest.skip("avx2 not supported on this CPU")
    try:
        rng = np.random.default_rng(SEED + 1)
        for length in (31, 32, 33, 64, 95, 200, 257):
            rows = random_rows(rng, 41, 3 * length + 3, dtype, scale=rng.uniform(1e-3, 30))
            offs = [length + 3, 0]
            K.set_kernel_isa("avx2")
            a = sketch_of(rows, offs, length)
            K.set_kernel_isa("scalar")
            b = sketch_of(rows, offs, length)
            np.testing.assert_array_equal(a, b, err_msg=f"length {length}")
    finally:
        K.set_kernel_isa("auto")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_round_trip_within_half_a_step(isa, dtype):
    rng = np.random.default_rng(SEED + 2)
    length, offs = 77, [80, 0]
    rows = random_rows(rng, 13, 160, dtype)
    sk = sketch_of(rows, offs, length)
    f32 = upcast(rows)
    nb = -(-length // BLOCK)
    for r in range(rows.shape[0]):
        got = K.dequantize_q4(sk[r], 2, length)
        assert got.dtype == np.float32 and got.shape == (2 * length,)
        np.testing.assert_array_equal(got, ref_dequantize(sk[r], 2, length).reshape(-1))
        for p, o in enumerate(offs):
            w = f32[r, o:o + length]
            d = sk[r, p * nb * BLOCK_BYTES:(p + 1) * nb * BLOCK_BYTES].reshape(nb, -1)[:, :2]
            d = np.repeat(d.copy().view(np.float16).astype(np.float64).reshape(-1), BLOCK)[:length]
            # half a step, plus what rounding the scale to fp16 can add over 7 steps
            err = np.abs(got[p * length:(p + 1) * length] - w)
            assert (err <= d / 2 * (1 + 1e-2) + 1e-12).all(), (r, p, err.max())


# ---- q4_scores ---------------------------------------------------------------------------


def _case(rng, n_rec: int, length: int, gated: bool, t: int, dtype: str = "float16"):
    parts = 2 if gated else 1
    rows = random_rows(rng, n_rec, 3 * length, dtype, scale=0.3)
    sk = sketch_of(rows, [0, length][:parts], length)
    w = np.stack([ref_dequantize(r, parts, length) for r in sk])   # [R, parts, n]
    x = (rng.standard_normal((t, length)) * 1.5).astype(np.float32)
    x[0, :BLOCK] = 0.0                                              # an all-zero x block
    return sk, w, x


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("t", [1, 3])
def test_scores_match_float64_on_the_quantized_x(isa, gated, act, t):
    rng = np.random.default_rng(SEED + 3)
    length = 200
    sk, w, x = _case(rng, 37, length, gated, t)
    param = 0.05 if act == "fatrelu" else 0.0
    got = K.q4_scores(x, sk, length, gated, act, param)
    assert got.dtype == np.float32 and got.shape == (37,)
    xq, _ = ref_quantize_x(x)
    ref, bound = ref_scores(xq, w, gated, act, param)
    assert (np.abs(got - ref) <= bound).all(), np.max(np.abs(got - ref) / bound)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("length", [77, 200])
def test_scores_are_within_the_x_quantization_error_of_float_activations(isa, gated, length):
    """Against the float activations of the dequantized sketch (x not quantized): each element
    of x moves by at most half its block's step dx = max|x| / 32767, which bounds the error; in
    practice it is about 1e-5."""
    rng = np.random.default_rng(SEED + 4)
    sk, w, x = _case(rng, 53, length, gated, 2)
    got = K.q4_scores(x, sk, length, gated, "silu")
    exact, fp = ref_scores(x.astype(np.float64), w, gated, "silu", 0.0)
    _, dx = ref_quantize_x(x)
    step = np.repeat(dx.astype(np.float64), BLOCK, axis=1)[:, :length] / 2 * (1 + 1e-4)
    eu = np.einsum("rn,tn->rt", np.abs(w[:, 0]), step)
    u = np.einsum("rn,tn->rt", w[:, 0], x)
    if gated:
        eg = np.einsum("rn,tn->rt", np.abs(w[:, 1]), step)
        g = np.einsum("rn,tn->rt", w[:, 1], x)
        bound = (np.abs(act_ref("silu", g, 0)) * eu + LIPSCHITZ * eg * (np.abs(u) + eu)).max(1)
    else:
        bound = (LIPSCHITZ * eu).max(1)
    assert (np.abs(got - exact) <= bound + fp).all()
    assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)


def test_scores_rank_neurons_like_the_unquantized_weights():
    """What the sketch is for: its top half of neurons carries most of the |activation| mass of
    the true top half (full-precision weights and x)."""
    rng = np.random.default_rng(SEED + 5)
    length, n = 200, 301
    w = (rng.standard_normal((n, 2 * length)) * 0.3).astype(np.float32)
    sk = sketch_of(w, [0, length], length)
    x = rng.standard_normal((1, length)).astype(np.float32)
    truth = np.abs(act_ref("silu", w[:, length:] @ x[0].astype(np.float64), 0)
                   * (w[:, :length] @ x[0].astype(np.float64)))
    est = K.q4_scores(x, sk, length, True, "silu")
    k = n // 2
    mass = truth[np.argsort(-est)[:k]].sum() / np.sort(truth)[::-1][:k].sum()
    assert mass > 0.97, mass


def test_scores_take_the_max_over_tokens_and_apply_scale_and_out(isa):
    rng = np.random.default_rng(SEED + 6)
    length = 77
    sk, _, x = _case(rng, 29, length, True, 4)
    per_row = np.stack([K.q4_scores(x[i], sk, length, True, "gelu_tanh") for i in range(4)])
    whole = K.q4_scores(x, sk, length, True, "gelu_tanh")
    np.testing.assert_array_equal(whole, per_row.max(axis=0))
    assert (per_row.argmax(axis=0) > 0).any()   # the max is not always the first token's
    scale = rng.uniform(0.5, 3.0, 29).astype(np.float32)
    out = np.full(29, np.nan, np.float32)
    got = K.q4_scores(x, sk, length, True, "gelu_tanh", scale=scale, out=out)
    assert got is out
    np.testing.assert_array_equal(out, whole * scale)
    # a 1-D x is one token; a sketch wider than its parts is read with its row stride
    wide = np.zeros((29, sk.shape[1] + 13), np.uint8)
    wide[:, :sk.shape[1]] = sk
    np.testing.assert_array_equal(K.q4_scores(x[2], wide, length, True, "gelu_tanh"), per_row[2])


def test_scores_of_an_empty_store_and_a_zero_x(isa):
    sk = np.zeros((0, 2 * 3 * BLOCK_BYTES), np.uint8)
    assert K.q4_scores(np.ones(70, np.float32), sk, 70, True, "silu").shape == (0,)
    rng = np.random.default_rng(SEED + 7)
    sk, _, _ = _case(rng, 5, 70, True, 1)
    assert (K.q4_scores(np.zeros((2, 70), np.float32), sk, 70, True, "silu") == 0).all()


# ---- argument checks ---------------------------------------------------------------------


def _q_args(**kw):
    rows = np.ones((4, 64), np.float32)
    a = dict(rows=rows, part_offsets=[0, 32], length=32, src_rows=[0, 3],
             out=np.zeros((3, 36), np.uint8), dst_rows=[2, 0])
    a.update(kw)
    return a


@pytest.mark.parametrize("change,match", [
    (dict(rows=np.ones((4, 64), np.int32)), r"rows must be float32, float16 or uint16"),
    (dict(rows=np.ones(64, np.float32)), r"rows must be 2-D"),
    (dict(rows=np.ones((64, 4), np.float32).T), r"rows must be C-contiguous"),
    (dict(length=0), r"length must be positive"),
    (dict(part_offsets=[0, 33]), r"part_offsets\[1\]=33 is out of range \[0, 33\)"),
    (dict(part_offsets=[0, 0, 0, 0]), r"part_offsets must list 1 to 3 parts"),
    (dict(src_rows=[0, 4]), r"src_rows\[1\]=4 is out of range \[0, 4\)"),
    (dict(dst_rows=[-1, 0]), r"dst_rows\[0\]=-1 is out of range \[0, 3\)"),
    (dict(dst_rows=[0]), r"src_rows and dst_rows differ in length"),
    (dict(out=np.zeros((3, 35), np.uint8)), r"out has shape \(3, 35\): records of at least 36"),
    (dict(out=np.zeros((3, 36), np.int8)), r"out must be uint8"),
    (dict(out=np.zeros(36, np.uint8)), r"out must be 2-D"),
])
def test_quantize_rejects_bad_arguments(change, match):
    a = _q_args(**change)
    with pytest.raises(ValueError, match=match):
        K.quantize_q4(a["rows"], a["part_offsets"], a["length"], a["src_rows"], a["out"],
                      a["dst_rows"])


def test_quantize_rejects_a_read_only_out():
    a = _q_args()
    a["out"].flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        K.quantize_q4(**a)


def test_dequantize_rejects_a_short_record():
    with pytest.raises(ValueError, match=r"record has 35 bytes; 36 are needed"):
        K.dequantize_q4(np.zeros(35, np.uint8), 1, 64)
    with pytest.raises(ValueError, match="1 to 3 parts"):
        K.dequantize_q4(np.zeros(90, np.uint8), 4, 32)
    with pytest.raises(ValueError, match="record must be 1-D"):
        K.dequantize_q4(np.zeros((2, 36), np.uint8), 1, 32)


@pytest.mark.parametrize("change,match", [
    (dict(x=np.ones((2, 63), np.float32)), r"x has shape \(2, 63\), expected \(2, 64\)"),
    (dict(sketch=np.zeros((5, 72), np.int8)), r"sketch must be uint8"),
    (dict(sketch=np.zeros((5, 71), np.uint8)), r"sketch has shape \(5, 71\): records of at least 72"),
    (dict(sketch=np.zeros((5, 144), np.uint8)[:, ::2]), r"sketch must be C-contiguous"),
    (dict(sketch=np.zeros(72, np.uint8)), r"sketch must be 2-D"),
    (dict(scale=np.ones(4, np.float32)), r"scale has shape \(4,\), expected \(5,\)"),
    (dict(scale=np.ones(5, np.float64)), r"scale must be float32"),
    (dict(out=np.ones(6, np.float32)), r"out has shape \(6,\), expected \(5,\)"),
    (dict(out=np.ones(5, np.float64)), r"out must be float32"),
    (dict(activation="tanh"), r"tanh"),
])
def test_scores_reject_bad_arguments(change, match):
    a = dict(x=np.ones((2, 64), np.float32), sketch=np.zeros((5, 72), np.uint8),
             activation="silu", scale=None, out=None)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        K.q4_scores(a["x"], a["sketch"], 64, True, a["activation"], scale=a["scale"], out=a["out"])
    # ungated records need one part only: 36 bytes are enough there
    assert K.q4_scores(np.ones(64, np.float32), np.zeros((5, 36), np.uint8), 64, False,
                       "relu").shape == (5,)

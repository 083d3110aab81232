"""Quantized flash directories (q8_0, q4_0, q4_1): tiny random models against transformers,
every runtime mode on them, GGUF blocks kept bit for bit (the codes layout of a GGUF's
down_proj included), K-quants requantized with a warning, and older directories still opening.

Two references per tiny model. transformers running the weights the directory stores, which
gguf-py (llama.cpp's numpy quantizers, outside this project) produces from the same float
weights: only the kernels' 16-bit x separates us from it (max error measured 1e-4 of the
largest logit). And transformers' float logits of the unquantized model, within an NMSE
stated per format (what quantizing these random Gaussian weights costs; measured on
llama-silu, the worst of the families below: q8_0 1.0e-3, q4_0 0.22, q4_1 0.18).
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest

import flashinfer_py as fi  # before torch: its OMP_WAIT_POLICY default must reach torch's libgomp
import torch  # noqa: E402  (isort: skip)
from conftest import rel_err
from flashinfer_py.dtypes import RecordLayout, codes_to_float32
from test_sparse import MODES, TOL, _runtime

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gg_dequantize  # noqa: E402
from gguf.quants import quantize as gg_quantize  # noqa: E402

FORMATS = ["q8_0", "q4_0", "q4_1"]
FLOAT_NMSE = {"q8_0": 5e-3, "q4_0": 0.3, "q4_1": 0.25}   # vs the unquantized model
STORED_REL = 1e-3                                         # vs the stored weights in float
GG = {f: getattr(gguf.GGMLQuantizationType, f.upper()) for f in FORMATS}


def nmse(got, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.mean((np.asarray(got, np.float64) - ref) ** 2) / np.mean(ref ** 2))


def qdq(w: np.ndarray, fmt: str) -> np.ndarray:
    """gguf-py's quantize then dequantize of the rows of w (the last block zero padded);
    numpy's rounding for float16."""
    if fmt == "float16":
        return w.astype(np.float16).astype(np.float32)
    n = w.shape[1]
    p = np.pad(w.astype(np.float32), ((0, 0), (0, -n % 32)))
    return gg_dequantize(gg_quantize(p, GG[fmt]), GG[fmt])[:, :n]


def stored_model(model, ffn_fmt: str, resident_fmt: str, down_codes: bool = False):
    """A copy of `model` holding the values a directory of these formats stores: every matrix
    quantized along its input dimension (embeddings along theirs), except down_proj, which a
    record holds as each neuron's column: quantized along d_model (with `down_codes`, the
    codes layout: along d_ff like the others)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim != 2:
                continue
            w = p.detach().numpy()
            ffn = any(k in name for k in ("mlp.", "fc1", "fc2"))
            fmt = ffn_fmt if ffn else resident_fmt
            down = "down_proj" in name or "fc2" in name
            p.copy_(torch.from_numpy(qdq(w.T, fmt).T.copy() if down and not down_codes
                                     else qdq(w, fmt)))
    return m


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# ---- tiny random models in every format ------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-silu", "opt", "opt-350m", "qwen3"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_model_logits_against_transformers(name, fmt, tiny_hf, tiny_flash, prompt_ids):
    model, _ = tiny_hf(name)
    m = fi.load(tiny_flash(name, fmt))
    assert m.dtype == fmt and set(m.resident_formats.values()) == {fmt}
    got = m.logits(prompt_ids)
    stored = hf_logits(stored_model(model, fmt, fmt), prompt_ids)
    assert rel_err(got, stored) < STORED_REL
    assert nmse(got, hf_logits(model, prompt_ids)) < FLOAT_NMSE[fmt]
    # token by token through the KV cache (the GEMV path rather than the blocked GEMM)
    cache = m.new_cache()
    step = np.concatenate([m.forward([t], cache) for t in prompt_ids[:12]])
    assert rel_err(step, stored[:12]) < STORED_REL


@pytest.mark.parametrize("resident", ["q8_0", "float16"])
def test_attention_at_8_bits_with_the_ffn_at_4(resident, tiny_hf, tmp_path, prompt_ids):
    model, src = tiny_hf("llama-silu")
    d = fi.convert(src, tmp_path / "m", dtype="q4_0", resident_dtype=resident, progress=False)
    m = fi.load(d)
    man = m.manifest
    assert man["dtype"] == "q4_0" and man["resident_dtype"] == resident
    assert set(m.resident_formats.values()) == {resident}
    wq = m.transformer.weight("layers.0.wq")
    want = ((200, 7 * 34), np.uint8) if resident == "q8_0" else ((200, 200), np.float16)
    assert (wq.shape, wq.dtype) == want
    assert m.transformer.w["layers.0.attn_norm"].dtype == np.float32  # norms stay float
    # records: 7 blocks of 18 bytes a part, three parts in one 4 KiB page
    assert man["bundle"]["part_bytes"] == [126] * 3 and man["bundle"]["record_bytes"] == 4096
    got = m.logits(prompt_ids)
    assert rel_err(got, hf_logits(stored_model(model, "q4_0", resident), prompt_ids)) < STORED_REL


# ---- every runtime mode on a quantized directory ---------------------------------------------
#
# Whole-model logits of two runs of a quantized model can differ by more than float rounding:
# a float32 difference in summation order (cache rows in another order) can tip x's 16-bit
# rounding in the next layer. So the runtime modes are compared where they differ, at the FFN:
# the same inputs, recorded from the dense model, go through the sparse FFN (window, cache,
# budget, reads) and the dense one, to float rounding.


def ffn_inputs(dense, schedule) -> list:
    """For each call of `schedule` (token lists run one after the other), each layer's FFN
    input in the dense model."""
    calls, rec = [], {}
    dense.transformer.observer = lambda layer, x, act, ref: rec.__setitem__(layer, x.copy())
    try:
        cache = dense.new_cache()
        for ids in schedule:
            dense.forward(ids, cache)
            calls.append([rec[i] for i in range(dense.args.num_hidden_layers)])
    finally:
        dense.transformer.observer = None
    return calls


def assert_sparse_ffn_is_dense(sparse, dense, schedule, tol: float = TOL) -> None:
    n = sparse.runtime.prefill_chunk  # calls in the chunks the sparse model would run
    schedule = [ids[i:i + n] for ids in schedule for i in range(0, len(ids), n)]
    sparse.reset()
    for xs in ffn_inputs(dense, schedule):
        sparse.ffn.start_token()
        for layer, x in enumerate(xs):
            got = sparse.ffn.forward(layer, x)
            assert rel_err(got, dense.ffn.forward(layer, x)) < tol, layer
        sparse.ffn.end_token()


@pytest.mark.parametrize("name,fmt", [("llama-relu", "q4_1"), ("opt", "q8_0")])
@pytest.mark.parametrize("mode", list(MODES))
def test_sparse_modes_on_quantized_records_equal_dense(name, fmt, mode, tiny_flash, prompt_ids):
    """The oracle's sparse paths (window, budget, no reuse, unbundled reads, frequency) compute
    the dense FFN of the quantized directory, as they do for float records."""
    d = tiny_flash(name, fmt)
    schedule = [prompt_ids[:9]] + [[t] for t in prompt_ids[9:]]
    assert_sparse_ffn_is_dense(fi.load(d, _runtime(d, mode)), fi.load(d), schedule)


@pytest.mark.parametrize("row", ["naive", "hybrid", "predictor", "window", "bundling"])
def test_paper_table_rows_on_quantized_records(row, tiny_flash, prompt_ids):
    d = tiny_flash("opt", "q4_0")
    m = fi.load(d, fi.RuntimeConfig(ablation=row, selection="oracle", prefill_chunk=1))
    assert_sparse_ffn_is_dense(m, fi.load(d), [[t] for t in prompt_ids[:10]])
    if row in ("predictor", "window") and m.ffn.total.loaded:  # parts of unequal size
        assert m.ffn.total.reads >= 2 * m.ffn.total.loaded
    # and the model runs in the mode end to end
    assert np.isfinite(m.logits(prompt_ids[:4])).all()


def test_budget_plans_packed_rows_of_blocks(tiny_flash):
    from flashinfer_py.loader import cache_row_bytes, plan_memory

    d = tiny_flash("llama-relu", "q4_1")
    m = fi.load(d)
    assert cache_row_bytes(m.manifest) == 448  # 3 x 140 bytes, rounded up to 64
    plan = plan_memory(m.args, m.manifest, fi.RuntimeConfig(sparse=True, selection="oracle"))
    assert plan.row_bytes == 448 and plan.cache_bytes == 3 * 344 * 448
    sparse = fi.load(d, _runtime(d, "tiny-budget"))
    assert sparse.ffn.cache.row_bytes == 448
    assert sparse.plan.total <= sparse.runtime.dram_budget


# ---- ranking with the 4-bit sketch, and predictor training -----------------------------------


@pytest.fixture(scope="module")
def sketched_q41(tiny_flash, tmp_path_factory):
    from test_rank import sketch_dir

    return sketch_dir(tiny_flash, tmp_path_factory, "q4_1")


def test_sketch_of_quantized_records(sketched_q41):
    """ffn_sketch.bin of a q4_1 directory: the sketch quantizer run on the values the records'
    blocks hold (expanded by gguf-py's dequantizer here)."""
    from flashinfer_py import kernels as K
    from test_rank import bundle_rows, file_sketches

    d, preds = sketched_q41
    m = fi.load(d)
    a, lay = m.args, RecordLayout.from_manifest(m.manifest)
    sk = file_sketches(d, a)
    for layer in range(a.num_hidden_layers):
        raw = bundle_rows(d, layer)
        parts = [gg_dequantize(np.ascontiguousarray(raw[:, o:o + b]), GG["q4_1"])[:, :a.hidden_size]
                 for o, b in zip(lay.part_offsets[:2], lay.part_bytes[:2])]
        f32 = np.ascontiguousarray(np.concatenate(parts, axis=1), np.float32)
        want = np.zeros_like(sk[layer])
        ids = np.arange(a.intermediate_size)
        K.quantize_q4(f32, [0, a.hidden_size], a.hidden_size, ids, want, ids)
        np.testing.assert_array_equal(sk[layer], want)


def test_rank_and_sketch_on_quantized_records(sketched_q41, prompt_ids):
    """eviction="rank" under a budget: the tiers stay a partition and every sketch stays the
    file's bytes (re-quantized from quantized cache rows); with every neuron cached and
    read_limit 1 it is the dense model."""
    from test_rank import check_gate_tiers, check_tiers, file_sketches, rank_budget

    d, _ = sketched_q41
    # a q4_1 record (448 bytes cached) is not much bigger than its full 4-bit sketch (252 +
    # 12): half the cache's bytes would not pay for the other half's sketches. "auto" takes
    # the gate sketch here (half of that); the full one is still there when asked for.
    file_sk = file_sketches(d, fi.load(d).args)
    for kind, check in (("auto", check_gate_tiers), ("full", check_tiers)):
        m = fi.load(d, dram_budget=rank_budget(d, 0.8), prefill_chunk=1, sketch=kind)
        assert all(16 <= c < m.args.intermediate_size for c in m.plan.cache_capacity)
        assert (m.runtime.selection, m.runtime.eviction) == ("sketch", "rank")
        assert m.runtime.sketch == ("gate" if kind == "auto" else "full")
        cache = m.new_cache()
        for t in prompt_ids[:12]:
            m.forward([t], cache)
            check(m, file_sk)
    assert m.ffn.total.loaded > 0
    kw = dict(prefill_chunk=1, read_limit=1.0)
    full = fi.load(d, fi.RuntimeConfig(**kw, dram_budget=rank_budget(d, 1.0, **kw)))
    assert_sparse_ffn_is_dense(full, fi.load(d), [[t] for t in prompt_ids[:10]])


def test_lowrank_predictors_train_on_quantized_records(tiny_flash, tmp_path):
    from flashinfer_py.train import TrainConfig, evaluate_layer, record, train_predictors

    d = tmp_path / "relu-q8.flash"
    shutil.copytree(tiny_flash("llama-relu", "q8_0"), d)
    m = fi.load(d)
    ids = np.random.default_rng(1).integers(3, 503, 512).tolist()
    cfg = TrainConfig(rank=200, rank_last=200, max_tokens=512, window=64, epochs=4, lr=1e-3,
                      methods=("lowrank",))
    preds = train_predictors(m, ids, cfg, progress=False)
    held = np.random.default_rng(2).integers(3, 503, 128).tolist()
    xs, hs, _ = record(m, held, TrainConfig(window=64, max_tokens=128), progress=False)
    r = evaluate_layer(preds.layers[0], xs[0], hs[0], np.asarray(hs[0]) > 0)
    assert r["recall"] > 0.85 and r["precision"] > 0.75, r
    sparse = fi.load(d, sparse=True, selection="predictor", prefill_chunk=1)
    assert np.isfinite(sparse.logits(held[:6])).all()


# ---- GGUF: blocks kept bit for bit -----------------------------------------------------------


LLAMA_GGUF = dict(vocab_size=503, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)


def llama_model(seed: int = 5, **kw):
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_GGUF, **kw}))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def q41_gguf(tmp_path_factory):
    """A llama GGUF quantized like SmolLM2's: Q4_1 attention and FFN, Q8_0 embeddings and LM
    head; and transformers reading it back."""
    import transformers
    from gguf_export import write_gguf

    d = tmp_path_factory.mktemp("q41gguf")
    write_gguf(llama_model(), d / "m.gguf", "llama",
               qtypes={"attn_": "Q4_1", "ffn_": "Q4_1", "token_embd": "Q8_0",
                       "output.": "Q8_0"})  # first match wins: attn_output is Q4_1
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    return d / "m.gguf", hf


def convert_quiet(src, dst, **kw):
    """Convert, returning the warnings other than the tiny GGUF's missing vocabulary."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fi.convert(src, dst, progress=False, **kw)
    return out, [str(w.message) for w in caught if "tokenizer.json" not in str(w.message)]


def test_gguf_q4_1_is_kept_bit_for_bit(q41_gguf, tmp_path, prompt_ids):
    path, hf = q41_gguf
    out, warned = convert_quiet(path, tmp_path / "q41", dtype="q4_1")
    assert warned == []
    m = fi.load(out)
    man = m.manifest
    assert man["conversion"] == {"kept_bit_for_bit": {"Q4_1": 14, "Q8_0": 2}, "requantized": {}}
    assert man["bundle"]["down_layout"] == "codes" and man["bundle"]["part_bytes"] == [120, 120, 96]
    assert m.resident_formats["tok_embeddings"] == "q8_0" and m.resident_formats["layers.1.wq"] == "q4_1"
    reader = gguf.GGUFReader(path)
    t = {x.name: x for x in reader.tensors}
    lay = RecordLayout.from_manifest(man)
    for layer in range(2):
        rows = m.ffn.rows_by_layer[layer]
        # up and gate: the GGUF's rows of blocks, byte for byte
        for i, part in enumerate(("up", "gate")):
            o, b = lay.part_offsets[i], lay.part_bytes[i]
            np.testing.assert_array_equal(rows[:, o:o + b], np.asarray(t[f"blk.{layer}.ffn_{part}.weight"].data))
        # down: each neuron's codes and the resident scales give the GGUF's values exactly
        down = gg_dequantize(np.asarray(t[f"blk.{layer}.ffn_down.weight"].data), GG["q4_1"])
        o = lay.part_offsets[2]
        got = codes_to_float32(rows[:, o:o + 96], "q4_1", 192,
                               m.transformer.w[f"layers.{layer}.ffn_down_scales"],
                               np.arange(320))
        np.testing.assert_array_equal(got, down.T)
        # attention: the values transformers reads (llama's q/k rows moved back, whole)
        wq = m.transformer.weight(f"layers.{layer}.wq")
        np.testing.assert_array_equal(fi.kernels.dequantize(wq, "q4_1", 192),
                                      hf.model.layers[layer].self_attn.q_proj.weight.detach().numpy())
    ref = hf_logits(hf, prompt_ids)
    assert rel_err(m.logits(prompt_ids), ref) < STORED_REL  # the same weights: only x's 16 bits


def test_dense_4bit_layers_run_as_two_products(q41_gguf, tmp_path, prompt_ids, monkeypatch):
    """A dense model whose FFN holds GGUF's 4-bit blocks (the codes layout) runs each layer as
    two products, up/gate then down_proj (interleaved where the CPU has the kernels): the
    records made again from those matrices are the stored ones, byte for byte, and the logits,
    the activations the observer sees and a decode step agree with the fused per-neuron kernel
    within the rounding of h to 16 bits."""
    from flashinfer_py.ffn import ResidentFFN

    path, _ = q41_gguf
    out, _ = convert_quiet(path, tmp_path / "q41", dtype="q4_1")
    m = fi.load(out)
    assert all(x is not None for x in m.ffn._two)
    assert isinstance(m.ffn._two[0][0], fi.kernels.Interleaved) == fi.kernels.interleaves("q4_1")
    monkeypatch.setattr(ResidentFFN, "_two_products", lambda self, layer: False)
    monkeypatch.setattr(fi.kernels, "interleaves", lambda fmt: False)
    ref = fi.load(out)
    assert ref.ffn._two == [None, None]
    for layer in range(2):
        np.testing.assert_array_equal(m.ffn.rows_by_layer[layer], ref.ffn.rows_by_layer[layer])
        for part in ("up", "gate", "down"):
            np.testing.assert_array_equal(m.ffn.part_f32(layer, part),
                                          ref.ffn.part_f32(layer, part))
    assert m.ffn.nbytes <= ref.ffn.nbytes * 1.1
    # what info() reports held: the interleaved matrices (q/k/v fused) with their padding
    held, stored = m.info()["resident_bytes"], ref.info()["resident_bytes"]
    assert stored <= held <= stored * 1.02
    assert rel_err(m.logits(prompt_ids), ref.logits(prompt_ids)) < 1e-4
    seen = {}
    x = np.random.default_rng(3).standard_normal((5, 192)).astype(np.float32)
    for model in (m, ref):
        h = np.empty((5, 320), np.float32)
        seen[model is m] = (model.ffn.forward(1, x, act_out=h), h)
    np.testing.assert_allclose(seen[True][1], seen[False][1], rtol=1e-5, atol=1e-6)
    assert rel_err(seen[True][0], seen[False][0]) < 1e-4
    cache = m.new_cache()
    m.forward(prompt_ids[:-1], cache)
    cache2 = ref.new_cache()
    ref.forward(prompt_ids[:-1], cache2)
    assert rel_err(m.forward(prompt_ids[-1:], cache), ref.forward(prompt_ids[-1:], cache2)) < 1e-4


def test_codes_layout_in_the_neuron_cache(q41_gguf, tmp_path):
    """Cache rows in any order (inserted shuffled, then compacted by evictions) with their
    neuron ids: the FFN of the cached neurons, as the dense rows of those neurons give it."""
    from flashinfer_py.bundles import BundleReader
    from flashinfer_py.cache import NeuronCache

    out, _ = convert_quiet(q41_gguf[0], tmp_path / "q41", dtype="q4_1")
    dense = fi.load(out)
    kernel = dense.ffn.kernel
    reader = BundleReader(out / "ffn_bundles.bin")
    cache = NeuronCache(reader, 300, packed=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 192)).astype(np.float32)
    for layer in range(2):
        cache.insert(layer, rng.permutation(320)[:250])
        cache.evict(layer, cache.ids(layer)[rng.permutation(250)[:60]])  # moves the last rows
        cache.insert(layer, np.setdiff1d(np.arange(320), cache.ids(layer))[:70])
        ids = cache.ids(layer)
        assert not np.all(np.diff(ids) > 0)
        got = kernel(layer, x, cache.rows(layer), row_ids=ids)
        want = kernel(layer, x, dense.ffn.rows_by_layer[layer], row_select=np.sort(ids))
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("act,fmt", [("silu", "q4_1"), ("relu", "q8_0")])
def test_down_layout_codes_from_float_weights(act, fmt, tmp_path, prompt_ids):
    """convert --down-layout codes on a float checkpoint: down_proj quantized along d_ff as
    llama.cpp does (gguf-py's blocks of it), each neuron's codes in its record, the scales
    resident; the dense model runs its FFN as two products on them and gives transformers'
    logits of those stored values; the sparse FFN (window, budget) equals the dense one (ReLU;
    test_codes_layout_in_the_neuron_cache covers a gated layer's cache rows)."""
    model = llama_model(hidden_act=act)  # d_ff 320: whole blocks of 32 neurons
    src = tmp_path / "hf"
    model.save_pretrained(src)
    out, warned = convert_quiet(src, tmp_path / "codes", dtype=fmt, down_layout="codes")
    assert warned == []
    m = fi.load(out)
    assert m.manifest["bundle"]["down_layout"] == "codes"
    assert m.manifest["bundle"]["part_bytes"][-1] == 32 * (-(-m.args.hidden_size // 32)) * (
        4 if fmt.startswith("q4") else 8) // 8  # codes only: no scales in the record
    if m.args.hidden_act not in ("relu", "fatrelu"):
        assert all(x is not None for x in m.ffn._two)  # two products
    got = m.logits(prompt_ids)
    stored = hf_logits(stored_model(model, fmt, fmt, down_codes=True), prompt_ids)
    assert rel_err(got, stored) < STORED_REL
    assert nmse(got, hf_logits(model, prompt_ids)) < FLOAT_NMSE[fmt]
    # the blocks layout stores other values for down_proj: the option changed what is stored
    other = hf_logits(stored_model(model, fmt, fmt), prompt_ids)
    assert rel_err(got, other) > 10 * rel_err(got, stored)
    if act == "relu":  # the oracle's sparse paths are the dense FFN exactly for ReLU only
        schedule = [prompt_ids[:9]] + [[t] for t in prompt_ids[9:16]]
        for mode in ("window", "tiny-budget"):
            assert_sparse_ffn_is_dense(fi.load(out, _runtime(out, mode)), m, schedule)


def test_down_layout_is_checked_and_blocks_requantizes_a_gguf(q41_gguf, tiny_hf, tmp_path):
    _, src = tiny_hf("llama-silu")  # d_ff 344: no whole blocks of 32 neurons
    with pytest.raises(fi.ConvertError, match="344 is not a multiple of 32"):
        fi.convert(src, tmp_path / "d", dtype="q4_1", down_layout="codes", progress=False)
    with pytest.raises(fi.ConvertError, match="--down-layout codes needs a block --dtype"):
        fi.convert(src, tmp_path / "a", dtype="float16", down_layout="codes", progress=False)
    with pytest.raises(fi.ConvertError, match="--down-layout 'rows' is not supported"):
        fi.convert(src, tmp_path / "b", dtype="q4_1", down_layout="rows", progress=False)
    assert not any((tmp_path / n).exists() for n in "abd")
    # a GGUF's down_proj blocks asked for as blocks: quantized again along d_model, and said so
    out, warned = convert_quiet(q41_gguf[0], tmp_path / "c", dtype="q4_1", down_layout="blocks")
    assert fi.load(out).manifest["bundle"]["down_layout"] == "blocks"
    assert len(warned) == 1 and "2 tensors Q4_1 -> q4_1" in warned[0]


def test_gguf_in_another_block_format_is_requantized_with_a_warning(q41_gguf, tmp_path, prompt_ids):
    path, hf = q41_gguf
    out, warned = convert_quiet(path, tmp_path / "q8", dtype="q8_0", resident_dtype="q8_0")
    assert len(warned) == 1 and "14 tensors Q4_1 -> q8_0" in warned[0] and "kept bit" in warned[0]
    man = fi.load(out).manifest
    assert man["bundle"]["down_layout"] == "blocks"
    assert man["conversion"]["kept_bit_for_bit"] == {"Q8_0": 2}
    # 8 bits hold the 4-bit values closely: near transformers reading the GGUF
    assert nmse(fi.load(out).logits(prompt_ids), hf_logits(hf, prompt_ids)) < FLOAT_NMSE["q8_0"]


def random_q6_k(rng, rows: int, cols: int) -> np.ndarray:
    """Valid Q6_K blocks (256 values: ql[128], qh[64], int8 scales[16], fp16 d) of small values."""
    nb = cols // 256
    b = np.zeros((rows, nb, 210), np.uint8)
    b[..., :192] = rng.integers(0, 256, (rows, nb, 192), dtype=np.uint8)
    b[..., 192:208] = rng.integers(1, 5, (rows, nb, 16)).astype(np.int8).view(np.uint8)
    b[..., 208:210] = np.full((rows, nb, 1), 6e-4, np.float16).view(np.uint8)
    return b.reshape(rows, nb * 210)


def test_k_quants_are_requantized_with_a_warning(tmp_path, prompt_ids):
    """A Q6_K tensor (what Q4_K_M files hold) has no block format here: dequantized by gguf,
    quantized to the chosen format, and said so."""
    import transformers
    from gguf_export import write_gguf

    model = llama_model(seed=9, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    raw = {f"blk.{i}.ffn_up.weight": ("Q6_K", random_q6_k(np.random.default_rng(i), 512, 256))
           for i in range(2)}
    write_gguf(model, tmp_path / "k.gguf", "llama", raw=raw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf",
                                                           dtype=torch.float32).eval()
    out, warned = convert_quiet(tmp_path / "k.gguf", tmp_path / "k", dtype="q4_1")
    assert len(warned) == 1 and "2 tensors Q6_K -> q4_1" in warned[0]
    assert fi.load(out).manifest["conversion"]["requantized"] == {"Q6_K -> q4_1": 2}
    assert nmse(fi.load(out).logits(prompt_ids), hf_logits(hf, prompt_ids)) < FLOAT_NMSE["q4_1"]


# ---- the command line, and directories made before the block formats --------------------------


def test_cli_convert_reports_formats_and_what_was_kept(q41_gguf, tmp_path, capsys):
    from flashinfer_py.cli import main

    path, _ = q41_gguf
    dst = tmp_path / "cli"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", str(path), str(dst), "--dtype", "q4_1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "FFN records: q4_1 (4096 bytes a neuron on flash, down layout codes)" in out
    assert "resident matrices: q4_1, q8_0" in out and "kept bit for bit: 14 x Q4_1, 2 x Q8_0" in out
    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "q4_1" and info["resident_dtypes"] == ["q4_1", "q8_0"]
    with pytest.raises(SystemExit):
        main(["convert", str(path), str(tmp_path / "x"), "--dtype", "q5_0"])


def test_a_version_1_directory_still_opens(tiny_flash, tmp_path, prompt_ids):
    """What the converter wrote before the block formats: manifest version 1 (one dtype, no
    resident_formats, no part sizes) and bundle header version 1."""
    from test_bundle_format import OFF, V2_FIELDS, patch

    src = tiny_flash("llama-silu", "float16")
    d = tmp_path / "old"
    shutil.copytree(src, d)
    man = json.loads((d / "manifest.json").read_text())
    for key in ("resident_dtype", "resident_formats", "conversion"):
        del man[key]
    for key in ("down_layout", "part_bytes", "payload_bytes"):
        del man["bundle"][key]
    man["format_version"] = 1
    bundle = d / "ffn_bundles.bin"
    patch(bundle, OFF["version"], "I", 1)
    with open(bundle, "r+b") as f:
        f.seek(V2_FIELDS[0])
        f.write(bytes(V2_FIELDS[1] - V2_FIELDS[0]))
    (d / "manifest.json").write_text(json.dumps(man))
    old = fi.load(d)
    assert set(old.resident_formats.values()) == {"float16"}
    assert rel_err(old.logits(prompt_ids[:8]), fi.load(src).logits(prompt_ids[:8])) < 1e-6
    man["dtype"] = "q4_0"  # block formats need version 2
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(fi.FlashFormatError, match="unknown storage format 'q4_0'"):
        fi.load(d)

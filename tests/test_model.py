"""Our dense forward pass against transformers' logits for the same weights (the outside oracle)."""
from __future__ import annotations

import numpy as np
import pytest

import flashinfer_py as fi
from conftest import NEW_FAMILIES, TINY_MODELS, rel_err

TOL = 1e-4  # relative to the largest |logit|


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_full_prompt_matches_transformers(name, tiny_hf, tiny_flash, prompt_ids):
    ref_model, _ = tiny_hf(name)
    ours = fi.load(tiny_flash(name)).logits(prompt_ids)
    ref = hf_logits(ref_model, prompt_ids)
    assert ours.shape == ref.shape == (len(prompt_ids), ref_model.config.vocab_size)
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("name", ["llama-silu", "llama-fatrelu", "opt", *NEW_FAMILIES])
def test_token_by_token_with_kv_cache_matches(name, tiny_hf, tiny_flash, prompt_ids):
    ref_model, _ = tiny_hf(name)
    model = fi.load(tiny_flash(name))
    cache = model.new_cache()
    # a chunk first (prefill), then one token at a time through the KV cache
    rows = [model.logits(prompt_ids[:7], cache)]
    rows += [model.logits([t], cache) for t in prompt_ids[7:]]
    ours = np.concatenate(rows)
    assert cache.size == len(prompt_ids)
    assert rel_err(ours, hf_logits(ref_model, prompt_ids)) < TOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_storage_matches_rounded_reference(dtype, tiny_hf, tiny_flash, prompt_ids):
    """16-bit storage computes in float32 on the rounded weights: compare with transformers
    running float32 on the same rounded weights."""
    import copy

    import torch

    ref_model, _ = tiny_hf("llama-silu")
    rounded = copy.deepcopy(ref_model)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2:  # matrices are stored in 16 bits, norms stay float32
                p.copy_(p.to(tdt).float())
    model = fi.load(tiny_flash("llama-silu", dtype))
    assert model.dtype == dtype
    assert rel_err(model.logits(prompt_ids), hf_logits(rounded, prompt_ids)) < TOL


def test_weights_stay_in_storage_dtype(tiny_flash):
    model = fi.load(tiny_flash("llama-silu", "float16"))
    w = model.transformer.w
    assert w["layers.0.wq"].dtype == np.float16
    assert w["tok_embeddings"].dtype == np.float16
    assert all(r.dtype == np.float16 for r in model.ffn.rows_by_layer)


@pytest.mark.parametrize("name,dtype", [("llama-silu", "float16"), ("llama-silu", "bfloat16"),
                                        ("llama-silu", "float32"), ("opt", "float16"),
                                        ("gemma3", "float16")])
def test_dense_ffn_runs_as_two_products(tiny_flash, prompt_ids, monkeypatch, name, dtype):
    """A dense float FFN layer (not ReLU) runs as two products: up/gate rows, then down_proj
    (the records' down columns transposed). The records made again are the stored ones, and
    logits and activations agree with the fused per-neuron kernel to float rounding. ReLU
    (OPT) keeps the fused kernel, which skips the down column of every zero activation."""
    from conftest import rel_err

    from flashinfer_py.ffn import ResidentFFN

    d = tiny_flash(name, dtype)
    m = fi.load(d)
    relu = m.args.hidden_act in ("relu", "fatrelu")
    assert [x is None for x in m.ffn._two] == [relu] * m.args.num_hidden_layers
    monkeypatch.setattr(ResidentFFN, "_two_products", lambda self, layer: False)
    ref = fi.load(d)
    for layer in range(m.args.num_hidden_layers):
        np.testing.assert_array_equal(m.ffn.rows_by_layer[layer], ref.ffn.rows_by_layer[layer])
    assert rel_err(m.logits(prompt_ids), ref.logits(prompt_ids)) < 1e-5
    x = np.random.default_rng(0).standard_normal((3, m.args.hidden_size)).astype(np.float32)
    f = m.args.intermediate_size
    h, h_ref = np.empty((3, f), np.float32), np.empty((3, f), np.float32)
    got, want = m.ffn.forward(0, x, act_out=h), ref.ffn.forward(0, x, act_out=h_ref)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    assert rel_err(got, want) < 1e-5
    assert m.ffn.nbytes <= ref.ffn.nbytes
    if not relu:  # records made again are a copy: a write would change nothing, so it raises
        with pytest.raises(ValueError, match="read-only"):
            m.ffn.rows_by_layer[0][0, 0] = 1


def test_context_limit_is_a_clear_error(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"), max_context=8)
    with pytest.raises(ValueError, match="max_context"):
        model.logits(list(range(3, 20)))


def test_bad_token_ids_rejected(tiny_flash):
    model = fi.load(tiny_flash("llama-silu"))
    with pytest.raises(ValueError, match="token ids"):
        model.logits([1, 99999])

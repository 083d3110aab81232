"""The model families beyond Llama and OPT (issue 9): Qwen2, Qwen3, Phi-3, Gemma 3, Mistral's
sliding window and OPT-350m's projections. Dense logits against transformers are in
test_model.py (every name in TINY_MODELS); here: the sparse path, predictor training, the CLI,
multimodal Gemma 3 checkpoints, the GGUF layout of each architecture, and the errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import flashinfer_py as fi
from conftest import GEMMA3_KW, NEW_FAMILIES, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# --- LongRoPE: transformers picks the factors per call, by the sequence length so far -----------


def test_phi3_longrope_token_by_token_matches_transformers_cache(tiny_hf, tiny_flash, prompt_ids):
    """Through the KV cache, the positions before the original context (16) are rotated with
    the short factors and the later ones with the long factors, as in transformers' own
    incremental decoding (the whole-prompt case is in test_model.py)."""
    hf, _ = tiny_hf("phi3-longrope")
    ours = fi.load(tiny_flash("phi3-longrope"))
    assert ours.args.rope_scaling["attention_factor"] == pytest.approx(np.sqrt(2.0))  # 256 / 16
    chunks = [prompt_ids[:7]] + [[t] for t in prompt_ids[7:]]
    ref, past = [], None
    with torch.no_grad():
        for c in chunks:
            out = hf(torch.tensor([c]), cache=past, use_cache=True)
            ref.append(out.logits[0].numpy())
            past = out.past_key_values
    cache = ours.new_cache()
    got = np.concatenate([ours.logits(c, cache) for c in chunks])
    assert rel_err(got, np.concatenate(ref)) < TOL
    whole = hf_logits(hf, prompt_ids)  # all 40 positions with the long factors: not the same
    assert rel_err(got[:16], whole[:16]) > 100 * TOL


# --- manifests written before these families -------------------------------------------------


def test_manifest_without_the_new_fields_loads_as_before(tiny_flash, tmp_path, prompt_ids):
    """A manifest from before issue 9 (no new ModelArgs fields; llama3 rope scaling without a
    rope_type) loads with the defaults and computes the same logits."""
    from flashinfer_py.config import ModelArgs

    src = tiny_flash("llama3-rope")
    old = tmp_path / "old.flash"
    shutil.copytree(src, old)
    m = json.loads((old / "manifest.json").read_text())
    new_fields = ("model_type", "attention_out_bias", "qk_norm", "post_norms", "embed_scale",
                  "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "layer_types", "rope_local_base_freq", "partial_rotary_factor",
                  "word_embed_proj_dim")
    assert set(new_fields) <= set(m["model"])
    m["model"] = {k: v for k, v in m["model"].items() if k not in new_fields}
    m["model"]["rope_scaling"].pop("rope_type")
    (old / "manifest.json").write_text(json.dumps(m))
    args = ModelArgs.from_dict(m["model"])
    assert args.window(0) is None and args.embed_dim == args.hidden_size
    # (threaded kernels sum in varying order: equal to rounding, not bit for bit)
    assert rel_err(fi.load(old).logits(prompt_ids), fi.load(src).logits(prompt_ids)) < 1e-5


# --- the sparse path: the bundle record is one neuron for every family ------------------------


@pytest.mark.parametrize("selection", ["all", "oracle"])
@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_sparse_with_every_neuron_is_dense(name, selection, tiny_flash, prompt_ids):
    """selection="all", and the oracle keeping every neuron (oracle_sparsity=0; for ReLU the
    oracle's exact active set), stream the FFN through the neuron cache with a window and
    give the dense logits."""
    d = tiny_flash(name)
    ref = fi.load(d).logits(prompt_ids)
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection=selection, window=2,
                                    oracle_sparsity=0.0))
    assert m.sparse
    cache = m.new_cache()
    got = [m.forward(prompt_ids[:9], cache)] + [m.forward([t], cache) for t in prompt_ids[9:]]
    # token by token against the whole prompt at once: other kernels (GEMV vs blocked GEMM)
    # and thread splits sum in other orders; Gemma 3's reached 1.05e-5 under load. A missing
    # or wrong neuron moves the logits by 1e-3 or more.
    assert rel_err(np.concatenate(got), ref) < 3e-5
    assert m.ffn.total.loaded > 0


@pytest.mark.parametrize("mode", [dict(window=1), dict(reuse=False), dict(window=3, bundled=False),
                                  dict(window=3, compute="predicted")])
def test_opt350m_relu_oracle_is_exact(mode, tiny_flash, prompt_ids):
    """OPT-350m's shape is ReLU: its true active set is sparse and gives the dense logits."""
    d = tiny_flash("opt-350m")
    ref = fi.load(d).logits(prompt_ids)
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection="oracle", prefill_chunk=1, **mode))
    cache = m.new_cache()
    got = np.concatenate([m.forward([t], cache) for t in prompt_ids])
    assert rel_err(got, ref) < 1e-5
    f = m.args.intermediate_size * m.args.num_hidden_layers
    assert 0 < m.ffn.total.needed < 0.8 * f * len(prompt_ids)  # ReLU: about half fire


@pytest.mark.parametrize("name", ["llama-relu", "opt"])
def test_compute_predicted_with_the_true_active_set_is_dense(name, tiny_flash, prompt_ids):
    """compute="predicted": each token runs with its own neurons only, not the window's union
    the cache holds. With ReLU's exact active set (the oracle) the rest are zero, so the
    logits are the dense ones, in prompt chunks and token by token; and fewer neurons are
    computed than the cache holds."""
    d = tiny_flash(name)
    ref = fi.load(d).logits(prompt_ids)
    m = fi.load(d, fi.RuntimeConfig(sparse=True, selection="oracle", window=4,
                                    compute="predicted", prefill_chunk=4))
    calls = []
    ffn_on = m.ffn._ffn_on

    def count(layer, x, rows, select, has_bias):  # the FFN over rows[select] of the cache
        calls.append(select is not None and len(select) < rows.shape[0])
        return ffn_on(layer, x, rows, select, has_bias)

    m.ffn._ffn_on = count
    cache = m.new_cache()
    got = [m.forward(prompt_ids[:9], cache)] + [m.forward([t], cache) for t in prompt_ids[9:]]
    # token by token against the whole prompt at once: other kernels (GEMV vs blocked GEMM)
    # and thread splits sum in other orders; Gemma 3's reached 1.05e-5 under load. A missing
    # or wrong neuron moves the logits by 1e-3 or more.
    assert rel_err(np.concatenate(got), ref) < 3e-5
    assert any(calls)  # the subset path ran: the window held more than a token needed


def test_gemma3_sparse_geglu_matches_transformers_on_the_same_neurons(tiny_hf, tiny_flash,
                                                                    prompt_ids):
    """GeGLU at 50% sparsity (oracle, each token computed with its own neurons only) equals
    transformers' Gemma 3 with every other neuron's activation zeroed, and the neurons kept
    are the largest |gelu(gate) * up| by transformers' own activations."""
    hf, _ = tiny_hf("gemma3")
    m = fi.load(tiny_flash("gemma3"), fi.RuntimeConfig(
        sparse=True, selection="oracle", oracle_sparsity=0.5, compute="predicted",
        prefill_chunk=1, window=1))
    chosen: dict = {}
    select = m.ffn._select

    def record(layer, x):
        ids = select(layer, x)
        chosen[(len(chosen) // m.args.num_hidden_layers, layer)] = ids
        return ids

    m.ffn._select = record
    ids = prompt_ids[:16]
    cache = m.new_cache()
    got = np.concatenate([m.forward([t], cache) for t in ids])

    seen = {}

    def mask(layer):
        def hook(module, args):
            (h,) = args  # [1, T, f]: gelu(gate) * up, the down projection's input
            seen[layer] = h[0].abs().numpy().copy()
            keep = torch.zeros_like(h, dtype=torch.bool)
            for t in range(h.shape[1]):
                keep[0, t, torch.from_numpy(chosen[(t, layer)].astype(np.int64))] = True
            return (torch.where(keep, h, torch.zeros_like(h)),)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(mask(i))
               for i, layer in enumerate(hf.model.layers)]
    try:
        ref = hf_logits(hf, ids)
    finally:
        for h in handles:
            h.remove()
    assert rel_err(got, ref) < TOL
    f = m.args.intermediate_size
    for (t, layer), kept in chosen.items():
        assert len(kept) == f // 2
        act = seen[layer][t]
        kth = np.sort(act)[::-1][f // 2 - 1]
        assert act[kept].min() >= kth * (1 - 1e-4)  # the top half, up to rounding at the edge


# --- predictors for a GeGLU model -------------------------------------------------------------


def test_gemma3_predictors_train_and_drive_sparse_generation(tiny_flash, tmp_path):
    """GeGLU is labelled like SwiGLU (by |gelu(gate) * up|, 50% target): a short training run
    reaches the recall target on its tokens, and generation runs from the predictors."""
    from flashinfer_py.train import TrainConfig, evaluate_layer, record, train_predictors

    d = tmp_path / "gemma3.flash"
    shutil.copytree(tiny_flash("gemma3"), d)
    m = fi.load(d)
    ids = np.random.default_rng(5).integers(3, 503, 512).tolist()
    cfg = TrainConfig(rank=16, rank_last=16, max_tokens=512, window=64, epochs=2, lr=1e-3,
                      holdout=0.01, recall=0.9, methods=("sketch", "lowrank"))
    preds = train_predictors(m, ids, cfg, progress=False)
    assert preds.label == "magnitude" and len(preds.layers) == GEMMA3_KW["num_hidden_layers"]
    assert preds.kinds == ["lowrank", "sketch"]
    xs, hs, _ = record(m, ids, cfg, progress=False)
    for layer, p in enumerate(preds.layers):
        truth = np.asarray(hs[layer]) > np.float16(preds.act_thresholds[layer])
        assert abs(truth.mean() - 0.5) < 0.05
        assert abs(evaluate_layer(p, xs[layer], hs[layer], truth)["recall"] - 0.9) < 0.05
    sparse = fi.load(d, sparse=True, selection="predictor", window=2)
    steps = list(sparse.generate_step("w5 w6 w7", max_new_tokens=4, stop_at_eos=False))
    assert len(steps) == 4 and all(0 < s.stats["needed"] for s in steps)
    # the default for GeGLU: the 4-bit sketch ranking neurons under eviction "rank"
    default = fi.load(d, sparse=True)
    assert (default.runtime.selection, default.runtime.eviction) == ("sketch", "rank")
    steps = list(default.generate_step("w5 w6 w7", max_new_tokens=4, stop_at_eos=False))
    assert len(steps) == 4 and all(0 < s.stats["needed"] for s in steps)


# --- the command line -------------------------------------------------------------------------


def test_info_names_the_family_and_what_sets_it_apart(tiny_flash, capsys):
    from flashinfer_py.cli import main

    assert main(["info", str(tiny_flash("gemma3"))]) == 0
    out = capsys.readouterr().out
    assert "model_type: gemma3_text" in out and "arch: gemma3" in out
    assert "GeGLU (tanh GELU gate)" in out and "6 of 7 layers attend to the last 5 tokens" in out
    assert main(["info", str(tiny_flash("opt-350m")), "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["model_type"] == "opt"
    assert "embeddings projected 72 <-> 200" in model["features"]
    assert "post-LayerNorm" in model["features"]


# --- a multimodal Gemma 3 checkpoint: its text model ------------------------------------------


def test_multimodal_gemma3_converts_its_text_model(tmp_path, prompt_ids):
    """Its weights sit under language_model.model.*; transformers' multimodal class does not
    apply final_logit_softcapping (the released models have none), so neither does this one."""
    tr = transformers
    torch.manual_seed(7)
    text = {**GEMMA3_KW, "final_logit_softcapping": None}
    cfg = tr.Gemma3Config(text_config=text, mm_tokens_per_image=4,
                          vision_config=dict(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14),
                          boi_token_index=500, eoi_token_index=501, image_token_index=502)
    model = tr.Gemma3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    ids = [i % 500 for i in prompt_ids]  # text tokens only
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        out = fi.convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False)
    ours = fi.load(out)
    assert ours.args.model_type == "gemma3_text"
    assert rel_err(ours.logits(ids), hf_logits(model, ids)) < TOL


def test_sparse_hub_gemma3_config_reads_as_transformers_reads_it():
    """gemma-3-4b-it's config.json gives five text fields and leaves the rest to
    Gemma3TextConfig's defaults; we must fill them in the same way."""
    from flashinfer_py.config import ModelArgs

    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                           "model_type": "gemma3_text", "num_hidden_layers": 34,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    a = ModelArgs.from_hf_config(cfg)
    t = transformers.Gemma3Config(**{k: v for k, v in cfg.items() if k != "model_type"}).text_config
    for key in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "query_pre_attn_scalar", "sliding_window", "layer_types", "max_position_embeddings",
                "tie_word_embeddings", "final_logit_softcapping"):
        assert getattr(a, key) == getattr(t, key), key
    assert a.norm_eps == t.rms_norm_eps and a.hidden_act == "gelu_tanh"
    full, local = t.rope_parameters["full_attention"], t.rope_parameters["sliding_attention"]
    assert (a.rope_theta, a.rope_scaling["factor"]) == (full["rope_theta"], full["factor"])
    assert a.rope_scaling["rope_type"] == full["rope_type"] == "linear"
    assert a.rope_local_base_freq == local["rope_theta"] and local["rope_type"] == "default"


# --- GGUF: llama.cpp's layout of each architecture --------------------------------------------

# Rows are multiples of 32 so that the FFN and fused projections can be stored as Q8_0.
GGUF_BASE = dict(vocab_size=503, hidden_size=192, intermediate_size=320, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GGUF_MODELS = {  # arch -> (model_type, config): what a GGUF of each can express
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "phi3": ("phi3", dict(partial_rotary_factor=0.75, sliding_window=9)),
    # 7 layers so that layer 5 is global; the GGUF fixes the local base (10000) and the query
    # scale (head_dim) as llama.cpp reads them
    "gemma3": ("gemma3_text", dict(num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32,
                                   sliding_window=5, rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                          "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default",
                                                             "rope_theta": 10000.0}})),
}
# Config fields transformers' GGUF loader does not read back, for the tensor comparison only.
GGUF_HF_OVERRIDES = {"qwen3": dict(head_dim=24)}


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """arch -> (random transformers model, dir with f32.gguf and q8.gguf). Built lazily."""
    pytest.importorskip("gguf")
    from gguf_export import write_gguf

    cache: dict = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(arch):
        if arch not in cache:
            model_type, extra = GGUF_MODELS[arch]
            torch.manual_seed(11)
            config = transformers.AutoConfig.for_model(model_type, **{**GGUF_BASE, **extra})
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "norm" in pname and pname.endswith("weight"):
                        p.copy_(1.0 + 0.2 * torch.randn_like(p))
                    elif pname.endswith("bias"):
                        p.copy_(0.05 * torch.randn_like(p))
            d = root / arch
            d.mkdir()
            write_gguf(model, d / "f32.gguf", arch)
            write_gguf(model, d / "q8.gguf", arch, quantize=("ffn_up", "ffn_gate", "attn_qkv"))
            cache[arch] = model, d
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(GGUF_MODELS))
def test_gguf_tensors_are_what_transformers_gguf_loader_gives(arch, gguf_models):
    """Names, layout (llama q/k un-permuted, Gemma norms without llama.cpp's +1, Phi-3 fused)
    and dequantized values, bit for bit, against transformers reading the same Q8_0 GGUF."""
    from flashinfer_py.checkpoint import open_checkpoint

    _, d = gguf_models(arch)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file="q8.gguf", dtype=torch.float32, **GGUF_HF_OVERRIDES.get(arch, {}))
    sd = ref.state_dict()
    with open_checkpoint(d / "q8.gguf") as ck:
        assert ck.config["model_type"] == ref.config.model_type
        assert set(ck.names()) == set(sd) - ({"lm_head.weight"} if ref.config.tie_word_embeddings
                                             else set())
        for name in ck.names():
            np.testing.assert_array_equal(ck.get(name), sd[name].numpy(), err_msg=name)
        if arch == "phi3":  # a part of a fused Q8_0 tensor, read alone
            qkv = "model.layers.1.self_attn.qkv_proj.weight"
            np.testing.assert_array_equal(ck.get(qkv, rows=(192, 256)), ck.get(qkv)[192:256])


@pytest.mark.parametrize("arch", list(GGUF_MODELS))
def test_gguf_converts_to_the_original_models_logits(arch, gguf_models, tmp_path, prompt_ids):
    """A float32 GGUF converts to the logits of the model it was written from (Phi-3's
    partial RoPE and sliding window, Gemma's query scale, local RoPE base and global RoPE
    scaling come from the metadata as llama.cpp reads them), through the KV cache too."""
    model, d = gguf_models(arch)
    with pytest.warns(UserWarning, match="no tokenizer.json"):  # this GGUF has no vocabulary
        out = fi.convert(d / "f32.gguf", tmp_path / arch, dtype="float32", progress=False)
    ours = fi.load(out)
    ref = hf_logits(model, prompt_ids)
    assert rel_err(ours.logits(prompt_ids), ref) < TOL
    cache = ours.new_cache()
    got = [ours.logits(prompt_ids[:5], cache)] + [ours.logits([t], cache) for t in prompt_ids[5:]]
    assert rel_err(np.concatenate(got), ref) < TOL


def test_gguf_q8_phi3_converts_fused_parts(gguf_models, tmp_path, prompt_ids):
    """Phi-3's quantized qkv and gate_up are cut into q/k/v and gate/up rows at conversion:
    the result computes what transformers computes from the same dequantized weights."""
    from flashinfer_py.checkpoint import open_checkpoint

    model, d = gguf_models("phi3")
    with open_checkpoint(d / "q8.gguf") as ck, torch.no_grad():
        sd = {k: torch.from_numpy(ck.get(k)) for k in ck.names()}
    model.load_state_dict(sd, strict=True)  # the original model, on the dequantized weights
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        out = fi.convert(d / "q8.gguf", tmp_path / "phi3-q8", dtype="float32", progress=False)
    assert rel_err(fi.load(out).logits(prompt_ids), hf_logits(model, prompt_ids)) < TOL


# --- what is refused, and how -----------------------------------------------------------------


def test_unsupported_model_type_lists_every_family(tmp_path):
    from safetensors.numpy import save_file

    from flashinfer_py.config import SUPPORTED_ARCHS

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(fi.UnsupportedModelError) as e:
        fi.convert(tmp_path, tmp_path.parent / "out", progress=False)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path)) and "'falcon'" in msg and "\n" not in msg
    for family in SUPPORTED_ARCHS:
        assert family in msg


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'dynamic' is not supported; supported: default, llama3, linear, longrope"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 10,
                          "long_factor": [1.0] * 10, "original_max_position_embeddings": 64}},
     "longrope short_factor has 10 entries; RoPE over 12 dims needs 6"),
    ({"hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast' is not supported"),
    ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
     "layer_types must list one of full_attention, sliding_attention"),
])
def test_unsupported_settings_are_named(change, match, tiny_hf, tmp_path):
    _, src = tiny_hf("phi3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = {**json.loads((bad / "config.json").read_text()), **change}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fi.UnsupportedModelError, match=match) as e:
        fi.convert(bad, tmp_path / "out", progress=False)
    assert str(e.value).startswith(str(bad))


def test_fused_tensor_of_the_wrong_size_is_named(tiny_hf, tmp_path):
    _, src = tiny_hf("phi3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 5  # qkv_proj has rows for 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fi.ConvertError, match=r"qkv_proj.weight has 280 rows but config.json "
                                              r"implies 200 \+ 100 \+ 100 \(wq, wk, wv\)"):
        fi.convert(bad, tmp_path / "out", progress=False)


def test_gguf_unsupported_architecture_and_longrope(tmp_path):
    gguf = pytest.importorskip("gguf")
    from flashinfer_py.checkpoint import GGUF_ARCHITECTURES, CheckpointError, open_checkpoint

    def write(path, arch, tensors):
        w = gguf.GGUFWriter(str(path), arch)
        for name, arr in tensors.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    x = np.ones((8, 8), np.float32)
    write(tmp_path / "f.gguf", "falcon", {"token_embd.weight": x})
    with pytest.raises(CheckpointError, match="f.gguf: has GGUF architecture 'falcon'; "
                                              f"supported: {', '.join(GGUF_ARCHITECTURES)}"):
        open_checkpoint(tmp_path / "f.gguf")
    assert set(GGUF_ARCHITECTURES) == {"llama", "qwen2", "qwen3", "phi3", "gemma3"}
    write(tmp_path / "p.gguf", "phi3", {"token_embd.weight": x, "rope_factors_long.weight": x[0]})
    with pytest.raises(CheckpointError, match="p.gguf: carries LongRoPE factors"):
        open_checkpoint(tmp_path / "p.gguf")

"""Shared fixtures: tiny random Hugging Face models built in-process (odd sizes, fixed seeds),
converted once per session by our converter."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SEED = 1234
PROMPT_LEN = 40

# Odd sizes on purpose: hidden 200, FFN 344, 3 layers, grouped-query attention.
LLAMA_KW = dict(vocab_size=503, hidden_size=200, intermediate_size=344, num_hidden_layers=3,
                num_attention_heads=10, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, initializer_range=0.08, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
OPT_KW = dict(vocab_size=503, hidden_size=200, ffn_dim=344, num_hidden_layers=3,
              num_attention_heads=5, max_position_embeddings=256, init_std=0.08,
              word_embed_proj_dim=200, do_layer_norm_before=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
FATRELU_THRESHOLD = 0.05
# The other families, as odd: head counts with GQA ratios 3-5, head_dim unrelated to
# hidden / heads, sliding windows far shorter than the 40-token prompt.
QWEN2_KW = {**LLAMA_KW, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}
QWEN3_KW = {**LLAMA_KW, "hidden_size": 210, "num_attention_heads": 6, "head_dim": 24}
PHI3_KW = {**LLAMA_KW, "partial_rotary_factor": 0.6, "sliding_window": 9}
# 7 layers: layer 5 is the global one (pattern 6); a local RoPE base that is not the default;
# linear RoPE scaling on the global layers (Gemma 3 4B+); a soft-cap that bites.
GEMMA3_KW = {**QWEN3_KW, "num_hidden_layers": 7, "query_pre_attn_scalar": 20, "sliding_window": 5,
             "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 3.0,
             "tie_word_embeddings": True, "rope_parameters": {
                 "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}}}
# Phi-3-128k / Phi-3.5 / Phi-4-mini's LongRoPE, with a pretraining context (16) shorter than
# the prompt, so that both factor sets are used
PHI3_LONGROPE_KW = {**PHI3_KW, "original_max_position_embeddings": 16, "rope_parameters": {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.6,
    "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}}
MISTRAL_KW = {**LLAMA_KW, "sliding_window": 7}
# opt-350m's shape: embeddings narrower than the model (project_in/out), post-LayerNorm
OPT350_KW = {**OPT_KW, "word_embed_proj_dim": 72, "do_layer_norm_before": False}

# name -> (family, extra config)
TINY_MODELS = {
    "llama-silu": ("llama", dict(hidden_act="silu")),
    "llama-relu": ("llama", dict(hidden_act="relu")),
    "llama-fatrelu": ("llama", dict(hidden_act="relu")),  # act_fn swapped below
    "llama3-rope": ("llama", dict(hidden_act="silu", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "opt": ("opt", {}),
    "opt-350m": ("opt", OPT350_KW),
    "mistral": ("mistral", MISTRAL_KW),
    "qwen2": ("qwen2", QWEN2_KW),
    "qwen3": ("qwen3", QWEN3_KW),
    "phi3": ("phi3", PHI3_KW),
    "phi3-longrope": ("phi3", PHI3_LONGROPE_KW),
    "gemma3": ("gemma3", GEMMA3_KW),
}
# The families added with issue 9 (their tests live in test_families.py). LongRoPE is not among
# them: it computes a prompt differently whole and token by token, as transformers does.
NEW_FAMILIES = ["opt-350m", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]


def fatrelu_module(threshold: float):
    """ProSparse's activation as a torch module, the reference act_fn in transformers' Llama."""
    import torch

    class FATReLU(torch.nn.Module):
        def forward(self, x):
            return torch.where(x > threshold, x, torch.zeros_like(x))

    return FATReLU()


def build_hf_model(name: str):
    """A random transformers model (float32, eval mode) for `name` in TINY_MODELS."""
    import torch
    import transformers as tr

    family, extra = TINY_MODELS[name]
    torch.manual_seed(SEED)
    if family == "llama":
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**{**LLAMA_KW, **extra}))
    elif family == "opt":
        model = tr.OPTForCausalLM(tr.OPTConfig(**{**OPT_KW, **extra}))
    else:
        config = tr.AutoConfig.for_model({"gemma3": "gemma3_text"}.get(family, family), **extra)
        model = tr.AutoModelForCausalLM.from_config(config)
    if name == "llama-fatrelu":
        for layer in model.model.layers:
            layer.mlp.act_fn = fatrelu_module(FATRELU_THRESHOLD)
    # Non-zero norm weights and biases, so a mix-up of norms or biases cannot hide.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over the tiny vocabulary, so generation can be run end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.save(str(path / "tokenizer.json"))


def save_hf_model(model, path: Path, name: str, **save_kw) -> Path:
    model.save_pretrained(path, **save_kw)
    write_word_tokenizer(path, model.config.vocab_size)
    if name == "llama-fatrelu":  # record the activation the way ProSparse checkpoints do
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["hidden_act"] = "fatrelu"
        cfg["hidden_act_param"] = FATRELU_THRESHOLD
        cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> (transformers model, checkpoint dir). Built lazily, once per session."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("hf")

    def get(name: str):
        if name not in cache:
            model = build_hf_model(name)
            cache[name] = (model, save_hf_model(model, root / name, name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_flash(tiny_hf, tmp_path_factory):
    """(name, dtype) -> flash dir converted by our converter. Built lazily, once per session."""
    from flashinfer_py import convert

    cache: dict = {}
    root = tmp_path_factory.mktemp("flash")

    def get(name: str, dtype: str = "float32"):
        key = (name, dtype)
        if key not in cache:
            _, src = tiny_hf(name)
            cache[key] = convert(src, root / f"{name}-{dtype}", dtype=dtype, progress=False)
        return cache[key]

    return get


@pytest.fixture
def prompt_ids():
    rng = np.random.default_rng(SEED)
    return rng.integers(3, LLAMA_KW["vocab_size"], size=PROMPT_LEN).tolist()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                 / max(np.max(np.abs(b)), 1e-30))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `cuda` / `mps` where that device is absent."""
    have_cuda = have_mps = False
    try:
        import torch

        have_cuda = torch.cuda.is_available()
        have_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    except ImportError:
        pass
    if not have_mps and sys.platform == "darwin":  # the mlx backend's Metal, without torch
        try:
            import mlx.core as mx

            have_mps = mx.metal.is_available()
        except ImportError:
            pass
    for item in items:
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "mps" in item.keywords and not have_mps:
            item.add_marker(pytest.mark.skip(reason="no Apple GPU"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    """Run a kernel test on each instruction set the kernels have; skip those this CPU lacks."""
    from flashinfer_py import kernels

    try:
        kernels.set_kernel_isa(request.param)
    except ValueError:
        pytest.skip(f"{request.param} not supported on this CPU")
    yield request.param
    kernels.set_kernel_isa("auto")

"""A random Llama checkpoint made with numpy and safetensors alone (no torch, no model hub),
for tests and fuzzers that need a model of a chosen shape quickly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def llama_config(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}


def llama_weights(cfg: dict, scale: float = 0.1, seed: int = 0) -> dict:
    """Hugging Face names -> float16 arrays of the shapes `cfg` gives."""
    d, f, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
              "lm_head.weight": (vocab, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float16) for k, s in shapes.items()}


def write_llama(dst: Path, cfg: dict, scale: float = 0.1) -> Path:
    """dst/config.json and dst/model.safetensors; returns dst."""
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(llama_weights(cfg, scale), str(dst / "model.safetensors"))
    return dst

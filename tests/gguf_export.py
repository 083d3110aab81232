"""Write a transformers model as a GGUF file in llama.cpp's layout, for the GGUF tests.

What llama.cpp's convert_hf_to_gguf.py does for these architectures, written out with the gguf
package: tensor names from gguf-py's own name map, llama's q/k rows permuted for its rotary
layout, Gemma's norm weights stored as 1 + w, Phi-3's fused projections kept fused, the
metadata keys llama.cpp writes and reads. No tokenizer is stored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _metadata(writer, arch: str, cfg) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters
    if arch == "gemma3":
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window)
        if rope["full_attention"].get("rope_type") == "linear":
            writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma3", "qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("llama", "phi3"):
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(rotary)
    if arch == "phi3" and cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    for key in ("bos", "eos", "pad"):  # llama.cpp writes these with the vocabulary
        if getattr(cfg, f"{key}_token_id", None) is not None:
            getattr(writer, f"add_{key}_token_id")(getattr(cfg, f"{key}_token_id"))


def write_gguf(model, path: Path, arch: str, quantize: tuple[str, ...] = (),
               qtypes: dict | None = None, raw: dict | None = None) -> Path:
    """Write `model` (a transformers causal LM) to `path`; tensors whose GGUF name contains one
    of `quantize` are stored as Q8_0 (row length must be a multiple of 32), the rest as F32.
    `qtypes` maps more name parts to GGUF types gguf-py can quantize ("Q4_0", "Q4_1", "Q8_0");
    `raw` maps a GGUF tensor name to (type name, uint8 blocks) written as they are (types
    gguf-py cannot quantize, e.g. K-quants)."""
    import gguf

    qtypes = {**{q: "Q8_0" for q in quantize}, **(qtypes or {})}

    cfg = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, cfg)
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for hf, t in sd.items():
        base, suffix = hf.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, hf
        w = t.detach().float().numpy()
        if arch == "llama" and ".attn_q" in name:
            w = _permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k" in name:
            w = _permute(w, cfg.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm"):
            w = w + 1
        name = f"{name}.{suffix}"
        qtype = next((t for part, t in qtypes.items() if part in name), None)
        if raw and name in raw:
            kind, blocks = raw[name]
            writer.add_tensor(name, blocks, raw_shape=blocks.shape,
                              raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        elif qtype is not None:
            t = getattr(gguf.GGMLQuantizationType, qtype)
            q = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), t)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

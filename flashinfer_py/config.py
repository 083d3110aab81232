"""Model and runtime configuration: the only two configuration objects, passed down explicitly.

`ModelArgs` describes the network (read from a Hugging Face ``config.json`` and stored in the
flash directory's manifest). `RuntimeConfig` holds every runtime knob with a documented default.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import UnsupportedModelError

SUPPORTED_ARCHS = {
    "llama": "Llama 2/3, SmolLM2, ReluLLaMA (hidden_act relu), ProSparse (hidden_act fatrelu)",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2 and Qwen2.5 (q/k/v biases)",
    "qwen3": "Qwen3 dense models (q/k RMSNorm)",
    "phi3": "Phi-3, Phi-3.5, Phi-4-mini (fused qkv_proj and gate_up_proj; LongRoPE)",
    "gemma3_text": "Gemma 3 (GeGLU, local/global attention)",
    "gemma3": "Gemma 3 multimodal checkpoints (their text model)",
    "opt": "OPT 125m-66b (ReLU; the paper's model), opt-350m's project_in/out included",
}
SUPPORTED_ACTS = ("relu", "fatrelu", "silu", "gelu", "gelu_tanh")
SUPPORTED_ROPE = ("default", "llama3", "linear", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Hugging Face activation names -> ours.
_ACT_ALIASES = {
    "relu": "relu", "fatrelu": "fatrelu", "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}


@dataclass
class ModelArgs:
    """Shape and semantics of a decoder-only transformer (Llama-like families or OPT).

    Every field added after the first release has a default that reproduces the models written
    before it, so older manifests load unchanged.
    """

    arch: str                      # tensor layout: "llama" (also mistral) | "qwen2" | "qwen3" |
    #                                "phi3" | "gemma3" | "opt"
    vocab_size: int
    hidden_size: int               # d_model
    intermediate_size: int         # d_ff: FFN neurons per layer
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0   # 0 -> = num_attention_heads
    head_dim: int = 0              # 0 -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"       # one of SUPPORTED_ACTS
    act_param: float = 0.0         # FATReLU threshold
    gated: bool = True             # SwiGLU-style gate (Llama) or plain up/act/down (OPT)
    norm: str = "rmsnorm"          # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3" | "linear" | "longrope", ...}
    #                                      or None; without rope_type: llama3 (older manifests)
    attention_bias: bool = False   # biases on q/k/v/o projections (OPT: True)
    ffn_bias: bool = False         # per-neuron up bias and output down bias (OPT: True)
    pre_norm: bool = True          # OPT do_layer_norm_before
    learned_pos_offset: int = 0    # OPT learned positions are shifted by 2; 0 -> RoPE
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None  # tokens a "sliding_attention" layer sees (itself included)
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    model_type: str = ""           # the Hugging Face model_type it was read from ("" -> arch)
    attention_out_bias: Optional[bool] = None  # o_proj bias; None -> attention_bias (Qwen2: False)
    qk_norm: bool = False          # RMSNorm over each head's q and k before RoPE (Gemma 3, Qwen3)
    post_norms: bool = False       # norms on the attention and FFN outputs (Gemma's sandwich)
    embed_scale: float = 1.0       # embeddings are multiplied by it (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by its -1/2 power; None -> head_dim
    attn_logit_softcapping: Optional[float] = None   # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    layer_types: Optional[list] = None  # per layer, one of LAYER_TYPES; None -> all full attention
    rope_local_base_freq: Optional[float] = None  # sliding layers' own unscaled RoPE base (Gemma 3)
    partial_rotary_factor: float = 1.0  # fraction of head_dim that RoPE rotates (Phi-3 family)
    word_embed_proj_dim: int = 0   # OPT embedding width when != hidden_size (project_in/out)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            v = getattr(self, name)
            if not whole_at_least(v, 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_key_value_heads <= 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise UnsupportedModelError(
                f"activation {self.hidden_act!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ACTS)}")
        if self.word_embed_proj_dim <= 0:
            self.word_embed_proj_dim = self.hidden_size
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.layer_types is not None:
            self._check_layer_types()
        s = self.rope_scaling or {}
        if s.get("rope_type") == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(s[key]) != self.rotary_dim // 2:
                    raise UnsupportedModelError(
                        f"longrope {key} has {len(s[key])} entries; RoPE over {self.rotary_dim} "
                        f"dims needs {self.rotary_dim // 2}")

    def _check_layer_types(self) -> None:
        types = list(self.layer_types)
        if len(types) != self.num_hidden_layers or not set(types) <= set(LAYER_TYPES):
            raise UnsupportedModelError(
                f"layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                f"{self.num_hidden_layers} layers, got {types}")
        if "sliding_attention" in types and not (self.sliding_window or 0) > 0:
            raise UnsupportedModelError(
                f"sliding_attention layers need a positive sliding_window, got {self.sliding_window}")

    @property
    def uses_rope(self) -> bool:
        return self.learned_pos_offset == 0

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings and the LM head (OPT-350m: 512 while hidden is 1024)."""
        return self.word_embed_proj_dim

    @property
    def projects_embeddings(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def rotary_dim(self) -> int:
        """Leading elements of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor + 1e-6)  # 0.75 * 128 -> 96

    def window(self, layer: int) -> Optional[int]:
        """Tokens layer `layer` attends to (itself included), or None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return int(self.sliding_window)

    def features(self) -> list[str]:
        """What sets this model apart from a plain Llama, in words (for `info`)."""
        geglu = {"gelu_tanh": "GeGLU (tanh GELU gate)", "gelu": "GeGLU (erf GELU gate)"}
        n_local = (self.layer_types or []).count("sliding_attention")
        rope = (self.rope_scaling or {}).get("rope_type", "llama3")
        listed = [
            (not self.gated, f"ungated FFN ({self.hidden_act})"),
            (self.gated and self.hidden_act != "silu",
             geglu.get(self.hidden_act, f"gated FFN with {self.hidden_act}")),
            (n_local > 0, f"{n_local} of {self.num_hidden_layers} layers attend to the last "
                          f"{self.sliding_window} tokens"),
            (self.rope_local_base_freq is not None,
             f"local RoPE base {self.rope_local_base_freq}"),
            (self.attention_bias,
             "q/k/v biases" + (" and o bias" if self.attention_out_bias else "")),
            (self.qk_norm, "q/k RMSNorm"),
            (self.post_norms, "post-attention and post-FFN norms"),
            (self.embed_scale != 1.0, f"embeddings scaled by {self.embed_scale:.4g}"),
            (not self.pre_norm, "post-LayerNorm"),
            (self.projects_embeddings,
             f"embeddings projected {self.embed_dim} <-> {self.hidden_size}"),
            (self.partial_rotary_factor != 1.0,
             f"RoPE on {self.rotary_dim} of {self.head_dim} head dims"),
            (self.rope_scaling is not None, f"RoPE scaling {rope}"),
            (self.final_logit_softcapping is not None,
             f"logits soft-capped at {self.final_logit_softcapping}"),
        ]
        return [text for present, text in listed if present]

    @property
    def ffn_parts(self) -> list[str]:
        """Order of the parts inside one bundle record."""
        return ["up", "gate", "down"] if self.gated else ["up", "down"]

    @property
    def ffn_part_offsets(self) -> dict:
        """Element offset of each part inside a bundle record: {"up": 0, "gate": d, "down": 2d}."""
        return {p: i * self.hidden_size for i, p in enumerate(self.ffn_parts)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a manifest dict, ignoring unknown keys (newer writers may add fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Translate a Hugging Face ``config.json`` dict; unsupported models raise a clear error."""
        mt = cfg.get("model_type", "")
        parse = _FAMILIES.get(mt)
        if parse is None:
            supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_ARCHS.items())
            raise UnsupportedModelError(
                f"model_type {mt!r} (architectures {cfg.get('architectures')}) is not supported. "
                f"Supported model types: {supported}.")
        return parse(cfg)


def _eos_list(cfg: dict) -> list:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _act(name: str) -> str:
    act = _ACT_ALIASES.get(str(name).lower())
    if act is None:
        raise UnsupportedModelError(
            f"hidden_act {name!r} is not supported; supported: {', '.join(sorted(_ACT_ALIASES))}")
    return act


def _rope(rp: dict, default_theta: float = 10000.0, cfg: Optional[dict] = None
          ) -> tuple[float, Optional[dict]]:
    """(base, scaling) from one rope-parameters dict (transformers 5 ``rope_parameters``, or a
    4.x ``rope_scaling`` with the base beside it); `cfg` is the whole config (longrope)."""
    theta = float(rp.get("rope_theta", default_theta))
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"rope type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
    if rtype == "llama3":
        return theta, {"rope_type": "llama3", **{k: float(rp[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    if rtype == "linear":
        return theta, {"rope_type": "linear", "factor": float(rp["factor"])}
    if rtype == "longrope":
        return theta, _longrope(rp, cfg or {})
    return theta, None


def _longrope(rp: dict, cfg: dict) -> dict:
    """LongRoPE as transformers computes it: per-frequency divisors, short ones while the
    sequence fits the pretraining context, long ones beyond it, and cos/sin scaled by
    attention_factor (default sqrt(1 + ln(factor) / ln(original context)))."""
    original = int(rp.get("original_max_position_embeddings")
                   or cfg.get("original_max_position_embeddings")
                   or cfg["max_position_embeddings"])
    factor = rp.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention = rp.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "attention_factor": float(attention),
            "short_factor": [float(x) for x in rp["short_factor"]],
            "long_factor": [float(x) for x in rp["long_factor"]]}


def _rope_dict(cfg: dict) -> dict:
    # transformers 5 keeps rope settings under rope_parameters, 4.x at the top level.
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rp


def _sliding_layers(cfg: dict, n_layers: int, window: Optional[int]) -> Optional[list]:
    """Per-layer attention types as transformers builds them: the config's own ``layer_types``,
    else every layer when there is a window (Mistral, Phi-3), else None (all full)."""
    types = cfg.get("layer_types")
    if types is not None and not window:  # transformers: without a window no layer slides
        types = ["full_attention" if t == "sliding_attention" else t for t in types]
    if types is None and window:
        first = int(cfg.get("max_window_layers", 0) or 0) if "use_sliding_window" in cfg else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if types is None or all(t == "full_attention" for t in types):
        return None
    return list(types)  # ModelArgs refuses types it does not know (chunked_attention, ...)


def _from_llama(cfg: dict, **overrides) -> ModelArgs:
    """The Llama layout; the other Llama-like families pass what differs as `overrides`."""
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("Llama models with mlp_bias=true are not supported yet.")
    act = _act(cfg.get("hidden_act", "silu"))
    theta, scaling = _rope(_rope_dict(cfg), cfg=cfg)
    param = float(cfg.get("hidden_act_param", cfg.get("fatrelu_threshold", 0.0)) or 0.0)
    n_layers = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2/3 carry a window they do not use
        window = None
    kw = dict(
        arch="llama",
        model_type=str(cfg.get("model_type", "llama")),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=int(cfg.get("head_dim") or 0),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        hidden_act=act,
        act_param=param,
        gated=True,
        norm="rmsnorm",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        layer_types=_sliding_layers(cfg, n_layers, window),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_list(cfg),
    )
    kw.update(overrides)
    return ModelArgs(**kw)


def _from_qwen2(cfg: dict) -> ModelArgs:
    # Qwen2's q/k/v projections always carry biases, its o_proj never does.
    return _from_llama(cfg, arch="qwen2", attention_bias=True, attention_out_bias=False)


def _from_qwen3(cfg: dict) -> ModelArgs:
    return _from_llama(cfg, arch="qwen3", qk_norm=True)


def _from_phi3(cfg: dict) -> ModelArgs:
    rp = _rope_dict(cfg)
    if rp.get("rope_type", rp.get("type")) in ("su", "yarn"):  # Phi3Config reads both as longrope
        rp = {**rp, "rope_type": "longrope"}
        cfg = {**cfg, "rope_parameters": rp}
    partial = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return _from_llama(cfg, arch="phi3", attention_bias=False, partial_rotary_factor=partial)


# Gemma3TextConfig's defaults in transformers 5: the Hub's gemma-3 configs leave most fields out
# (a text_config of five keys is common), and transformers reading a GGUF relies on them too.
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
    final_logit_softcapping=None, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
)


def _from_gemma3(cfg: dict) -> ModelArgs:
    """Gemma 3: ``gemma3_text``, or the text model inside a multimodal ``gemma3`` config."""
    if cfg.get("model_type") == "gemma3":
        cfg = cfg.get("text_config") or {}
    cfg = {**_GEMMA3_DEFAULTS, **cfg}
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention (an embedding "
                                    "model) is not a causal language model; not supported.")
    n_layers = int(cfg["num_hidden_layers"])
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:  # transformers 5: one rope dict per layer type
        full, local = rp["full_attention"], rp.get("sliding_attention") or {}
    else:
        full = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg["rope_theta"]}
        local = {"rope_theta": cfg["rope_local_base_freq"]}
    theta, scaling = _rope(full, _GEMMA3_DEFAULTS["rope_theta"], cfg)
    local_theta, local_scaling = _rope(local, _GEMMA3_DEFAULTS["rope_local_base_freq"])
    if local_scaling is not None:
        raise UnsupportedModelError("Gemma 3 with RoPE scaling on its sliding-window layers is "
                                    "not supported (the released models scale global layers only).")
    pattern = int(cfg.get("_sliding_window_pattern") or cfg["sliding_window_pattern"])
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else
                                       "full_attention" for i in range(n_layers)]
    window = cfg["sliding_window"]
    hidden = int(cfg["hidden_size"])
    return _from_llama(
        {**cfg, "hidden_act": cfg.get("hidden_activation") or cfg.get("hidden_act")},
        arch="gemma3", model_type="gemma3_text", qk_norm=True, post_norms=True,
        embed_scale=math.sqrt(hidden), rope_theta=theta, rope_scaling=scaling,
        rope_local_base_freq=local_theta,
        layer_types=_sliding_layers({"layer_types": types}, n_layers, window),
        sliding_window=int(window) if window else None,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        # transformers' Gemma 3 applies the final soft-cap but not attn_logit_softcapping
        final_logit_softcapping=cfg.get("final_logit_softcapping"))


def _from_opt(cfg: dict) -> ModelArgs:
    d = int(cfg["hidden_size"])
    proj = int(cfg.get("word_embed_proj_dim", d) or d)
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT without biases or without affine layer norms is not supported.")
    pre = bool(cfg.get("do_layer_norm_before", True))
    if pre and cfg.get("_remove_final_layer_norm"):
        raise UnsupportedModelError("OPT with _remove_final_layer_norm (an old fairseq export) is "
                                    "not supported; re-save it with a current transformers.")
    return ModelArgs(
        arch="opt",
        model_type="opt",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(cfg["ffn_dim"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        hidden_act=_act(cfg.get("activation_function", "relu")),
        gated=False,
        norm="layernorm",
        norm_eps=1e-5,
        attention_bias=True,
        ffn_bias=True,
        pre_norm=pre,
        learned_pos_offset=2,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_list(cfg),
        word_embed_proj_dim=proj,
    )


_FAMILIES = {"llama": _from_llama, "mistral": _from_llama, "qwen2": _from_qwen2,
             "qwen3": _from_qwen3, "phi3": _from_phi3, "gemma3_text": _from_gemma3,
             "gemma3": _from_gemma3, "opt": _from_opt}

SELECTIONS = ("auto", "sketch", "predictor", "oracle", "all")
EVICTIONS = ("auto", "rank", "window", "frequency")
OVERLAPS = ("off", "layer", "ahead", "async")
SKETCHES = ("auto", "full", "gate")
STREAM_RESIDENT = ("auto", "needed", "off", "all")

# The rows of the paper's Table 2, as runtime settings. "predictor" keeps the caller's
# selection (a trained predictor, or the oracle for measurements).
ABLATIONS = {
    "naive": dict(selection="all", reuse=False, bundled=True, reread_resident=True),
    "hybrid": dict(selection="all", reuse=False, bundled=True, reread_resident=False),
    "predictor": dict(reuse=False, bundled=False, reread_resident=False),
    "window": dict(reuse=True, bundled=False, reread_resident=False),
    "bundling": dict(reuse=True, bundled=True, reread_resident=False),
}


SMALL_RECORD_BYTES = 4096
SMALL_RECORD_GAP = 2


def coalesce_gap_for(record_bytes: int) -> int:
    """The reader's coalescing gap when RuntimeConfig.coalesce_gap_bytes is None: reads of
    records of at most 4 KiB are bound by their count (RESULTS section 1: 4 KiB reads run at
    0.31 GB/s, 8 KiB at 0.49, 16 KiB at 0.81), so reading up to two unwanted records to merge
    two wanted ones pays (section 14: SmolLM2, 0 -> 2 records, I/O -11%, token -8%); larger
    records are bound by bytes and read only what is wanted (section 3)."""
    return SMALL_RECORD_GAP * record_bytes if record_bytes <= SMALL_RECORD_BYTES else 0


# The reader assembles a gap-merged read in its scratch buffer. Unbounded, that buffer grew
# with a call's records: a long chat session under a 340 MiB budget (whose prompts load many
# records a call) peaked 8.1 MB over the budget with two records of gap (RESULTS section 15).
# The reader now works in rounds within ReaderParams.max_scratch_bytes (1 MiB), which
# loader.plan_memory counts per reader, so the gap is the default again.


@dataclass
class RuntimeConfig:
    """Every runtime knob, with its default. Mirrors the native ``ReaderParams``.

    Attributes:
        threads: compute threads (0 = all cores): the native kernels' pool, and on the torch
            backend torch's intra-op threads while the model runs (0 = torch's own setting;
            ``torch.set_num_threads`` is process-wide, so it is set on each call into the
            model and put back after it). The mlx backend has no such setting.
        use_direct_io: bypass the page cache (O_DIRECT / F_NOCACHE); falls back with a warning.
        io_engine: "auto" (io_uring when built and usable, else threads), "threads", "io_uring".
        queue_depth: reads in flight (this disk needs 16-64; the paper used 32 threads).
        coalesce_gap_bytes: merge two neurons the cache lacks into one read when at most this
            many bytes of records lie between them (those are read and dropped); 0 merges only
            adjacent records. None (default): ``coalesce_gap_for(record_bytes)``, two records
            when a record is at most 4 KiB (a small read's cost is mostly per request: SmolLM2
            under a budget 8% faster, RESULTS section 14), else 0 (16 KiB records lost useful
            bandwidth with any gap, section 3). Merged runs land in the reader's scratch
            buffer, bounded (ReaderParams.max_scratch_bytes) and counted in the memory plan.
        read_timeout_ms: a read call none of whose reads completes for this long (ms) cancels
            them and raises FlashIOError (errno ETIMEDOUT) instead of hanging on a failing
            device; 0 waits forever. Default 60000. The io_uring engine only: the threads
            engine cannot interrupt a pread that the device never answers, so a hung read
            there hangs the generation (use io_engine "io_uring" where that matters).
        max_context: tokens the KV cache is sized for (prompt + generated).

    Sparse inference from flash (the paper's method; off unless `sparse` or `dram_budget`):
        sparse: stream the FFN from the bundle file through the neuron cache.
        dram_budget: bytes the model may use (resident tensors + predictors + KV cache + neuron
            cache); sets each layer's cache capacity. None: cache every neuron that is needed.
        selection: how the neurons a token needs are found. "auto" (default): "sketch" when
            the directory has one, unless the model is ReLU and has low-rank predictors too (the
            paper's exact path), else "predictor". "sketch": a 4-bit
            copy of every uncached neuron's gate and up rows estimates its activation (built
            by `train-predictors`; needs eviction "rank"). "predictor": the paper's trained
            low-rank predictors. "oracle": the true activations, computed from all weights
            (for measurement only: it keeps the whole FFN in DRAM). "all": every neuron (the
            paper's "hybrid" row).
        sketch: selection "sketch": what the sketch of an uncached neuron holds. "full": its
            gate and up rows, scored |act(gate~.x) * (up~.x)| * ||down||. "gate": the gate row
            only (half the bytes), scored |act(gate~.x)| * mean|up.x| * ||down|| (the mean over
            the calibration text, as CATS thresholds the gate alone). "auto" (default): "gate"
            where the full sketch would take more than GATE_SKETCH_SHARE (40%) of a cached
            neuron's bytes (4-bit records: 64%) and the calibration has the means, else "full".
            Simulated on SmolLM2 with 70% of a q4_1 FFN's bytes: +20% perplexity against +94%
            (the full sketch leaves the cache 16% of the FFN, the gate sketch 56%); with float16
            records the full sketch is better (+4% against +10%; benchmarks/RESULTS_sparse.md).
        window: k, the tokens whose neurons stay cached (the paper's sliding window). Default 4,
            measured on SmolLM2 (see README): k=4 keeps the bytes read per token low while the
            cache stays well under the FFN's size.
        eviction: when a cached neuron leaves DRAM. "auto" (default): "rank" with the sketch,
            else "window". "rank" (ours): the cache stays full; a neuron leaves when an
            uncached one scores higher for the current token, at most `read_limit` of a layer
            per token; every cached neuron is computed (benchmarks/RESULTS_sparse.md).
            "window" (the paper): as soon as none of the last `window` tokens used it. "frequency" (ours): only when the cache is full,
            least used first (decayed count, half-life 64 tokens); fills the budget, so it reads
            fewer neurons at the same DRAM when some neurons are used far more than others
            (benchmarks/RESULTS.md sections 6 and 10). `window` is then unused. Without a
            budget nothing is ever evicted.
        read_limit: eviction "rank": at most this fraction of each layer's neurons is read
            from flash per token (per prompt token in a prefill chunk). Default 0.1, measured
            on SmolLM2 (benchmarks/RESULTS_sparse.md): the perplexity cost falls steeply up to
            ~10% and slowly after.
        swap_margin: eviction "rank": an uncached neuron replaces a cached one only when it
            scores more than (1 + swap_margin) times as much for the current token. 0 (default):
            any higher score (benchmarks/swap_margin.py measures larger margins).
        per_layer_cache: size each layer's neuron cache from the calibration (layers whose
            activations are more spread out get more), rather than equally.
        reuse: False reloads each token's whole active set (the paper's "+predictor" row).
        bundled: False reads up/gate/down as separate requests (the "no bundling" ablation).
        predictor_threshold: probability above which a predicted neuron is loaded.
        compute: "predicted" computes each token with its own predicted neurons only; "cached"
            (default) uses every cached neuron (the window's union: no extra I/O, closer to
            dense). Measured on SmolLM2 (benchmarks/RESULTS_sparse.md): predicted sets alone
            cost +35% perplexity at the default threshold, the k=4 union +1.8%.
        prefill_chunk: prompt tokens processed together in sparse mode (their union of active
            sets counts as one window step).
        oracle_sparsity: for selection="oracle" on non-ReLU models, the fraction of neurons
            (smallest |activation|) treated as inactive.
        reread_resident: also read the whole resident file from flash every token (the paper's
            "naive" row: nothing stays in DRAM between tokens).
        overlap: reads that run while the CPU computes (issue 16; needs the neuron cache and
            bundled reads). "off": a layer reads what it needs, then computes. "layer": the
            reads a layer's selection asks for run on a worker thread while the FFN computes
            on the rows already cached, and only the rest waits for them. "ahead": also start
            each layer's reads before its attention, from a guess made on the attention's
            input (Deja Vu's look-ahead): the most confident quarter of what the guess says
            the cache lacks (ffn.AHEAD_SHARE); the selection itself still comes from the FFN's true
            input, so a wrong guess costs reads, never quality. The logits are "off"'s bit
            for bit: every mode sums the rows that stay, then the arriving ones. "async":
            Deja Vu's asynchronous look-ahead: the guess reads all a layer may load, and the
            layer loads only what the guess read (chosen among it by its true input), so no
            read waits for the layer's own input; the neurons the guess missed are left out
            for that token (`stats["dropped"]`). A guess reads at most `read_limit` of a
            layer's neurons (its slot), on the window path too. Decode steps only: a prompt
            chunk runs as "ahead". Faster where the token waits for reads, at a cost in
            quality measured in benchmarks/RESULTS.md section 14 (SmolLM2: +31-65% perplexity;
            under the sketch a lower read_limit with "off" was the better trade, on the
            predictor + window path "async" beat a higher predictor threshold).
        stream_resident: resident matrices (the attention's, the LM head, the embeddings) left
            on flash and read every token, to give the neuron cache more of `dram_budget`, or
            so that a budget below the resident part still runs
            (flashinfer_py/resident_stream.py). "auto" (default): at any budget below the
            whole model the budget is shared in proportion (the resident matrices kept in
            DRAM and the neuron cache get the same fraction of their full size), the untied
            input embedding (a row a token) and the LM head leaving first. "needed": the same
            split, but only when the budget cannot hold the resident part beside a neuron
            cache (the rule before 2026-11-30: faster where the matrices' reads cost more than
            the cache's misses, at a quality cost; RESULTS section 17 measures both). "off":
            never (a budget that is too small is an error). "all": every such matrix, whatever
            the budget. The logits do not change with where a matrix is read from: the same
            matrices, read in row chunks by a thread that runs ahead of the compute. The
            native backend only (device backends keep theirs on the device).
        ablation: a preset reproducing a row of the paper's Table 2, applied over the fields
            above: "naive", "hybrid", "predictor", "window", "bundling" (= everything on).
            Like the paper, its rows keep the resident part in DRAM: "auto" eviction means
            "window" and "auto" stream_resident means "needed" there.

    Where the forward pass runs (``flashinfer_py.backends``):
        backend: "native" (default: numpy and the C++ kernels on the CPU), "torch" (PyTorch
            on `device`; ``pip install flashinfer_py[torch]``), "mlx" (Apple's MLX on
            `device`; ``pip install flashinfer_py[mlx]``), or "auto" (torch when it is
            installed and `device` is cuda/mps, mlx for "gpu", else native).
        device: the torch device: "cpu" (default), "cuda", "cuda:N" or "mps"; the mlx
            device: "cpu" (default) or "gpu" (Metal).
        compute_dtype: a device backend's compute dtype: "float32" (default), "float16" or
            "bfloat16" (weights are dequantized to it; norms, softmax and logits stay float32).
        vram_budget: bytes of device memory the model may use (a device backend: resident
            tensors in the compute dtype + KV cache + the device copy of the neuron cache);
            implies `sparse`. The neuron cache gets what is left, per layer as the DRAM plan
            splits it, and the smaller of the two plans wins. None: no limit. A
            CUDA device's plan counts its context and the allocator's margin
            (loader.CUDA_CONTEXT_BYTES, ALLOCATOR_MARGIN).
        unified_memory: whether the device keeps its arrays in the host's RAM (None: from
            the device: mlx, torch's cpu and mps, an integrated CUDA GPU). Then there is one
            plan for host and device (nothing counted twice; each cached neuron costs its
            host record and its device copy) and one budget, the smaller of dram_budget and
            vram_budget. True/False overrides what the device says.
    """

    threads: int = 0
    use_direct_io: bool = True
    io_engine: str = "auto"
    queue_depth: int = 32
    coalesce_gap_bytes: Optional[int] = None
    read_timeout_ms: int = 60000
    max_context: int = 2048
    sparse: bool = False
    dram_budget: Optional[int] = None
    selection: str = "auto"
    sketch: str = "auto"
    window: int = 4
    eviction: str = "auto"
    read_limit: float = 0.1
    swap_margin: float = 0.0
    per_layer_cache: bool = True
    reuse: bool = True
    bundled: bool = True
    predictor_threshold: float = 0.5
    compute: str = "cached"
    prefill_chunk: int = 16
    oracle_sparsity: float = 0.5
    reread_resident: bool = False
    overlap: str = "off"
    stream_resident: str = "auto"
    ablation: Optional[str] = None
    backend: str = "native"
    device: Optional[str] = None
    compute_dtype: Optional[str] = None
    vram_budget: Optional[int] = None
    unified_memory: Optional[bool] = None

    # whole-number fields and their least value; flags; fractions and margins (checked for
    # type first, so that a float, a string or a bool is named here instead of failing later)
    _WHOLE = {"threads": (0, " (0 = all cores)"), "queue_depth": (1, ""),
              "read_timeout_ms": (0, " milliseconds (0 = wait forever)"),
              "max_context": (1, " tokens"), "prefill_chunk": (1, " tokens")}
    _FLAGS = ("use_direct_io", "sparse", "per_layer_cache", "reuse", "bundled", "reread_resident")
    _REALS = ("read_limit", "swap_margin", "predictor_threshold", "oracle_sparsity")

    def __post_init__(self):
        for name, (least, unit) in self._WHOLE.items():
            v = getattr(self, name)
            if not whole_at_least(v, least):
                raise ValueError(f"{name} must be a whole number >= {least}{unit}, got {v!r}")
        if self.coalesce_gap_bytes is not None and not whole_at_least(self.coalesce_gap_bytes, 0):
            raise ValueError(f"coalesce_gap_bytes must be a whole number of bytes >= 0 (or None: "
                             f"by record size), got {self.coalesce_gap_bytes!r}")
        for name in self._FLAGS:
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {v!r}")
        for name in self._REALS:
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                raise ValueError(f"{name} must be a number, got {v!r}")
        self._check_backend()
        if self.vram_budget is not None:
            self.vram_budget = parse_bytes(self.vram_budget)
            if self.vram_budget <= 0:
                raise ValueError(f"vram_budget must be a positive size, got {self.vram_budget}")
        if self.vram_budget is not None:
            if self.backend == "native":
                raise ValueError("vram_budget is device memory: it needs backend='torch' or "
                                 "'mlx' (or 'auto') and a device; the native backend runs from DRAM "
                                 "(use dram_budget)")
            self.sparse = True
        if self.io_engine not in ("auto", "threads", "io_uring"):
            raise ValueError(f"io_engine must be 'auto', 'threads' or 'io_uring', not {self.io_engine!r}")
        if self.ablation is not None:
            if self.ablation not in ABLATIONS:
                raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, not {self.ablation!r}")
            for k, v in ABLATIONS[self.ablation].items():
                setattr(self, k, v)
            self.sparse = True
            if self.eviction == "auto":  # the paper's rows are its window method
                self.eviction = "window"
            if self.stream_resident == "auto":  # and keep its resident part in DRAM
                self.stream_resident = "needed"
        if self.dram_budget is not None:
            self.dram_budget = parse_bytes(self.dram_budget)
            if self.dram_budget <= 0:
                raise ValueError(f"dram_budget must be a positive size, got {self.dram_budget}")
            self.sparse = True
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))}, "
                             f"not {self.selection!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(map(repr, EVICTIONS))}, "
                             f"not {self.eviction!r}")
        if self.selection == "sketch" and self.eviction not in ("rank", "auto"):
            raise ValueError("selection='sketch' ranks neurons under eviction='rank'; "
                             f"eviction={self.eviction!r} needs 'predictor' or 'oracle'")
        if self.eviction == "rank" and self.selection == "all":
            raise ValueError("eviction='rank' ranks neurons by a score; selection='all' has "
                             "none (use 'sketch', 'predictor' or 'oracle')")
        if self.eviction == "rank" and not self.reuse:
            raise ValueError("eviction='rank' keeps neurons across tokens; it needs reuse=True")
        if not 0.0 < self.read_limit <= 1.0:
            raise ValueError(f"read_limit must be in (0, 1] (a fraction of each layer's "
                             f"neurons), got {self.read_limit}")
        if not self.swap_margin >= 0.0:
            raise ValueError(f"swap_margin must be >= 0, got {self.swap_margin}")
        if self.sketch not in SKETCHES:
            raise ValueError(f"sketch must be one of {', '.join(map(repr, SKETCHES))}, "
                             f"not {self.sketch!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {', '.join(map(repr, OVERLAPS))}, "
                             f"not {self.overlap!r}")
        if self.stream_resident not in STREAM_RESIDENT:
            raise ValueError(f"stream_resident must be one of "
                             f"{', '.join(map(repr, STREAM_RESIDENT))}, not {self.stream_resident!r}")
        if self.compute not in ("predicted", "cached"):
            raise ValueError(f"compute must be 'predicted' or 'cached', not {self.compute!r}")
        if not whole_at_least(self.window, 1):
            raise ValueError(f"window must be a whole number of tokens >= 1, got {self.window!r}")
        if not 0.0 < self.predictor_threshold < 1.0:
            raise ValueError(f"predictor_threshold must be in (0, 1), got {self.predictor_threshold}")
        if not 0.0 <= self.oracle_sparsity < 1.0:
            raise ValueError(f"oracle_sparsity must be in [0, 1), got {self.oracle_sparsity}")

    def _check_backend(self) -> None:
        from .backends import BACKENDS, COMPUTE_DTYPES

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"not {self.backend!r}")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"device must be a device name such as 'cpu', 'cuda', 'cuda:1' "
                             f"or 'mps', not {self.device!r}")
        kind = (self.device or "cpu").split(":", 1)[0]
        if self.backend == "native" and kind != "cpu":
            raise ValueError(f"device={self.device!r} needs backend='torch' or 'mlx' (or "
                             "'auto'); the native backend runs on the CPU")
        if self.unified_memory not in (None, True, False):
            raise ValueError(f"unified_memory must be True, False or None (from the device), "
                             f"not {self.unified_memory!r}")
        if self.backend == "native" and self.unified_memory is not None:
            raise ValueError("unified_memory describes a device backend's device: it needs "
                             "backend='torch' or 'mlx'")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, "
                             f"not {self.compute_dtype!r}")
        if self.backend == "native" and self.compute_dtype not in (None, "float32"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r} needs backend='torch' or "
                             "'mlx'; the native backend computes in float32")

    def resolved(self, args: "ModelArgs", kinds) -> "RuntimeConfig":
        """"auto" selection and eviction made concrete for a model whose `train-predictors`
        output holds `kinds` ("sketch", "lowrank"; None: nothing trained)."""
        kinds = list(kinds or [])
        sel, ev = self.selection, self.eviction
        if sel == "auto":
            relu = args.hidden_act in ("relu", "fatrelu")
            window_like = ev in ("window", "frequency") or not self.reuse
            sel = ("sketch" if "sketch" in kinds and not window_like
                   and (not relu or "lowrank" not in kinds) else "predictor")
        if ev == "auto":
            ev = "rank" if sel == "sketch" else "window"
        return self.replace(selection=sel, eviction=ev)

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def replace(self, **kw: Any) -> "RuntimeConfig":
        """A copy with the fields in `kw` changed. The `ablation` preset was applied once, when
        this config was made: a copy keeps its name but not its settings over `kw` (so
        ``RuntimeConfig(ablation="window").replace(bundled=True).bundled`` is True); pass
        ``ablation=`` to apply a preset again."""
        if "ablation" in kw or self.ablation is None:
            return dataclasses.replace(self, **kw)
        out = dataclasses.replace(self, ablation=None, **kw)
        out.ablation = self.ablation  # the name, for reports; its settings are in the fields
        return out


def whole_at_least(v: Any, minimum: int) -> bool:
    """`v` is an integer (Python's or numpy's, not a bool, a float or a string) >= minimum."""
    try:
        return not isinstance(v, bool) and operator.index(v) >= minimum
    except TypeError:
        return False


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def parse_bytes(text) -> int:
    """'4GB', '512 MiB', '1.5G', '1e9' or a number -> bytes (binary units: 1 GB = 2**30 bytes;
    a bare number is bytes). Negative, infinite and NaN sizes are refused."""
    import math
    import re

    bad = f"cannot read {text!r} as a size; write it like 4GB, 512MB or 1.5G (binary units)"
    if isinstance(text, bool):
        raise ValueError(bad)
    if isinstance(text, (int, float)) or type(text).__module__ == "numpy":
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(bad) from None
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(bad)
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value < 0:
        raise ValueError(bad)
    return int(value)


def format_bytes(n: float, up: bool = False) -> str:
    """'1.50 MiB'; `up` rounds the shown figure up, for minimums a user will pass back."""
    import math

    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else n:.0f} {unit}"
            return f"{math.ceil(n * 100) / 100 if up else n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"

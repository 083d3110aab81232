"""Model and runtime configuration: the only two configuration objects, passed down explicitly.

`ModelArgs` describes the network (read from a Hugging Face ``config.json`` and stored in the
flash directory's manifest). `RuntimeConfig` holds every runtime knob with a documented default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UnsupportedModelError

SUPPORTED_ARCHS = {
    "llama": "Llama 2/3, SmolLM2, ReluLLaMA (hidden_act relu), ProSparse (hidden_act fatrelu)",
    "mistral": "Mistral (dense attention; contexts longer than sliding_window are refused)",
    "opt": "OPT (ReLU; the paper's model)",
}
SUPPORTED_ACTS = ("relu", "fatrelu", "silu", "gelu", "gelu_tanh")
SUPPORTED_ROPE = ("default", "llama3")
# Hugging Face activation names -> ours.
_ACT_ALIASES = {
    "relu": "relu", "fatrelu": "fatrelu", "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}


@dataclass
class ModelArgs:
    """Shape and semantics of a decoder-only transformer (Llama family or OPT)."""

    arch: str                      # "llama" | "opt" (mistral maps to llama)
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
    rope_scaling: Optional[dict] = None  # llama3 frequency scaling parameters, or None
    attention_bias: bool = False   # biases on q/k/v/o projections (OPT: True)
    ffn_bias: bool = False         # per-neuron up bias and output down bias (OPT: True)
    pre_norm: bool = True          # OPT do_layer_norm_before
    learned_pos_offset: int = 0    # OPT learned positions are shifted by 2; 0 -> RoPE
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
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
        if mt in ("llama", "mistral"):
            return _from_llama(cfg)
        if mt == "opt":
            return _from_opt(cfg)
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_ARCHS.items())
        raise UnsupportedModelError(
            f"model_type {mt!r} (architectures {cfg.get('architectures')}) is not supported. "
            f"Supported model types: {supported}.")


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


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    # transformers 5 keeps rope settings under rope_parameters, 4.x at the top level.
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"rope type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
    scaling = None
    if rtype == "llama3":
        scaling = {k: float(rp[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    return theta, scaling


def _from_llama(cfg: dict) -> ModelArgs:
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("Llama models with mlp_bias=true are not supported yet.")
    act = _act(cfg.get("hidden_act", "silu"))
    theta, scaling = _rope(cfg)
    param = float(cfg.get("hidden_act_param", cfg.get("fatrelu_threshold", 0.0)) or 0.0)
    return ModelArgs(
        arch="llama",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
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
        sliding_window=cfg.get("sliding_window"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_list(cfg),
    )


def _from_opt(cfg: dict) -> ModelArgs:
    d = int(cfg["hidden_size"])
    proj = int(cfg.get("word_embed_proj_dim", d) or d)
    if proj != d:
        raise UnsupportedModelError(
            f"OPT with word_embed_proj_dim={proj} != hidden_size={d} (project_in/out, as in "
            "opt-350m) is not supported.")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("OPT without biases or without affine layer norms is not supported.")
    return ModelArgs(
        arch="opt",
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
        pre_norm=bool(cfg.get("do_layer_norm_before", True)),
        learned_pos_offset=2,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_list(cfg),
    )


# The rows of the paper's Table 2, as runtime settings. "predictor" keeps the caller's
# selection (a trained predictor, or the oracle for measurements).
ABLATIONS = {
    "naive": dict(selection="all", reuse=False, bundled=True, reread_resident=True),
    "hybrid": dict(selection="all", reuse=False, bundled=True, reread_resident=False),
    "predictor": dict(reuse=False, bundled=False, reread_resident=False),
    "window": dict(reuse=True, bundled=False, reread_resident=False),
    "bundling": dict(reuse=True, bundled=True, reread_resident=False),
}


@dataclass
class RuntimeConfig:
    """Every runtime knob, with its default. Mirrors the native ``ReaderParams``.

    Attributes:
        threads: compute threads for the native kernels (0 = all cores).
        use_direct_io: bypass the page cache (O_DIRECT / F_NOCACHE); falls back with a warning.
        io_engine: "auto" (io_uring when built and usable, else threads), "threads", "io_uring".
        queue_depth: reads in flight (this disk needs 16-64; the paper used 32 threads).
        max_context: tokens the KV cache is sized for (prompt + generated).

    Sparse inference from flash (the paper's method; off unless `sparse` or `dram_budget`):
        sparse: stream the FFN from the bundle file through the neuron cache.
        dram_budget: bytes the model may use (resident tensors + predictors + KV cache + neuron
            cache); sets each layer's cache capacity. None: cache every neuron that is needed.
        selection: which neurons a token needs: "predictor" (trained low-rank predictors),
            "oracle" (the true active set, computed from all weights: for measurement only, it
            keeps the whole FFN in DRAM), "all" (every neuron: the paper's "hybrid" row).
        window: k, the tokens whose neurons stay cached (the paper's sliding window). Default 4,
            measured on SmolLM2 (see README): k=4 keeps the bytes read per token low while the
            cache stays well under the FFN's size.
        eviction: when a cached neuron leaves DRAM. "window" (the paper): as soon as none of
            the last `window` tokens used it. "frequency" (ours): only when the cache is full,
            least used first (decayed count, half-life 64 tokens); fills the budget, so it reads
            fewer neurons at the same DRAM when some neurons are used far more than others
            (benchmarks/RESULTS.md sections 6 and 10). `window` is then unused. Without a
            budget nothing is ever evicted.
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
        ablation: a preset reproducing a row of the paper's Table 2, applied over the fields
            above: "naive", "hybrid", "predictor", "window", "bundling" (= everything on).
    """

    threads: int = 0
    use_direct_io: bool = True
    io_engine: str = "auto"
    queue_depth: int = 32
    max_context: int = 2048
    sparse: bool = False
    dram_budget: Optional[int] = None
    selection: str = "predictor"
    window: int = 4
    eviction: str = "window"
    reuse: bool = True
    bundled: bool = True
    predictor_threshold: float = 0.5
    compute: str = "cached"
    prefill_chunk: int = 16
    oracle_sparsity: float = 0.5
    reread_resident: bool = False
    ablation: Optional[str] = None

    def __post_init__(self):
        if self.io_engine not in ("auto", "threads", "io_uring"):
            raise ValueError(f"io_engine must be 'auto', 'threads' or 'io_uring', not {self.io_engine!r}")
        if self.queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = all cores), got {self.threads}")
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")
        if self.ablation is not None:
            if self.ablation not in ABLATIONS:
                raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, not {self.ablation!r}")
            for k, v in ABLATIONS[self.ablation].items():
                setattr(self, k, v)
            self.sparse = True
        if isinstance(self.dram_budget, str):
            self.dram_budget = parse_bytes(self.dram_budget)
        if self.dram_budget is not None:
            self.sparse = True
        if self.selection not in ("predictor", "oracle", "all"):
            raise ValueError(f"selection must be 'predictor', 'oracle' or 'all', not {self.selection!r}")
        if self.eviction not in ("window", "frequency"):
            raise ValueError(f"eviction must be 'window' or 'frequency', not {self.eviction!r}")
        if self.compute not in ("predicted", "cached"):
            raise ValueError(f"compute must be 'predicted' or 'cached', not {self.compute!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")
        if not 0.0 < self.predictor_threshold < 1.0:
            raise ValueError(f"predictor_threshold must be in (0, 1), got {self.predictor_threshold}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if not 0.0 <= self.oracle_sparsity < 1.0:
            raise ValueError(f"oracle_sparsity must be in [0, 1), got {self.oracle_sparsity}")

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    def replace(self, **kw: Any) -> "RuntimeConfig":
        return dataclasses.replace(self, **kw)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def parse_bytes(text) -> int:
    """'4GB', '512 MiB', '1.5G' or a number -> bytes (binary units: 1 GB = 2**30 bytes)."""
    if isinstance(text, (int, float)):
        return int(text)
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write it like 4GB, 512MB or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"

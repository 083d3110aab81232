"""The memory plan of sparse inference: a DRAM budget -> resident tensors, KV cache, predictors
or sketch, runtime overhead, and each layer's neuron-cache capacity (`plan_memory`); and
`prepare_sparse`, which resolves the runtime's "auto" choices for a directory and plans it.
The FFN providers that use the plan are in ffn.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .config import ModelArgs, RuntimeConfig, format_bytes

# Python, numpy, tokenizers, our module and the working buffers of a forward pass: measured as
# peak RSS minus the planned parts for SmolLM2 under a budget (71 MiB on 2026-11-29 with a
# 6-token and a 190-token prompt, 38 MiB of it the imports; 70-80 MiB earlier; numpy 2.4,
# Linux x86_64), with margin. Every MiB here is taken from the neuron cache, so the margin is
# kept small; tests/test_memory.py checks peak RSS <= budget.
RUNTIME_OVERHEAD_BYTES = 84 << 20
STAGING_RECORDS = 256  # NeuronCache::kStagingRecords


READ_AHEAD_SLOTS = 3  # RuntimeConfig.overlap: two guessed layers in flight and the rest


def read_ahead_records(args: ModelArgs, runtime: RuntimeConfig) -> int:
    """Records per read-ahead slot: one token's reads at most (read_limit of a layer); a
    prompt chunk's excess is read by the cache itself, after the slots."""
    f = args.intermediate_size
    return max(1, min(f, int(np.ceil(runtime.read_limit * f))))


@dataclass
class MemoryPlan:
    """Where the DRAM budget goes."""

    budget: Optional[int]
    resident: int          # dense.safetensors: embeddings, attention, norms, LM head
    predictors: int
    kv_cache: int          # float32 keys/values for max_context tokens
    overhead: int          # interpreter and libraries
    cache_capacity: list   # neurons per layer
    record_bytes: int      # one neuron on flash (padded to the I/O alignment)
    d_ff: int
    layer_buffer: int = 0  # modes without reuse: one layer's worth of rows, shared by all layers
    row_bytes: int = 0     # one cached neuron in DRAM (the packed record; 0: record_bytes)
    sketch_record_bytes: int = 0  # eviction="rank" with the sketch: bytes per uncached neuron
    sketch_fixed: int = 0         # and the sketch tier's per-neuron maps (ids, down norms)
    vram: Optional["VramPlan"] = None  # a device backend's plan (RuntimeConfig.vram_budget)

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_capacity) * (self.row_bytes or self.record_bytes) + self.layer_buffer

    @property
    def ffn_dram_bytes(self) -> int:
        """The whole FFN as the cache would hold it: L x d_ff x row bytes."""
        return len(self.cache_capacity) * self.d_ff * (self.row_bytes or self.record_bytes)

    @property
    def sketch_bytes(self) -> int:
        """The 4-bit sketches of every neuron the cache does not hold, with their maps."""
        if not self.sketch_record_bytes:
            return 0
        uncached = sum(self.d_ff - c for c in self.cache_capacity)
        return uncached * (self.sketch_record_bytes + 12) + self.sketch_fixed

    @property
    def total(self) -> int:
        return (self.resident + self.predictors + self.kv_cache + self.overhead + self.cache_bytes
                + self.sketch_bytes)

    def as_dict(self) -> dict:
        """The plan's figures in bytes (what `info --dram-budget --json` prints)."""
        out = {"budget": self.budget, "resident": self.resident, "predictors": self.predictors,
               "sketch": self.sketch_bytes, "kv_cache": self.kv_cache,
               "overhead": self.overhead, "cache_neurons_per_layer": self.cache_capacity,
               "cache_bytes": self.cache_bytes, "total": self.total}
        if self.vram is not None:
            out["vram"] = self.vram.as_dict()
        return out

    def cache_line(self) -> str:
        caps = self.cache_capacity
        lo, hi = (min(caps), max(caps)) if caps else (0, 0)
        pct = 100 * sum(caps) / max(self.d_ff * len(caps), 1)
        per = f"{lo}" if lo == hi else f"{lo}-{hi} (per layer, from the calibration)"
        return (f"{per} of {self.d_ff} neurons per layer, {pct:.1f}% of the FFN")

    def describe(self, per_layer: bool = False) -> str:
        if self.layer_buffer:
            cache_line = (f"  one layer's FFN rows, reused by every layer (no reuse across "
                          f"tokens):  {format_bytes(self.layer_buffer)}")
        else:
            cache_line = (f"  neuron cache: {self.cache_line()}: "
                          f"{format_bytes(self.cache_bytes)}")
        lines = [
            f"  resident tensors (embeddings, attention, norms): {format_bytes(self.resident)}",
            f"  predictors:                                      {format_bytes(self.predictors)}",
        ]
        if self.sketch_record_bytes:
            lines.append(f"  4-bit sketch of the uncached neurons:            "
                         f"{format_bytes(self.sketch_bytes)}")
        lines += [
            f"  KV cache (float32, max context):                 {format_bytes(self.kv_cache)}",
            f"  runtime overhead (interpreter, libraries):       {format_bytes(self.overhead)}",
            cache_line,
            f"  total: {format_bytes(self.total)}"
            + (f" of a {format_bytes(self.budget)} budget" if self.budget else " (no budget set)"),
        ]
        if per_layer and len(set(self.cache_capacity)) > 1:
            lines.append("  neurons cached per layer: " + " ".join(map(str, self.cache_capacity)))
        if self.vram is not None:
            lines += ["device memory (vram_budget):", self.vram.describe()]
        return "\n".join(lines)


# Per-layer cache sizes stay within these multiples of the equal share, and are used only when
# the caches hold at least PER_LAYER_MIN_FRACTION of the FFN. Measured on SmolLM2 with exact
# ranking (benchmarks/sparse_sim.py-style runs, 4 Wikipedia windows): equalized errors with
# these bounds give +19% / +5.8% perplexity at caches of 30% / 50% against +25% / +10% with
# equal sizes, but at 13% every unequal split tried lost (+91% to +164% against +73%).
PER_LAYER_BOUNDS = (0.5, 2.0)
PER_LAYER_MIN_FRACTION = 0.2


def allocate_caps(err: np.ndarray, err_k: np.ndarray, total: int, d_ff: int,
                  minimum: int, bounds: tuple = (0.0, float("inf"))) -> list[int]:
    """Split `total` cached neurons between layers so that their FFN errors (err [L, K] at the
    neuron counts err_k, from the calibration) are equal: the smallest error level whose
    per-layer counts fit in `total`, then the rest evenly to the layers whose error is
    largest. Every layer gets at least `minimum` and bounds[0] x the equal share, at most d_ff
    and bounds[1] x the equal share."""
    L = err.shape[0]
    total = int(min(max(total, minimum * L), d_ff * L))
    share = total / L
    lo_cap = max(minimum, int(share * bounds[0]))
    hi_cap = int(min(d_ff, np.ceil(share * bounds[1])))
    ks = np.asarray(err_k, np.float64)

    def caps_at(eps: float) -> np.ndarray:
        out = np.empty(L, np.int64)
        for layer, e in enumerate(np.asarray(err, np.float64)):
            # smallest k with e(k) <= eps on the piecewise-linear curve (e falls with k)
            below = np.flatnonzero(e <= eps)
            if below.size == 0:
                out[layer] = hi_cap
                continue
            i = int(below[0])
            k = ks[0]
            if i > 0:
                e0, e1 = e[i - 1], e[i]
                k = ks[i - 1] + (ks[i] - ks[i - 1]) * (e0 - eps) / max(e0 - e1, 1e-30)
            out[layer] = min(hi_cap, max(lo_cap, int(np.ceil(k))))
        return out

    lo, hi = 0.0, float(np.max(err))
    for _ in range(60):
        mid = (lo + hi) / 2
        if caps_at(mid).sum() > total:
            lo = mid
        else:
            hi = mid
    caps = caps_at(hi)
    # What the error levels leave (rounding, flat curves: a ReLU layer's error is exactly 0
    # past its largest active set) goes out evenly, the layers with the largest error first.
    rest = total - int(caps.sum())
    while rest > 0:
        room = [i for i in range(L) if caps[i] < hi_cap] or [i for i in range(L) if caps[i] < d_ff]
        at_cap = {i: float(np.interp(caps[i], ks, err[i])) for i in room}
        step = max(1, rest // len(room))
        for layer in sorted(room, key=lambda i: -at_cap[i]):
            give = min(step, (hi_cap if caps[layer] < hi_cap else d_ff) - int(caps[layer]), rest)
            caps[layer] += give
            rest -= give
            if rest == 0:
                break
    return [int(c) for c in caps]


def cache_row_bytes(manifest: dict) -> int:
    """DRAM bytes of one cached neuron: its parts, rounded up to 64 (the packed NeuronCache)."""
    from .dtypes import RecordLayout

    layout = RecordLayout.from_manifest(manifest)
    return min(-(-layout.payload_bytes // 64) * 64, layout.record_bytes)


def plan_memory(args: ModelArgs, manifest: dict, runtime: RuntimeConfig,
                predictor_bytes: int = 0, resident_bytes: Optional[int] = None, *,
                calibration=None, sketch_record_bytes: int = 0) -> MemoryPlan:
    """Split `runtime.dram_budget` between the resident part and the neuron cache.

    With `calibration` (predictor.Calibration) and ``runtime.per_layer_cache``, layers get
    cache sizes that equalize their measured FFN error; with `sketch_record_bytes` (eviction
    "rank" with the 4-bit sketch), every neuron the cache does not hold costs that many bytes
    too. Raises ValueError naming the smallest workable budget when even the resident part
    does not fit.
    """
    rec = int(manifest["bundle"]["record_bytes"])
    row = cache_row_bytes(manifest)  # what a cached neuron takes in DRAM (packed)
    if resident_bytes is None:
        resident_bytes = int(manifest["checksums"][manifest["files"]["dense"]]["bytes"])
    ctx = min(runtime.max_context, args.max_position_embeddings)
    kv = 2 * args.num_hidden_layers * ctx * args.kv_dim * 4
    L, f = args.num_hidden_layers, args.intermediate_size
    overhead = RUNTIME_OVERHEAD_BYTES
    if runtime.eviction == "frequency" and runtime.reuse:
        overhead += L * f * 9  # FrequencyPolicy: held flag + float64 score per neuron
    if runtime.eviction == "rank":  # the cached rows' activations and scores, per chunk
        overhead += runtime.prefill_chunk * f * 4
    if runtime.reuse and row < rec:  # the packed cache's staging buffer
        overhead += STAGING_RECORDS * rec
    if runtime.overlap != "off" and runtime.reuse:  # the read-ahead worker's slots and maps
        overhead += READ_AHEAD_SLOTS * (read_ahead_records(args, runtime) * rec + f * 4)
    fixed = resident_bytes + predictor_bytes + kv + overhead
    if not runtime.reuse:  # nothing is kept across tokens: one layer's rows at a time
        if runtime.dram_budget is not None and fixed + f * rec > runtime.dram_budget:
            raise ValueError(
                f"dram_budget {format_bytes(runtime.dram_budget)} is too small: without reuse the "
                f"runtime needs the resident part ({format_bytes(fixed)}) plus one layer's FFN "
                f"({format_bytes(f * rec)}). Give at least {format_bytes(fixed + f * rec, up=True)}.")
        return MemoryPlan(runtime.dram_budget, resident_bytes, predictor_bytes, kv,
                          overhead, [0] * L, rec, f, layer_buffer=f * rec)
    sk = sketch_record_bytes
    sk_fixed = L * f * 12 if sk else 0  # per neuron: its sketch slot (int64) and down norm (f32)
    if runtime.dram_budget is None:
        caps = [f] * L
    else:
        # neurons cached in all layers: each costs a record, each other one a sketch
        spare = runtime.dram_budget - fixed - sk_fixed - L * f * (sk + 12 if sk else 0)
        total = max(spare, 0) // (row - (sk + 12 if sk else 0))
        minimum = max(16, f // 100)  # below 1% of a layer the model cannot run a token
        if total < minimum * L:
            need = fixed + sk_fixed + minimum * L * row + L * (f - minimum) * (sk + 12 if sk else 0)
            sketch = f", the 4-bit sketch {format_bytes(L * f * (sk + 12) + sk_fixed)}" if sk else ""
            raise ValueError(
                f"dram_budget {format_bytes(runtime.dram_budget)} is too small: the resident part "
                f"alone needs {format_bytes(fixed)} (tensors {format_bytes(resident_bytes)}, KV "
                f"cache {format_bytes(kv)} for {ctx} tokens, predictors "
                f"{format_bytes(predictor_bytes)}, runtime {format_bytes(overhead)}{sketch}). "
                f"Give at least {format_bytes(need, up=True)}, or lower --max-context.")
        if (calibration is not None and runtime.per_layer_cache
                and total >= PER_LAYER_MIN_FRACTION * L * f):
            caps = allocate_caps(calibration.err, calibration.err_k, int(total), f, minimum,
                                 PER_LAYER_BOUNDS)
        else:
            caps = [int(min(f, total // L))] * L
    return MemoryPlan(runtime.dram_budget, resident_bytes, predictor_bytes, kv,
                      overhead, [int(c) for c in caps], rec, f, row_bytes=row,
                      sketch_record_bytes=sk, sketch_fixed=sk_fixed)


@dataclass
class VramPlan:
    """Where a device backend's memory budget goes (RuntimeConfig.vram_budget)."""

    budget: int
    resident: int          # resident matrices in the compute dtype, norms float32
    kv_cache: int          # keys/values for max_context tokens in the compute dtype
    row_bytes: int         # one cached neuron on the device: its parts (and up bias)
    cache_capacity: list   # neurons per layer the device copy holds

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_capacity) * self.row_bytes

    @property
    def total(self) -> int:
        return self.resident + self.kv_cache + self.cache_bytes

    def as_dict(self) -> dict:
        return {"budget": self.budget, "resident": self.resident, "kv_cache": self.kv_cache,
                "cache_neurons_per_layer": self.cache_capacity, "cache_bytes": self.cache_bytes,
                "total": self.total}

    def describe(self) -> str:
        caps = self.cache_capacity
        return "\n".join([
            f"  resident tensors (compute dtype):  {format_bytes(self.resident)}",
            f"  KV cache (max context):            {format_bytes(self.kv_cache)}",
            f"  neuron cache (device copy): {min(caps)}-{max(caps)} neurons per layer, "
            f"{format_bytes(self.cache_bytes)}",
            f"  total: {format_bytes(self.total)} of a {format_bytes(self.budget)} budget"])


def _device_resident_bytes(directory: Path, manifest: dict, args: ModelArgs, esize: int) -> int:
    """Bytes a device backend's resident tensors take on the device (backends/common.py:
    matrices dequantized to the compute dtype, esize bytes a value, norms float32), from
    dense.safetensors' header; nothing is loaded."""
    from .backends.common import device_resident_bytes
    from .checkpoint import _SafetensorsFile
    from .format import resident_formats

    f = _SafetensorsFile(Path(directory) / manifest["files"]["dense"])
    try:
        shapes = {name: shape for name, (_, shape, _, _) in f.entries.items()}
    finally:
        f.close()
    return device_resident_bytes(args, shapes, resident_formats(manifest), esize)


def plan_vram(directory: Path, manifest: dict, args: ModelArgs, runtime: RuntimeConfig,
              dram_caps: list) -> VramPlan:
    """Split `runtime.vram_budget` between the resident tensors, the KV cache and the device
    copy of the neuron cache: each layer keeps the share of the DRAM plan's `dram_caps` that
    fits. Raises ValueError naming the smallest workable budget when too little is left."""
    esize = {"float32": 4, "float16": 2, "bfloat16": 2}[runtime.compute_dtype or "float32"]
    L, f, d = args.num_hidden_layers, args.intermediate_size, args.hidden_size
    resident = _device_resident_bytes(directory, manifest, args, esize)
    ctx = min(runtime.max_context, args.max_position_embeddings)
    kv = 2 * L * ctx * args.kv_dim * esize
    parts = len(manifest["bundle"]["parts"])
    row = parts * d * esize + (esize if args.ffn_bias else 0)
    spare = runtime.vram_budget - resident - kv
    minimum = max(16, f // 100)
    if spare < minimum * L * row:
        raise ValueError(
            f"vram_budget {format_bytes(runtime.vram_budget)} is too small: the resident "
            f"tensors need {format_bytes(resident)} and the KV cache {format_bytes(kv)} for "
            f"{ctx} tokens on the device. Give at least "
            f"{format_bytes(resident + kv + minimum * L * row, up=True)}, or lower --max-context "
            "or use a smaller compute dtype.")
    want = sum(dram_caps)
    scale = min(1.0, (spare // row) / max(want, 1))
    caps = [int(max(min(c, minimum), np.floor(c * scale))) for c in dram_caps]
    return VramPlan(runtime.vram_budget, resident, kv, row, caps)


def plan_directory(directory, runtime: RuntimeConfig) -> tuple[RuntimeConfig, MemoryPlan]:
    """The memory plan of a flash directory under `runtime`, from its manifest (what
    `flashinfer-py info --dram-budget` and the demo print): (runtime resolved, plan)."""
    from .format import read_manifest

    manifest = read_manifest(Path(directory))
    rt, _, plan = prepare_sparse(Path(directory), manifest, ModelArgs.from_dict(manifest["model"]),
                                 runtime)
    return rt, plan


def prepare_sparse(directory: Path, manifest: dict, args: ModelArgs, runtime: RuntimeConfig):
    """What sparse inference needs before it starts: `train-predictors`' output, the runtime
    with "auto" made concrete, and the memory plan. Returns (runtime, predictors or None, plan).

    Raises FlashFormatError when the selection needs predictors that are missing or stale.
    """
    from .errors import FlashFormatError
    from .predictor import PREDICTORS_FILE, Predictors
    from .sketch import sketch_record_bytes

    preds = None
    if runtime.selection in ("auto", "predictor", "sketch") or (
            runtime.selection == "oracle" and (Path(directory) / PREDICTORS_FILE).is_file()):
        preds = Predictors.load(directory, manifest)
    rt = runtime.resolved(args, preds.kinds if preds is not None else None)
    fix = f"run `flashinfer-py train-predictors {directory} --method {{}}`"
    if rt.selection == "predictor" and not preds.layers:
        raise FlashFormatError(f"{Path(directory) / PREDICTORS_FILE}: no low-rank predictors "
                               f"(selection='predictor'); {fix.format('lowrank')}.")
    if rt.selection == "sketch" and "sketch" not in preds.kinds:
        raise FlashFormatError(f"{Path(directory) / PREDICTORS_FILE}: no 4-bit sketch "
                               f"(selection='sketch'); {fix.format('sketch')}.")
    rank = rt.eviction == "rank"
    plan = plan_memory(args, manifest, rt, preds.nbytes if rt.selection == "predictor" else 0,
                       calibration=preds.calibration if rank and preds is not None else None,
                       sketch_record_bytes=sketch_record_bytes(args)
                       if rt.selection == "sketch" else 0)
    if rt.vram_budget is not None:  # the device copy of the cache may hold fewer neurons
        plan.vram = plan_vram(Path(directory), manifest, args, rt, plan.cache_capacity)
        plan.cache_capacity = list(plan.vram.cache_capacity)
    return rt, preds, plan

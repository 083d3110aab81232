"""The memory plan of sparse inference: a DRAM budget -> resident tensors, KV cache, predictors
or sketch, runtime overhead, and each layer's neuron-cache capacity (`plan_memory`); and
`prepare_sparse`, which resolves the runtime's "auto" choices for a directory and plans it.
The FFN providers that use the plan are in ffn.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


# The runtime's readers bound their scratch buffer to this (ReaderParams.max_scratch_bytes):
# gap-merged runs (RuntimeConfig.coalesce_gap_bytes), runs whose rows are not adjacent and the
# unbundled ablation's parts land there before they are copied into rows; a call that needs
# more works in rounds that reuse it. 1 MiB: a round then holds 64-256 merged reads of a
# 4 KiB-record model, so the queue drains between rounds cost little.
READER_SCRATCH_BYTES = 1 << 20


def reader_scratch_bytes(record_bytes: int) -> int:
    """What one runtime reader's scratch buffer can hold (BundleReader.scratch_cap)."""
    return -(-max(READER_SCRATCH_BYTES, record_bytes) // 4096) * 4096

# ---- a device backend's memory outside its tensors (plan_vram, and the unified plan) ----------
# The CUDA context: the driver's state and the kernels of torch, cuBLAS and cuDNN, in device
# memory but in no tensor, so no allocator counts it. With lazy module loading (CUDA >= 11.7,
# torch's default) it is a few hundred MiB on current data-center GPUs and grows as kernels are
# first used. Not measured here (the development machine has no GPU): an estimate; where a CUDA
# device is visible, plan_vram measures the context instead and keeps the larger figure
# (cuda_context_bytes).
CUDA_CONTEXT_BYTES = 512 << 20
# The caching allocators (torch's CUDA/MPS allocators, mlx's buffer cache) round blocks up
# (torch: 512 B, 2 MiB segments for large ones) and keep freed blocks for reuse, and a forward
# pass allocates temporaries (a prompt chunk's activations, attention scores, logits): this
# share is added on top of the planned tensors.
ALLOCATOR_MARGIN = 0.10
# The framework's own memory in the process at rest (its libraries, its allocator's pools): peak
# RSS after `import torch` (torch 2.13's CPU build, Linux x86_64: +204 MiB over numpy alone)
# and `import mlx.core` (mlx[cpu] 0.32: +5 MiB), with margin. CUDA and Metal builds load more
# (not measured here). Counted in the DRAM plan's overhead whenever a device backend runs.
FRAMEWORK_OVERHEAD_BYTES = {"torch": 224 << 20, "mlx": 16 << 20}


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
    cache_split: bool = False  # the cache keeps down parts in matrices of their own
                               # (RecordLayout.split_at; the same row_bytes in two pieces)
    sketch_record_bytes: int = 0  # eviction="rank" with the sketch: bytes per uncached neuron
    sketch_fixed: int = 0         # and the sketch tier's per-neuron maps (ids, down norms)
    vram: Optional["VramPlan"] = None  # a device backend's plan (RuntimeConfig.vram_budget)
    # unified memory (a device that shares the host's RAM: one plan for both, see
    # prepare_sparse): the device's description, the device copy of a cached neuron (with the
    # allocator margin), and the margin on the device's resident tensors and KV cache
    unified: Optional[str] = None
    device_row_bytes: int = 0
    allocator: int = 0
    # resident matrices left on flash (RuntimeConfig.stream_resident, resident_stream.py):
    # the units' names, the bytes they add to every token's reads, the stream's buffers
    streamed: list = field(default_factory=list)
    stream_bytes: int = 0
    stream_buffers: int = 0

    @property
    def cache_bytes(self) -> int:
        per = (self.row_bytes or self.record_bytes) + self.device_row_bytes
        return sum(self.cache_capacity) * per + self.layer_buffer

    @property
    def cache_fraction(self) -> float:
        """Neurons cached, as a fraction of the FFN's."""
        return sum(self.cache_capacity) / max(self.d_ff * len(self.cache_capacity), 1)

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
                + self.sketch_bytes + self.allocator + self.stream_buffers)

    def as_dict(self) -> dict:
        """The plan's figures in bytes (what `info --dram-budget --json` prints)."""
        out = {"budget": self.budget, "resident": self.resident, "predictors": self.predictors,
               "sketch": self.sketch_bytes, "kv_cache": self.kv_cache,
               "overhead": self.overhead, "cache_neurons_per_layer": self.cache_capacity,
               "cache_bytes": self.cache_bytes, "total": self.total}
        if self.unified:
            out.update(unified=self.unified, device_row_bytes=self.device_row_bytes,
                       allocator=self.allocator)
        if self.streamed:
            out.update(streamed=list(self.streamed), stream_bytes_per_token=self.stream_bytes,
                       stream_buffers=self.stream_buffers)
        if self.vram is not None:
            out["vram"] = self.vram.as_dict()
        return out

    def cache_line(self) -> str:
        caps = self.cache_capacity
        lo, hi = (min(caps), max(caps)) if caps else (0, 0)
        pct = 100 * self.cache_fraction
        per = f"{lo}" if lo == hi else f"{lo}-{hi} (per layer, from the calibration)"
        return (f"{per} of {self.d_ff} neurons per layer, {pct:.1f}% of the FFN")

    def describe(self, per_layer: bool = False) -> str:
        def line(label: str, n: int, note: str = "") -> str:
            return f"  {label + ':':<49}{format_bytes(n)}{note}"

        dev = " (on the device)" if self.unified else ""
        lines = [f"  unified memory ({self.unified}): host and device share this RAM, so one "
                 "plan holds both and nothing is counted twice"] if self.unified else []
        lines.append(line("resident tensors (embeddings, attention, norms)", self.resident, dev))
        if self.streamed:
            layers = [u for u in self.streamed if u.startswith("layers.")]
            what = [u for u in ("embed", "head") if u in self.streamed]
            names = {"embed": "input embedding (a row a token)", "head": "LM head"}
            parts = [names[u] for u in what] + ([f"{len(layers)} layers' attention"]
                                                if layers else [])
            lines.append(line("read from flash every token (buffers)", self.stream_buffers,
                              f": {', '.join(parts)}, {format_bytes(self.stream_bytes)} a "
                              "token"))
        lines.append(line("predictors", self.predictors))
        if self.sketch_record_bytes:
            lines.append(line("4-bit sketch of the uncached neurons", self.sketch_bytes))
        kv = "KV cache (compute dtype, max context)" if self.unified else \
            "KV cache (float32, max context)"
        lines.append(line(kv, self.kv_cache, dev))
        lines.append(line("runtime overhead (interpreter, libraries)", self.overhead))
        if self.unified:
            lines.append(line(f"allocator margin ({ALLOCATOR_MARGIN:.0%} of resident + KV)",
                              self.allocator))
        if self.layer_buffer:
            lines.append(line("one layer's FFN rows, reused by every layer (no reuse across "
                              "tokens)", self.layer_buffer))
        else:
            per = ""
            if self.unified:
                per = (f" ({self.row_bytes or self.record_bytes} B host record + "
                       f"{self.device_row_bytes} B device copy a neuron)")
            elif self.cache_split:
                per = " (up parts and down parts in two matrices)"
            lines.append(f"  neuron cache: {self.cache_line()}: "
                         f"{format_bytes(self.cache_bytes)}{per}")
        lines.append(f"  total: {format_bytes(self.total)}"
                     + (f" of a {format_bytes(self.budget)} budget" if self.budget
                        else " (no budget set)"))
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
# Below this share of the FFN cached, loading a model under a budget warns of the quality
# loss: at 13% the default costs +70-81% perplexity (benchmarks/RESULTS_sparse.md)
LOW_CACHE_SHARE = 0.15


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
    """DRAM bytes of one cached neuron: its parts, rounded up to 64 (the packed NeuronCache,
    split or not)."""
    from .dtypes import RecordLayout

    return RecordLayout.from_manifest(manifest).cache_row_bytes


def plan_memory(args: ModelArgs, manifest: dict, runtime: RuntimeConfig,
                predictor_bytes: int = 0, resident_bytes: Optional[int] = None, *,
                calibration=None, sketch_record_bytes: int = 0,
                device: Optional["DeviceCosts"] = None,
                stream_units: Optional[list] = None) -> MemoryPlan:
    """Split `runtime.dram_budget` between the resident part and the neuron cache.

    With `device` (a device backend's costs), its host memory (framework, staging) is in the
    overhead; when that device shares the host's RAM (``device.unified``) this is the one
    plan of that RAM: the budget is the smaller of dram_budget and vram_budget, the resident
    tensors and the KV cache are counted once, as the device holds them (the host's copies
    are dropped once they are on the device), the allocator margin is added, and each cached
    neuron costs its host record plus its device copy.

    With `calibration` (predictor.Calibration) and ``runtime.per_layer_cache``, layers get
    cache sizes that equalize their measured FFN error; with `sketch_record_bytes` (eviction
    "rank" with the 4-bit sketch), every neuron the cache does not hold costs that many bytes
    too. With `stream_units` (resident_stream.stream_units of the directory), resident
    matrices may be left on flash as ``runtime.stream_resident`` says (_choose_streamed).
    Raises ValueError naming the smallest workable budget when even the resident part does
    not fit.
    """
    from .dtypes import RecordLayout

    rec = int(manifest["bundle"]["record_bytes"])
    layout = RecordLayout.from_manifest(manifest)
    # a device backend mirrors whole rows; the host-only runtime splits FFNs without a gate
    split = device is None and layout.split_at > 0
    row = layout.cache_row_bytes  # what a cached neuron takes in DRAM (packed)
    if resident_bytes is None:
        resident_bytes = int(manifest["checksums"][manifest["files"]["dense"]]["bytes"])
    ctx = min(runtime.max_context, args.max_position_embeddings)
    kv = 2 * args.num_hidden_layers * ctx * args.kv_dim * 4
    L, f = args.num_hidden_layers, args.intermediate_size
    overhead = RUNTIME_OVERHEAD_BYTES + (device.host if device is not None else 0)
    budget, what = runtime.dram_budget, "dram_budget"
    unified = device.unified if device is not None else None
    dev_row = allocator = 0  # unified: a cached neuron's device copy, the margin on the rest
    if unified:
        resident_bytes, kv = device.resident, device.kv_cache
        allocator = int(ALLOCATOR_MARGIN * (resident_bytes + kv))
        dev_row = int(np.ceil(device.row_bytes * (1 + ALLOCATOR_MARGIN)))
        if runtime.vram_budget is not None and (budget is None or runtime.vram_budget < budget):
            budget, what = runtime.vram_budget, "vram_budget"
    if runtime.eviction == "frequency" and runtime.reuse:
        overhead += L * f * 9  # FrequencyPolicy: held flag + float64 score per neuron
    if runtime.eviction == "rank":  # the cached rows' activations and scores, per chunk
        overhead += runtime.prefill_chunk * f * 4
    if runtime.reuse and (row < rec or split):  # the packed (or split) cache's staging buffer
        overhead += STAGING_RECORDS * rec
    overhead += reader_scratch_bytes(rec)  # the FFN's reader
    if calibration is not None:  # held while the model runs: hot, err, norms, up means
        overhead += sum(int(np.asarray(a).nbytes) for a in calibration.arrays().values())
    if runtime.overlap != "off" and runtime.reuse:  # the read-ahead worker's slots and maps
        overhead += READ_AHEAD_SLOTS * (read_ahead_records(args, runtime) * rec + f * 4)
        overhead += reader_scratch_bytes(rec)  # and its own reader
    sk = sketch_record_bytes
    sk_fixed = L * f * 12 if sk else 0  # per neuron: its sketch slot (int64) and down norm (f32)
    sk_neuron = sk + 12 if sk else 0  # what an uncached neuron costs (a cached one, its row)
    row_cost = row + dev_row
    minimum = max(16, f // 100)  # below 1% of a layer the model cannot run a token
    streamed, stream_read, stream_buf = [], 0, 0
    if stream_units and device is None and not runtime.reread_resident:
        full_cache = L * f * (row_cost - sk_neuron) if runtime.reuse else 0
        chosen = _choose_streamed(
            stream_units, runtime, budget, resident_bytes + predictor_bytes + kv + overhead,
            sk_fixed + L * f * sk_neuron,
            (row_cost - sk_neuron) * minimum * L if runtime.reuse else f * rec, full_cache)
        if chosen:
            from .resident_stream import buffer_bytes

            streamed = [u.name for u in chosen]
            stream_read = sum(u.nbytes for u in chosen if u.per_token)
            stream_buf = buffer_bytes(chosen)
            resident_bytes -= sum(u.nbytes for u in chosen)
    extra = dict(streamed=streamed, stream_bytes=stream_read, stream_buffers=stream_buf)
    fixed = resident_bytes + predictor_bytes + kv + overhead + allocator + stream_buf
    if not runtime.reuse:  # nothing is kept across tokens: one layer's rows at a time
        layer = f * (rec + dev_row)
        if budget is not None and fixed + layer > budget:
            raise ValueError(
                f"{what} {format_bytes(budget)} is too small: without reuse the "
                f"runtime needs the resident part ({format_bytes(fixed)}) plus one layer's FFN "
                f"({format_bytes(layer)}). Give at least {format_bytes(fixed + layer, up=True)}.")
        return MemoryPlan(budget, resident_bytes, predictor_bytes, kv, overhead, [0] * L, rec,
                          f, layer_buffer=layer, unified=unified, allocator=allocator, **extra)
    if budget is None:
        caps = [f] * L
    else:
        # neurons cached in all layers: each costs a record, each other one a sketch
        spare = budget - fixed - sk_fixed - L * f * sk_neuron
        total = max(spare, 0) // (row_cost - sk_neuron)
        if total < minimum * L:
            def need_for(n_cached: int) -> int:  # the budget that caches n_cached a layer
                return fixed + sk_fixed + n_cached * L * row_cost + L * (f - n_cached) * sk_neuron

            sketch_b = L * (f - minimum) * sk_neuron + sk_fixed
            sketch = f" + the 4-bit sketch of the uncached neurons {format_bytes(sketch_b)}" if sk else ""
            dev = (f" (with an allocator margin of {format_bytes(allocator)}; unified memory "
                   f"({unified}): dram_budget and vram_budget are one budget)") if unified else ""
            gone = sum(u.nbytes for u in stream_units or [] if u.name in streamed)
            left = f", with {format_bytes(gone)} of matrices left on flash" if streamed else ""
            hint = (", or let the resident matrices stream from flash (--stream-resident auto)"
                    if stream_units and runtime.stream_resident == "off" else "")
            good = max(int(np.ceil(LOW_CACHE_SHARE * f)), minimum)
            raise ValueError(
                f"{what} {format_bytes(budget)} is too small: the resident part needs "
                f"{format_bytes(fixed)}{left} (tensors {format_bytes(resident_bytes)}, KV cache "
                f"{format_bytes(kv)} for {ctx} tokens, predictors {format_bytes(predictor_bytes)}, "
                f"runtime {format_bytes(overhead)}){dev}{sketch} + the smallest neuron cache "
                f"({minimum} neurons a layer) {format_bytes(minimum * L * row_cost)}. Give at least "
                f"{format_bytes(need_for(minimum), up=True)} to run; "
                f"{format_bytes(need_for(good), up=True)} caches {LOW_CACHE_SHARE:.0%} of the FFN, "
                f"below which quality suffers. Or lower --max-context{hint}.")
        if (calibration is not None and runtime.per_layer_cache
                and total >= PER_LAYER_MIN_FRACTION * L * f):
            caps = allocate_caps(calibration.err, calibration.err_k, int(total), f, minimum,
                                 PER_LAYER_BOUNDS)
        else:
            caps = [int(min(f, total // L))] * L
    return MemoryPlan(budget, resident_bytes, predictor_bytes, kv,
                      overhead, [int(c) for c in caps], rec, f, row_bytes=row,
                      cache_split=split, sketch_record_bytes=sk, sketch_fixed=sk_fixed, unified=unified,
                      device_row_bytes=dev_row, allocator=allocator, **extra)


def _choose_streamed(units: list, runtime: RuntimeConfig, budget: Optional[int], fixed: int,
                     sketch: int, need: int, full_cache: int) -> list:
    """Which resident units (resident_stream.stream_units, in their order) stay on flash.

    "all": every one. "auto" and "needed": the budget is shared in proportion, the units
    kept in DRAM and the neuron cache each getting the same fraction s of their full size
    (`full_cache`: every neuron cached), s = what is left after the rest / (units + full
    cache); then more units go until the smallest cache (`need`) fits. "needed" does this
    only when `budget` cannot hold `fixed` (the resident part, KV cache, predictors, runtime)
    + `sketch` + `need`; "auto" at every budget below the whole model, unless the stream's
    buffers would take more than the matrices it frees. Why a share for both rather than
    either extreme: a matrix on flash costs its bytes every token, but in large sequential
    reads (~2 GB/s here), while a neuron the cache lacks costs a random 4-24 KiB read
    (0.3-1 GB/s) and quality (benchmarks/RESULTS_sparse.md); measured with both rules,
    RESULTS section 17, "The budget shared at every size".
    """
    from .resident_stream import buffer_bytes

    mode = runtime.stream_resident
    if mode == "all":
        return list(units)
    if mode not in ("auto", "needed") or budget is None:
        return []
    fits = fixed + sketch + need <= budget
    if fits and mode == "needed":
        return []
    total = sum(u.nbytes for u in units)
    room = budget - (fixed - total) - sketch - buffer_bytes(units)
    share = min(1.0, max(0.0, room / (total + full_cache))) if full_cache else 0.0
    chosen, kept = [], total
    for u in units:
        ok = fixed - (total - kept) + buffer_bytes(chosen) + sketch + need <= budget
        if kept <= share * total and ok:
            break
        chosen.append(u)
        kept -= u.nbytes
    if fits and (total - kept) <= buffer_bytes(chosen):
        return []  # the buffers would eat what streaming frees: keep every matrix
    return chosen


@dataclass
class DeviceCosts:
    """What a device backend's memory plan needs to know about the device (device_costs)."""

    resident: int          # resident tensors on the device: matrices in the compute dtype
    kv_cache: int          # keys/values for max_context tokens in the compute dtype
    row_bytes: int         # one cached neuron on the device (device_row: its stored bytes)
    host: int              # host memory the backend adds: its framework, the staging buffer
    context: int = 0       # device memory in no tensor (the CUDA context; 0 elsewhere)
    context_note: str = ""
    unified: Optional[str] = None  # the device shares the host's RAM: which device, why


@dataclass(frozen=True)
class DeviceRow:
    """One neuron's row on a device backend, and in the host staging buffer it is sent from
    (backends/device_ffn.py): `raw` bytes of its record's payload as stored (block formats:
    the parts kept quantized, dequantized on the device per layer when the FFN runs), then
    `values` values in the compute dtype (float formats: the parts, dequantized on the host
    as before; then the up bias, where the model has one)."""

    raw: int
    values: int
    esize: int

    @property
    def nbytes(self) -> int:
        return self.raw + self.values * self.esize

    @property
    def direct(self) -> bool:
        """The values are float32 and lie aligned: staged straight into the row's bytes, with
        no float32 copy to cast from."""
        return self.esize == 4 and self.raw % 4 == 0


def device_row(layout, esize: int, bias: bool) -> DeviceRow:
    """The device row of records in `layout` (dtypes.RecordLayout) for a compute dtype of
    `esize` bytes, with or without an up bias."""
    if layout.fmt.quantized:
        return DeviceRow(layout.payload_bytes, int(bias), esize)
    return DeviceRow(0, len(layout.parts) * layout.d_model + int(bias), esize)


def device_staging_rows(row: DeviceRow, most: int) -> int:
    """Rows of a device backend's host staging buffer: at most STAGING_BYTES, at most `most`
    rows, at least one."""
    return max(1, min(most, STAGING_BYTES // row.nbytes))


def device_staging_bytes(row: DeviceRow, rows: int) -> int:
    """Host bytes of a staging buffer of `rows` device rows: the rows, and the float32 values
    written before their cast (unless they are staged directly)."""
    return rows * (row.nbytes + (0 if row.direct else row.values * 4))


STAGING_BYTES = 32 << 20  # a device backend's host staging buffer: at most this much a transfer


def device_costs(directory: Path, manifest: dict, args: ModelArgs, runtime: RuntimeConfig,
                 backend: str) -> DeviceCosts:
    """A device backend's figures for the plans, from the manifest and dense.safetensors'
    header (nothing is loaded; the CUDA context is measured where a CUDA device is visible)."""
    from .backends import device_context, shares_host_memory

    from .dtypes import RecordLayout

    esize = {"float32": 4, "float16": 2, "bfloat16": 2}[runtime.compute_dtype or "float32"]
    L, f = args.num_hidden_layers, args.intermediate_size
    ctx = min(runtime.max_context, args.max_position_embeddings)
    row = device_row(RecordLayout.from_manifest(manifest), esize, args.ffn_bias)
    staging = device_staging_bytes(row, device_staging_rows(row, f))
    unified = shares_host_memory(backend, runtime.device, runtime.unified_memory)
    context, note = (0, "") if unified else device_context(backend, runtime.device)
    return DeviceCosts(
        resident=_device_resident_bytes(directory, manifest, args, esize),
        kv_cache=2 * L * ctx * args.kv_dim * esize, row_bytes=row.nbytes,
        host=FRAMEWORK_OVERHEAD_BYTES[backend] + staging, context=context, context_note=note,
        unified=unified)


@dataclass
class VramPlan:
    """Where a device backend's memory budget goes (RuntimeConfig.vram_budget), on a device
    with its own memory (a discrete GPU)."""

    budget: int
    resident: int          # resident matrices in the compute dtype, norms float32
    kv_cache: int          # keys/values for max_context tokens in the compute dtype
    row_bytes: int         # one cached neuron on the device (device_row)
    cache_capacity: list   # neurons per layer the device copy holds
    context: int = 0       # the CUDA context: device memory in no tensor
    context_note: str = ""  # how `context` was found ("estimate" or "measured")
    allocator: int = 0     # ALLOCATOR_MARGIN of the tensors

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_capacity) * self.row_bytes

    @property
    def total(self) -> int:
        return self.resident + self.kv_cache + self.cache_bytes + self.context + self.allocator

    def as_dict(self) -> dict:
        return {"budget": self.budget, "resident": self.resident, "kv_cache": self.kv_cache,
                "context": self.context, "allocator": self.allocator,
                "cache_neurons_per_layer": self.cache_capacity, "row_bytes": self.row_bytes,
                "cache_bytes": self.cache_bytes, "total": self.total}

    def describe(self) -> str:
        def line(label: str, n: int) -> str:
            return f"  {label + ':':<35}{format_bytes(n)}"

        caps = self.cache_capacity
        return "\n".join([
            line("resident tensors (compute dtype)", self.resident),
            line("KV cache (max context)", self.kv_cache),
            line(f"CUDA context ({self.context_note})" if self.context_note
                 else "device context (none off CUDA)", self.context),
            line(f"allocator margin ({ALLOCATOR_MARGIN:.0%} of tensors)", self.allocator),
            f"  neuron cache (device copy): {min(caps)}-{max(caps)} neurons per layer, "
            f"{format_bytes(self.cache_bytes)} ({self.row_bytes} B a neuron)",
            f"  total: {format_bytes(self.total)} of a {format_bytes(self.budget)} budget"])


def dense_entries(directory: Path, manifest: dict) -> dict:
    """dense.safetensors' header: name -> (dtype, shape, file offset, count); nothing is
    loaded (the plans' sizes, the streamed matrices' places)."""
    from .checkpoint import _SafetensorsFile

    f = _SafetensorsFile(Path(directory) / manifest["files"]["dense"])
    try:
        return dict(f.entries)
    finally:
        f.close()


def _stream_units(directory: Path, manifest: dict, args: ModelArgs) -> Optional[list]:
    """The resident units the plan may leave on flash, or None when dense.safetensors' header
    cannot be read: the plan is then made without them (a budget too small still says so
    first), and loading the file reports what is wrong with it."""
    from .checkpoint import CheckpointError
    from .resident_stream import stream_units

    try:
        return stream_units(args, dense_entries(directory, manifest))
    except CheckpointError:
        return None


def _device_resident_bytes(directory: Path, manifest: dict, args: ModelArgs, esize: int) -> int:
    """Bytes a device backend's resident tensors take on the device (backends/common.py:
    matrices dequantized to the compute dtype, esize bytes a value, norms float32), from
    dense.safetensors' header."""
    from .backends.common import device_resident_bytes
    from .format import resident_formats

    shapes = {name: e[1] for name, e in dense_entries(directory, manifest).items()}
    return device_resident_bytes(args, shapes, resident_formats(manifest), esize)


def plan_vram(directory: Path, manifest: dict, args: ModelArgs, runtime: RuntimeConfig,
              dram_caps: list, costs: Optional[DeviceCosts] = None) -> VramPlan:
    """Split `runtime.vram_budget` of a discrete device between its context, the allocator
    margin, the resident tensors, the KV cache and the device copy of the neuron cache: each
    layer keeps the share of the DRAM plan's `dram_caps` that fits. Raises ValueError naming
    the smallest workable budget when too little is left."""
    c = costs or device_costs(directory, manifest, args, runtime, runtime.backend)
    L, f, m = args.num_hidden_layers, args.intermediate_size, ALLOCATOR_MARGIN
    row = c.row_bytes
    tensors = int((runtime.vram_budget - c.context) / (1 + m))  # what the tensors may take
    spare = tensors - c.resident - c.kv_cache
    minimum = max(16, f // 100)
    if spare < minimum * L * row:
        ctx = min(runtime.max_context, args.max_position_embeddings)
        least = c.resident + c.kv_cache + minimum * L * row
        need = c.context + int(np.ceil(least * (1 + m))) + 1
        context = (f", the CUDA context {format_bytes(c.context)} ({c.context_note})"
                   if c.context else "")
        raise ValueError(
            f"vram_budget {format_bytes(runtime.vram_budget)} is too small: the resident "
            f"tensors need {format_bytes(c.resident)} and the KV cache "
            f"{format_bytes(c.kv_cache)} for {ctx} tokens on the device{context}, plus the "
            f"allocator margin ({m:.0%} of the tensors). Give at least "
            f"{format_bytes(need, up=True)}, or lower --max-context or use a smaller compute "
            "dtype.")
    want = sum(dram_caps)
    scale = min(1.0, (spare // row) / max(want, 1))
    caps = [int(max(min(c_, minimum), np.floor(c_ * scale))) for c_ in dram_caps]
    allocator = int(m * (c.resident + c.kv_cache + sum(caps) * row))
    return VramPlan(runtime.vram_budget, c.resident, c.kv_cache, row, caps, c.context,
                    c.context_note, allocator)


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
    from .backends import resolve_backend
    from .errors import FlashFormatError
    from .predictor import PREDICTORS_FILE, Predictors
    from .sketch import resolve_sketch, sketch_record_bytes

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
    if rt.selection == "sketch":  # "full" or "gate", for this model's cached row
        rt = rt.replace(sketch=resolve_sketch(rt.sketch, args, cache_row_bytes(manifest),
                                              preds.calibration))
    rank = rt.eviction == "rank"
    backend = resolve_backend(rt.backend, rt.device)
    costs = (device_costs(Path(directory), manifest, args, rt, backend)
             if backend != "native" else None)
    # a device sharing the host's RAM gets one plan for both (plan_memory); a discrete one
    # gets the DRAM plan, then the device's own (plan_vram)
    if rt.stream_resident == "all" and costs is not None:
        raise ValueError(f"stream_resident='all' needs the native backend; the {backend} "
                         "backend keeps its resident tensors on the device")
    plan = plan_memory(args, manifest, rt, preds.nbytes if rt.selection == "predictor" else 0,
                       calibration=preds.calibration if rank and preds is not None else None,
                       sketch_record_bytes=sketch_record_bytes(args, rt.sketch)
                       if rt.selection == "sketch" else 0, device=costs,
                       stream_units=_stream_units(Path(directory), manifest, args)
                       if costs is None else None)
    if rt.vram_budget is not None and not costs.unified:  # the device copy may hold fewer
        plan.vram = plan_vram(Path(directory), manifest, args, rt, plan.cache_capacity, costs)
        plan.cache_capacity = list(plan.vram.cache_capacity)
    share = plan.cache_fraction
    if (plan.budget is not None and rt.reuse and rt.selection in ("sketch", "predictor")
            and share < LOW_CACHE_SHARE):
        import warnings

        warnings.warn(
            f"the neuron cache holds {share:.0%} of the FFN under a budget of "
            f"{format_bytes(plan.budget)}: expect a large quality loss (with 13% cached the "
            "default lost 70-81% in perplexity on SmolLM2 and Gemma-3-270M; "
            "benchmarks/RESULTS_sparse.md). `flashinfer-py info DIR --dram-budget SIZE` "
            "shows the cache a budget gives.", stacklevel=3)
    return rt, preds, plan

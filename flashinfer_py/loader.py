"""Sparse FFN from flash: predictor -> sliding window -> neuron cache -> rows for the kernel.

`SparseFFN.rows(layer, x)` is called by the model for every layer of every token. It decides
which neurons the token needs (`selection`), updates the window, evicts the neurons that left
it (swap-with-last compaction in the native cache), reads the new ones straight from the bundle
file into the cache's tail rows, and returns the cache rows (and the rows this token uses).
`plan_memory` turns a DRAM budget into per-layer cache capacities.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import kernels
from .config import ModelArgs, RuntimeConfig, format_bytes
from .window import FrequencyPolicy, SlidingWindow

# Python, numpy, tokenizers, our module and the working buffers of a forward pass: measured as
# peak RSS minus the planned parts for SmolLM2 under a budget (70-80 MiB, numpy 2.4, Linux
# x86_64), with margin. tests/test_memory.py checks peak RSS <= budget.
RUNTIME_OVERHEAD_BYTES = 96 << 20


@dataclass
class MemoryPlan:
    """Where the DRAM budget goes."""

    budget: Optional[int]
    resident: int          # dense.safetensors: embeddings, attention, norms, LM head
    predictors: int
    kv_cache: int          # float32 keys/values for max_context tokens
    overhead: int          # interpreter and libraries
    cache_capacity: list   # neurons per layer
    record_bytes: int
    d_ff: int
    layer_buffer: int = 0  # modes without reuse: one layer's worth of rows, shared by all layers

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_capacity) * self.record_bytes + self.layer_buffer

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.overhead + self.cache_bytes

    def describe(self) -> str:
        cap = self.cache_capacity[0] if self.cache_capacity else 0
        if self.layer_buffer:
            cache_line = (f"  one layer's FFN rows, reused by every layer (no reuse across "
                          f"tokens):  {format_bytes(self.layer_buffer)}")
        else:
            cache_line = (f"  neuron cache: {cap} of {self.d_ff} neurons per layer "
                          f"({100 * cap / max(self.d_ff, 1):.1f}%):        "
                          f"{format_bytes(self.cache_bytes)}")
        lines = [
            f"  resident tensors (embeddings, attention, norms): {format_bytes(self.resident)}",
            f"  predictors:                                      {format_bytes(self.predictors)}",
            f"  KV cache (float32, max context):                 {format_bytes(self.kv_cache)}",
            f"  runtime overhead (interpreter, libraries):       {format_bytes(self.overhead)}",
            cache_line,
            f"  total: {format_bytes(self.total)}"
            + (f" of a {format_bytes(self.budget)} budget" if self.budget else " (no budget set)"),
        ]
        return "\n".join(lines)


def plan_memory(args: ModelArgs, manifest: dict, runtime: RuntimeConfig,
                predictor_bytes: int = 0, resident_bytes: Optional[int] = None) -> MemoryPlan:
    """Split `runtime.dram_budget` between the resident part and the neuron cache.

    Raises ValueError naming the smallest workable budget when even the resident part does not fit.
    """
    rec = int(manifest["bundle"]["record_bytes"])
    if resident_bytes is None:
        resident_bytes = int(manifest["checksums"][manifest["files"]["dense"]]["bytes"])
    ctx = min(runtime.max_context, args.max_position_embeddings)
    kv = 2 * args.num_hidden_layers * ctx * args.kv_dim * 4
    L, f = args.num_hidden_layers, args.intermediate_size
    overhead = RUNTIME_OVERHEAD_BYTES
    if runtime.eviction == "frequency" and runtime.reuse:
        overhead += L * f * 9  # FrequencyPolicy: held flag + float64 score per neuron
    fixed = resident_bytes + predictor_bytes + kv + overhead
    if not runtime.reuse:  # nothing is kept across tokens: one layer's rows at a time
        if runtime.dram_budget is not None and fixed + f * rec > runtime.dram_budget:
            raise ValueError(
                f"dram_budget {format_bytes(runtime.dram_budget)} is too small: without reuse the "
                f"runtime needs the resident part ({format_bytes(fixed)}) plus one layer's FFN "
                f"({format_bytes(f * rec)}). Give at least {format_bytes(fixed + f * rec)}.")
        return MemoryPlan(runtime.dram_budget, resident_bytes, predictor_bytes, kv,
                          overhead, [0] * L, rec, f, layer_buffer=f * rec)
    if runtime.dram_budget is None:
        cap = f
    else:
        spare = runtime.dram_budget - fixed
        cap = min(f, max(spare, 0) // (L * rec))
        minimum = max(16, f // 100)  # below 1% of a layer the model cannot run a token
        if cap < minimum:
            need = fixed + minimum * L * rec
            raise ValueError(
                f"dram_budget {format_bytes(runtime.dram_budget)} is too small: the resident part "
                f"alone needs {format_bytes(fixed)} (tensors {format_bytes(resident_bytes)}, KV "
                f"cache {format_bytes(kv)} for {ctx} tokens, predictors "
                f"{format_bytes(predictor_bytes)}, runtime {format_bytes(overhead)}). "
                f"Give at least {format_bytes(need)}, or lower --max-context.")
    return MemoryPlan(runtime.dram_budget, resident_bytes, predictor_bytes, kv,
                      overhead, [int(cap)] * L, rec, f)


@dataclass
class TokenStats:
    """What one forward call cost in the FFN streaming path (summed over layers)."""

    io_ns: int = 0            # reading neurons from flash
    mm_ns: int = 0            # memory management: window, eviction/compaction, bookkeeping
    predict_ns: int = 0       # running the predictors
    bytes_read: int = 0
    reads: int = 0
    loaded: int = 0           # neurons read from flash
    evicted: int = 0
    needed: int = 0           # neurons the tokens needed (summed over layers)
    hits: int = 0             # of those, already cached
    cached: int = 0           # neurons held after the call (summed over layers)
    direct: bool = True
    per_layer_loaded: list = field(default_factory=list)

    _SUMMED = ("io_ns", "mm_ns", "predict_ns", "bytes_read", "reads", "loaded", "evicted",
               "needed", "hits")

    def add(self, other: "TokenStats") -> "TokenStats":
        """Accumulate `other` (a later call) into self; `cached` is the latest count."""
        for k in self._SUMMED:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.cached, self.direct = other.cached, self.direct and other.direct
        return self

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_layer_loaded"}
        d["hit_rate"] = self.hits / self.needed if self.needed else 1.0
        d["io_gbps"] = self.bytes_read / self.io_ns if self.io_ns else 0.0
        return d


class SparseFFN:
    """FFN rows streamed from flash through a per-layer neuron cache."""

    def __init__(self, directory: Path, manifest: dict, args: ModelArgs, dense: dict,
                 runtime: RuntimeConfig, predictors=None, plan: Optional[MemoryPlan] = None):
        from .bundles import BundleReader, ReaderParams
        from .cache import NeuronCache

        self.args, self.runtime, self.predictors = args, runtime, predictors
        if runtime.selection == "predictor" and predictors is None:
            raise ValueError("selection='predictor' needs trained predictors")
        path = Path(directory) / manifest["files"]["bundles"]
        self.reader = BundleReader(str(path), ReaderParams(
            engine=runtime.io_engine, queue_depth=runtime.queue_depth,
            use_direct_io=runtime.use_direct_io))
        self.plan = plan or plan_memory(args, manifest, runtime)
        # What stays cached: both policies answer update(layer, ids, capacity) -> (load, evict).
        self.policy = (FrequencyPolicy(args.num_hidden_layers, args.intermediate_size)
                       if runtime.eviction == "frequency" else
                       SlidingWindow(args.num_hidden_layers, args.intermediate_size, runtime.window))
        self.bias = [dense.get(f"layers.{i}.ffn_up_bias") for i in range(args.num_hidden_layers)]
        self.cache = self.layer_rows = None
        if runtime.reuse:
            self.cache = NeuronCache(self.reader, self.plan.cache_capacity)
            for i, b in enumerate(self.bias):
                if b is not None:
                    self.cache.set_layer_bias(i, b)
        else:  # the paper's rows without a window: one layer's rows, refilled for every layer
            from .bundles import aligned_empty

            self.layer_rows = aligned_empty((args.intermediate_size, self.reader.record_elems),
                                            self.reader.numpy_dtype)
            self._prev_loaded = [0] * args.num_hidden_layers
        self.oracle = _Oracle(path, args, self.bias, runtime) if runtime.selection == "oracle" else None
        self.resident_path = Path(directory) / manifest["files"]["dense"]
        self._resident_buf = None
        self.tok = TokenStats()
        self.total = TokenStats()

    # ------------------------------------------------------------------ selection
    def _select(self, layer: int, x: np.ndarray) -> np.ndarray:
        cap = self.cache.capacity(layer) if self.cache is not None else self.args.intermediate_size
        if self.runtime.selection == "all":
            return np.arange(self.args.intermediate_size, dtype=np.int32)
        if self.runtime.selection == "oracle":
            return self.oracle.active(layer, x, cap)
        return self.predictors.layers[layer].predict(x, self.runtime.predictor_threshold, cap)

    def rows(self, layer: int, x: np.ndarray):
        """(rows, up_bias, row_select) to compute layer `layer`'s FFN for inputs x [T, d]."""
        st, cache = self.tok, self.cache
        t0 = time.perf_counter_ns()
        ids = self._select(layer, x)
        t1 = time.perf_counter_ns()
        st.predict_ns += t1 - t0
        if cache is None:
            return self._rows_streamed(layer, ids, t1)
        load, evict = self.policy.update(layer, ids, cache.capacity(layer))
        hits = len(ids) - len(load)
        before = cache.stats()
        if len(evict):
            cache.evict(layer, evict)
        t2 = time.perf_counter_ns()
        if len(load):
            if self.runtime.bundled:
                cache.insert(layer, load)
            else:
                cache.insert_parts(layer, load)
        t3 = time.perf_counter_ns()
        after = cache.stats()
        r0, r1 = before["reads"], after["reads"]
        st.io_ns += t3 - t2
        st.mm_ns += t2 - t1
        st.bytes_read += r1["bytes_read"] - r0["bytes_read"]
        st.reads += r1["reads_issued"] - r0["reads_issued"]
        st.direct = st.direct and bool(r1["direct"])
        st.loaded += len(load)
        st.evicted += len(evict)
        st.needed += len(ids)
        st.hits += hits
        st.cached += cache.n_used(layer)
        st.per_layer_loaded.append(len(load))
        t4 = time.perf_counter_ns()
        select = None
        if self.runtime.compute == "predicted" and len(ids) < cache.n_used(layer):
            inverse = np.full(self.args.intermediate_size, -1, np.int32)
            cached = cache.ids(layer)
            inverse[cached] = np.arange(len(cached), dtype=np.int32)
            select = inverse[ids]
        bias = cache.bias(layer) if self.bias[layer] is not None else None
        st.mm_ns += time.perf_counter_ns() - t4
        return cache.rows(layer), bias, select

    def _rows_streamed(self, layer: int, ids: np.ndarray, t1: int):
        """No reuse across tokens (naive, hybrid, +predictor rows): read this token's neurons
        into the shared layer buffer; up, gate and down separately without bundling."""
        st, n = self.tok, len(ids)
        rows = self.layer_rows[:n]
        if n:
            if self.runtime.bundled:
                self.reader.read(layer, ids, rows)
            else:
                self.reader.read_parts(layer, ids, list(range(len(self.reader.parts))), rows)
            r = self.reader.last_stats
            st.bytes_read += r.bytes_read
            st.reads += r.reads_issued
            st.direct = st.direct and bool(r.direct)
        t2 = time.perf_counter_ns()
        st.io_ns += t2 - t1
        st.loaded += n
        st.needed += n
        st.evicted += self._prev_loaded[layer]
        self._prev_loaded[layer] = n
        bias = self.bias[layer][ids] if self.bias[layer] is not None and n else None
        st.mm_ns += time.perf_counter_ns() - t2
        return rows, bias, None

    # ------------------------------------------------------------------ statistics
    def start_token(self) -> None:
        self.tok = TokenStats()
        if self.runtime.reread_resident:
            self._reread_resident()

    def _reread_resident(self) -> None:
        """The "naive" row: the resident tensors come from flash again for every token."""
        import os

        from .bundles import aligned_empty

        chunk = 1 << 22
        if self._resident_buf is None:
            self._resident_buf = aligned_empty((chunk,), np.uint8)
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if self.runtime.use_direct_io else 0)
        try:
            fd = os.open(self.resident_path, flags)
        except OSError:  # filesystem refuses O_DIRECT: buffered (and says so in the stats)
            fd, self.tok.direct = os.open(self.resident_path, os.O_RDONLY), False
        t0 = time.perf_counter_ns()
        try:
            size, off = os.fstat(fd).st_size, 0
            while off < size:
                got = os.preadv(fd, [memoryview(self._resident_buf)], off)
                if got <= 0:
                    break
                off += got
                self.tok.reads += 1
        finally:
            os.close(fd)
        self.tok.io_ns += time.perf_counter_ns() - t0
        self.tok.bytes_read += off

    def end_token(self) -> TokenStats:
        self.total.add(self.tok)
        return self.tok

    def reset(self) -> None:
        """Forget the window and empty the cache (a new conversation)."""
        self.policy.reset()
        if self.cache is None:
            self._prev_loaded = [0] * self.args.num_hidden_layers
            return
        for layer in range(self.args.num_hidden_layers):
            self.cache.clear(layer)

    @property
    def nbytes(self) -> int:
        held = self.cache.nbytes() if self.cache is not None else self.layer_rows.nbytes
        if isinstance(self.policy, FrequencyPolicy):  # the window's counts are not counted
            held += self.policy.nbytes
        return held + (self.predictors.nbytes if self.predictors else 0)


class _Oracle:
    """The true active set, from every neuron's activation (keeps the whole FFN in DRAM: a
    measuring instrument for tests and ablations, not a way to save memory)."""

    def __init__(self, path: Path, args: ModelArgs, bias: list, runtime: RuntimeConfig):
        from .model import ResidentFFN

        self.args, self.bias, self.runtime = args, bias, runtime
        self.full = ResidentFFN(str(path), args, {f"layers.{i}.ffn_up_bias": b
                                                  for i, b in enumerate(bias) if b is not None},
                                runtime.replace(sparse=False, dram_budget=None))

    def activations(self, layer: int, x: np.ndarray) -> np.ndarray:
        a = self.args
        rows = self.full.rows_by_layer[layer]
        h = np.empty((x.shape[0], rows.shape[0]), np.float32)
        off = a.ffn_part_offsets
        kernels.ffn_rows(x, rows, a.hidden_size, up_off=off["up"], down_off=off["down"],
                         gate_off=off.get("gate", -1), activation=a.hidden_act,
                         act_param=a.act_param, up_bias=self.bias[layer], act_out=h)
        return h

    def active(self, layer: int, x: np.ndarray, cap: int) -> np.ndarray:
        h = np.abs(self.activations(layer, x))
        if self.args.hidden_act in ("relu", "fatrelu"):
            mask = (h > 0).any(axis=0)
        else:  # per token, the largest (1 - oracle_sparsity) fraction of |activation|
            keep = max(1, int(round(h.shape[1] * (1.0 - self.runtime.oracle_sparsity))))
            idx = np.argpartition(-h, keep - 1, axis=1)[:, :keep]
            mask = np.zeros(h.shape[1], bool)
            mask[idx.ravel()] = True
        ids = np.flatnonzero(mask).astype(np.int32)
        if ids.size > cap:
            raise ValueError(f"layer {layer}: the true active set has {ids.size} neurons, more "
                             f"than the cache's {cap}; raise dram_budget")
        return ids

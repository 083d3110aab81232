"""The FFN providers the transformer calls for every layer: the FFN kernel over bundle
records (`FfnOnRows`), every neuron resident in DRAM (`ResidentFFN`, the dense model) and the
neurons streamed from flash through the neuron cache (`SparseFFN`).

`SparseFFN.forward(layer, x)` is called by the model for every layer of every token. Two ways:

- The paper's (``eviction="window"`` or ``"frequency"``): the selection (the low-rank
  predictor, or the oracle) names the neurons the token needs, the policy updates the window,
  the native cache reads the newcomers from the bundle file into the rows of the neurons
  leaving; the FFN runs on the cache rows.
- Ranking under a budget (``eviction="rank"``, the default for SwiGLU/GeGLU models): the cache
  stays full. The FFN runs on every cached neuron, which gives their exact activations; the
  uncached neurons are scored (the 4-bit sketch by default); the best of them replace the
  cached neurons that matter least for this token, at most `read_limit` of the layer per token;
  the newcomers are read and added to this token's FFN.

With ``RuntimeConfig.overlap`` the reads run on a worker thread while the FFN computes
(issue 16). The memory plan that sizes the caches is in loader.py.
"""
from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import kernels, loader
from ._bookkeeping import CacheDriver
from .config import ModelArgs, RuntimeConfig, coalesce_gap_for
from .dtypes import RecordLayout
from .errors import FlashIOError
from .loader import READ_AHEAD_SLOTS, MemoryPlan, plan_memory, read_ahead_records
from .window import FrequencyPolicy, SlidingWindow, rank_swaps

class FfnOnRows:
    """The FFN kernel over bundle records of one flash directory: their format and part
    offsets, and (the codes layout) each layer's resident down scales. Shared by the dense
    and the sparse FFN providers."""

    def __init__(self, args: ModelArgs, layout: RecordLayout, dense: dict, threads: int = 0):
        self.args, self.layout, self.threads = args, layout, threads  # 0: every core
        self.down_scales = [dense.get(f"layers.{i}.ffn_down_scales") if layout.codes else None
                            for i in range(args.num_hidden_layers)]
        if layout.codes and any(s is None for s in self.down_scales):
            raise ValueError("the bundle's down parts hold codes but dense.safetensors has no "
                             "layers.N.ffn_down_scales; re-run `flashinfer-py convert`")
        off = layout.offsets
        self._offs = (off["up"], off.get("gate", -1), off["down"])

    def __call__(self, layer: int, x: np.ndarray, rows: np.ndarray, up_bias=None,
                 row_select=None, act_out=None, row_ids=None) -> np.ndarray:
        """The FFN of inputs x [T, d] over records `rows` (all, or those in row_select) of
        `layer`; `row_ids` (int32, one per row) name their neurons (default: row i is neuron i)."""
        a = self.args
        up, gate, down = self._offs
        scales = self.down_scales[layer]
        ids = None if scales is None or row_ids is None else np.ascontiguousarray(row_ids, np.int32)
        return kernels.ffn_rows(x, rows, a.hidden_size, up_off=up, down_off=down, gate_off=gate,
                                activation=a.hidden_act, act_param=a.act_param, up_bias=up_bias,
                                row_select=row_select, act_out=act_out, fmt=self.layout.fmt.name,
                                down_scales=scales, row_ids=ids, threads=self.threads)

    def part_f32(self, layer: int, rows: np.ndarray, part: str, ids=None) -> np.ndarray:
        """float32 [n, d] values of one part of records `rows` of `layer` (neuron `ids`)."""
        return self.layout.part_f32(rows, part, self.down_scales[layer], ids)


class ResidentFFN:
    """Every neuron resident in DRAM: the dense model. Rows are read once from the bundle file
    (direct I/O) and kept packed, one aligned matrix per layer: a record's parts rounded up to
    64 bytes, without its padding to 4 KiB pages (as the neuron cache packs them). For a 4-bit
    SmolLM2 that is 1024 of 4096 bytes a neuron: a quarter of the DRAM, and the FFN kernel
    streams its rows back to back instead of skipping 3 KiB after each."""

    def __init__(self, bundle_path: str, args: ModelArgs, dense: dict, runtime: RuntimeConfig,
                 two_products: bool = True):
        from .bundles import BundleReader, ReaderParams, aligned_empty

        reader = BundleReader(bundle_path, ReaderParams(engine=runtime.io_engine,
                                                        queue_depth=runtime.queue_depth,
                                                        use_direct_io=runtime.use_direct_io,
                                                        read_timeout_ms=runtime.read_timeout_ms))
        self.kernel = FfnOnRows(args, reader.layout, dense, runtime.threads)
        self.rows_by_layer = []
        f = args.intermediate_size
        eb = np.dtype(reader.numpy_dtype).itemsize
        packed = min(reader.record_elems, -(-reader.layout.payload_bytes // 64) * 64 // eb)
        # whole records are read into a staging buffer of at most ~64 MiB, then packed
        chunk = max(1, min(f, (64 << 20) // (reader.record_elems * eb)))
        staging = aligned_empty((chunk, reader.record_elems), reader.numpy_dtype)
        self.bias = [dense.get(f"layers.{i}.ffn_up_bias") for i in range(args.num_hidden_layers)]
        self.args = args
        self._packed = (packed, reader.numpy_dtype)
        # (up/gate rows, down_proj, gated) of each layer run as two products; records dropped
        self._two: list = [None] * args.num_hidden_layers
        records = []
        for layer in range(args.num_hidden_layers):
            rows = aligned_empty((f, packed), reader.numpy_dtype)
            for i in range(0, f, chunk):
                ids = np.arange(i, min(f, i + chunk), dtype=np.int32)
                reader.read(layer, ids, staging[:len(ids)])
                rows[i:i + len(ids)] = staging[:len(ids), :packed]
            if two_products and self._two_products(layer):
                self._two[layer] = self._split(layer, rows)
                rows = None
            records.append(rows)
        self.rows_by_layer = _LayerRecords(self, records)
        self.io_stats = reader.stats()
        self.is_direct = reader.is_direct

    # A dense layer runs as two products (kernels.ffn_dense: the up and gate rows, then
    # down_proj) instead of the fused per-neuron kernel when it can, so both stream at the
    # matrix kernels' speed: the fused kernel's down part adds each neuron's column into the
    # output, a load, a multiply-add and a store per value, and its 4-bit unpacking holds a
    # core below memory speed (benchmarks/RESULTS.md section 13). It can where down_proj's
    # rows can be made exactly from the records: float records (the down columns transposed)
    # and block records holding a GGUF's down_proj (the codes layout; 4-bit ones interleaved
    # where the CPU has the kernels). Our own block quantization of float weights (down columns
    # in blocks along d_model) keeps the fused kernel, and so do ReLU FFNs (their fused kernel
    # skips the down column of every zero activation) and FFNs with an up bias. Same weights;
    # a block format quantizes h to 16 bits per block of 32 for the down product, as x is for
    # every product; float records sum in another order.
    def _two_products(self, layer: int) -> bool:
        lay, a = self.kernel.layout, self.args
        return (a.hidden_act not in ("relu", "fatrelu") and self.bias[layer] is None
                and (not lay.fmt.quantized or (lay.codes and a.intermediate_size % 32 == 0)))

    def _parts(self, rows: np.ndarray) -> dict:
        lay = self.kernel.layout
        return {p: lay.part_view(rows, p) for p in lay.parts}

    def _split(self, layer: int, rows: np.ndarray) -> tuple:
        from .convert import join_down_blocks

        a, lay = self.args, self.kernel.layout
        fmt, f, d = lay.fmt.name, a.intermediate_size, a.hidden_size
        part = self._parts(rows)
        gated = "gate" in part
        ug = np.ascontiguousarray(np.concatenate([part["up"], part["gate"]]) if gated
                                  else part["up"])
        if lay.fmt.quantized:
            down = join_down_blocks(part["down"], self.kernel.down_scales[layer], fmt, d, f)
        else:
            down = np.ascontiguousarray(part["down"].T)
        if kernels.interleaves(fmt):
            return (kernels.interleave(ug, fmt, d, consume=True),
                    kernels.interleave(down, fmt, f, consume=True), gated)
        return ug, down, gated

    def _records(self, layer: int) -> np.ndarray:
        """A two-product layer's packed records, made again (training, sketches, tests)."""
        from .bundles import aligned_empty
        from .convert import split_down_blocks

        a, lay = self.args, self.kernel.layout
        f, d = a.intermediate_size, a.hidden_size
        ug, down, gated = self._two[layer]
        packed, dtype = self._packed
        rows = aligned_empty((f, packed), dtype)
        rows[:] = 0
        part = self._parts(rows)
        both = ug.take(np.arange(ug.rows)) if isinstance(ug, kernels.Interleaved) else ug
        part["up"][:] = both[:f]
        if gated:
            part["gate"][:] = both[f:]
        if isinstance(down, kernels.Interleaved):
            down = down.take(np.arange(down.rows))
        if lay.fmt.quantized:
            codes, _ = split_down_blocks(down, lay.fmt, d, f)
            part["down"][:] = codes[:, :part["down"].shape[1]]
        else:
            part["down"][:] = down.T
        return rows

    def forward(self, layer: int, x: np.ndarray, act_out=None) -> np.ndarray:
        if self._two[layer] is not None:
            ug, down, gated = self._two[layer]
            a = self.args
            return kernels.ffn_dense(x, ug, down, gated, a.hidden_act, a.act_param,
                                     fmt=self.kernel.layout.fmt.name, act_out=act_out,
                                     threads=self.kernel.threads)
        return self.kernel(layer, x, self.rows_by_layer[layer], self.bias[layer], act_out=act_out)

    def part_f32(self, layer: int, part: str) -> np.ndarray:
        """float32 [d_ff, d] values of one part ("up", "gate", "down") of every neuron."""
        return self.kernel.part_f32(layer, self.rows_by_layer[layer], part)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes if x is None else x[0].nbytes + x[1].nbytes
                   for r, x in zip(self.rows_by_layer._held, self._two))


class _LayerRecords(Sequence):
    """ResidentFFN.rows_by_layer: each layer's packed records [d_ff, packed]; those of a layer
    run as two products are made again when asked for (one layer at a time: a one-off reader
    such as predictor training or the sketch builder pays for one layer's copy, not the
    model's), read-only: the model computes from its own matrices, so a write to such a copy
    would change nothing (it raises instead)."""

    def __init__(self, owner: "ResidentFFN", held: list):
        self._owner, self._held = owner, held

    def __len__(self) -> int:
        return len(self._held)

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(len(self)))]
        rows = self._held[layer]
        if rows is None:
            rows = self._owner._records(layer)
            rows.flags.writeable = False
        return rows


# overlap="ahead": the share of a guessed layer's likely loads read ahead (the most confident
# first); the rest waits for the layer's own selection. Measured on SmolLM2 (benchmarks/
# RESULTS.md section 14).
AHEAD_SHARE = 0.25
# overlap="async": a layer loads only what was read ahead for it (Deja Vu's asynchronous
# look-ahead), so the guess takes this share of what the layer may load: all of it.
ASYNC_SHARE = 1.0
REST_SLOT = 2  # the ReadAhead slot of what a layer's own selection lacks


@dataclass
class TokenStats:
    """What one forward call cost in the FFN streaming path (summed over layers)."""

    io_ns: int = 0            # reading neurons from flash (on the caller's thread or ahead)
    io_wait_ns: int = 0       # of the token's wall time, waiting for reads (= io_ns unless
                              # reads overlap compute: RuntimeConfig.overlap)
    mm_ns: int = 0            # memory management: window, eviction/compaction, bookkeeping
    predict_ns: int = 0       # running the predictors
    bytes_read: int = 0
    reads: int = 0
    loaded: int = 0           # neurons read from flash
    evicted: int = 0
    needed: int = 0           # neurons the tokens needed (summed over layers)
    hits: int = 0             # of those, already cached
    cached: int = 0           # neurons held after the call (summed over layers)
    ahead_bytes: int = 0      # of bytes_read, read ahead by the worker (overlap)
    ahead_used: int = 0       # neurons read ahead that the cache took (the rest was wasted)
    dropped: int = 0          # overlap "async": neurons a layer's own selection would have
                              # loaded that its guess lacked (computed without them; counted
                              # in `needed`, not in `hits`)
    direct: bool = True
    per_layer_loaded: list = field(default_factory=list)

    _SUMMED = ("io_ns", "io_wait_ns", "mm_ns", "predict_ns", "bytes_read", "reads", "loaded",
               "evicted", "needed", "hits", "ahead_bytes", "ahead_used", "dropped")

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

    # The cache may keep FFNs without a gate split (their down parts in matrices of their own,
    # as the plan says: MemoryPlan.cache_split); a device backend mirrors whole rows.
    SPLIT_CACHE = True

    def __init__(self, directory: Path, manifest: dict, args: ModelArgs, dense: dict,
                 runtime: RuntimeConfig, predictors=None, plan: Optional[MemoryPlan] = None):
        from .bundles import BundleReader, ReaderParams
        from .cache import NeuronCache

        self.args, self.runtime, self.predictors = args, runtime, predictors
        self.dtype = manifest["dtype"]
        if runtime.selection in ("predictor", "sketch") and predictors is None:
            raise ValueError(f"selection={runtime.selection!r} needs `flashinfer-py "
                             "train-predictors` to have run on this directory")
        path = Path(directory) / manifest["files"]["bundles"]
        self.reader = BundleReader(str(path), ReaderParams(
            engine=runtime.io_engine, queue_depth=runtime.queue_depth,
            coalesce_gap_bytes=(coalesce_gap_for(manifest["bundle"]["record_bytes"])
                                if runtime.coalesce_gap_bytes is None
                                else runtime.coalesce_gap_bytes),
            use_direct_io=runtime.use_direct_io, read_timeout_ms=runtime.read_timeout_ms,
            max_scratch_bytes=loader.READER_SCRATCH_BYTES))  # counted per reader by the plan
        self.kernel = FfnOnRows(args, self.reader.layout, dense, runtime.threads)
        self.plan = plan or plan_memory(args, manifest, runtime)
        self.rank = runtime.eviction == "rank"
        # What stays cached: the window policies answer update(layer, ids, capacity) ->
        # (load, evict); "rank" decides per token in _forward_rank.
        self.policy = (None if self.rank else
                       FrequencyPolicy(args.num_hidden_layers, args.intermediate_size)
                       if runtime.eviction == "frequency" else
                       SlidingWindow(args.num_hidden_layers, args.intermediate_size, runtime.window))
        self.bias = [dense.get(f"layers.{i}.ffn_up_bias") for i in range(args.num_hidden_layers)]
        self.cache = self.layer_rows = self.driver = None
        if runtime.reuse:
            self.cache = NeuronCache(self.reader, self.plan.cache_capacity, packed=True,
                                     split=self.plan.cache_split and self.SPLIT_CACHE)
            for i, b in enumerate(self.bias):
                if b is not None:
                    self.cache.set_layer_bias(i, b)
            # the per-layer calls into the cache, compiled, counting into the token's stats
            self.driver = CacheDriver(self.cache, self.policy, bundled=runtime.bundled)
        else:  # the paper's rows without a window: one layer's rows, refilled for every layer
            from .bundles import aligned_empty

            self.layer_rows = aligned_empty((args.intermediate_size, self.reader.record_elems),
                                            self.reader.numpy_dtype)
            self._prev_loaded = [0] * args.num_hidden_layers
        self.oracle = (_Oracle(path, args, dense, self.bias, runtime)
                       if runtime.selection == "oracle" else None)
        # Reads overlapping compute (issue 16): a worker reads into two staging slots, slot 0
        # ahead of the layer (from its attention input), slot 1 what the layer's own selection
        # lacks, while the caller runs attention and the FFN on the rows already cached.
        self.ahead = None
        self._lost: Optional[str] = None  # set when a failed swap left a layer uncovered
        if runtime.overlap != "off":
            if self.cache is None or not runtime.bundled:
                raise ValueError(f"overlap={runtime.overlap!r} needs the neuron cache and "
                                 "bundled reads (reuse=True, bundled=True); the paper's rows "
                                 "without them have nothing to overlap with")
            from .bundles import ReadAhead

            # slots 0 and 1: guesses for even and odd layers; REST_SLOT: what a layer's own
            # selection lacks (counted in the memory plan's overhead)
            self.ahead = ReadAhead(path, self.reader.params,
                                   max_records=read_ahead_records(args, runtime),
                                   n_slots=READ_AHEAD_SLOTS)
            self.cache.set_source(self.ahead)
            self._ahead: dict = {}  # layer -> (slot, ids) of the guesses in flight
            self._is_ahead = np.zeros((2, args.intermediate_size), bool)
        self.resident_path = Path(directory) / manifest["files"]["dense"]
        self._resident_buf = None
        self.sketch = None
        self.load_stats = TokenStats()  # the cache's first fill (at load, not per token)
        if self.rank:
            self._init_rank(Path(directory))
        self.tok = TokenStats()
        self.total = TokenStats()

    def _init_rank(self, directory: Path) -> None:
        """Fill every layer's cache with its hottest neurons (calibration), put the others'
        sketches in the second tier, size the per-token buffers."""
        a, cal = self.args, getattr(self.predictors, "calibration", None)
        f, L = a.intermediate_size, a.num_hidden_layers
        caps = self.plan.cache_capacity
        self.max_loads = max(1, int(np.ceil(self.runtime.read_limit * f)))
        self._h = np.empty(self.runtime.prefill_chunk * max(caps), np.float32)  # [T, n] views
        if cal is not None:
            self.down_norm = cal.down_norm
        elif self.oracle is not None:
            from .sketch import down_norms

            self.down_norm = down_norms(self.kernel, self.oracle.full.rows_by_layer)
        else:
            self.down_norm = None
        t0 = time.perf_counter_ns()
        if cal is not None:
            for layer in range(L):
                hot = np.sort(np.argsort(-cal.hot[layer], kind="stable")[:caps[layer]])
                self.cache.insert(layer, hot.astype(np.int64))
        io = self.cache.stats()["reads"]
        self.load_stats.io_ns = time.perf_counter_ns() - t0
        self.load_stats.bytes_read = io["bytes_read"]
        self.load_stats.loaded = sum(self.cache.n_used(i) for i in range(L))
        if self.runtime.selection == "sketch":
            from .sketch import SketchStore, check_sketch

            meta = self.predictors.sketch
            path = directory / meta["file"]
            check_sketch(path, a, meta)
            self.sketch = SketchStore(path, a, [self.cache.ids(i) for i in range(L)],
                                      cal.down_norm, self.kernel.layout, self.runtime.threads,
                                      kind=self.runtime.sketch, up_mean=cal.up_mean)

    # ------------------------------------------------------------------ selection
    def _select(self, layer: int, x: np.ndarray) -> np.ndarray:
        cap = self.cache.capacity(layer) if self.cache is not None else self.args.intermediate_size
        if self.runtime.selection == "all":
            return np.arange(self.args.intermediate_size, dtype=np.int32)
        if self.runtime.selection == "oracle":
            return self.oracle.active(layer, x, cap)
        return self.predictors.layers[layer].predict(x, self.runtime.predictor_threshold, cap)

    def forward(self, layer: int, x: np.ndarray, act_out=None) -> np.ndarray:
        """Layer `layer`'s FFN for inputs x [T, d] (see the module docstring)."""
        if act_out is not None:
            raise ValueError("activations are recorded with the dense model: load(dir) "
                             "without sparse options")
        if self.rank:
            return self._forward_rank(layer, x)
        if self.cache is not None:
            return self._forward_window(layer, x)
        rows, bias, select, ids = self.rows(layer, x)
        return self.kernel(layer, x, rows, bias, select, row_ids=ids)

    # ------------------------------------------------------------------ overlap (issue 16)
    @property
    def wants_prefetch(self) -> bool:
        """Whether the transformer should call `prefetch` before each layer's attention."""
        return self.ahead is not None and self.runtime.overlap in ("ahead", "async")

    @property
    def is_async(self) -> bool:
        """overlap "async": a layer loads only what its guess read ahead (Deja Vu's
        asynchronous look-ahead); no read waits for the layer's own input."""
        return self.ahead is not None and self.runtime.overlap == "async"

    def _async_for(self, t: int) -> bool:
        """Whether a forward call of t tokens selects from the guess alone: decode steps only.
        A prompt chunk may load t tokens' worth, more than a read-ahead slot holds (one
        token's, read_ahead_records), so prompts run as "ahead" does: exact, once."""
        return self.is_async and t == 1

    def _guessed(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` the guess in flight for `layer` is reading (a bool per id)."""
        if layer not in self._ahead:
            return np.zeros(ids.size, bool)
        return self._is_ahead[self._ahead[layer][0]][ids]

    def _count_dropped(self, n: int) -> None:
        """overlap "async": n neurons a layer's own selection wanted and its guess lacked.
        They were needed, not computed: `needed` counts them, so the hit rate sees them."""
        self.tok.dropped += n
        self.tok.needed += n

    def prefetch(self, layer: int, x: np.ndarray) -> None:
        """Start reading, on the worker, part of what layer `layer` will probably load: called
        with the layer's attention input (normalized as its FFN input will be) before the
        attention runs, unless the previous layer already guessed for it (see _guess)."""
        if not self.wants_prefetch or layer in self._ahead:
            return
        t0 = time.perf_counter_ns()
        self._guess(layer, x)
        self.tok.predict_ns += time.perf_counter_ns() - t0

    def _guess(self, layer: int, x: np.ndarray) -> None:
        """Read ahead the neurons `layer` is most likely to load, judged from x (its own
        attention input, or the previous layer's FFN input): under eviction "rank" the
        uncached neurons whose sketch scores best, otherwise the predicted ones the cache
        lacks; the most confident AHEAD_SHARE of them, so that a wrong guess costs few reads.
        What the layer loads is still decided from its true FFN input: never quality.
        Under overlap "async" the guess is all of it (ASYNC_SHARE), and the layer loads only
        what the guess read: its quality cost is measured (benchmarks/RESULTS.md section 14)."""
        share = ASYNC_SHARE if self._async_for(x.shape[0]) else AHEAD_SHARE
        if self.rank:
            cand_ids, cand_s = self._candidates(layer, x)
            want = self._top(cand_ids, cand_s, int(self._rank_want(layer, x.shape[0])
                                                   * share), ordered=True)
        elif (self.runtime.selection == "predictor"
              and getattr(self.predictors, "lookahead", None) is None):
            # the predicted neurons the cache lacks, the most confident first: reading all of
            # them read 17% more bytes a token and was 14% slower on SmolLM2 (RESULTS 14)
            ids, s = self.predictors.layers[layer].predict_scored(  # as _select predicts
                x, self.runtime.predictor_threshold, self.cache.capacity(layer))
            if ids.size:
                ids = ids[self.driver.rows_of(layer, ids) < 0]
            want = self._top(ids, s[ids], int(np.ceil(ids.size * share)), ordered=True)
        else:  # the oracle, every neuron, or a benchmark's own look-ahead: all of it
            want = np.asarray(self._select_ahead(layer, x), np.int64)
            if want.size:
                want = want[self.driver.rows_of(layer, want) < 0]
        want = np.sort(want[:self.ahead.max_records])
        slot = layer % 2
        self._finish_ahead(slot)  # an older guess nobody used: its reads are counted, wasted
        self.ahead.start(slot, layer, want)
        self._ahead[layer] = (slot, want)
        self._is_ahead[slot][want] = True

    def _select_ahead(self, layer: int, x: np.ndarray) -> np.ndarray:
        la = getattr(self.predictors, "lookahead", None)  # a benchmark's own look-ahead
        if la is not None:
            return la[layer].predict(x, self.runtime.predictor_threshold,
                                     self.cache.capacity(layer))
        return self._select(layer, x)

    def _finish_ahead(self, slot: int) -> None:
        """Wait for an ahead slot and account for it."""
        for layer, (sl, ids) in list(self._ahead.items()):
            if sl != slot:
                continue
            del self._ahead[layer]
            self._is_ahead[slot][ids] = False
            t0 = time.perf_counter_ns()
            try:
                rs = self.ahead.wait(slot)
            finally:
                self.tok.io_wait_ns += time.perf_counter_ns() - t0
            self._count_ahead(rs, slot)

    def _count_ahead(self, rs, slot: int) -> None:
        st = self.tok
        st.io_ns += self.ahead.busy_ns(slot)
        st.bytes_read += rs.bytes_read
        st.ahead_bytes += rs.bytes_read
        st.reads += rs.reads_issued
        if rs.reads_issued:
            st.direct = st.direct and bool(rs.direct)

    def _read_rest(self, layer: int, load: np.ndarray, x: np.ndarray) -> bool:
        """Start the rest slot on the neurons of `load` no ahead slot is reading for this
        layer; then (overlap "ahead") guess for the next layer from x, so the disk does not
        idle between this layer's last read and the next layer's attention."""
        if self.ahead is None:  # overlap "off": the cache reads them when they land
            return False
        if layer in self._ahead:
            load = load[~self._is_ahead[self._ahead[layer][0]][load]]
        load = load[:self.ahead.max_records]
        if load.size:
            self.ahead.start(REST_SLOT, layer, load)
        nxt = layer + 1
        if self.wants_prefetch and nxt < self.args.num_hidden_layers and nxt not in self._ahead:
            self._guess(nxt, x)
        return bool(load.size)

    def _land(self, layer: int, rest: bool, apply) -> None:
        """Wait for this layer's reads, let `apply` put them in the cache, free the slots."""
        if self.ahead is None:
            apply()
            return
        st = self.tok
        mine = self._ahead.get(layer, (None,))[0]
        try:
            t0 = time.perf_counter_ns()
            rs = self.ahead.wait(REST_SLOT) if rest else None
            st.io_wait_ns += time.perf_counter_ns() - t0
            if rs is not None:
                self._count_ahead(rs, REST_SLOT)
            if mine is not None:
                self._finish_ahead(mine)
            apply()
        finally:
            self.ahead.release(REST_SLOT)
            if mine is not None:
                self.ahead.release(mine)

    def _forward_window(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The window/frequency step: plan, compute the FFN on the rows that stay, land the
        newcomers, add their part. With overlap the newcomers' reads are in flight meanwhile;
        without, they are read when they land. Either way the same rows are summed in the
        same two groups, so every overlap mode gives the same logits bit for bit
        (tests/test_overlap.py)."""
        st, cache, drv = self.tok, self.cache, self.driver
        t0 = time.perf_counter_ns()
        ids = np.asarray(self._select(layer, x), np.int64)
        if self._async_for(x.shape[0]) and ids.size:  # only what is cached or was read ahead
            keep = (drv.rows_of(layer, ids) >= 0) | self._guessed(layer, ids)
            self._count_dropped(int(ids.size - np.count_nonzero(keep)))
            ids = ids[keep]
        t1 = time.perf_counter_ns()
        st.predict_ns += t1 - t0
        # From plan to commit the policy counts the plan as applied: anything that stops the
        # layer in between (a failed read, an error in the kernel, Ctrl-C, which chat
        # survives) must abort it, or the policy and the cache disagree from then on.
        try:
            enter, leave = drv.plan(layer, ids)
            rest = self._read_rest(layer, enter, x)
            t2 = time.perf_counter_ns()
            has_bias = self.bias[layer] is not None
            rows = cache.rows(layer)
            if self.runtime.compute == "predicted":
                stay = drv.rows_of(layer, ids)
                stay = stay[stay >= 0]
            elif leave.size:
                keep = np.ones(rows.shape[0], bool)
                keep[drv.rows_of(layer, leave)] = False
                stay = np.flatnonzero(keep).astype(np.int32)
            else:
                stay = None
            st.mm_ns += time.perf_counter_ns() - t2
            out = self._ffn_on(layer, x, rows, stay, has_bias)
            self._land(layer, rest, lambda: drv.commit(layer))
        except BaseException:
            drv.abort(layer)  # the plan is not applied: start the layer over
            raise
        if enter.size:
            t3 = time.perf_counter_ns()
            new = drv.rows_of(layer, enter)
            st.mm_ns += time.perf_counter_ns() - t3
            out += self._ffn_on(layer, x, cache.rows(layer), new, has_bias)
        return out

    def _ffn_on(self, layer, x, rows, select, has_bias) -> np.ndarray:
        if select is not None and select.size == 0:
            return np.zeros((x.shape[0], self.args.hidden_size), np.float32)
        return self.kernel(layer, x, rows, self.cache.bias(layer) if has_bias else None,
                           select, row_ids=self.cache.ids(layer))

    def _candidates(self, layer: int, x: np.ndarray):
        """(uncached ids, their scores) for the tokens x: what rank_swaps chooses from."""
        sel = self.runtime.selection
        if sel == "sketch":
            return self.sketch.scores(layer, x)
        s = self._full_scores(layer, x)
        held = np.zeros(s.size, bool)
        held[self.cache.ids(layer)] = True
        cand_ids = np.flatnonzero(~held)
        return cand_ids, s[cand_ids]

    def _full_scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        sel = self.runtime.selection
        if sel == "oracle":
            return np.abs(self.oracle.activations(layer, x)).max(axis=0) * self.down_norm[layer]
        if sel == "predictor":
            return self.predictors.layers[layer].scores(x).max(axis=0)
        raise ValueError(f"eviction='rank' ranks neurons by a score; selection={sel!r} has "
                         "none (use 'sketch', 'predictor' or 'oracle')")

    def _cached_scores(self, layer: int, x: np.ndarray, h: np.ndarray, ids: np.ndarray):
        if self.runtime.selection == "sketch":
            return np.abs(h).max(axis=0) * self.down_norm[layer][ids]
        return self._full_scores(layer, x)[ids]

    def _rank_want(self, layer: int, t: int) -> int:
        """How many candidates rank_swaps may take for t tokens: the free rows + max_loads."""
        return self.cache.capacity(layer) - self.cache.n_used(layer) + self.max_loads * t

    @staticmethod
    def _top(cand_ids: np.ndarray, cand_s: np.ndarray, want: int,
             ordered: bool = False) -> np.ndarray:
        """The `want` best-scoring candidates (best first if `ordered`): with want from
        _rank_want, a superset of what rank_swaps loads."""
        if want <= 0:
            return np.empty(0, np.int64)
        top = (np.argpartition(-cand_s, want - 1)[:want] if want < cand_ids.size
               else np.arange(cand_ids.size))
        if ordered:
            top = top[np.argsort(-cand_s[top], kind="stable")]
        return np.asarray(cand_ids[top], np.int64)

    def _forward_rank(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The FFN on every cached neuron, then the best uncached neurons swapped in for the
        cached ones that matter least to these tokens (at most max_loads per token), read,
        and added to the output. With overlap, the best candidates' reads start before the
        FFN on the cached rows (they do not depend on it); the loads are a subset of them."""
        if self._lost is not None:
            raise FlashIOError(errno.EIO, self._lost)
        st, cache = self.tok, self.cache
        t = x.shape[0]
        t0 = time.perf_counter_ns()
        cand_ids, cand_s = self._candidates(layer, x)
        rest, guessed = False, None
        if self._async_for(t):  # nothing of its own: the guess made a layer earlier, and the next
            guessed = self._guessed(layer, cand_ids)
            self._read_rest(layer, np.empty(0, np.int64), x)
        elif self.ahead is not None:
            top = self._top(cand_ids, cand_s, self._rank_want(layer, t))
            rest = self._read_rest(layer, np.sort(top), x)
        st.predict_ns += time.perf_counter_ns() - t0
        rows = cache.rows(layer)
        n = rows.shape[0]
        has_bias = self.bias[layer] is not None
        h = self._h[:t * n].reshape(t, n)
        out = self.kernel(layer, x, rows, cache.bias(layer) if has_bias else None, act_out=h,
                          row_ids=cache.ids(layer))
        t1 = time.perf_counter_ns()
        ids = cache.ids(layer)
        cached_s = self._cached_scores(layer, x, h, ids)
        swaps = (self.max_loads * t, cache.capacity(layer) - n, self.runtime.swap_margin)
        if guessed is not None:  # "async": choose among the neurons read ahead, by true scores
            own, _ = rank_swaps(cached_s, cand_ids, cand_s, *swaps)
            self._count_dropped(int(np.count_nonzero(~self._guessed(layer, np.asarray(own,
                                                                                  np.int64)))))
            cand_ids, cand_s = cand_ids[guessed], cand_s[guessed]
        load, evict_rows = rank_swaps(cached_s, cand_ids, cand_s, *swaps)
        t2 = time.perf_counter_ns()
        st.predict_ns += t2 - t1
        st.needed += n + len(load)
        st.hits += n
        evict = ids[evict_rows].astype(np.int64)  # ids before the cache changes

        def apply():
            if not (len(load) and self.sketch is not None):
                self.driver.swap(layer, np.sort(load), evict)
                return
            self.sketch.swap(layer, load, evict, rows, evict_rows)
            try:
                self.driver.swap(layer, np.sort(load), evict)
            except BaseException as e:
                # The newcomers already left the sketch store (their slots went to the
                # evicted neurons) and did not reach the cache: no tier holds them, and
                # both tiers are full, so they cannot be put back. Refuse to go on rather
                # than run without them unnoticed.
                self._lost = (f"a read failed while layer {layer}'s neurons were being "
                              f"swapped ({type(e).__name__}: {e}); the neuron cache and the "
                              "sketch no longer cover the layer. Load the model again "
                              "(flashinfer_py.load) to continue.")
                raise

        if self.ahead is not None:
            self._land(layer, rest, apply)  # the reads first: a failed one changes nothing
        else:
            apply()
        if len(load):  # the newcomers sit in the tail rows: add their part of the output
            k = len(load)
            out += self.kernel(layer, x, cache.rows(layer)[-k:],
                               cache.bias(layer)[-k:] if has_bias else None,
                               row_ids=cache.ids(layer)[-k:])
        return out

    def rows(self, layer: int, x: np.ndarray):
        """(rows, up_bias, row_select, the rows' neuron ids) to compute layer `layer`'s FFN
        for inputs x [T, d] (the window and frequency policies)."""
        st, cache = self.tok, self.cache
        t0 = time.perf_counter_ns()
        ids = self._select(layer, x)
        t1 = time.perf_counter_ns()
        st.predict_ns += t1 - t0
        if cache is None:
            return self._rows_streamed(layer, ids, t1)
        self.driver.step(layer, ids)  # policy, then evict + read into the freed rows
        t4 = time.perf_counter_ns()
        select = None
        if self.runtime.compute == "predicted" and len(ids) < cache.n_used(layer):
            select = self.driver.rows_of(layer, ids)
        bias = cache.bias(layer) if self.bias[layer] is not None else None
        st.mm_ns += time.perf_counter_ns() - t4
        return cache.rows(layer), bias, select, cache.ids(layer)

    def _rows_streamed(self, layer: int, ids: np.ndarray, t1: int):
        """No reuse across tokens (naive, hybrid, +predictor rows): read this token's neurons
        into the shared layer buffer; up, gate and down separately without bundling."""
        st, n = self.tok, len(ids)
        rows = self.layer_rows[:n]
        if n:
            abandoned = self.reader._r.abandoned
            try:
                if self.runtime.bundled:
                    self.reader.read(layer, ids, rows)
                else:
                    self.reader.read_parts(layer, ids, list(range(len(self.reader.parts))), rows)
            except BaseException:
                if self.reader._r.abandoned != abandoned:
                    # the device may still write into the buffer (the reader keeps it alive
                    # for that): the next tokens read into a fresh one
                    from .bundles import aligned_empty

                    self.layer_rows = aligned_empty(self.layer_rows.shape, self.layer_rows.dtype)
                raise
            r = self.reader.last_stats
            st.bytes_read += r.bytes_read
            st.reads += r.reads_issued
            st.direct = st.direct and bool(r.direct)
        t2 = time.perf_counter_ns()
        st.io_ns += t2 - t1
        st.io_wait_ns += t2 - t1
        st.loaded += n
        st.needed += n
        st.evicted += self._prev_loaded[layer]
        self._prev_loaded[layer] = n
        bias = self.bias[layer][ids] if self.bias[layer] is not None and n else None
        st.mm_ns += time.perf_counter_ns() - t2
        return rows, bias, None, ids

    # ------------------------------------------------------------------ statistics
    def start_token(self) -> None:
        self.tok = TokenStats()
        if self.driver is not None:
            self.driver.flush(TokenStats())  # nothing counted between tokens carries over
        if self.ahead is not None:  # a token that failed half-way may have left reads ahead
            self._ahead.clear()
            for slot in range(3):
                self._is_ahead[slot % 2][:] = False
                self.ahead.release(slot)
        if self.runtime.reread_resident:
            self._reread_resident()

    def _reread_resident(self) -> None:
        """The "naive" row: the resident tensors come from flash again for every token."""
        import os

        from .bundles import aligned_empty
        from .resident_stream import open_uncached

        chunk = 1 << 22
        if self._resident_buf is None:
            self._resident_buf = aligned_empty((chunk,), np.uint8)
        fd, direct = open_uncached(self.resident_path, self.runtime.use_direct_io)
        if self.runtime.use_direct_io and not direct:  # buffered, and the stats say so
            self.tok.direct = False
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
        self.tok.io_wait_ns += time.perf_counter_ns() - t0
        self.tok.bytes_read += off

    def end_token(self) -> TokenStats:
        if self.driver is not None:
            io0 = self.tok.io_ns
            self.driver.flush(self.tok)
            self.tok.io_wait_ns += self.tok.io_ns - io0  # the cache's own reads: the caller waits
        self.total.add(self.tok)
        return self.tok

    def unusable(self) -> Optional[str]:
        """Why this FFN refuses to compute (a read failed in a way that lost neurons or left a
        device able to write into the cache), or None."""
        if self._lost is not None:
            return self._lost
        if self.cache is not None and self.cache.poisoned:
            return ("a read the device never answered was abandoned; the device may still write "
                    "into the neuron cache. Load the model again")
        return None

    def reset(self) -> None:
        """Forget the window and empty the cache (a new conversation). Under eviction="rank"
        the cached neurons stay: they are the weights the last tokens ranked highest, as good a
        start as any, and keeping them saves refilling the cache from flash."""
        if self.rank:
            return
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
        if self.sketch is not None:
            held += self.sketch.nbytes
        if self.ahead is not None:
            held += self.ahead.nbytes
        return held + (self.predictors.nbytes if self.predictors else 0)


class _Oracle:
    """The true active set, from every neuron's activation (keeps the whole FFN in DRAM: a
    measuring instrument for tests and ablations, not a way to save memory)."""

    def __init__(self, path: Path, args: ModelArgs, dense: dict, bias: list,
                 runtime: RuntimeConfig):
        self.args, self.bias, self.runtime = args, bias, runtime
        self.full = ResidentFFN(str(path), args, dense,  # records: read every token
                                runtime.replace(sparse=False, dram_budget=None), two_products=False)

    def activations(self, layer: int, x: np.ndarray) -> np.ndarray:
        rows = self.full.rows_by_layer[layer]
        h = np.empty((x.shape[0], rows.shape[0]), np.float32)
        self.full.kernel(layer, x, rows, self.bias[layer], act_out=h)
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

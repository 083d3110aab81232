# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, embedsignature=True
"""The per-token bookkeeping of the streamed FFN, compiled (window.py documents the policies).

- `SlidingWindow` (the paper's, Section 3.2) and `FrequencyPolicy` (ours) turn one token's
  selected neuron ids into the ids that enter and leave a layer's cache.
- `CacheDriver` makes the native NeuronCache follow a policy: one call per layer and token
  runs the policy, then `NeuronCache::replace` through csrc/neuron_cache.h (no pybind11 on
  the way, the GIL released while it reads and moves rows), and counts what it did.

Everything here works on C++ vectors in place; numpy arrays appear only at the Python-facing
edges (the ids going in, the enter/leave lists handed back to tests and tools). The set-based
Python references the tests compare against live in tests/policy_reference.py.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.pair cimport pair
from libcpp.vector cimport vector

import numpy as np

from ._core import FlashFormatError, FlashIOError


cdef extern from "<algorithm>" namespace "std" nogil:
    void sort[It](It first, It last)
    It unique[It](It first, It last)
    void nth_element[It](It first, It nth, It last)


# C++ exceptions of the core -> the package's Python exceptions (as _core's pybind11
# translator does): FormatError -> FlashFormatError, IoError -> FlashIOError,
# std::invalid_argument -> ValueError.
cdef extern from *:
    """
    #include <new>
    #include <stdexcept>
    #include "common.h"
    #include "failpoints.h"
    static PyObject* fi_format_error = NULL;
    static PyObject* fi_io_error = NULL;
    static void fi_set_errors(PyObject* fmt, PyObject* io) {
      Py_XINCREF(fmt);
      Py_XINCREF(io);
      fi_format_error = fmt;
      fi_io_error = io;
    }
    static void fi_raise() {
      try {
        throw;
      } catch (const flashinfer::FormatError& e) {
        PyErr_SetString(fi_format_error, e.what());
      } catch (const flashinfer::IoError& e) {
        // as _core's translator: OSError(errno, message) when there is an errno, and the
        // file and offset as .path and .offset (None when the error is not about one)
        PyObject* exc = e.error_code() != 0
            ? PyObject_CallFunction(fi_io_error, "is", e.error_code(), e.what())
            : PyObject_CallFunction(fi_io_error, "s", e.what());
        if (exc == NULL) return;  // the constructor's own error stands
        PyObject* path = e.path().empty() ? (Py_INCREF(Py_None), Py_None)
                                          : PyUnicode_DecodeFSDefault(e.path().c_str());
        PyObject* offset = e.offset() < 0 ? (Py_INCREF(Py_None), Py_None)
                                          : PyLong_FromLongLong(e.offset());
        if (path != NULL && offset != NULL && PyObject_SetAttrString(exc, "path", path) == 0
            && PyObject_SetAttrString(exc, "offset", offset) == 0)
          PyErr_SetObject(fi_io_error, exc);
        Py_XDECREF(path);
        Py_XDECREF(offset);
        Py_DECREF(exc);
      } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
      } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
      } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
      } catch (...) {
        PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception in flashinfer_py._bookkeeping");
      }
    }
    static void fi_share_failpoints(void* states) {
      flashinfer::failpoints::shared_states() =
          static_cast<flashinfer::failpoints::Shared*>(states);
    }
    """
    void fi_set_errors(object fmt, object io)
    void fi_raise()
    void fi_share_failpoints(void* states)
    uint64_t now_ns "flashinfer::now_ns"() nogil


cdef extern from "neuron_cache.h" namespace "flashinfer" nogil:
    cdef cppclass ReadStats:
        uint64_t bytes_read
        uint64_t reads_issued
        uint64_t ns
        cbool direct

    cdef cppclass CacheStats:
        uint64_t inserted
        uint64_t evicted
        uint64_t moved_bytes
        uint64_t compaction_ns
        uint64_t from_source
        ReadStats reads

    cdef cppclass NeuronCache:
        void insert(uint32_t layer, const int64_t* ids, size_t n, cbool bundled) except +fi_raise
        void evict(uint32_t layer, const int64_t* ids, size_t n) except +fi_raise
        void replace(uint32_t layer, const int64_t* evict, size_t n_evict, const int64_t* load,
                     size_t n_load, cbool bundled) except +fi_raise
        void clear(uint32_t layer) except +fi_raise
        uint32_t d_ff()
        uint32_t n_layers()
        uint32_t n_used(uint32_t layer) except +fi_raise
        uint32_t capacity(uint32_t layer) except +fi_raise
        const int32_t* id_slots(uint32_t layer) except +fi_raise
        CacheStats stats()


fi_set_errors(FlashFormatError, FlashIOError)
from ._core import testing as _testing  # noqa: E402
# the read path's failpoints are _core's (csrc/failpoints.h)
fi_share_failpoints(PyCapsule_GetPointer(_testing._failpoint_states(), b"flashinfer.failpoints"))


# ---------------------------------------------------------------------------------------
# ids in: sorted unique int32 in [0, d_ff)
# ---------------------------------------------------------------------------------------

cdef int _sorted_ids(object active_ids, int d_ff, vector[int32_t]& out) except -1:
    """Copy `active_ids` into `out`, sorted and unique (predictors already give that: then it
    is one pass), or raise ValueError naming the range."""
    cdef const int32_t[::1] v
    cdef Py_ssize_t i, n
    a = np.asarray(active_ids)
    if a.dtype != np.int32 or not a.flags.c_contiguous or a.ndim != 1:
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"neuron ids must be integers, got dtype {a.dtype}")
        a64 = np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
        if a64.size and (a64.min() < 0 or a64.max() >= d_ff):
            raise ValueError(f"neuron ids must be in [0, {d_ff}); got "
                             f"{a64.min()}..{a64.max()}")
        a = a64.astype(np.int32)
    v = a
    n = v.shape[0]
    out.resize(n)
    cdef cbool ordered = True
    with nogil:
        for i in range(n):
            out[i] = v[i]
            if i and v[i] <= v[i - 1]:
                ordered = False
        if not ordered:
            sort(out.begin(), out.end())
            out.resize(unique(out.begin(), out.end()) - out.begin())
    n = out.size()
    if n and (out[0] < 0 or out[n - 1] >= d_ff):
        raise ValueError(f"neuron ids must be in [0, {d_ff}); got {out[0]}..{out[n - 1]}")
    return 0


cdef object _as_array(const vector[int64_t]& v):
    """int32 numpy copy of an id list (the Python-facing result)."""
    out = np.empty(v.size(), np.int32)
    cdef int32_t[::1] o = out
    cdef size_t i
    for i in range(v.size()):
        o[i] = <int32_t>v[i]
    return out


cdef class _Policy:
    """What the driver needs of a policy: decide(layer, ids, capacity) -> enter, leave."""
    cdef readonly int n_layers, d_ff
    cdef vector[int64_t] _size      # (n_layers,) neurons held per layer
    cdef vector[int32_t] _ids       # scratch: the current set, sorted

    cdef int decide(self, int layer, const vector[int32_t]& ids, int64_t capacity,
                    vector[int64_t]& enter, vector[int64_t]& leave) except -1:
        raise NotImplementedError

    cdef void forget_layer(self, int layer) noexcept:
        """Start `layer` over, as if no token had run (its cache was emptied)."""
        pass

    cdef int _check_layer(self, int layer) except -1:
        if layer < 0 or layer >= self.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layers})")
        return 0

    def size(self, int layer) -> int:
        """Neurons the policy holds for `layer` (what the cache must hold)."""
        self._check_layer(layer)
        return self._size[layer]

    def update(self, int layer, active_ids, capacity=None):
        """Record this token's active set for `layer` (any integer ids, any order, duplicates
        allowed) and fit what is held in `capacity` rows (the layer's cache; the window needs
        none, the frequency policy does).

        Returns:
            (to_load, to_evict): sorted int32 ids that enter (needed, not held) and leave
            what the policy holds; held + loaded - evicted <= capacity.
        Raises ValueError, changing nothing, if the set alone exceeds `capacity` or an id
        is out of [0, d_ff).
        """
        cdef vector[int64_t] enter, leave
        _sorted_ids(active_ids, self.d_ff, self._ids)
        self.decide(layer, self._ids, -1 if capacity is None else capacity, enter, leave)
        return _as_array(enter), _as_array(leave)


# ---------------------------------------------------------------------------------------
# the paper's sliding window
# ---------------------------------------------------------------------------------------

cdef class SlidingWindow(_Policy):
    """Per-layer union of the active sets of the last `k` tokens.

    A count per neuron (how many of the last k tokens used it) makes each update cost
    O(|new set| + |dropped set|), independent of d_ff. Each layer keeps the last k sets in a
    ring of id vectors that are reused (no allocation once they have grown).
    """
    cdef readonly int k
    cdef vector[int32_t] _counts           # (n_layers * d_ff,) tokens of the window using it
    cdef vector[vector[int32_t]] _ring     # (n_layers * k,) the last k sets of each layer
    cdef vector[int32_t] _head, _len       # (n_layers,) oldest set's ring index, sets held

    def __init__(self, int n_layers, int d_ff, int k):
        if k < 1:
            raise ValueError(f"window k must be >= 1, got {k}")
        self.n_layers, self.d_ff, self.k = n_layers, d_ff, k
        self.reset()

    def reset(self) -> None:
        """Forget every token (a new conversation)."""
        self._counts.assign(<size_t>self.n_layers * self.d_ff, 0)
        self._ring.resize(<size_t>self.n_layers * self.k)
        cdef size_t i
        for i in range(self._ring.size()):
            self._ring[i].clear()
        self._head.assign(self.n_layers, 0)
        self._len.assign(self.n_layers, 0)
        self._size.assign(self.n_layers, 0)

    cdef void forget_layer(self, int layer) noexcept:
        self._head[layer] = self._len[layer] = 0
        cdef size_t i
        for i in range(<size_t>self.d_ff):
            self._counts[<size_t>layer * self.d_ff + i] = 0
        self._size[layer] = 0

    cdef void _pop_oldest(self, int layer, vector[int64_t]& leave) noexcept nogil:
        """Forget the layer's oldest set; its ids no other set of the window uses leave."""
        cdef int32_t* counts = &self._counts[<size_t>layer * self.d_ff]
        cdef vector[int32_t]* old = &self._ring[<size_t>layer * self.k + self._head[layer]]
        cdef size_t i
        cdef int32_t nid
        for i in range(old.size()):
            nid = old[0][i]
            counts[nid] -= 1
            if counts[nid] == 0:
                leave.push_back(nid)
                self._size[layer] -= 1
        self._head[layer] = (self._head[layer] + 1) % self.k
        self._len[layer] -= 1

    cdef int decide(self, int layer, const vector[int32_t]& ids, int64_t capacity,
                    vector[int64_t]& enter, vector[int64_t]& leave) except -1:
        self._check_layer(layer)
        if capacity >= 0 and <int64_t>ids.size() > capacity:
            raise ValueError(f"layer {layer}: the token's {ids.size()} active neurons alone "
                             f"exceed the cache's {capacity} rows; raise the DRAM budget")
        enter.clear()
        leave.clear()
        cdef int32_t* counts = &self._counts[<size_t>layer * self.d_ff]
        cdef size_t i
        cdef int pops = 0
        cdef int32_t nid
        with nogil:
            # count the new set first: a neuron used now and by the set leaving stays
            for i in range(ids.size()):
                nid = ids[i]
                counts[nid] += 1
                if counts[nid] == 1:
                    enter.push_back(nid)
            self._size[layer] += enter.size()
            if self._len[layer] == self.k:
                self._pop_oldest(layer, leave)
            self._ring[<size_t>layer * self.k
                       + (self._head[layer] + self._len[layer]) % self.k] = ids
            self._len[layer] += 1
            # a cache smaller than the union: forget the oldest sets until it fits (never the
            # newest: it fits alone, checked above)
            while capacity >= 0 and self._size[layer] > capacity:
                self._pop_oldest(layer, leave)
                pops += 1
            if pops:  # each pop's ids are sorted; together they are not
                sort(leave.begin(), leave.end())
        return 0

    def state(self, int layer):
        """Sorted int32 ids in the union (for tests and statistics)."""
        self._check_layer(layer)
        c = np.asarray(<int32_t[:self.d_ff]>&self._counts[<size_t>layer * self.d_ff])
        return np.flatnonzero(c).astype(np.int32)


# ---------------------------------------------------------------------------------------
# frequency eviction (ours)
# ---------------------------------------------------------------------------------------

cdef class FrequencyPolicy(_Policy):
    """Eviction by use frequency: keep every loaded neuron while the layer's cache has room;
    when it is full, evict the held neurons with the lowest use score first (ties: the lower
    id), never one the current token needs. The score is an exponentially decayed count of
    the tokens (or prefill chunks) that used the neuron, half-life `halflife` tokens.

    Decay without touching every neuron per token: token t adds weight g**t (g = 2**(1/halflife))
    to the neurons it uses, which ranks them exactly as a decayed count; the weights are rescaled
    before they overflow.
    """
    cdef readonly double halflife
    cdef double _growth
    cdef vector[uint8_t] _held             # (n_layers * d_ff,) 1 = held, 2 = held and used now
    cdef vector[double] _score             # (n_layers * d_ff,) decayed use count, scaled
    cdef vector[double] _weight            # (n_layers,) the weight the next token adds
    cdef vector[pair[double, int32_t]] _cand   # scratch: (score, id) of the evictable

    def __init__(self, int n_layers, int d_ff, double halflife=64.0):
        if not halflife > 0:
            raise ValueError(f"halflife must be > 0 tokens, got {halflife}")
        self.n_layers, self.d_ff, self.halflife = n_layers, d_ff, halflife
        self._growth = 2.0 ** (1.0 / halflife)
        self.reset()

    def reset(self) -> None:
        """Forget every neuron's use (a new conversation)."""
        self._held.assign(<size_t>self.n_layers * self.d_ff, 0)
        self._score.assign(<size_t>self.n_layers * self.d_ff, 0.0)
        self._weight.assign(self.n_layers, 1.0)
        self._size.assign(self.n_layers, 0)

    cdef void forget_layer(self, int layer) noexcept:
        cdef size_t i, base = <size_t>layer * self.d_ff
        for i in range(<size_t>self.d_ff):
            self._held[base + i] = 0
            self._score[base + i] = 0.0
        self._weight[layer] = 1.0
        self._size[layer] = 0

    cdef int decide(self, int layer, const vector[int32_t]& ids, int64_t capacity,
                    vector[int64_t]& enter, vector[int64_t]& leave) except -1:
        self._check_layer(layer)
        if capacity < 0:
            raise ValueError("FrequencyPolicy.update needs the layer's cache capacity (rows)")
        if <int64_t>ids.size() > capacity:
            raise ValueError(f"layer {layer}: {ids.size()} active neurons exceed the cache's "
                             f"{capacity} rows; raise the DRAM budget")
        enter.clear()
        leave.clear()
        cdef uint8_t* held = &self._held[<size_t>layer * self.d_ff]
        cdef double* score = &self._score[<size_t>layer * self.d_ff]
        cdef double w = self._weight[layer] * self._growth, inv
        cdef size_t i
        cdef int32_t nid
        cdef int64_t excess
        with nogil:
            if w > 1e200:  # rescale: only the order of the scores matters
                inv = 1.0 / w
                for i in range(<size_t>self.d_ff):
                    score[i] *= inv
                w = 1.0
            self._weight[layer] = w
            for i in range(ids.size()):
                nid = ids[i]
                score[nid] += w
                if held[nid]:
                    held[nid] = 2      # needed now: not evictable
                else:
                    enter.push_back(nid)
            excess = self._size[layer] + <int64_t>enter.size() - capacity
            if excess > 0:
                # the held neurons this token does not need, lowest (score, id) first
                self._cand.clear()
                for i in range(<size_t>self.d_ff):
                    if held[i] == 1:
                        self._cand.push_back(pair[double, int32_t](score[i], <int32_t>i))
                if excess < <int64_t>self._cand.size():
                    nth_element(self._cand.begin(), self._cand.begin() + excess,
                                self._cand.end())
                for i in range(<size_t>excess):
                    leave.push_back(self._cand[i].second)
                    held[self._cand[i].second] = 0
                sort(leave.begin(), leave.end())
            for i in range(ids.size()):
                held[ids[i]] = 1
            self._size[layer] += <int64_t>enter.size() - <int64_t>leave.size()
        return 0

    def state(self, int layer):
        """Sorted int32 ids held (for tests and statistics)."""
        self._check_layer(layer)
        h = np.asarray(<uint8_t[:self.d_ff]>&self._held[<size_t>layer * self.d_ff])
        return np.flatnonzero(h).astype(np.int32)

    @property
    def nbytes(self) -> int:
        """DRAM of the policy's state: a held flag and a float64 score per neuron."""
        return self._held.size() + 8 * (self._score.size() + self._weight.size())


# ---------------------------------------------------------------------------------------
# the per-layer step: policy -> NeuronCache::replace, with the token's statistics
# ---------------------------------------------------------------------------------------

cdef class CacheDriver:
    """Drives a NeuronCache (the `_core` object; its C++ instance through neuron_cache.h) for
    the streamed FFN, and counts per token what it cost.

    Args:
        cache: flashinfer_py.cache.NeuronCache or the _core.NeuronCache it wraps (kept alive).
        policy: a SlidingWindow or FrequencyPolicy (for `step`), or None (only `swap`).
        bundled: read each neuron's record in one request (False: the "no bundling" ablation,
            each part its own read).

    Counters (since the last `flush`): io_ns (checking, reading and landing the records),
    mm_ns (the policy and the rows the cache moves; in `swap`, the whole eviction),
    bytes_read, reads, loaded, evicted, needed, hits, cached (rows held after each call,
    summed), from_source (rows copied from records read ahead), direct, per_layer_loaded.
    """
    cdef NeuronCache* _c
    cdef object _owner
    cdef int32_t _d_ff
    cdef _Policy _policy
    cdef cbool _bundled
    cdef vector[int32_t] _ids
    cdef vector[int64_t] _enter, _leave
    cdef readonly uint64_t io_ns, mm_ns, bytes_read, reads, loaded, evicted, needed, hits, cached
    cdef readonly uint64_t from_source
    cdef readonly cbool direct
    cdef list _per_layer
    cdef int _plan_layer

    def __init__(self, cache, policy=None, bint bundled=True):
        owner = getattr(cache, "_c", cache)
        self._c = <NeuronCache*>PyCapsule_GetPointer(owner._capsule(), "flashinfer::NeuronCache")
        self._owner = owner
        self._d_ff = self._c.d_ff()
        if policy is not None and not isinstance(policy, _Policy):
            raise TypeError(f"policy must be a SlidingWindow or FrequencyPolicy, got "
                            f"{type(policy).__name__}")
        if policy is not None and (policy.d_ff != self._d_ff or
                                   policy.n_layers < self._c.n_layers()):
            raise ValueError(f"the policy is for {policy.n_layers} layers of {policy.d_ff} "
                             f"neurons, the cache has {self._c.n_layers()} layers of "
                             f"{self._d_ff}")
        self._policy = policy
        self._bundled = bundled
        self._plan_layer = -1
        self._clear()

    cdef void _clear(self):
        self.io_ns = self.mm_ns = self.bytes_read = self.reads = 0
        self.loaded = self.evicted = self.needed = self.hits = self.cached = 0
        self.from_source = 0
        self.direct = True
        self._per_layer = []

    cdef int _count(self, int layer, const CacheStats& before, uint64_t mm, uint64_t io,
                    uint64_t needed, uint64_t hits) except -1:
        """Add one call's work, given the cache's statistics before it. `io` is the time the
        cache spent getting records in; when it read none from flash (every record came from
        the read-ahead worker's staging: RuntimeConfig.overlap), that time was copying, and is
        memory management: the worker's own reads are counted as I/O by the caller."""
        cdef CacheStats after = self._c.stats()
        cdef uint64_t n_in = after.inserted - before.inserted
        if after.reads.reads_issued == before.reads.reads_issued:
            mm += io
            io = 0
        self.mm_ns += mm
        self.io_ns += io
        self.bytes_read += after.reads.bytes_read - before.reads.bytes_read
        self.reads += after.reads.reads_issued - before.reads.reads_issued
        if after.reads.reads_issued != before.reads.reads_issued:
            self.direct = self.direct and after.reads.direct
        self.loaded += n_in
        self.from_source += after.from_source - before.from_source
        self.evicted += after.evicted - before.evicted
        self.needed += needed
        self.hits += hits
        self.cached += self._c.n_used(layer)
        self._per_layer.append(n_in)
        return 0

    def step(self, int layer, ids) -> None:
        """One token (or prefill chunk) at one layer: the policy decides which of `ids` (the
        selected neurons) enter and which held neurons leave, and the cache reads the entering
        records into the rows the leaving ones free (`plan`, then `commit`)."""
        self._plan(layer, ids)
        self._commit(layer)

    def plan(self, int layer, ids):
        """The policy's decision for `ids` at `layer`, without touching the cache: (enter,
        leave) int64 arrays (sorted). `commit(layer)` applies it; in between the caller may
        read the entering records ahead (issue 16) and compute on the rows that stay. Until
        the commit the policy counts the plan done: `abort(layer)` if it is not committed."""
        self._plan(layer, ids)
        return (np.asarray(<int64_t[:self._enter.size()]>self._enter.data()).copy()
                if self._enter.size() else np.empty(0, np.int64),
                np.asarray(<int64_t[:self._leave.size()]>self._leave.data()).copy()
                if self._leave.size() else np.empty(0, np.int64))

    def commit(self, int layer) -> None:
        """Apply the last `plan` (of this layer) to the cache."""
        self._commit(layer)

    def abort(self, int layer) -> None:
        """Start `layer` over on both sides (cache and policy), as after a failed read."""
        self._c.clear(layer)
        self._policy.forget_layer(layer)
        self._plan_layer = -1

    cdef int _plan(self, int layer, ids) except -1:
        if self._policy is None:
            raise ValueError("this CacheDriver has no policy: use swap()")
        cdef uint64_t t0 = now_ns()
        _sorted_ids(ids, self._policy.d_ff, self._ids)
        self._policy.decide(layer, self._ids, self._c.capacity(layer), self._enter, self._leave)
        self.mm_ns += now_ns() - t0
        self._plan_layer = layer
        return 0

    cdef int _commit(self, int layer) except -1:
        if self._plan_layer != layer:
            raise ValueError(f"commit({layer}) without a plan for layer {layer}")
        self._plan_layer = -1
        cdef CacheStats before = self._c.stats()
        cdef uint64_t t1 = now_ns()
        try:
            with nogil:
                self._c.replace(layer, self._leave.data(), self._leave.size(),
                                self._enter.data(), self._enter.size(), self._bundled)
        except BaseException:
            # A failed read left the leaving neurons gone and none of the entering ones
            # cached, while the policy counts them held: start the layer over on both sides
            # (the next token reads what it needs again).
            self._c.clear(layer)
            self._policy.forget_layer(layer)
            raise
        cdef uint64_t t2 = now_ns()
        # memory management: the policy (counted in _plan) and the rows replace moves; I/O:
        # the rest of replace (checks, reading and landing the records)
        cdef uint64_t moving = self._c.stats().compaction_ns - before.compaction_ns
        self._count(layer, before, moving, (t2 - t1) - moving, self._ids.size(),
                    self._ids.size() - self._enter.size())
        return 0

    def swap(self, int layer, load, evict) -> None:
        """Evict `evict`, then read `load` into the tail rows (eviction="rank": its newcomers
        are the last rows). The caller counts needed and hits."""
        cdef const int64_t[::1] ld = np.ascontiguousarray(load, dtype=np.int64).reshape(-1)
        cdef const int64_t[::1] ev = np.ascontiguousarray(evict, dtype=np.int64).reshape(-1)
        cdef uint64_t t0 = now_ns()
        cdef CacheStats before = self._c.stats()
        with nogil:
            if ev.shape[0]:
                self._c.evict(layer, &ev[0], ev.shape[0])
        cdef uint64_t t1 = now_ns()
        with nogil:
            if ld.shape[0]:
                self._c.insert(layer, &ld[0], ld.shape[0], self._bundled)
        cdef uint64_t t2 = now_ns()
        self._count(layer, before, t1 - t0, t2 - t1, 0, 0)

    def rows_of(self, int layer, ids):
        """int32 cache row of each of `ids` (in [0, d_ff); -1 for one not cached), in their
        order: the row selection of compute="predicted"."""
        cdef const int32_t[::1] v = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
        out = np.empty(v.shape[0], np.int32)
        cdef int32_t[::1] o = out
        cdef const int32_t* slot = self._c.id_slots(layer)
        cdef int32_t d_ff = self._d_ff
        cdef Py_ssize_t i
        for i in range(v.shape[0]):
            if v[i] < 0 or v[i] >= d_ff:
                raise ValueError(f"neuron id {v[i]} out of range [0, {d_ff})")
        with nogil:
            for i in range(v.shape[0]):
                o[i] = slot[v[i]]
        return out

    def flush(self, tok) -> None:
        """Add the counters into `tok` (ffn.TokenStats) and restart them."""
        tok.io_ns += self.io_ns
        tok.mm_ns += self.mm_ns
        tok.bytes_read += self.bytes_read
        tok.reads += self.reads
        tok.loaded += self.loaded
        tok.evicted += self.evicted
        tok.needed += self.needed
        tok.hits += self.hits
        tok.cached += self.cached
        tok.ahead_used += self.from_source
        tok.direct = tok.direct and self.direct
        tok.per_layer_loaded.extend(self._per_layer)
        self._clear()

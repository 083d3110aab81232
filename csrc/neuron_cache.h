// neuron_cache.h: the paper's preallocated per-layer DRAM matrix of neuron records.
//
// Per layer, allocated once and never reallocated:
//   rows       (capacity, row_bytes) storage dtype, 4096-aligned; rows [0, n_used) live
//   slot_to_id (capacity,) int32     neuron id held by each slot
//   id_to_slot (d_ff,)     int32     slot of each neuron, -1 = absent
//   bias       (capacity,) float32   per-slot bias (from set_layer_bias; 0 otherwise)
// evict() moves the LAST live rows into the freed slots (O(rows deleted), rows stay dense);
// insert() reads new records straight from the bundle file into rows n_used.. (no bounce);
// replace() does one token's change in one call: the entering neurons are read into the
// slots the leaving ones free, so rows move only when more neurons leave than enter (the
// paper's window at steady state moves almost nothing; swap-with-last moved one row per
// eviction: OPT-6.7B's 206 MB per token, benchmarks/RESULTS.md section 11).
//
// Row size. On flash a record is padded to a multiple of 4096 bytes so that one direct read
// fetches one neuron. In DRAM the padding is waste (SmolLM2: 3456 of 4096 bytes are weights),
// so a packed cache keeps rows of row_bytes = the parts' bytes rounded up to 64: its reads
// land in a staging buffer of kStagingRecords aligned records and are copied into the rows
// (one memcpy of the bytes read). When the record has no padding, row_bytes == record_bytes
// and reads land in place as before.
// Split (split_at > 0, packed only): the parts of a record before byte split_at (up, and gate)
// go to `rows` (row_bytes = split_at) and the rest (the down part) to a matrix of its own,
// `down_rows` (down_row_bytes = a packed row's bytes - split_at: the two take what one packed
// row would), both in slot order, as the paper preallocates its up and down matrices. A ReLU layer's sparse FFN reads every
// cached up part and a few down parts: one contiguous stream instead of up parts one record
// apart (q8_0 1.3-1.4x, q4_1 1.1-1.16x; benchmarks/RESULTS.md section 13).
// Row order is arbitrary: an FFN over rows[:n_used] does not depend on it.
// Not thread-safe: one thread drives a cache (the reader it uses parallelises the I/O).
#pragma once

#include <cstdint>
#include <vector>

#include "aligned_buffer.h"
#include "async_reads.h"
#include "bundle_reader.h"

namespace flashinfer {

struct CacheStats {
  uint64_t inserted = 0;        // rows loaded
  uint64_t evicted = 0;         // rows dropped
  uint64_t moved_bytes = 0;     // bytes copied by compaction (last rows into freed slots)
  uint64_t compaction_ns = 0;   // time spent compacting (evict, replace)
  uint64_t from_source = 0;     // rows copied from the read-ahead source (set_source)
  ReadStats reads;              // reads done by insert()
};

class NeuronCache {
 public:
  // capacity.size() == n_layers (one capacity per layer); n_layers <= header n_layers.
  // packed: rows of the parts' bytes (rounded up to 64) instead of whole padded records.
  NeuronCache(BundleReader& reader, uint32_t n_layers, const std::vector<uint32_t>& capacity,
              bool packed = false, uint64_t split_at = 0);
  ~NeuronCache();
  NeuronCache(const NeuronCache&) = delete;
  NeuronCache& operator=(const NeuronCache&) = delete;
  static constexpr std::size_t kStagingRecords = 256;  // records per staged read (packed)

  // Load ids (absent, no duplicates, must fit) into rows n_used..n_used+n.
  // bundled=false is the "unbundled" ablation: every part of every neuron is its own read
  // (BundleReader::read_parts); the rows end up byte-identical either way.
  void insert(uint32_t layer, const int64_t* ids, std::size_t n, bool bundled = true);
  // Drop ids (present, no duplicates) by moving the last live rows into their slots.
  void evict(uint32_t layer, const int64_t* ids, std::size_t n);
  // Drop `evict` (present) and load `load` (absent): the loaded records land in the freed
  // slots, lowest slot first, then in the tail; the live rows past the new end fill what
  // freed slots remain. Sorted `load` keeps neighbouring records one read. Checked as insert
  // and evict are before anything changes; if a read fails, the evicted neurons are gone
  // and none of `load` is cached.
  void replace(uint32_t layer, const int64_t* evict, std::size_t n_evict, const int64_t* load,
               std::size_t n_load, bool bundled = true);
  void clear(uint32_t layer);
  // Records read ahead (issue 16): insert/replace copy each loaded neuron that `source` holds
  // in a waited slot from there (one memcpy of row_bytes) and read only the others. nullptr
  // (the default) reads everything. Not owned; must outlive its use here.
  void set_source(const AsyncReads* source) { source_ = source; }
  // Per-neuron bias of the layer, d_ff floats; copied, and applied to live and future rows.
  void set_layer_bias(uint32_t layer, const float* bias_all_d_ff);

  uint32_t n_layers() const { return uint32_t(layers_.size()); }
  uint32_t d_ff() const { return d_ff_; }
  uint32_t n_used(uint32_t layer) const { return at(layer).n_used; }
  uint32_t capacity(uint32_t layer) const { return at(layer).capacity; }
  bool contains(uint32_t layer, int64_t id) const { return slot_of(layer, id) >= 0; }
  int32_t slot_of(uint32_t layer, int64_t id) const;  // -1 when absent
  bool has_bias(uint32_t layer) const { return !at(layer).bias_all.empty(); }
  std::size_t nbytes() const;  // everything this cache allocated
  // A read into its rows was abandoned (the device may still write them): it refuses use.
  bool poisoned() const { return poisoned_; }
  uint64_t record_bytes() const { return record_bytes_; }
  uint64_t row_bytes() const { return row_bytes_; }  // DRAM bytes per row of rows()
  uint64_t split_at() const { return split_at_; }    // 0: not split
  uint64_t down_row_bytes() const { return down_row_bytes_; }  // 0: not split
  const BundleReader& reader() const { return reader_; }

  // Raw views for the bindings (valid until the next insert/evict/clear of that layer).
  char* rows(uint32_t layer) { return at(layer).rows.as<char>(); }
  char* down_rows(uint32_t layer) { return at(layer).down.as<char>(); }  // split only
  const int32_t* slot_ids(uint32_t layer) const { return at(layer).slot_to_id.data(); }
  const int32_t* id_slots(uint32_t layer) const { return at(layer).id_to_slot.data(); }  // (d_ff,)
  const float* bias(uint32_t layer) const { return at(layer).bias.data(); }

  CacheStats stats() const { return stats_; }
  void reset_stats() { stats_ = CacheStats{}; }

 private:
  struct Layer {
    uint32_t capacity = 0;
    uint32_t n_used = 0;
    AlignedBuffer rows;               // (capacity, row_bytes)
    AlignedBuffer down;               // (capacity, down_row_bytes) when split
    std::vector<int32_t> slot_to_id;  // (capacity,)
    std::vector<int32_t> id_to_slot;  // (d_ff,), -1 = absent
    std::vector<float> bias;          // (capacity,)
    std::vector<float> bias_all;      // (d_ff,) or empty
  };
  Layer& at(uint32_t layer, bool usable = true);  // usable: refuse a poisoned cache
  const Layer& at(uint32_t layer) const;
  void check_ids(const Layer& L, uint32_t layer, const int64_t* ids, std::size_t n,
                 bool want_present) const;

  // The down row of the slot whose row starts at `row` (split caches).
  char* down_of(Layer& L, const char* row) {
    return L.down.as<char>() + uint64_t(row - L.rows.as<char>()) / row_bytes_ * down_row_bytes_;
  }
  // A record's bytes (a staged or read-ahead copy) into the slot whose row is `row`.
  void place(Layer& L, char* row, const char* record);
  // Read ids[0, n) as whole records into rows dst[0, n) (staged when packed).
  ReadStats read_into(uint32_t layer, const int64_t* ids, std::size_t n, bool bundled,
                      char* const* dst);
  // read_into's body (read_into marks the cache unusable when the reader abandoned a read).
  ReadStats read_into_unguarded(uint32_t layer, const int64_t* ids, std::size_t n,
                                bool bundled, char* const* dst);
  // read_into without the source: every record from flash.
  ReadStats read_into_direct(uint32_t layer, const int64_t* ids, std::size_t n, bool bundled,
                             char* const* dst);
  // Slots of ids (present) into holes_, ascending.
  void collect_holes(const Layer& L, const int64_t* ids, std::size_t n);
  // holes[0, n): free slots of [0, n_used), ascending. Moves the last live rows into those
  // below the new end (each such row moves once), then n_used -= n.
  void fill_holes(Layer& L, const uint32_t* holes, std::size_t n);
  void move_row(Layer& L, uint32_t from, uint32_t to);
  void map_row(Layer& L, uint32_t slot, int64_t id);  // slot holds id now (maps, bias)

  BundleReader& reader_;
  const AsyncReads* source_ = nullptr;
  bool poisoned_ = false;  // a read into the rows was abandoned: refuse use, leak the rows
  uint64_t record_bytes_;
  uint64_t split_at_;
  uint64_t row_bytes_;
  uint64_t down_row_bytes_;
  uint32_t d_ff_;
  AlignedBuffer staging_;  // (kStagingRecords, record_bytes) when packed, else empty
  std::vector<uint32_t> holes_;  // (n_evict,) freed slots of the current call, ascending
  std::vector<char*> dst_;       // (n_load,) destination row of each record read
  std::vector<int64_t> rest_ids_;  // the loads the source lacks, and their rows
  std::vector<char*> rest_dst_;
  std::vector<Layer> layers_;
  CacheStats stats_;
};

}  // namespace flashinfer

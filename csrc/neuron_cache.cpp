// neuron_cache.cpp: insert (read into the tail), evict (the last rows fill the freed slots)
// and replace (new records read into the freed slots).
#include "neuron_cache.h"

#include <cerrno>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace flashinfer {


// ---------------------------------------------------------------------------------------
// construction: every allocation happens here, once
// ---------------------------------------------------------------------------------------

namespace {
// A packed row: the record's parts rounded up to 64 bytes (never more than the record).
uint64_t packed_row_bytes(const BundleReader& r) {
  return std::min<uint64_t>(align_up(r.payload_bytes(), 64), r.record_bytes());
}
}  // namespace

NeuronCache::NeuronCache(BundleReader& reader, uint32_t n_layers,
                         const std::vector<uint32_t>& capacity, bool packed, uint64_t split_at)
    : reader_(reader),
      record_bytes_(reader.record_bytes()),
      split_at_(split_at),
      row_bytes_(split_at ? split_at : packed ? packed_row_bytes(reader) : reader.record_bytes()),
      // split: the two rows take what one packed row would (the plan's figure either way)
      down_row_bytes_(split_at && split_at < reader.payload_bytes()
                          ? packed_row_bytes(reader) - split_at : 0),
      d_ff_(reader.header().d_ff) {
  const BundleHeader& h = reader.header();
  bool boundary = false;  // split_at must start a part after the first
  for (uint32_t p = 1; p < h.n_parts; ++p) boundary |= split_at == h.part_offset[p];
  FI_CHECK(split_at == 0 || (packed && boundary),
           "split_at=", split_at, " must be 0 (records whole) or the offset of a record's part "
           "after the first, with packed=True");
  if (row_bytes_ != record_bytes_ || split_at_) staging_ = AlignedBuffer(kStagingRecords * record_bytes_);
  FI_CHECK(n_layers >= 1 && n_layers <= h.n_layers, "n_layers must be in [1, ", h.n_layers,
           "] (the bundle file's layers), got ", n_layers);
  FI_CHECK(capacity.size() == n_layers, "capacity has ", capacity.size(),
           " entries but n_layers is ", n_layers);
  layers_.resize(n_layers);
  for (uint32_t l = 0; l < n_layers; ++l) {
    FI_CHECK(capacity[l] <= h.d_ff, "capacity of layer ", l, " is ", capacity[l],
             " but the layer has only d_ff=", h.d_ff, " neurons");
    Layer& L = layers_[l];
    L.capacity = capacity[l];
    // At least one aligned page so rows() is a valid pointer even for capacity 0.
    L.rows = AlignedBuffer(std::max<uint64_t>(uint64_t(capacity[l]) * row_bytes_, kIoAlignment));
    if (split_at_)
      L.down = AlignedBuffer(std::max<uint64_t>(uint64_t(capacity[l]) * down_row_bytes_, 64));
    L.slot_to_id.assign(capacity[l], -1);
    L.id_to_slot.assign(h.d_ff, -1);
    L.bias.assign(capacity[l], 0.0f);
  }
}

// A device that did not answer a read may still write it into these rows or the staging at
// any time: leak them (never freed, never reused), as the reader leaks its ring.
NeuronCache::~NeuronCache() {
  if (!poisoned_) return;
  staging_.leak();
  for (Layer& L : layers_) {
    L.rows.leak();
    L.down.leak();
  }
}

// Every entry point that writes rows or hands them out comes through here (clear, which
// only forgets, may run on a poisoned cache: the error paths that start a layer over call it).
NeuronCache::Layer& NeuronCache::at(uint32_t layer, bool usable) {
  if (usable && poisoned_)  // an I/O failure (FlashIOError), not a bad argument
    throw IoError(detail::concat("a read of ", reader_.path(), " that the device never "
                                 "answered was abandoned, and the device may still write into "
                                 "this neuron cache: load the model again (and check the disk: "
                                 "see the error that reported the read)"),
                  EIO, reader_.path());
  FI_CHECK(layer < layers_.size(), "layer ", layer, " out of range [0, ", layers_.size(), ")");
  return layers_[layer];
}
const NeuronCache::Layer& NeuronCache::at(uint32_t layer) const {
  FI_CHECK(layer < layers_.size(), "layer ", layer, " out of range [0, ", layers_.size(), ")");
  return layers_[layer];
}

int32_t NeuronCache::slot_of(uint32_t layer, int64_t id) const {
  const Layer& L = at(layer);
  if (id < 0 || id >= int64_t(d_ff_)) return -1;
  return L.id_to_slot[std::size_t(id)];
}

std::size_t NeuronCache::nbytes() const {
  std::size_t b = staging_.size();
  for (const Layer& L : layers_)
    b += L.rows.size() + L.down.size() + 4 * (L.slot_to_id.size() + L.id_to_slot.size() + L.bias.size() +
                              L.bias_all.size());
  return b;
}

// Every id in range, no duplicates within the call, and each present (evict) or absent
// (insert). All checked before anything changes, so a bad call leaves the cache as it was.
void NeuronCache::check_ids(const Layer& L, uint32_t layer, const int64_t* ids, std::size_t n,
                            bool want_present) const {
  std::vector<int64_t> s(ids, ids + n);
  std::sort(s.begin(), s.end());
  for (std::size_t j = 0; j < n; ++j) {
    FI_CHECK(s[j] >= 0 && s[j] < int64_t(d_ff_), "neuron id ", s[j], " out of range [0, ",
             d_ff_, ")");
    FI_CHECK(j == 0 || s[j] != s[j - 1], "duplicate neuron id ", s[j], " in ids");
    int32_t slot = L.id_to_slot[std::size_t(s[j])];
    if (want_present)
      FI_CHECK(slot >= 0, "cannot evict neuron ", s[j], " from layer ", layer,
               ": it is not in the cache (check contains() first)");
    else
      FI_CHECK(slot < 0, "cannot insert neuron ", s[j], " into layer ", layer,
               ": it is already cached in slot ", slot,
               " (filter ids with contains() or evict it first)");
  }
}

// ---------------------------------------------------------------------------------------
// insert: read straight into the tail rows
// ---------------------------------------------------------------------------------------

void NeuronCache::insert(uint32_t layer, const int64_t* ids, std::size_t n, bool bundled) {
  Layer& L = at(layer);
  check_ids(L, layer, ids, n, /*want_present=*/false);
  FI_CHECK(uint64_t(L.n_used) + n <= L.capacity, "cannot insert ", n, " neurons into layer ",
           layer, ": ", L.n_used, " of ", L.capacity,
           " slots are in use; evict first or build the cache with a larger capacity");
  if (n == 0) return;
  dst_.resize(n);
  for (std::size_t k = 0; k < n; ++k)
    dst_[k] = L.rows.as<char>() + uint64_t(L.n_used + k) * row_bytes_;
  ReadStats rs = read_into(layer, ids, n, bundled, dst_.data());  // throws -> no change
  for (std::size_t k = 0; k < n; ++k) map_row(L, L.n_used + uint32_t(k), ids[k]);
  L.n_used += uint32_t(n);
  stats_.inserted += n;
  stats_.reads.add(rs);
}

void NeuronCache::map_row(Layer& L, uint32_t slot, int64_t id) {
  L.slot_to_id[slot] = int32_t(id);
  L.id_to_slot[std::size_t(id)] = int32_t(slot);
  L.bias[slot] = L.bias_all.empty() ? 0.0f : L.bias_all[std::size_t(id)];
}

ReadStats NeuronCache::read_into(uint32_t layer, const int64_t* ids, std::size_t n,
                                 bool bundled, char* const* dst) {
  const uint64_t abandoned = reader_.abandoned();
  try {
    return read_into_unguarded(layer, ids, n, bundled, dst);
  } catch (...) {
    if (reader_.abandoned() != abandoned) poisoned_ = true;  // see ~NeuronCache
    throw;
  }
}

ReadStats NeuronCache::read_into_unguarded(uint32_t layer, const int64_t* ids, std::size_t n,
                                           bool bundled, char* const* dst) {
  if (source_ != nullptr && n > 0) {
    // Copy what was read ahead, read the rest. A read failing after some copies leaves rows
    // that replace/insert treat as not loaded (the same as a failed read of all of them).
    rest_ids_.clear();
    rest_dst_.clear();
    for (std::size_t k = 0; k < n; ++k) {
      if (const char* src = source_->find(layer, ids[k])) {
        place(layers_[layer], dst[k], src);
        ++stats_.from_source;
      } else {
        rest_ids_.push_back(ids[k]);
        rest_dst_.push_back(dst[k]);
      }
    }
    if (rest_ids_.size() == n) return read_into_direct(layer, ids, n, bundled, dst);
    return read_into_direct(layer, rest_ids_.data(), rest_ids_.size(), bundled,
                            rest_dst_.data());
  }
  return read_into_direct(layer, ids, n, bundled, dst);
}

ReadStats NeuronCache::read_into_direct(uint32_t layer, const int64_t* ids, std::size_t n,
                                        bool bundled, char* const* dst) {
  if (n == 0) return ReadStats{};
  const uint32_t n_parts = reader_.header().n_parts;
  const uint32_t all_parts[4] = {0, 1, 2, 3};
  const uint64_t used = reader_.payload_bytes();
  // Whole records into rows out[0, m) (record_bytes each).
  auto read_records = [&](const int64_t* chunk, std::size_t m, char* const* out) {
    if (bundled) return reader_.read_rows(layer, chunk, m, out);
    ReadStats r = reader_.read_parts_rows(layer, chunk, m, all_parts, n_parts, out);
    // read_parts fills the parts only: zero the padding so rows equal the records.
    for (std::size_t k = 0; k < m; ++k) std::memset(out[k] + used, 0, record_bytes_ - used);
    return r;
  };
  // rows are 4096-aligned and record_bytes % 4096 == 0: the reader lands data in place.
  if (row_bytes_ == record_bytes_ && !split_at_) return read_records(ids, n, dst);
  // Packed rows: stage whole records, keep the first row_bytes of each. The rows change only
  // after every read succeeded, so a failed read leaves the cache as it was.
  ReadStats total;
  char* stage[kStagingRecords];
  for (std::size_t k = 0; k < kStagingRecords; ++k)
    stage[k] = staging_.as<char>() + k * record_bytes_;
  for (std::size_t k0 = 0; k0 < n; k0 += kStagingRecords) {
    const std::size_t m = std::min(kStagingRecords, n - k0);
    total.add(read_records(ids + k0, m, stage));
    for (std::size_t k = 0; k < m; ++k) place(layers_[layer], dst[k0 + k], stage[k]);
  }
  return total;
}

void NeuronCache::place(Layer& L, char* row, const char* record) {
  if (!split_at_) {
    std::memcpy(row, record, row_bytes_);
    return;
  }
  // the parts before split_at, then the rest of the parts and zeros up to the row's end (as a
  // packed row copies the record's zero padding)
  const uint64_t rest = reader_.payload_bytes() - split_at_;
  char* down = down_of(L, row);
  std::memcpy(row, record, split_at_);
  std::memcpy(down, record + split_at_, rest);
  std::memset(down + rest, 0, down_row_bytes_ - rest);
}

// ---------------------------------------------------------------------------------------
// evict and replace: freed slots are refilled by the last live rows, O(n * row_bytes)
// ---------------------------------------------------------------------------------------

void NeuronCache::collect_holes(const Layer& L, const int64_t* ids, std::size_t n) {
  holes_.resize(n);
  for (std::size_t k = 0; k < n; ++k) holes_[k] = uint32_t(L.id_to_slot[std::size_t(ids[k])]);
  std::sort(holes_.begin(), holes_.end());
}

void NeuronCache::move_row(Layer& L, uint32_t from, uint32_t to) {
  char* rows = L.rows.as<char>();
  std::memcpy(rows + uint64_t(to) * row_bytes_, rows + uint64_t(from) * row_bytes_, row_bytes_);
  if (split_at_) {
    char* down = L.down.as<char>();
    std::memcpy(down + uint64_t(to) * down_row_bytes_, down + uint64_t(from) * down_row_bytes_,
                down_row_bytes_);
    stats_.moved_bytes += down_row_bytes_;
  }
  int32_t id = L.slot_to_id[from];
  L.slot_to_id[to] = id;
  L.bias[to] = L.bias[from];
  L.id_to_slot[std::size_t(id)] = int32_t(to);
  L.slot_to_id[from] = -1;
  stats_.moved_bytes += row_bytes_;
}

void NeuronCache::fill_holes(Layer& L, const uint32_t* holes, std::size_t n) {
  uint64_t t0 = now_ns();
  // Walk the rows down from the last: a free one is a hole at the top (dropped with the
  // shrinking end), a live one moves into the lowest hole left. Stops when every hole is
  // either filled or past the end.
  uint32_t src = L.n_used;
  std::size_t lo = 0, hi = n;
  while (lo < hi) {
    --src;
    if (holes[hi - 1] == src) {
      --hi;
      continue;
    }
    move_row(L, src, holes[lo++]);
  }
  L.n_used -= uint32_t(n);
  stats_.compaction_ns += now_ns() - t0;
}

void NeuronCache::evict(uint32_t layer, const int64_t* ids, std::size_t n) {
  Layer& L = at(layer);
  check_ids(L, layer, ids, n, /*want_present=*/true);
  collect_holes(L, ids, n);
  for (std::size_t k = 0; k < n; ++k) {
    L.id_to_slot[std::size_t(ids[k])] = -1;
    L.slot_to_id[holes_[k]] = -1;
  }
  fill_holes(L, holes_.data(), n);
  stats_.evicted += n;
}

void NeuronCache::replace(uint32_t layer, const int64_t* evict, std::size_t n_evict,
                          const int64_t* load, std::size_t n_load, bool bundled) {
  Layer& L = at(layer);
  check_ids(L, layer, evict, n_evict, /*want_present=*/true);
  check_ids(L, layer, load, n_load, /*want_present=*/false);
  const uint64_t n_after = uint64_t(L.n_used) - n_evict + n_load;
  FI_CHECK(n_after <= L.capacity, "cannot replace ", n_evict, " neurons by ", n_load,
           " in layer ", layer, ": ", L.n_used, " of ", L.capacity, " slots are in use, ",
           n_after, " would be; build the cache with a larger capacity");
  collect_holes(L, evict, n_evict);
  // load[k] -> the k-th lowest freed slot, then the tail. The k-th lowest of n_evict freed
  // slots is below n_used - n_evict + k + 1 <= n_after: every loaded row is live afterwards.
  dst_.resize(n_load);
  for (std::size_t k = 0; k < n_load; ++k) {
    uint32_t slot = k < n_evict ? holes_[k] : L.n_used + uint32_t(k - n_evict);
    dst_[k] = L.rows.as<char>() + uint64_t(slot) * row_bytes_;
  }
  for (std::size_t k = 0; k < n_evict; ++k) L.id_to_slot[std::size_t(evict[k])] = -1;
  ReadStats rs;
  try {
    rs = read_into(layer, load, n_load, bundled, dst_.data());
  } catch (...) {  // the evicted neurons are gone (their rows may hold parts of new ones)
    for (std::size_t k = 0; k < n_evict; ++k) L.slot_to_id[holes_[k]] = -1;
    fill_holes(L, holes_.data(), n_evict);
    stats_.evicted += n_evict;
    throw;
  }
  const std::size_t filled = std::min(n_load, n_evict);
  for (std::size_t k = 0; k < n_load; ++k)
    map_row(L, k < n_evict ? holes_[k] : L.n_used + uint32_t(k - n_evict), load[k]);
  if (n_load > n_evict) L.n_used += uint32_t(n_load - n_evict);
  for (std::size_t k = filled; k < n_evict; ++k) L.slot_to_id[holes_[k]] = -1;
  fill_holes(L, holes_.data() + filled, n_evict - filled);
  stats_.inserted += n_load;
  stats_.evicted += n_evict;
  stats_.reads.add(rs);
}

void NeuronCache::clear(uint32_t layer) {
  Layer& L = at(layer, /*usable=*/false);
  for (uint32_t s = 0; s < L.n_used; ++s) {
    L.id_to_slot[std::size_t(L.slot_to_id[s])] = -1;
    L.slot_to_id[s] = -1;
  }
  stats_.evicted += L.n_used;
  L.n_used = 0;
}

void NeuronCache::set_layer_bias(uint32_t layer, const float* bias_all_d_ff) {
  Layer& L = at(layer);
  L.bias_all.assign(bias_all_d_ff, bias_all_d_ff + d_ff_);
  for (uint32_t s = 0; s < L.n_used; ++s) L.bias[s] = L.bias_all[std::size_t(L.slot_to_id[s])];
}

}  // namespace flashinfer

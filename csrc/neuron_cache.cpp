// neuron_cache.cpp: insert (read into the tail) and evict (swap-with-last compaction).
#include "neuron_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace flashinfer {


// ---------------------------------------------------------------------------------------
// construction: every allocation happens here, once
// ---------------------------------------------------------------------------------------

NeuronCache::NeuronCache(BundleReader& reader, uint32_t n_layers,
                         const std::vector<uint32_t>& capacity, bool packed)
    : reader_(reader),
      record_bytes_(reader.record_bytes()),
      row_bytes_(packed ? std::min<uint64_t>(align_up(reader.payload_bytes(), 64),
                                             reader.record_bytes())
                        : reader.record_bytes()),
      d_ff_(reader.header().d_ff) {
  const BundleHeader& h = reader.header();
  if (row_bytes_ != record_bytes_) staging_ = AlignedBuffer(kStagingRecords * record_bytes_);
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
    L.slot_to_id.assign(capacity[l], -1);
    L.id_to_slot.assign(h.d_ff, -1);
    L.bias.assign(capacity[l], 0.0f);
  }
}

NeuronCache::Layer& NeuronCache::at(uint32_t layer) {
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
    b += L.rows.size() + 4 * (L.slot_to_id.size() + L.id_to_slot.size() + L.bias.size() +
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
  char* tail = L.rows.as<char>() + uint64_t(L.n_used) * row_bytes_;
  ReadStats rs = read_into(layer, ids, n, bundled, tail);  // throws -> no change
  for (std::size_t k = 0; k < n; ++k) {
    uint32_t slot = L.n_used + uint32_t(k);
    int32_t id = int32_t(ids[k]);
    L.slot_to_id[slot] = id;
    L.id_to_slot[std::size_t(id)] = int32_t(slot);
    L.bias[slot] = L.bias_all.empty() ? 0.0f : L.bias_all[std::size_t(id)];
  }
  L.n_used += uint32_t(n);
  stats_.inserted += n;
  stats_.reads.add(rs);
}

ReadStats NeuronCache::read_into(uint32_t layer, const int64_t* ids, std::size_t n,
                                 bool bundled, char* dst) {
  const uint32_t n_parts = reader_.header().n_parts;
  const uint32_t all_parts[4] = {0, 1, 2, 3};
  const uint64_t used = reader_.payload_bytes();
  // Whole records (dst_stride = record_bytes, 4096-aligned rows) into `out`.
  auto read_records = [&](const int64_t* chunk, std::size_t m, char* out) {
    if (bundled) return reader_.read(layer, chunk, m, out, record_bytes_);
    ReadStats r = reader_.read_parts(layer, chunk, m, all_parts, n_parts, out, record_bytes_);
    // read_parts fills the parts only: zero the padding so rows equal the records.
    for (std::size_t k = 0; k < m; ++k)
      std::memset(out + k * record_bytes_ + used, 0, record_bytes_ - used);
    return r;
  };
  // rows are 4096-aligned and record_bytes % 4096 == 0: the reader lands data in place.
  if (row_bytes_ == record_bytes_) return read_records(ids, n, dst);
  // Packed rows: stage whole records, keep the first row_bytes of each. The rows change only
  // after every read succeeded, so a failed read leaves the cache as it was.
  ReadStats total;
  for (std::size_t k0 = 0; k0 < n; k0 += kStagingRecords) {
    const std::size_t m = std::min(kStagingRecords, n - k0);
    total.add(read_records(ids + k0, m, staging_.as<char>()));
    for (std::size_t k = 0; k < m; ++k)
      std::memcpy(dst + (k0 + k) * row_bytes_, staging_.as<char>() + k * record_bytes_,
                  row_bytes_);
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// evict: swap-with-last compaction, O(n * row_bytes)
// ---------------------------------------------------------------------------------------

void NeuronCache::evict(uint32_t layer, const int64_t* ids, std::size_t n) {
  Layer& L = at(layer);
  check_ids(L, layer, ids, n, /*want_present=*/true);
  uint64_t t0 = now_ns();
  char* rows = L.rows.as<char>();
  for (std::size_t k = 0; k < n; ++k) {
    int32_t slot = L.id_to_slot[std::size_t(ids[k])];
    uint32_t last = L.n_used - 1;
    if (uint32_t(slot) != last) {
      // The last live row takes the freed slot: record bytes, bias and both maps.
      std::memcpy(rows + uint64_t(slot) * row_bytes_, rows + uint64_t(last) * row_bytes_,
                  row_bytes_);
      int32_t moved = L.slot_to_id[last];
      L.slot_to_id[slot] = moved;
      L.bias[slot] = L.bias[last];
      L.id_to_slot[std::size_t(moved)] = slot;
      stats_.moved_bytes += row_bytes_;
    }
    L.id_to_slot[std::size_t(ids[k])] = -1;
    L.slot_to_id[last] = -1;
    L.n_used = last;
  }
  stats_.evicted += n;
  stats_.compaction_ns += now_ns() - t0;
}

void NeuronCache::clear(uint32_t layer) {
  Layer& L = at(layer);
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

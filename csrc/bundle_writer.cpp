// bundle_writer.cpp: interleave parts into padded records and stream them out in chunks.
#include "bundle_writer.h"

#include <unistd.h>

#include <cstring>

namespace flashinfer {

namespace {
// Staging size: big sequential pwrites (the disk does 1-1.7 GB/s at 1-4 MiB) while keeping
// memory O(chunk) instead of O(layer).
constexpr std::size_t kChunkBytes = 4u << 20;

std::array<PartKind, 4> part_array(const std::vector<PartKind>& parts) {
  FI_CHECK(parts.size() == 2 || parts.size() == 3,
           "parts must be (up, down) or (up, gate, down), got ", parts.size(), " parts");
  std::array<PartKind, 4> a{PartKind::None, PartKind::None, PartKind::None, PartKind::None};
  for (std::size_t i = 0; i < parts.size(); ++i) a[i] = parts[i];
  return a;
}
}  // namespace

BundleWriter::BundleWriter(const std::string& path, uint32_t n_layers, uint32_t d_model,
                           uint32_t d_ff, DType dtype, const std::vector<PartKind>& parts,
                           uint32_t alignment, DownLayout down_layout)
    : header_(make_header(n_layers, d_model, d_ff, dtype, part_array(parts),
                          uint32_t(parts.size()), alignment, down_layout)),
      file_(path),
      written_(n_layers, false) {
  records_per_chunk_ = std::max<std::size_t>(1, kChunkBytes / header_.record_bytes);
  records_per_chunk_ = std::min<std::size_t>(records_per_chunk_, d_ff);
  chunk_ = AlignedBuffer(records_per_chunk_ * header_.record_bytes);
  // Reserve the header's place with zeros: until finish() the file has no valid magic.
  AlignedBuffer zeros(header_.data_offset);
  std::memset(zeros.data(), 0, header_.data_offset);
  file_.write_at(zeros.data(), header_.data_offset, 0);
}

// ---------------------------------------------------------------------------------------
// write_layer: [d_ff, part_bytes[p]] x n_parts -> d_ff records, chunk by chunk
// ---------------------------------------------------------------------------------------

void BundleWriter::write_layer(uint32_t layer, const void* const* part_ptrs,
                               std::size_t n_parts) {
  FI_CHECK(!closed_, "write_layer on ", path(), " after finish()/abort()");
  FI_CHECK(layer < header_.n_layers, "layer ", layer, " out of range [0, ", header_.n_layers,
           ")");
  FI_CHECK(!written_[layer], "layer ", layer, " of ", path(), " was already written");
  FI_CHECK(n_parts == header_.n_parts, "expected ", header_.n_parts, " parts, got ", n_parts);
  const std::size_t rb = header_.record_bytes;
  char* chunk = chunk_.as<char>();
  for (uint32_t i0 = 0; i0 < header_.d_ff; i0 += uint32_t(records_per_chunk_)) {
    uint32_t cnt = std::min<uint32_t>(uint32_t(records_per_chunk_), header_.d_ff - i0);
    // Zero first so the padding after the parts is deterministic (files are reproducible).
    std::memset(chunk, 0, std::size_t(cnt) * rb);
    for (uint32_t k = 0; k < cnt; ++k)
      for (std::size_t p = 0; p < n_parts; ++p) {
        const std::size_t pb = header_.part_bytes[p];  // one neuron's part
        std::memcpy(chunk + k * rb + header_.part_offset[p],
                    static_cast<const char*>(part_ptrs[p]) + std::size_t(i0 + k) * pb, pb);
      }
    file_.write_at(chunk, std::size_t(cnt) * rb, bundle_offset(header_, layer, i0));
  }
  written_[layer] = true;
}

// ---------------------------------------------------------------------------------------
// finish / abort
// ---------------------------------------------------------------------------------------

void BundleWriter::finish() {
  FI_CHECK(!closed_, "finish() on ", path(), " called twice or after abort()");
  for (uint32_t l = 0; l < header_.n_layers; ++l)
    FI_CHECK(written_[l], "finish() on ", path(), ": layer ", l, " of ", header_.n_layers,
             " was never written");
  // Data first, then the header: the magic appears only once everything else is durable.
  file_.sync();
  AlignedBuffer hb(kHeaderBytes);
  std::memcpy(hb.data(), &header_, sizeof(header_));
  file_.write_at(hb.data(), kHeaderBytes, 0);
  file_.sync();
  file_.close();
  closed_ = finished_ = true;
}

void BundleWriter::abort() {
  if (closed_) return;
  closed_ = true;
  try {
    file_.close();
  } catch (const IoError&) {
    // the file is being thrown away; a close error changes nothing
  }
  ::unlink(path().c_str());
}

}  // namespace flashinfer

// bundle_writer.h: stream an FFN, one layer at a time, into a bundle file.
//
//   BundleWriter w(path, n_layers, d_model, d_ff, DType::F16, {Up, Gate, Down});
//   for l: w.write_layer(l, {up, gate, downT});   // each [d_ff, part_bytes[p]] row-major
//   w.finish();                                   // header, fsync, close
//
// Record i of layer l = up[i] | gate[i] | downT[i] | zero padding (bundle_format.h). Part p
// of every neuron is header().part_bytes[p] bytes: d_model elements of a float format, or
// a row of blocks (or, for down in DownLayout::Codes, of codes) of a block format.
// Memory stays O(chunk) (a few MiB), independent of model size. The header is written by
// finish() last, so an interrupted conversion leaves a file that fails validation (bad
// magic) instead of one that silently holds zero neurons.
#pragma once

#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "bundle_format.h"
#include "direct_file.h"

namespace flashinfer {

class BundleWriter {
 public:
  BundleWriter(const std::string& path, uint32_t n_layers, uint32_t d_model, uint32_t d_ff,
               DType dtype, const std::vector<PartKind>& parts, uint32_t alignment = kIoAlignment,
               DownLayout down_layout = DownLayout::Blocks);

  // part_ptrs[p] -> [d_ff, part_bytes[p]] row-major bytes in the storage format, one per
  // part, in the header's part order. Each layer exactly once, any order.
  void write_layer(uint32_t layer, const void* const* part_ptrs, std::size_t n_parts);

  // Checks every layer was written, writes the header, fsyncs and closes.
  void finish();
  // Closes without a header and removes the file (used when conversion fails).
  void abort();

  const BundleHeader& header() const { return header_; }
  const std::string& path() const { return file_.path(); }
  bool finished() const { return finished_; }

 private:
  BundleHeader header_;
  WritableFile file_;
  std::vector<bool> written_;   // per layer
  AlignedBuffer chunk_;         // (records_per_chunk, record_bytes) staging, zero padded
  std::size_t records_per_chunk_ = 0;
  bool finished_ = false;
  bool closed_ = false;
};

}  // namespace flashinfer

// bundle_format.h: the on-disk layout of ffn_bundles.bin, the one offset function,
// and header validation. Everything that writes or reads bundle records goes through here.
//
// File layout (little-endian):
//   [0, 4096)                     BundleHeader, zero padded to header_bytes (4096)
//   [data_offset + r*record_bytes) record r = layer * d_ff + neuron, for every layer/neuron
//
// One record = the FFN neuron's parts, each d_model elements of the storage dtype, in
// part_kinds order (up row, gate row when gated, down column), then zero padding up to
// record_bytes, a multiple of `alignment` (4096). One direct read therefore fetches one
// neuron, and a part can also be read alone (the "unbundled" ablation) at
//   bundle_offset(l, i) + part_index * d_model * elem_bytes.
// Per-neuron up biases (OPT fc1.bias) are NOT in the record: they live in the resident
// dense.safetensors. Reason: OPT-6.7B fp16 parts are exactly 16 KiB and a 2-byte bias would
// push every record to 20 KiB (+25% I/O per neuron).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common.h"

namespace flashinfer {

constexpr char kBundleMagic[8] = {'F', 'I', 'P', 'Y', 'B', 'N', 'D', 'L'};
constexpr uint32_t kBundleVersion = 1;
constexpr uint32_t kHeaderBytes = 4096;

enum class DType : uint32_t { F32 = 0, F16 = 1, BF16 = 2 };
enum class PartKind : uint32_t { None = 0, Up = 1, Gate = 2, Down = 3 };

inline uint32_t dtype_bytes(DType t) { return t == DType::F32 ? 4 : 2; }
const char* dtype_name(DType t);  // "float32", "float16", "bfloat16"

#pragma pack(push, 1)
struct BundleHeader {
  char magic[8];             // "FIPYBNDL"
  uint32_t version;          // kBundleVersion
  uint32_t header_bytes;     // 4096
  uint32_t n_layers;
  uint32_t d_model;          // elements per part
  uint32_t d_ff;             // neurons per layer
  uint32_t dtype;            // DType
  uint32_t elem_bytes;       // 2 or 4, must agree with dtype
  uint32_t n_parts;          // 2 (up, down) or 3 (up, gate, down)
  uint32_t part_kinds[4];    // PartKind per part, unused entries 0
  uint32_t alignment;        // record alignment in bytes (4096)
  uint64_t record_bytes;     // stride between records, multiple of alignment
  uint64_t data_offset;      // first record, multiple of alignment (== header_bytes)
  uint64_t file_bytes;       // data_offset + n_layers * d_ff * record_bytes
  uint8_t reserved[kHeaderBytes - 8 - 4 * 13 - 8 * 3];
};
#pragma pack(pop)
static_assert(sizeof(BundleHeader) == kHeaderBytes, "BundleHeader must be exactly 4096 bytes");

// Build a header for the given shape. record_bytes = align_up(n_parts*d_model*elem, alignment).
BundleHeader make_header(uint32_t n_layers, uint32_t d_model, uint32_t d_ff, DType dtype,
                         const std::array<PartKind, 4>& parts, uint32_t n_parts,
                         uint32_t alignment = kIoAlignment);

// THE offset function: byte offset of neuron `neuron` of layer `layer`. Bounds-checked.
uint64_t bundle_offset(const BundleHeader& h, uint32_t layer, uint32_t neuron);

// Check magic, version, field consistency and that file_size holds every record.
// Throws FormatError naming `path` and telling the user to re-run `flashinfer-py convert`.
void validate_header(const BundleHeader& h, uint64_t file_size, const std::string& path);

// Read and validate the header of `path` (buffered read, tiny).
BundleHeader read_header(const std::string& path);

}  // namespace flashinfer

// bundle_format.h: the on-disk layout of ffn_bundles.bin, the storage formats, the one
// offset function, and header validation. Everything that writes or reads bundle records
// goes through here.
//
// File layout (little-endian):
//   [0, 4096)                     BundleHeader, zero padded to header_bytes (4096)
//   [data_offset + r*record_bytes) record r = layer * d_ff + neuron, for every layer/neuron
//
// One record = the FFN neuron's parts in part_kinds order (up row, gate row when gated, down
// column), part p at byte part_offset[p] with part_bytes[p] bytes, back to back, then zero
// padding up to record_bytes, a multiple of `alignment` (4096). One direct read therefore
// fetches one neuron, and a part can also be read alone (the "unbundled" ablation) at
//   bundle_offset(l, i) + part_offset[p].
//
// Storage formats (DType; the block layouts are defined once, in kernels_q8.h / kernels_q4.h):
//   float32, float16, bfloat16   a part is d_model elements           (4 / 2 / 2 bytes each)
//   q8_0  blocks of 32: fp16 scale d, 32 x int8 q;       value = d * q          34 B / 32
//   q4_0  blocks of 32: fp16 d, 16 bytes of nibbles;     value = d * (q - 8)    18 B / 32
//   q4_1  blocks of 32: fp16 d, fp16 m, 16 B nibbles;    value = d * q + m      20 B / 32
// (llama.cpp's Q8_0 / Q4_0 / Q4_1, so GGUF blocks are copied bit for bit). Every part is
// quantized along d_model: ceil(d_model / 32) blocks, the last one zero padded, so one neuron
// stays one self-contained record. For d_model 4096 a q4_0 neuron with three parts is
// 3 x 2304 bytes = two 4 KiB pages instead of six in float16.
//
// The down part's other layout (down_layout = DownLayout::Codes): a GGUF quantizes
// down_proj [d_model, d_ff] along d_ff, so each of its blocks spans 32 neurons and a neuron's
// down column takes one value from d_model different blocks. To keep those weights exactly,
// the record holds only the column's codes (the nibbles or int8s, packed per 32 values of
// d_model like a block's quants, without scales: d_model/2 bytes for q4, d_model for q8) and
// the scales (and q4_1 mins) stay resident, per layer, in dense.safetensors as
// layers.{i}.ffn_down_scales: float16 [d_ff / 32, 1 or 2, d_model] (1/8 byte per weight for
// q4_1). The kernels rebuild value = scale[j / 32][c] * code + min[j / 32][c].
//
// Per-neuron up biases (OPT fc1.bias) are NOT in the record: they live in the resident
// dense.safetensors. Reason: OPT-6.7B fp16 parts are exactly 16 KiB and a 2-byte bias would
// push every record to 20 KiB (+25% I/O per neuron).
//
// Versions: 1 had float formats only and equal parts (its header leaves the fields below
// `file_bytes` zero); 2 added the block formats, per-part sizes and the down layout. Version 1
// files still open: read_header fills the version-2 fields in.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common.h"

namespace flashinfer {

constexpr char kBundleMagic[8] = {'F', 'I', 'P', 'Y', 'B', 'N', 'D', 'L'};
constexpr uint32_t kBundleVersion = 2;
constexpr uint32_t kOldestBundleVersion = 1;
constexpr uint32_t kHeaderBytes = 4096;
// The largest record alignment a bundle may declare (SSDs want 4096; 1 MiB leaves room for
// any device without letting a header size buffers at will).
constexpr uint32_t kMaxAlignment = 1u << 20;

enum class DType : uint32_t { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5 };
constexpr uint32_t kNumDTypes = 6;
enum class PartKind : uint32_t { None = 0, Up = 1, Gate = 2, Down = 3 };
// Where the down part's scales live (see the file comment).
enum class DownLayout : uint32_t { Blocks = 0, Codes = 1 };

// What a storage format is made of. Floats are blocks of one element.
struct DTypeInfo {
  const char* name;       // "float32", ..., "q4_1"
  uint32_t block_elems;   // elements per block: 1 (floats) or 32
  uint32_t block_bytes;   // bytes per block
  uint32_t elem_bytes;    // bytes of the array element holding it: 4 / 2 floats, 1 blocks
  uint32_t code_bits;     // bits of one quantized value (0 for floats)
  bool quantized;
};
const DTypeInfo& dtype_info(DType t);
inline bool dtype_valid(uint32_t code) { return code < kNumDTypes; }
inline bool is_quantized(DType t) { return dtype_info(t).quantized; }
inline uint32_t dtype_bytes(DType t) { return dtype_info(t).elem_bytes; }
const char* dtype_name(DType t);  // "float32", "float16", "bfloat16", "q8_0", "q4_0", "q4_1"
// Parse a name; throws std::invalid_argument listing the accepted names.
DType parse_dtype(const std::string& name);

// Bytes of `len` values: whole blocks, the last one zero padded.
inline uint64_t row_bytes(DType t, uint64_t len) {
  const DTypeInfo& i = dtype_info(t);
  return (len + i.block_elems - 1) / i.block_elems * i.block_bytes;
}
// Bytes of the codes of `len` values without scales (DownLayout::Codes), per 32 values.
inline uint64_t code_bytes(DType t, uint64_t len) {
  return (len + 31) / 32 * 32 * dtype_info(t).code_bits / 8;
}

#pragma pack(push, 1)
struct BundleHeader {
  char magic[8];             // "FIPYBNDL"
  uint32_t version;          // kBundleVersion (1 still read)
  uint32_t header_bytes;     // 4096
  uint32_t n_layers;
  uint32_t d_model;          // values per part
  uint32_t d_ff;             // neurons per layer
  uint32_t dtype;            // DType
  uint32_t elem_bytes;       // dtype_info(dtype).elem_bytes: 4, 2, or 1 for block formats
  uint32_t n_parts;          // 2 (up, down) or 3 (up, gate, down)
  uint32_t part_kinds[4];    // PartKind per part, unused entries 0
  uint32_t alignment;        // record alignment in bytes (4096; a power of two, 512 to 1 MiB)
  uint64_t record_bytes;     // stride between records: the parts rounded up to alignment
  uint64_t data_offset;      // first record, multiple of alignment (== header_bytes)
  uint64_t file_bytes;       // data_offset + n_layers * d_ff * record_bytes
  // ---- version 2 (zero in version 1 files; read_header fills them in)
  uint32_t down_layout;      // DownLayout
  uint32_t part_bytes[4];    // bytes of each part, unused entries 0
  uint32_t part_offset[4];   // byte offset of each part inside the record
  uint8_t reserved[kHeaderBytes - 8 - 4 * 13 - 8 * 3 - 4 * 9];
};
#pragma pack(pop)
static_assert(sizeof(BundleHeader) == kHeaderBytes, "BundleHeader must be exactly 4096 bytes");

// Build a header for the given shape: parts back to back, record_bytes = their sum rounded up
// to `alignment`. DownLayout::Codes needs a block format and d_ff a multiple of 32.
BundleHeader make_header(uint32_t n_layers, uint32_t d_model, uint32_t d_ff, DType dtype,
                         const std::array<PartKind, 4>& parts, uint32_t n_parts,
                         uint32_t alignment = kIoAlignment,
                         DownLayout down_layout = DownLayout::Blocks);

// Bytes of the parts of one record (the record without its padding).
uint64_t payload_bytes(const BundleHeader& h);

// THE offset function: byte offset of neuron `neuron` of layer `layer`. Bounds-checked.
uint64_t bundle_offset(const BundleHeader& h, uint32_t layer, uint32_t neuron);

// Check magic, version, field consistency and that file_size holds every record. A version 1
// header has its version-2 fields filled in first (so `h` may change).
// Throws FormatError naming `path` and telling the user to re-run `flashinfer-py convert`.
void validate_header(BundleHeader& h, uint64_t file_size, const std::string& path);

// Read and validate the header of `path` (buffered read, tiny).
BundleHeader read_header(const std::string& path);

}  // namespace flashinfer

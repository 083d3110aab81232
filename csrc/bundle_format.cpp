// bundle_format.cpp: header construction, THE offset function, and validation on open.
//
// All size arithmetic is done in uint64 with explicit overflow checks: a corrupt header
// must produce a FormatError, never a wrapped offset that reads the wrong neuron.
#include "bundle_format.h"

#include "kernels_q4.h"  // BlockQ4_0, BlockQ4_1
#include "kernels_q8.h"  // BlockQ8_0

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

namespace flashinfer {

namespace {

constexpr const char* kFixHint = "; re-run `flashinfer-py convert` to rebuild the bundle file";

// a * b, or false on uint64 overflow.
bool mul_ok(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

bool add_ok(uint64_t a, uint64_t b, uint64_t* out) {
  if (b > std::numeric_limits<uint64_t>::max() - a) return false;
  *out = a + b;
  return true;
}

bool is_pow2(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// Expected part-kind sequences: (up, down) for plain MLPs, (up, gate, down) for gated ones.
bool valid_kinds(const uint32_t kinds[4], uint32_t n_parts) {
  using K = PartKind;
  auto k = [&](int i) { return static_cast<K>(kinds[i]); };
  if (n_parts == 2) return k(0) == K::Up && k(1) == K::Down && k(2) == K::None && k(3) == K::None;
  if (n_parts == 3) return k(0) == K::Up && k(1) == K::Gate && k(2) == K::Down && k(3) == K::None;
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// storage formats: sizes come from the block structs themselves
// ---------------------------------------------------------------------------------------

const DTypeInfo& dtype_info(DType t) {
  static const DTypeInfo kInfo[kNumDTypes] = {
      {"float32", 1, 4, 4, 0, false},
      {"float16", 1, 2, 2, 0, false},
      {"bfloat16", 1, 2, 2, 0, false},
      {"q8_0", kQBlock, sizeof(BlockQ8_0), 1, 8, true},
      {"q4_0", kQBlock, sizeof(BlockQ4_0), 1, 4, true},
      {"q4_1", kQBlock, sizeof(BlockQ4_1), 1, 4, true},
  };
  const uint32_t i = static_cast<uint32_t>(t);
  FI_CHECK(i < kNumDTypes, "unknown dtype code ", i);
  return kInfo[i];
}

const char* dtype_name(DType t) {
  return dtype_valid(static_cast<uint32_t>(t)) ? dtype_info(t).name : "unknown";
}

DType parse_dtype(const std::string& name) {
  std::string all;
  for (uint32_t i = 0; i < kNumDTypes; ++i) {
    if (name == dtype_info(DType(i)).name) return DType(i);
    all += (i ? ", " : "") + std::string(dtype_info(DType(i)).name);
  }
  FI_CHECK(false, "dtype must be one of ", all, "; got '", name, "'");
  return DType::F32;
}

// ---------------------------------------------------------------------------------------
// make_header: the writer's single source of the layout
// ---------------------------------------------------------------------------------------

namespace {

// Bytes of part `p` of a record of this header (its kind, format and down layout).
uint64_t expected_part_bytes(const BundleHeader& h, uint32_t p) {
  const DType dt = static_cast<DType>(h.dtype);
  const bool codes = static_cast<PartKind>(h.part_kinds[p]) == PartKind::Down &&
                     static_cast<DownLayout>(h.down_layout) == DownLayout::Codes;
  return codes ? code_bytes(dt, h.d_model) : row_bytes(dt, h.d_model);
}

// Version 1 headers: equal parts of d_model elements, down in blocks like the others.
void fill_version1_fields(BundleHeader& h) {
  h.down_layout = static_cast<uint32_t>(DownLayout::Blocks);
  for (uint32_t p = 0; p < 4; ++p) {
    const bool used = p < h.n_parts && p < 4;
    h.part_bytes[p] = used ? h.d_model * h.elem_bytes : 0;
    h.part_offset[p] = used ? p * h.d_model * h.elem_bytes : 0;
  }
}

}  // namespace

BundleHeader make_header(uint32_t n_layers, uint32_t d_model, uint32_t d_ff, DType dtype,
                         const std::array<PartKind, 4>& parts, uint32_t n_parts,
                         uint32_t alignment, DownLayout down_layout) {
  FI_CHECK(n_layers > 0 && d_model > 0 && d_ff > 0, "n_layers, d_model and d_ff must be > 0, got ",
           n_layers, ", ", d_model, ", ", d_ff);
  FI_CHECK(dtype_valid(static_cast<uint32_t>(dtype)), "unknown dtype code ",
           static_cast<uint32_t>(dtype));
  FI_CHECK(is_pow2(alignment) && alignment >= 512 && alignment <= kMaxAlignment,
           "alignment must be a power of two in [512, ", kMaxAlignment, "], got ", alignment);
  FI_CHECK(down_layout == DownLayout::Blocks || (is_quantized(dtype) && d_ff % 32 == 0),
           "down_layout 'codes' (scales kept resident per 32 neurons) needs a block format "
           "and d_ff a multiple of 32; got dtype ", dtype_name(dtype), " and d_ff ", d_ff);
  BundleHeader h;
  std::memset(&h, 0, sizeof(h));
  std::memcpy(h.magic, kBundleMagic, sizeof(h.magic));
  h.version = kBundleVersion;
  h.header_bytes = kHeaderBytes;
  h.n_layers = n_layers;
  h.d_model = d_model;
  h.d_ff = d_ff;
  h.dtype = static_cast<uint32_t>(dtype);
  h.elem_bytes = dtype_bytes(dtype);
  h.n_parts = n_parts;
  for (int i = 0; i < 4; ++i) h.part_kinds[i] = static_cast<uint32_t>(parts[i]);
  FI_CHECK(valid_kinds(h.part_kinds, n_parts),
           "parts must be (up, down) or (up, gate, down); got n_parts=", n_parts);
  h.down_layout = static_cast<uint32_t>(down_layout);
  uint64_t off = 0;  // < 3 * 2^34: no overflow
  for (uint32_t p = 0; p < n_parts; ++p) {
    const uint64_t pb = expected_part_bytes(h, p);
    FI_CHECK(pb < (uint64_t(1) << 32) && off + pb < (uint64_t(1) << 32),
             "a record of d_model=", d_model, " does not fit the header's 32-bit part sizes");
    h.part_bytes[p] = uint32_t(pb);
    h.part_offset[p] = uint32_t(off);
    off += pb;
  }
  h.alignment = alignment;
  h.record_bytes = align_up(off, alignment);
  h.data_offset = align_up(kHeaderBytes, alignment);
  uint64_t n_records = uint64_t(n_layers) * d_ff;  // < 2^64
  // Through a local: the header is packed, file_bytes sits at byte 76, and a uint64_t* to it
  // would be misaligned (undefined behaviour; UBSan in the fuzz build reports it).
  uint64_t data_bytes = 0, file_bytes = 0;
  FI_CHECK(mul_ok(n_records, h.record_bytes, &data_bytes) &&
               add_ok(h.data_offset, data_bytes, &file_bytes),
           "bundle file size overflows 64 bits");
  h.file_bytes = file_bytes;
  return h;
}

uint64_t payload_bytes(const BundleHeader& h) {
  uint64_t sum = 0;
  for (uint32_t p = 0; p < h.n_parts && p < 4; ++p) sum += h.part_bytes[p];
  return sum;
}

// ---------------------------------------------------------------------------------------
// bundle_offset: THE offset function (writer, reader and cache all go through it)
// ---------------------------------------------------------------------------------------

uint64_t bundle_offset(const BundleHeader& h, uint32_t layer, uint32_t neuron) {
  FI_CHECK(layer < h.n_layers, "layer ", layer, " out of range [0, ", h.n_layers, ")");
  FI_CHECK(neuron < h.d_ff, "neuron id ", neuron, " out of range [0, ", h.d_ff, ")");
  // validate_header guarantees data_offset + n_layers*d_ff*record_bytes fits in 64 bits.
  return h.data_offset + (uint64_t(layer) * h.d_ff + neuron) * h.record_bytes;
}

// ---------------------------------------------------------------------------------------
// validate_header: everything a reader relies on, checked once on open
// ---------------------------------------------------------------------------------------

void validate_header(BundleHeader& h, uint64_t file_size, const std::string& path) {
  const std::string& p = path;
  FI_FORMAT_CHECK(std::memcmp(h.magic, kBundleMagic, 8) == 0, p,
                  ": not a flashinfer bundle file (bad magic)", kFixHint);
  FI_FORMAT_CHECK(h.version >= kOldestBundleVersion && h.version <= kBundleVersion, p,
                  ": bundle format version ", h.version, " but this build reads versions ",
                  kOldestBundleVersion, " to ", kBundleVersion, kFixHint);
  FI_FORMAT_CHECK(h.header_bytes == kHeaderBytes, p, ": header_bytes is ", h.header_bytes,
                  ", expected ", kHeaderBytes, kFixHint);
  FI_FORMAT_CHECK(h.n_layers > 0 && h.d_model > 0 && h.d_ff > 0, p,
                  ": empty dimensions (n_layers=", h.n_layers, ", d_model=", h.d_model,
                  ", d_ff=", h.d_ff, ")", kFixHint);
  FI_FORMAT_CHECK(dtype_valid(h.dtype) && (h.version >= 2 || h.dtype <= 2), p,
                  ": unknown dtype code ", h.dtype, kFixHint);
  const DType dt = static_cast<DType>(h.dtype);
  FI_FORMAT_CHECK(h.elem_bytes == dtype_bytes(dt), p, ": elem_bytes ", h.elem_bytes,
                  " does not match dtype ", dtype_name(dt), kFixHint);
  FI_FORMAT_CHECK(valid_kinds(h.part_kinds, h.n_parts), p, ": n_parts=", h.n_parts,
                  " with part kinds [", h.part_kinds[0], ",", h.part_kinds[1], ",",
                  h.part_kinds[2], ",", h.part_kinds[3],
                  "] is not (up, down) or (up, gate, down)", kFixHint);
  // Bounded above too: with record_bytes, it sizes the buffers readers allocate (a crafted
  // sparse file could otherwise ask for terabytes of staging).
  FI_FORMAT_CHECK(is_pow2(h.alignment) && h.alignment >= 512 && h.alignment <= kMaxAlignment,
                  p, ": alignment ", h.alignment, " is not a power of two in [512, ",
                  kMaxAlignment, "]", kFixHint);
  if (h.version == 1) fill_version1_fields(h);
  FI_FORMAT_CHECK(h.down_layout <= 1 && (h.down_layout == 0 || (is_quantized(dt) &&
                                                                 h.d_ff % 32 == 0)),
                  p, ": down_layout ", h.down_layout, " is not 0 (blocks) or 1 (codes with "
                  "a block format and d_ff a multiple of 32)", kFixHint);
  // The parts: each the size its kind and format give, back to back from byte 0.
  uint64_t payload = 0;
  for (uint32_t i = 0; i < 4; ++i) {
    const uint64_t want = i < h.n_parts ? expected_part_bytes(h, i) : 0;
    FI_FORMAT_CHECK(h.part_bytes[i] == want && h.part_offset[i] == (i < h.n_parts ? payload : 0),
                    p, ": part ", i, " has ", h.part_bytes[i], " bytes at offset ",
                    h.part_offset[i], " but ", dtype_name(dt), " parts of d_model=", h.d_model,
                    " need ", want, " bytes at ", payload, kFixHint);
    payload += want;
  }
  // Exactly the parts rounded up to the alignment, as every writer makes it.
  FI_FORMAT_CHECK(h.record_bytes == align_up(payload, h.alignment), p, ": record_bytes ",
                  h.record_bytes, " is not the parts' ", payload, " bytes rounded up to the "
                  "alignment ", h.alignment, kFixHint);
  FI_FORMAT_CHECK(h.data_offset >= h.header_bytes && h.data_offset % h.alignment == 0, p,
                  ": data_offset ", h.data_offset, " must be >= ", h.header_bytes,
                  " and a multiple of alignment ", h.alignment, kFixHint);
  uint64_t data_bytes = 0, expect = 0;
  bool ok = mul_ok(uint64_t(h.n_layers) * h.d_ff, h.record_bytes, &data_bytes) &&
            add_ok(h.data_offset, data_bytes, &expect);
  FI_FORMAT_CHECK(ok && h.file_bytes == expect, p, ": header says file_bytes=", h.file_bytes,
                  " but data_offset + n_layers*d_ff*record_bytes = ",
                  ok ? std::to_string(expect) : std::string("overflow"), kFixHint);
  FI_FORMAT_CHECK(file_size >= h.file_bytes, p, ": file is truncated: ", file_size,
                  " bytes on disk but the header needs ", h.file_bytes, kFixHint);
}

// ---------------------------------------------------------------------------------------
// read_header: a tiny buffered read, then validation
// ---------------------------------------------------------------------------------------

BundleHeader read_header(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw IoError(detail::concat("cannot open ", path, ": ", std::strerror(errno)), errno, path);
  struct stat st;
  if (fstat(fileno(f.get()), &st) != 0)
    throw IoError(detail::concat("cannot stat ", path, ": ", std::strerror(errno)), errno, path);
  BundleHeader h;
  std::memset(&h, 0, sizeof(h));
  std::size_t got = std::fread(&h, 1, sizeof(h), f.get());
  FI_FORMAT_CHECK(got == sizeof(h), path, ": file is ", uint64_t(st.st_size),
                  " bytes, too small to hold the ", sizeof(h), "-byte bundle header", kFixHint);
  validate_header(h, uint64_t(st.st_size), path);
  return h;
}

}  // namespace flashinfer

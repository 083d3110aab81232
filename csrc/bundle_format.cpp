// bundle_format.cpp: header construction, THE offset function, and validation on open.
//
// All size arithmetic is done in uint64 with explicit overflow checks: a corrupt header
// must produce a FormatError, never a wrapped offset that reads the wrong neuron.
#include "bundle_format.h"

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
// names
// ---------------------------------------------------------------------------------------

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------
// make_header: the writer's single source of the layout
// ---------------------------------------------------------------------------------------

BundleHeader make_header(uint32_t n_layers, uint32_t d_model, uint32_t d_ff, DType dtype,
                         const std::array<PartKind, 4>& parts, uint32_t n_parts,
                         uint32_t alignment) {
  FI_CHECK(n_layers > 0 && d_model > 0 && d_ff > 0, "n_layers, d_model and d_ff must be > 0, got ",
           n_layers, ", ", d_model, ", ", d_ff);
  FI_CHECK(static_cast<uint32_t>(dtype) <= 2, "unknown dtype code ", static_cast<uint32_t>(dtype));
  FI_CHECK(is_pow2(alignment) && alignment >= 512,
           "alignment must be a power of two >= 512, got ", alignment);
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
  h.alignment = alignment;
  uint64_t payload = uint64_t(n_parts) * d_model * h.elem_bytes;  // < 2^34, no overflow
  h.record_bytes = align_up(payload, alignment);
  h.data_offset = align_up(kHeaderBytes, alignment);
  uint64_t n_records = uint64_t(n_layers) * d_ff;  // < 2^64
  uint64_t data_bytes = 0;
  FI_CHECK(mul_ok(n_records, h.record_bytes, &data_bytes) &&
               add_ok(h.data_offset, data_bytes, &h.file_bytes),
           "bundle file size overflows 64 bits");
  return h;
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

void validate_header(const BundleHeader& h, uint64_t file_size, const std::string& path) {
  const std::string& p = path;
  FI_FORMAT_CHECK(std::memcmp(h.magic, kBundleMagic, 8) == 0, p,
                  ": not a flashinfer bundle file (bad magic)", kFixHint);
  FI_FORMAT_CHECK(h.version == kBundleVersion, p, ": bundle format version ", h.version,
                  " but this build reads version ", kBundleVersion, kFixHint);
  FI_FORMAT_CHECK(h.header_bytes == kHeaderBytes, p, ": header_bytes is ", h.header_bytes,
                  ", expected ", kHeaderBytes, kFixHint);
  FI_FORMAT_CHECK(h.n_layers > 0 && h.d_model > 0 && h.d_ff > 0, p,
                  ": empty dimensions (n_layers=", h.n_layers, ", d_model=", h.d_model,
                  ", d_ff=", h.d_ff, ")", kFixHint);
  FI_FORMAT_CHECK(h.dtype <= 2, p, ": unknown dtype code ", h.dtype, kFixHint);
  FI_FORMAT_CHECK(h.elem_bytes == dtype_bytes(static_cast<DType>(h.dtype)), p,
                  ": elem_bytes ", h.elem_bytes, " does not match dtype ",
                  dtype_name(static_cast<DType>(h.dtype)), kFixHint);
  FI_FORMAT_CHECK(valid_kinds(h.part_kinds, h.n_parts), p, ": n_parts=", h.n_parts,
                  " with part kinds [", h.part_kinds[0], ",", h.part_kinds[1], ",",
                  h.part_kinds[2], ",", h.part_kinds[3],
                  "] is not (up, down) or (up, gate, down)", kFixHint);
  FI_FORMAT_CHECK(is_pow2(h.alignment) && h.alignment >= 512, p, ": alignment ", h.alignment,
                  " is not a power of two >= 512", kFixHint);
  uint64_t payload = uint64_t(h.n_parts) * h.d_model * h.elem_bytes;
  FI_FORMAT_CHECK(h.record_bytes >= payload && h.record_bytes % h.alignment == 0, p,
                  ": record_bytes ", h.record_bytes, " must be a multiple of alignment ",
                  h.alignment, " and >= ", payload, " (n_parts * d_model * elem_bytes)",
                  kFixHint);
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
  if (!f) throw IoError(detail::concat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fileno(f.get()), &st) != 0)
    throw IoError(detail::concat("cannot stat ", path, ": ", std::strerror(errno)));
  BundleHeader h;
  std::memset(&h, 0, sizeof(h));
  std::size_t got = std::fread(&h, 1, sizeof(h), f.get());
  FI_FORMAT_CHECK(got == sizeof(h), path, ": file is ", uint64_t(st.st_size),
                  " bytes, too small to hold the ", sizeof(h), "-byte bundle header", kFixHint);
  validate_header(h, uint64_t(st.st_size), path);
  return h;
}

}  // namespace flashinfer

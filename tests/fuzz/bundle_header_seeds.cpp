// bundle_header_seeds.cpp: writes the seed corpus of fuzz_bundle_header: valid headers from
// the writer's own make_header (the one the converter's bundle writer calls), one per storage
// format, part layout, down layout and a few shapes (odd, block-straddling, SmolLM2's), plus
// a version-1 header, each in the fuzz target's input format (4096 header bytes, then the
// mode byte; see fuzz_bundle_header.cpp).
//
//   bundle_header_seeds CORPUS_DIR
#include <cstdio>
#include <cstring>
#include <string>

#include "bundle_format.h"

namespace fi = flashinfer;

static void write_seed(const std::string& dir, const std::string& name, const fi::BundleHeader& h,
                       unsigned char mode) {
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::fwrite(&h, 1, sizeof(h), f);
  std::fputc(mode, f);
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  using K = fi::PartKind;
  struct Shape {
    uint32_t n_layers, d_model, d_ff;
  };
  const Shape shapes[] = {{1, 1, 1}, {2, 31, 97}, {3, 64, 32}, {30, 576, 1536}};
  int count = 0;
  for (uint32_t dt = 0; dt < fi::kNumDTypes; ++dt)
    for (uint32_t n_parts : {2u, 3u})
      for (uint32_t layout : {0u, 1u})
        for (const Shape& s : shapes) {
          const auto dtype = fi::DType(dt);
          if (layout == 1 && (!fi::is_quantized(dtype) || s.d_ff % 32)) continue;
          const std::array<K, 4> parts = n_parts == 2 ? std::array<K, 4>{K::Up, K::Down}
                                                      : std::array<K, 4>{K::Up, K::Gate, K::Down};
          const fi::BundleHeader h = fi::make_header(s.n_layers, s.d_model, s.d_ff, dtype, parts,
                                                     n_parts, fi::kIoAlignment,
                                                     fi::DownLayout(layout));
          const std::string name = std::string(fi::dtype_name(dtype)) + "-" +
                                   std::to_string(n_parts) + "parts-" +
                                   (layout ? "codes-" : "") + std::to_string(s.n_layers) + "x" +
                                   std::to_string(s.d_model) + "x" + std::to_string(s.d_ff);
          // mode 1: the file the header declares; a few on disk with direct I/O (5), or truncated (2)
          write_seed(dir, name, h, (count % 5 == 0) ? 5 : (count % 7 == 0) ? 2 : 1);
          ++count;
        }
  // Version 1: float formats, equal parts, the version-2 fields zero.
  fi::BundleHeader v1 = fi::make_header(2, 31, 97, fi::DType::F16, {K::Up, K::Gate, K::Down}, 3);
  v1.version = 1;
  v1.down_layout = 0;
  std::memset(v1.part_bytes, 0, sizeof(v1.part_bytes));
  std::memset(v1.part_offset, 0, sizeof(v1.part_offset));
  write_seed(dir, "float16-3parts-version1", v1, 1);
  std::printf("%d seeds in %s\n", count + 1, dir.c_str());
  return 0;
}

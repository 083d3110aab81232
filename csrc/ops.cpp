// ops.cpp: see ops.h. The attention has an AVX2 path (scores, a vector exp, the weighted sum
// of values) picked at run time like the kernels'; the norms and RoPE are plain loops (a few
// hundred values a call).
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"  // kernel_isa
#include "simd.h"

namespace flashinfer {

void rms_norm(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * double(xr[i]);
    const float var = static_cast<float>(ss / double(d));
    const float inv = 1.0f / std::sqrt(var + eps);
    float* o = out + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

void rope_rows(float* x, int64_t n, int64_t ld, int64_t half, const float* cos, const float* sin) {
  for (int64_t r = 0; r < n; ++r) {
    float* a = x + r * ld;
    float* b = a + half;
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = a[i], x1 = b[i];
      a[i] = x0 * cos[i] - x1 * sin[i];
      b[i] = x1 * cos[half + i] + x0 * sin[half + i];
    }
  }
}

namespace {

// One head: p[s] = softcap(scale * q . k[s]), then out = sum_s softmax(p)_s v[s].
void scalar_head(const float* qh, const float* kg, const float* vg, int64_t s_n, int64_t hd,
                 float scale, float softcap, float* p, float* o) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < s_n; ++s) {
    const float* k = kg + s * hd;
    float lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += qh[i + l] * k[i + l];
    float dot = 0.f;
    for (float v : lanes) dot += v;
    for (; i < hd; ++i) dot += qh[i] * k[i];
    float v = dot * scale;
    if (softcap > 0.f) v = softcap * std::tanh(v / softcap);
    p[s] = v;
    mx = std::max(mx, v);
  }
  double sum = 0.0;
  for (int64_t s = 0; s < s_n; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  const float inv = static_cast<float>(1.0 / sum);
  std::fill(o, o + hd, 0.f);
  for (int64_t s = 0; s < s_n; ++s) {
    const float ps = p[s] * inv;
    const float* v = vg + s * hd;
    for (int64_t i = 0; i < hd; ++i) o[i] += ps * v[i];
  }
}

#ifdef FI_HAVE_X86
// exp of 8 floats <= 0 (Cephes' expf: range reduction by ln 2 in two parts, a degree-5
// polynomial; within 2 ulp of expf, 0 below -87).
FI_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

FI_AVX2 void avx2_head(const float* qh, const float* kg, const float* vg, int64_t s_n,
                       int64_t hd, float scale, float softcap, float* p, float* o) {
  if (hd % 8 != 0) return scalar_head(qh, kg, vg, s_n, hd, scale, softcap, p, o);
  float mx = -INFINITY;
  for (int64_t s = 0; s < s_n; ++s) {
    const float* k = kg + s * hd;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i + 8), _mm256_loadu_ps(k + i + 8), a1);
    }
    if (i < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), a0);
    float v = fi_hsum8(_mm256_add_ps(a0, a1)) * scale;
    if (softcap > 0.f) v = softcap * std::tanh(v / softcap);
    p[s] = v;
    mx = std::max(mx, v);
  }
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= s_n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), m));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = fi_hsum8(acc);
  if (s < s_n) {
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t q = s; q < s_n; ++q) t[q - s] = p[q] - mx;
    alignas(32) float e[8];
    _mm256_store_ps(e, exp8(_mm256_load_ps(t)));
    for (int64_t q = s; q < s_n; ++q) {
      p[q] = e[q - s];
      sum += e[q - s];
    }
  }
  const float inv = 1.0f / sum;
  std::fill(o, o + hd, 0.f);
  for (s = 0; s < s_n; ++s) {
    const __m256 ps = _mm256_set1_ps(p[s] * inv);
    const float* v = vg + s * hd;
    for (int64_t i = 0; i < hd; i += 8)
      _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
  }
}
#endif

}  // namespace

void attend1(const float* q, int64_t n_heads, int64_t hd, const float* keys,
             const float* values, int64_t n_kv, int64_t cap, int64_t first, int64_t end,
             float scale, float softcap, float* out) {
  const int64_t s_n = end - first, group = n_heads / n_kv;
  thread_local std::vector<float> p;
  p.resize(static_cast<size_t>(std::max<int64_t>(s_n, 1)));
  auto head = &scalar_head;
#ifdef FI_HAVE_X86
  if (kernel_isa() >= Isa::Avx2) head = &avx2_head;
#endif
  for (int64_t h = 0; h < n_heads; ++h) {
    const int64_t g = h / group;
    head(q + h * hd, keys + (g * cap + first) * hd, values + (g * cap + first) * hd, s_n, hd,
         scale, softcap, p.data(), out + h * hd);
  }
}

}  // namespace flashinfer

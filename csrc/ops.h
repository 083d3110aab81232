// ops.h: the small operations of a decode step (one token), in native code.
//
// Why: a decode step of a small model is ~150 matrix calls of 20-300 us and, between them,
// per layer a dozen numpy operations on vectors of a few hundred floats (norms, RoPE, the
// attention over the cached keys), each ~1-5 us of interpreter and dispatch overhead: about
// 5 ms a token for SmolLM2, a third of llama.cpp's whole token. model.py runs these instead
// for one token; prompts (several tokens) keep their numpy code, whose cost is amortized.
// Arithmetic is float32 like the numpy code's (sums in double where numpy sums pairwise), so
// results agree to float32 rounding.
#pragma once

#include <cstdint>

namespace flashinfer {

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for n rows of d (x and out may alias).
void rms_norm(const float* x, int64_t n, int64_t d, const float* w, float eps, float* out);

// Rotate-half RoPE in place on the first 2 * half values of each of n rows of length ld:
// x[i] = x[i] cos[i] - x[i + half] sin[i], x[i + half] = x[i + half] cos[i + half] +
// x[i] sin[i + half] (cos, sin: 2 * half values, Hugging Face's layout: the table repeated).
void rope_rows(float* x, int64_t n, int64_t ld, int64_t half, const float* cos, const float* sin);

// Attention of one query token: for head h (key/value head h / (n_heads / n_kv)),
//   p = softmax(softcap(scale * q_h . k[s]) for s in [first, end))
//   out[h] = sum_s p_s v[s]
// q (n_heads, hd); keys, values (n_kv, cap, hd) (the KV cache: rows [first, end) used);
// softcap <= 0: none. out (n_heads, hd).
void attend1(const float* q, int64_t n_heads, int64_t hd, const float* keys,
             const float* values, int64_t n_kv, int64_t cap, int64_t first, int64_t end,
             float scale, float softcap, float* out);

}  // namespace flashinfer

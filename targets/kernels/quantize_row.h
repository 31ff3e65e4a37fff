// Per-row symmetric int8 quantization shared by the kernels (included by dlrm_fast.cpp and
// dlrm_int8.cpp; targets/cpp_extension.py hashes this header into their build flags, so an edit
// here rebuilds both).
//   q[c] = round(x[c] / s) (half away from zero), s = max|x| / 127 (1 for an all-zero row),
//   q[k..kp) = 0.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

inline void quantize_row(const float* x, int64_t k, int64_t kp, int8_t* q, float* s) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < k; ++c) m = std::max(m, std::fabs(x[c]));
  const float scale = m > 0.f ? m / 127.f : 1.f;
  const float inv = 1.f / scale;
#pragma omp simd
  for (int64_t c = 0; c < k; ++c) {   // |x * inv| <= 127
    const float v = x[c] * inv;
    q[c] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.f ? 0.5f : -0.5f)));
  }
  for (int64_t c = k; c < kp; ++c) q[c] = 0;
  *s = scale;
}

// Per-row symmetric int8 quantization shared by the kernels (targets/native/cpp_extension.py
// hashes every header into each module's name, so an edit here rebuilds them).
//   q[c] = round(x[c] / s) (half away from zero), s = max|x| / 127 (1 for an all-zero row),
//   q[k..kp) = 0.
// With AVX-512 the row is done 16 floats at a time, with AVX2 8 (abs-max, then scale, round,
// saturating narrow; the same arithmetic as the plain loops, so every tier writes the same
// bytes): GCC's auto-vectorised form of the plain loops cost ~150 ns per 367-wide row here,
// a third of torch-fast-int8's fused lookup + interaction at B=2048.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if (defined(__AVX512F__) && defined(__AVX512BW__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

inline void quantize_row(const float* x, int64_t k, int64_t kp, int8_t* q, float* s) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 sign = _mm512_set1_ps(-0.f);
  __m512 mv = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 m = c + 16 <= k ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (k - c)) - 1);
    mv = _mm512_max_ps(mv, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(m, x + c)));
  }
  const float top = _mm512_reduce_max_ps(mv);
  const float scale = top > 0.f ? top / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / scale), half = _mm512_set1_ps(0.5f);
  for (int64_t c = 0; c < k; c += 16) {   // |x * inv| <= 127: truncating v + copysign(0.5, v) rounds half away
    const __mmask16 m = c + 16 <= k ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (k - c)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), inv);
    const __m512 r = _mm512_add_ps(v, _mm512_or_ps(half, _mm512_and_ps(sign, v)));
    _mm_mask_storeu_epi8(q + c, m, _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r)));
  }
#elif defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  const int64_t k8 = k / 8 * 8, k32 = k / 32 * 32;
  __m256 mv = _mm256_setzero_ps();
  for (int64_t c = 0; c < k8; c += 8) mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + c)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float top = 0.f;
  for (float v : lanes) top = std::max(top, v);
  for (int64_t c = k8; c < k; ++c) top = std::max(top, std::fabs(x[c]));
  const float scale = top > 0.f ? top / 127.f : 1.f;
  const float inv = 1.f / scale;
  const __m256 invv = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
  auto rounded = [&](int64_t c) {   // as the scalar tail below: truncate v + copysign(0.5, v)
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + c), invv);
    return _mm256_cvttps_epi32(_mm256_add_ps(v, _mm256_or_ps(half, _mm256_and_ps(sign, v))));
  };
  for (int64_t c = 0; c < k32; c += 32) {   // 4 x 8 s32 -> 32 s8; the packs interleave 128-bit lanes
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(rounded(c), rounded(c + 8)),
                                         _mm256_packs_epi32(rounded(c + 16), rounded(c + 24)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (int64_t c = k32; c < k; ++c) {
    const float v = x[c] * inv;
    q[c] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.f ? 0.5f : -0.5f)));
  }
#else
  float top = 0.f;
  for (int64_t c = 0; c < k; ++c) top = std::max(top, std::fabs(x[c]));
  const float scale = top > 0.f ? top / 127.f : 1.f;
  const float inv = 1.f / scale;
  for (int64_t c = 0; c < k; ++c) {   // |x * inv| <= 127
    const float v = x[c] * inv;
    q[c] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.f ? 0.5f : -0.5f)));
  }
#endif
  if (kp > k) std::memset(q + k, 0, kp - k);
  *s = scale;
}

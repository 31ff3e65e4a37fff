// Pooling the bags of plain rows (ROW and HASH features): one row decoded per format (f32, fp16,
// int8 / int4 / int2 row-wise) in registers, summed in f32; a quantized bag sums scale q and adds
// the biases once: sum_k (s_k q_k + b_k) = sum_k s_k q_k + sum_k b_k.  d = 16 (Criteo's shape) has
// AVX-512 and AVX2 forms, other widths plain loops the compiler vectorises.
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "tables.h"

namespace {

// An out-of-range id points here (then an error): zero codes, and for the quantized formats a zero
// scale and bias wherever they sit (every byte is 0).
alignas(64) const float ZERO_ROW[MAX_D + 16] = {};

inline float half_at(const char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// A quantized row's scale and bias (after its d codes).
template <int64_t FMT>
inline void scale_bias(const char* row, int64_t d, float* s, float* b) {
  if constexpr (FMT == Q8) {
    std::memcpy(s, row + d, 4);
    std::memcpy(b, row + d + 4, 4);
  } else {
    const int64_t nc = FMT == Q4 ? (d + 1) / 2 : (d + 3) / 4;
    *s = half_at(row + nc);
    *b = half_at(row + nc + 2);
  }
}

// Code j of a quantized row.
template <int64_t FMT>
inline float code(const uint8_t* c, int64_t j) {
  if constexpr (FMT == Q8) return static_cast<float>(c[j]);
  else if constexpr (FMT == Q4) return static_cast<float>((c[j >> 1] >> ((j & 1) * 4)) & 15);
  else return static_cast<float>((c[j >> 2] >> ((j & 3) * 2)) & 3);
}

// Row element c as f32 of a plain table.
template <int64_t FMT>
inline float element(const char* row, int64_t c) {
  if constexpr (FMT == F32) return reinterpret_cast<const float*>(row)[c];
  else return static_cast<float>(reinterpret_cast<const at::Half*>(row)[c]);
}

// 1 / len for a mean-pooled bag of len > 1, else 1.
inline float bag_scale(const Bags& g, int64_t f, int64_t count) {
  return g.at(f, MEAN) && count > 1 ? 1.f / static_cast<float>(count) : 1.f;
}

// Sums the bags of feature f, samples [lo, hi), whose row addresses (rows of `width` values in
// format FMT) are q[0 ..] in order; writes o = out + (b - lo) * stride.  Returns q advanced past them.
template <int64_t FMT, int64_t D, bool STREAM>
const char* const* sum_feature(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char* const* q, float* out,
                               int64_t stride, int64_t width) {
  const int64_t d = D > 0 ? D : width;
  const int64_t* off = g.off + f * g.batch;
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t count = off[b + 1] - off[b];
    const float scale = bag_scale(g, f, count);
    float* o = out + (b - lo) * stride;
#ifdef DLRM_FAST_AVX512
    if constexpr (D == 16) {
      __m512 acc = _mm512_setzero_ps();
      float bias = 0.f;
      for (int64_t k = 0; k < count; ++k, ++q) {
        __builtin_prefetch(q[PREFETCH]);
        const char* row = *q;
        if constexpr (FMT == F32) {
          acc = _mm512_add_ps(acc, _mm512_loadu_ps(reinterpret_cast<const float*>(row)));
        } else if constexpr (FMT == F16) {
          acc = _mm512_add_ps(acc, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))));
        } else if constexpr (FMT == Q8 || FMT == Q4) {
          float s, bb;
          scale_bias<FMT>(row, 16, &s, &bb);
          __m128i codes;
          if constexpr (FMT == Q8) {
            codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
          } else {   // 8 bytes -> 16 nibbles in order: low nibble of byte j/2 for even j
            const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
            const __m128i mask = _mm_set1_epi8(0x0F);
            codes = _mm_unpacklo_epi8(_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
          }
          acc = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), acc);
          bias += bb;
        } else {
          float s, bb;
          scale_bias<FMT>(row, 16, &s, &bb);
          alignas(64) float v[16];
          const uint8_t* c = reinterpret_cast<const uint8_t*>(row);
          for (int64_t j = 0; j < 16; ++j) v[j] = code<FMT>(c, j);
          acc = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_load_ps(v), acc);
          bias += bb;
        }
      }
      acc = _mm512_mul_ps(_mm512_add_ps(acc, _mm512_set1_ps(bias)), _mm512_set1_ps(scale));
      if constexpr (STREAM) _mm512_stream_ps(o, acc);
      else _mm512_storeu_ps(o, acc);
      continue;
    }
#endif
#ifdef DLRM_FAST_AVX2
    if constexpr (D == 16) {   // two 8-lane accumulators
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      float bias = 0.f;
      for (int64_t k = 0; k < count; ++k, ++q) {
        __builtin_prefetch(q[PREFETCH]);
        const char* row = *q;
        if constexpr (FMT == F32) {
          a0 = _mm256_add_ps(a0, _mm256_loadu_ps(reinterpret_cast<const float*>(row)));
          a1 = _mm256_add_ps(a1, _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8));
        } else if constexpr (FMT == F16) {
          a0 = _mm256_add_ps(a0, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
          a1 = _mm256_add_ps(a1, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16))));
        } else {
          float sc, bb;
          scale_bias<FMT>(row, 16, &sc, &bb);
          __m128i codes;
          if constexpr (FMT == Q8) {
            codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
          } else if constexpr (FMT == Q4) {
            const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
            const __m128i mask = _mm_set1_epi8(0x0F);
            codes = _mm_unpacklo_epi8(_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
          } else {
            alignas(16) uint8_t c16[16];
            const uint8_t* c = reinterpret_cast<const uint8_t*>(row);
            for (int64_t j = 0; j < 16; ++j) c16[j] = static_cast<uint8_t>((c[j >> 2] >> ((j & 3) * 2)) & 3);
            codes = _mm_load_si128(reinterpret_cast<const __m128i*>(c16));
          }
          const __m256 sv = _mm256_set1_ps(sc);
          a0 = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), a0);
          a1 = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))), a1);
          bias += bb;
        }
      }
      const __m256 bv = _mm256_set1_ps(bias), mv = _mm256_set1_ps(scale);
      a0 = _mm256_mul_ps(_mm256_add_ps(a0, bv), mv);
      a1 = _mm256_mul_ps(_mm256_add_ps(a1, bv), mv);
      if constexpr (STREAM) {
        _mm256_stream_ps(o, a0);
        _mm256_stream_ps(o + 8, a1);
      } else {
        _mm256_storeu_ps(o, a0);
        _mm256_storeu_ps(o + 8, a1);
      }
      continue;
    }
#endif
    float acc[D > 0 ? D : MAX_D];
    float bias = 0.f;
    for (int64_t c = 0; c < d; ++c) acc[c] = 0.f;
    for (int64_t k = 0; k < count; ++k, ++q) {
      __builtin_prefetch(q[PREFETCH]);
      const char* row = *q;
      if constexpr (FMT == F32 || FMT == F16) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) acc[c] += element<FMT>(row, c);
      } else {
        float s, bb;
        scale_bias<FMT>(row, d, &s, &bb);
        const uint8_t* cp = reinterpret_cast<const uint8_t*>(row);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) acc[c] += s * code<FMT>(cp, c);
        bias += bb;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[c] = (acc[c] + bias) * scale;
  }
  return q;
}

template <int64_t D, bool STREAM>
const char* const* sum_any(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char* const* q, float* out,
                           int64_t stride, int64_t width) {
  switch (g.at(f, FMT)) {
    case F32: return sum_feature<F32, D, STREAM>(g, f, lo, hi, q, out, stride, width);
    case F16: return sum_feature<F16, D, STREAM>(g, f, lo, hi, q, out, stride, width);
    case Q8: return sum_feature<Q8, D, STREAM>(g, f, lo, hi, q, out, stride, width);
    case Q4: return sum_feature<Q4, D, STREAM>(g, f, lo, hi, q, out, stride, width);
    default: return sum_feature<Q2, D, STREAM>(g, f, lo, hi, q, out, stride, width);
  }
}

}  // namespace

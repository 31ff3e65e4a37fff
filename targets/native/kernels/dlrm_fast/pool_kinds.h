// Pooling the bags of the other kinds that read rows (QR, HOTCOLD, PRUNED: two addresses per
// lookup from `addresses` in gather.h) and of TT (contracted from its cores here, no addresses).
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "pool_rows.h"

namespace {

// acc[0 .. w) += the row at `row` in format FMT; a quantized row's bias goes to *bias.
template <int64_t FMT>
inline void add_row(float* acc, float* bias, const char* row, int64_t w) {
  if constexpr (FMT == F32 || FMT == F16) {
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) acc[c] += element<FMT>(row, c);
  } else {
    float s, bb;
    scale_bias<FMT>(row, w, &s, &bb);
    const uint8_t* cp = reinterpret_cast<const uint8_t*>(row);
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) acc[c] += s * code<FMT>(cp, c);
    *bias += bb;
  }
}

// QR bags: two f32 rows per lookup (q[0] from Q, q[1] from S), combined per lookup, or pooled
// apart and combined after (pool_first mult; add and concat are the same either way).
const char* const* sum_qr(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char* const* q, float* out,
                          int64_t stride) {
  const int64_t w = g.at(f, WIDTH), op = g.at(f, P2);
  const bool apart = op == 2 || (op == 0 && g.at(f, P3));
  const int64_t* off = g.off + f * g.batch;
  float a0[MAX_D], a1[MAX_D];
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t count = off[b + 1] - off[b];
    const float scale = bag_scale(g, f, count);
    std::fill(a0, a0 + w, 0.f);
    std::fill(a1, a1 + w, 0.f);
    for (int64_t k = 0; k < count; ++k, q += 2) {
      __builtin_prefetch(q[PREFETCH]);
      __builtin_prefetch(q[PREFETCH + 1]);
      const float* x = reinterpret_cast<const float*>(q[0]);
      const float* y = reinterpret_cast<const float*>(q[1]);
      if (apart) {
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) { a0[c] += x[c]; a1[c] += y[c]; }
      } else if (op == 0) {
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) a0[c] += x[c] * y[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) a0[c] += x[c] + y[c];
      }
    }
    float* o = out + (b - lo) * stride;
    if (op == 2) {
      for (int64_t c = 0; c < w; ++c) { o[c] = a0[c] * scale; o[w + c] = a1[c] * scale; }
    } else if (apart) {
      for (int64_t c = 0; c < w; ++c) o[c] = (a0[c] * scale) * (a1[c] * scale);
    } else {
      for (int64_t c = 0; c < w; ++c) o[c] = a0[c] * scale;
    }
  }
  return q;
}

// Hot-cold bags: per lookup q[0] a hot f32 row or ZERO_ROW, q[1] a cold row (format FMT) or ZERO_ROW.
template <int64_t FMT>
const char* const* sum_hotcold(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char* const* q, float* out,
                               int64_t stride) {
  const int64_t w = g.at(f, WIDTH);
  const int64_t* off = g.off + f * g.batch;
  float acc[MAX_D];
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t count = off[b + 1] - off[b];
    const float scale = bag_scale(g, f, count);
    float bias = 0.f;
    std::fill(acc, acc + w, 0.f);
    for (int64_t k = 0; k < count; ++k, q += 2) {
      __builtin_prefetch(q[PREFETCH]);
      __builtin_prefetch(q[PREFETCH + 1]);
      add_row<F32>(acc, &bias, q[0], w);
      add_row<FMT>(acc, &bias, q[1], w);
    }
    float* o = out + (b - lo) * stride;
    for (int64_t c = 0; c < w; ++c) o[c] = (acc[c] + bias) * scale;
  }
  return q;
}

// Pruned bags: per lookup q[0] an f32 row of its level's width, q[1] that width (as an integer).
const char* const* sum_pruned(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char* const* q, float* out,
                              int64_t stride) {
  const int64_t w = g.at(f, WIDTH);
  const int64_t* off = g.off + f * g.batch;
  float acc[MAX_D];
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t count = off[b + 1] - off[b];
    const float scale = bag_scale(g, f, count);
    std::fill(acc, acc + w, 0.f);
#ifdef DLRM_FAST_AVX512
    if (w == 16) {   // one masked load per lookup, not a loop of the level's width
      __m512 a = _mm512_setzero_ps();
      for (int64_t k = 0; k < count; ++k, q += 2) {
        __builtin_prefetch(q[PREFETCH]);
        const __mmask16 m = static_cast<__mmask16>((1u << reinterpret_cast<uintptr_t>(q[1])) - 1);
        a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, q[0]));
      }
      _mm512_storeu_ps(acc, a);
    } else
#elif defined(DLRM_FAST_AVX2)
    if (w == 16) {   // two masked 8-lane loads per lookup
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t k = 0; k < count; ++k, q += 2) {
        __builtin_prefetch(q[PREFETCH]);
        const int n = static_cast<int>(reinterpret_cast<uintptr_t>(q[1]));
        const float* x = reinterpret_cast<const float*>(q[0]);
        a0 = _mm256_add_ps(a0, _mm256_maskload_ps(x, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)));
        a1 = _mm256_add_ps(a1, _mm256_maskload_ps(x + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane)));
      }
      _mm256_storeu_ps(acc, a0);
      _mm256_storeu_ps(acc + 8, a1);
    } else
#endif
    for (int64_t k = 0; k < count; ++k, q += 2) {
      __builtin_prefetch(q[PREFETCH]);
      const float* x = reinterpret_cast<const float*>(q[0]);
      const int64_t n = static_cast<int64_t>(reinterpret_cast<uintptr_t>(q[1]));
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += x[c];
    }
    float* o = out + (b - lo) * stride;
    for (int64_t c = 0; c < w; ++c) o[c] = acc[c] * scale;
  }
  return q;
}

// TT bags: each lookup's row from the cache, or contracted from one row of every core
// (x <- x G_k, x [width, r_k] -> [width q_k, r_{k+1}]); false if an id or slot was out of range.
bool sum_tt(const Bags& g, int64_t f, int64_t lo, int64_t hi, float* out, int64_t stride) {
  const TtTable tt{reinterpret_cast<const int64_t*>(g.w + g.at(f, P0))};
  const int64_t nk = tt.cores(), d = g.d, cache_rows = tt.t[1];
  const uint64_t rows = static_cast<uint64_t>(g.at(f, ROWS));
  const float* cache = reinterpret_cast<const float*>(g.w + tt.t[2]);
  const char* index = g.w + tt.t[3];
  int64_t radix[TT_MAX_CORES], need = 1, span = 1;   // need: a core row; span: the largest x
  for (int64_t k = nk - 1, acc = 1; k >= 0; --k) {
    radix[k] = acc;
    acc = std::min<int64_t>(acc * tt.core(k)[1], int64_t(1) << 62);
    need = std::max(need, tt.core(k)[3] * tt.core(k)[2] * tt.core(k)[4]);
  }
  for (int64_t k = 0, width = 1; k < nk; ++k) {
    width *= tt.core(k)[2];
    span = std::max(span, width * tt.core(k)[4]);
  }
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * span + need) buf.resize(2 * span + need);
  const int64_t* off = g.off + f * g.batch;
  bool ok = true;
  float acc[MAX_D];
  for (int64_t b = lo; b < hi; ++b) {
    const int64_t count = off[b + 1] - off[b];
    const float scale = bag_scale(g, f, count);
    std::fill(acc, acc + d, 0.f);
    for (int64_t p = off[b]; p < off[b + 1]; ++p) {
      const uint64_t i = static_cast<uint64_t>(g.idx[p]);
      if (i >= rows) { ok = false; continue; }
      if (cache_rows > 0) {
        int64_t slot = -1;
        if (tt.t[4] == 0) {   // sorted ids: binary search
          const int32_t* ids = reinterpret_cast<const int32_t*>(index);
          const int32_t* at = std::lower_bound(ids, ids + tt.t[5], static_cast<int64_t>(i),
                                               [](int32_t a, int64_t v) { return static_cast<int64_t>(a) < v; });
          if (at != ids + tt.t[5] && static_cast<int64_t>(*at) == static_cast<int64_t>(i)) slot = at - ids;
        } else {
          slot = remap_at(index, tt.t[4], i);
        }
        if (slot >= cache_rows) { ok = false; continue; }
        if (slot >= 0) {
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) acc[c] += cache[slot * d + c];
          continue;
        }
      }
      float* x = buf.data();
      float* y = x + span;
      float* row = y + span;
      int64_t width = 1, rest = static_cast<int64_t>(i);
      for (int64_t k = 0; k < nk; ++k) {
        const int64_t* core = tt.core(k);
        const int64_t digit = rest / radix[k], r0 = core[3], q = core[2], r1 = core[4], n = r0 * q * r1;
        rest -= digit * radix[k];
        const float* gk;
        if (core[5] == 32) {
          gk = reinterpret_cast<const float*>(g.w + core[0]) + digit * n;
        } else {
          const uint8_t* codes = reinterpret_cast<const uint8_t*>(g.w + core[0]) + digit * n;
          const float* sb = reinterpret_cast<const float*>(g.w + core[6]) + 2 * digit;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) row[c] = static_cast<float>(codes[c]) * sb[0] + sb[1];
          gk = row;
        }
        if (k == 0) {   // x [q, r1] = G_0 row
          std::memcpy(x, gk, n * sizeof(float));
        } else {        // y [width, q r1] = x [width, r0] G [r0, q r1]
          const int64_t m = q * r1;
          for (int64_t a = 0; a < width; ++a) {
            float* ya = y + a * m;
            std::fill(ya, ya + m, 0.f);
            for (int64_t t = 0; t < r0; ++t) {
              const float xv = x[a * r0 + t];
              const float* gt = gk + t * m;
#pragma omp simd
              for (int64_t c = 0; c < m; ++c) ya[c] += xv * gt[c];
            }
          }
          std::swap(x, y);
        }
        width *= q;
      }
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += x[c];
    }
    float* o = out + (b - lo) * stride;
    for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * scale;
  }
  return ok;
}

}  // namespace

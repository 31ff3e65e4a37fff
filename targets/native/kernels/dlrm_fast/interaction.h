// The dot interaction of each sample's tile T_b = [x_b; e[b, 0]; ..; e[b, F-1]]: G = T_b T_bᵀ, the
// kept pairs written after x_b (for_interaction_rows), in bf16 or f32.  The d = 16, F + 1 <= 32
// case (Criteo's shape) has an AVX-512 Gram (two 16x16 register transposes, then G row i =
// sum_c T[i][c] * Tᵀ[c]) and an AVX2 one; other shapes use plain loops.
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "gather.h"

namespace {

// [lo, hi) of the columns j kept in row i of G, for the pair orders of rewrite.core.model.interaction_pairs.
inline void pair_range(int64_t order, int64_t i, int64_t nv, int64_t* lo, int64_t* hi) {
  if (order == 0) { *lo = 0; *hi = i; }
  else if (order == 1) { *lo = 0; *hi = i + 1; }
  else { *lo = i + 1; *hi = nv; }
}

inline uint16_t to_bf16(float v) {   // round to nearest even, as the hardware conversion does
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);   // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// z's element type: bf16 bits (torch-fast's top MLP input) or f32 (quantized per row afterwards).
inline void put(uint16_t* z, float v) { *z = to_bf16(v); }
inline void put(float* z, float v) { *z = v; }

// Generic interaction row: T [nv, d] row-major -> z, pairs in `order`.
template <typename Z>
void interact_generic(const float* t, int64_t nv, int64_t d, int64_t order, Z* z) {
  for (int64_t c = 0; c < d; ++c) put(z + c, t[c]);
  int64_t k = d;
  for (int64_t i = 0; i < nv; ++i) {
    int64_t lo, hi;
    pair_range(order, i, nv, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) acc += t[i * d + c] * t[j * d + c];
      put(z + k++, acc);
    }
  }
}

#ifdef DLRM_FAST_AVX512
// In-register transpose of a 16x16 f32 block: r[k] row k in, column k out.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {   // 128-bit lanes: rows k, k+4, k+8, k+12 hold lane groups
    t[k] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0x88);
    t[k + 4] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
    r[k + 4] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0x88);
    r[k + 12] = _mm512_shuffle_f32x4(t[k + 4], t[k + 12], 0xDD);
  }
}

// Columns [lo, lo + n) of a Gram row (g0: columns 0-15, g1: 16-31), packed to out[0 .. n).
inline void store_pairs(uint16_t* out, __m512 g0, __m512 g1, int64_t lo, int64_t n) {
  const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(g1, g0);   // bf16 of columns 0..31
  const __mmask32 keep = static_cast<__mmask32>(((uint64_t(1) << n) - 1) << lo);
  _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t(1) << n) - 1),
                           lo == 0 ? v : _mm512_maskz_compress_epi16(keep, v));
}

inline void store_pairs(float* out, __m512 g0, __m512 g1, int64_t lo, int64_t n) {
  const uint32_t keep = static_cast<uint32_t>(((uint64_t(1) << n) - 1) << lo);
  const __mmask16 k0 = static_cast<__mmask16>(keep), k1 = static_cast<__mmask16>(keep >> 16);
  const int n0 = __builtin_popcount(k0);
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n0) - 1), lo == 0 ? g0 : _mm512_maskz_compress_ps(k0, g0));
  _mm512_mask_storeu_ps(out + n0, static_cast<__mmask16>((1u << (n - n0)) - 1), _mm512_maskz_compress_ps(k1, g1));
}

inline void store_row0(uint16_t* z, const float* t) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(z), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(t)));
}
inline void store_row0(float* z, const float* t) { _mm512_storeu_ps(z, _mm512_load_ps(t)); }

// d = 16, nv <= 32: T [32, 16] (rows >= nv zero, 64-byte aligned) -> z.
// G row i = sum_c T[i][c] * Tᵀ[c] (two vectors: columns 0-15 and 16-31), four rows at a time.
template <typename Z>
inline void interact_avx512(const float* t, int64_t nv, int64_t order, Z* z) {
  alignas(64) float tt[16][32];   // Tᵀ: tt[c][j] = T[j][c]
  __m512 r[16];
  for (int half = 0; half < 2; ++half) {
    for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(t + (half * 16 + k) * 16);
    transpose16(r);
    for (int c = 0; c < 16; ++c) _mm512_store_ps(&tt[c][half * 16], r[c]);
  }
  store_row0(z, t);
  Z* out = z + 16;
  for (int64_t i0 = 0; i0 < nv; i0 += 4) {   // 4 rows at a time: each Tᵀ[c] load feeds 4 FMA chains
    const int64_t rows = std::min<int64_t>(4, nv - i0);
    int64_t lo[4], hi[4];
    bool upper = false;
    for (int64_t r = 0; r < rows; ++r) {
      pair_range(order, i0 + r, nv, &lo[r], &hi[r]);
      upper |= hi[r] > 16;
    }
    __m512 g0[4], g1[4];
    for (int r = 0; r < 4; ++r) g0[r] = g1[r] = _mm512_setzero_ps();
    for (int c = 0; c < 16; ++c) {
      const __m512 u = _mm512_load_ps(&tt[c][0]);
      const __m512 v = upper ? _mm512_load_ps(&tt[c][16]) : u;
      for (int r = 0; r < 4; ++r) {   // rows past nv read zero rows of the tile, never stored
        const __m512 a = _mm512_set1_ps(t[(i0 + r) * 16 + c]);
        g0[r] = _mm512_fmadd_ps(a, u, g0[r]);
        if (upper) g1[r] = _mm512_fmadd_ps(a, v, g1[r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {   // kept columns [lo, hi) of row r, packed to the front
      const int64_t n = hi[r] - lo[r];
      if (n <= 0) continue;
      store_pairs(out, g0[r], g1[r], lo[r], n);
      out += n;
    }
  }
}
#endif

#ifdef DLRM_FAST_AVX2
// In-register transpose of an 8x8 f32 block: r[k] row k in, column k out.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {   // 128-bit lanes: u[k] holds columns k (low) and k + 4 (high)
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

// Rows i0 .. i0 + R of G over columns [0, 8 NV): g[r][j] = sum_c T[i0 + r][c] Tᵀ[c][j].  R x NV
// accumulators in registers (NV and R constants, so the arrays never reach the stack); each Tᵀ
// vector load feeds R FMA chains.
template <int R, int NV>
inline void gram_rows(const float* t, const float (*tt)[32], int64_t i0, float (*g)[32]) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int c = 0; c < 16; ++c) {
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_set1_ps(t[(i0 + r) * 16 + c]);
    for (int v = 0; v < NV; ++v) {
      const __m256 u = _mm256_load_ps(&tt[c][8 * v]);
      for (int r = 0; r < R; ++r) acc[r][v] = _mm256_fmadd_ps(a[r], u, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm256_store_ps(&g[r][8 * v], acc[r][v]);
}

// d = 16, nv <= 32: T [32, 16] (rows >= nv zero, 32-byte aligned) -> z.  Tᵀ by 8x8 register
// transposes, then G four rows at a time (two where a row needs all four column vectors), each
// row over the column vectors covering the widest kept range among its group.
template <typename Z>
inline void interact_avx2(const float* t, int64_t nv, int64_t order, Z* z) {
  alignas(32) float tt[16][32];   // Tᵀ: tt[c][j] = T[j][c]
  const int blocks = static_cast<int>((nv + 7) / 8);
  for (int jb = 0; jb < blocks; ++jb)
    for (int cb = 0; cb < 2; ++cb) {
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_load_ps(t + (jb * 8 + k) * 16 + cb * 8);
      transpose8(r);
      for (int k = 0; k < 8; ++k) _mm256_store_ps(&tt[cb * 8 + k][jb * 8], r[k]);
    }
  for (int jb = blocks; jb < 4; ++jb)
    for (int c = 0; c < 16; ++c) _mm256_store_ps(&tt[c][jb * 8], _mm256_setzero_ps());
  for (int c = 0; c < 16; ++c) put(z + c, t[c]);
  Z* out = z + 16;
  alignas(32) float g[4][32];
  for (int64_t i0 = 0; i0 < nv;) {
    int64_t lo[4], hi[4], top = 0;
    const int64_t rows = std::min<int64_t>(4, nv - i0);
    for (int64_t r = 0; r < rows; ++r) {
      pair_range(order, i0 + r, nv, &lo[r], &hi[r]);
      top = std::max(top, hi[r]);
    }
    int64_t step = 4;   // rows past nv read zero rows of the tile and are never stored
    switch ((top + 7) / 8) {
      case 0: break;
      case 1: gram_rows<4, 1>(t, tt, i0, g); break;
      case 2: gram_rows<4, 2>(t, tt, i0, g); break;
      case 3: gram_rows<4, 3>(t, tt, i0, g); break;
      default:
        gram_rows<2, 4>(t, tt, i0, g);
        step = 2;
    }
    for (int64_t r = 0; r < std::min(step, rows); ++r)
      for (int64_t j = lo[r]; j < hi[r]; ++j) put(out++, g[r][j]);
    i0 += step;
  }
}
#endif

// This thread's interaction tile, at least `floats` long, 64-byte aligned, kept between calls:
// with a tile allocated and zeroed (512 KiB) per chunk, B=2048 Kaggle with every id 0 (no
// misses) took 1.00 ms, 0.93 with this one.  The caller writes every float it reads.
float* interaction_tile(int64_t floats) {
  thread_local std::unique_ptr<float, decltype(&std::free)> tile(nullptr, &std::free);
  thread_local int64_t size = 0;
  if (size < floats) {
    tile.reset(static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64)));
    TORCH_CHECK(tile != nullptr, "out of memory for the interaction tile");
    size = floats;
  }
  return tile.get();
}

// d + the number of kept pairs among the F + 1 vectors.
inline int64_t interaction_width(int64_t nf, int64_t d, int64_t order) {
  return d + (order == 1 ? (nf + 1) * (nf + 2) / 2 : (nf + 1) * nf / 2);
}

// Every sample's interaction row, chunk by chunk: emit(b, z_b) with z_b the f32 or bf16 row
// [x_b, kept pairs] of width d + pairs written by write(z_b) (the AVX-512 Gram where it applies).
template <typename Z, typename Emit>
void for_interaction_rows(const Bags& g, torch::Tensor& x, int64_t order, int64_t kp, bool generic, Emit emit) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == g.batch && x.size(1) == g.d, "x must be [B, d]");
  TORCH_CHECK(order >= 0 && order <= 2, "order must be 0 (dlrm), 1 (dlrm-self) or 2 (torchrec)");
  x = x.to(torch::kFloat).contiguous();   // x may come bf16 from the bottom MLP
  const int64_t nv = g.nf + 1, d = g.d, width = interaction_width(g.nf, d, order);
  TORCH_CHECK(kp >= width, "kp must be >= d + pairs");
  const float* xp = x.data_ptr<float>();
  bool vector = false;
#if defined(DLRM_FAST_AVX512) || defined(DLRM_FAST_AVX2)
  vector = !generic && d == 16 && nv <= 32;
#endif
  const int64_t ts = std::max<int64_t>(32, nv) * d;   // tile floats per sample
  for_chunks(g, [&](int64_t lo, int64_t hi) {
    float* tile = interaction_tile(CHUNK * ts);
    for (int64_t b = lo; b < hi; ++b) {   // row 0: x; rows 1..F: the bags (pooled below); the rest 0
      float* t = tile + (b - lo) * ts;
      std::memcpy(t, xp + b * d, d * sizeof(float));
      std::memset(t + nv * d, 0, (ts - nv * d) * sizeof(float));
    }
    const bool ok = pool_features<false>(g, lo, hi, tile, ts, 1);
    for (int64_t b = lo; b < hi; ++b) {
      const float* t = tile + (b - lo) * ts;
      emit(b, [&](Z* zb) {
#ifdef DLRM_FAST_AVX512
        if (vector) return interact_avx512(t, nv, order, zb);
#elif defined(DLRM_FAST_AVX2)
        if (vector) return interact_avx2(t, nv, order, zb);
#endif
        interact_generic(t, nv, d, order, zb);
      });
    }
    return ok;
  });
}

}  // namespace

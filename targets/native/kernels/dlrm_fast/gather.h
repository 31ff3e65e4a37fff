// The lookup itself: every bag of a chunk of samples pooled, feature by feature, into rows of
// a tile (pool_chunk), and gather_bags, which returns them as e [B, F, d].
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
//
// Order: chunks of CHUNK samples; inside a chunk each feature's bags are pooled in turn (one
// table at a time, its rows prefetched PREFETCH lookups ahead) into a [CHUNK, 32, d] tile that
// stays in L2.  Huge pages: 2 GB of 4 KiB pages is 500k pages, far beyond the STLB, so without
// them nearly every lookup into a big table also walks the page table (B=2048 Kaggle: 0.63 ms on
// 4 KiB pages, 0.51 ms on 2 MiB pages).
// Bounds: an id outside its table is skipped and reported after the loop (an error, never a read
// outside the table).
#pragma once

#include "pool_kinds.h"

namespace {

// Row addresses per lookup of each kind (PRE, TT: none, TT reads small cores; QR, HOTCOLD, PRUNED: two).
inline int64_t slots_per_lookup(int64_t kind) {
  return kind == PRE || kind == TT ? 0 : kind == QR || kind == HOTCOLD || kind == PRUNED ? 2 : 1;
}

// Writes the row addresses of feature f's lookups, samples [lo, hi), from `at` on, in pooling
// order; an id outside the table (or a remap entry outside its parts) gets ZERO_ROW and clears *ok.
// Returns the end of what it wrote.
const char** addresses(const Bags& g, int64_t f, int64_t lo, int64_t hi, const char** at, bool* ok) {
  const char* zero = reinterpret_cast<const char*>(ZERO_ROW);
  const int64_t kind = g.at(f, KIND), w = g.at(f, WIDTH), rb = row_bytes(g.at(f, FMT), w);
  if (kind == PRE || kind == TT) return at;
  const uint64_t rows = static_cast<uint64_t>(g.at(f, ROWS));
  const char* wf = g.w + g.at(f, BASE);
  const int64_t p0 = g.at(f, P0), p1 = g.at(f, P1), p2 = g.at(f, P2), p3 = g.at(f, P3), p4 = g.at(f, P4);
  const int64_t begin = g.off[f * g.batch + lo], end = g.off[f * g.batch + hi];
  const bool remapped = kind == HOTCOLD || kind == PRUNED;
  // A remap is a random read per lookup too: read every entry first in a tight loop (independent
  // loads, many misses in flight), then compute the addresses from them.
  thread_local std::vector<int64_t> entry;
  if (remapped) {
    entry.resize(end - begin);
    for (int64_t p = begin; p < end; ++p) {
      const uint64_t i = static_cast<uint64_t>(g.idx[p]);
      entry[p - begin] = i < rows ? remap_at(g.w + p0, p1, i) : 0;
    }
  }
  bool good = true;
  for (int64_t p = begin; p < end; ++p) {
    const uint64_t i = static_cast<uint64_t>(g.idx[p]);
    const bool in = i < rows;
    good &= in;
    if (kind == ROW) {
      *at++ = in ? wf + static_cast<int64_t>(i) * rb : zero;
    } else if (kind == HASH) {
      const uint64_t h = ((static_cast<uint64_t>(p0) * (i % PRIME) + static_cast<uint64_t>(p1)) % PRIME) %
                         static_cast<uint64_t>(p2);
      *at++ = in ? wf + static_cast<int64_t>(h) * rb : zero;
    } else if (kind == QR) {
      const uint64_t c = static_cast<uint64_t>(p0);
      *at++ = in ? wf + static_cast<int64_t>(i / c) * 4 * w : zero;
      *at++ = in ? g.w + p1 + static_cast<int64_t>(i % c) * 4 * w : zero;
    } else if (kind == HOTCOLD) {
      const int64_t s = entry[p - begin];
      const bool valid = s >= -p4 && s < p3;
      good &= valid;
      *at++ = in && valid && s >= 0 ? g.w + p2 + s * 4 * w : zero;
      *at++ = in && valid && s < 0 ? wf + (-s - 1) * rb : zero;
    } else {   // PRUNED
      const int64_t packed = entry[p - begin];
      const int64_t level = packed >> p2, o = packed & ((int64_t(1) << p2) - 1);
      const int64_t* lv = reinterpret_cast<const int64_t*>(g.w + p3) + 3 * (level < p4 && level >= 0 ? level : 0);
      const bool valid = packed >= 0 && level < p4 && (lv[1] == 0 || o < lv[2]);   // a 0-wide level reads nothing
      good &= valid;
      *at++ = in && valid && lv[1] > 0 ? g.w + lv[0] + o * 4 * lv[1] : zero;
      *at++ = reinterpret_cast<const char*>(static_cast<uintptr_t>(in && valid ? lv[1] : 0));
    }
  }
  *ok &= good;
  return at;
}

// This thread's scratch for pooled rows before a projection, at least `floats` long.
float* projection_scratch(int64_t floats) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < floats) scratch.resize(floats);
  return scratch.data();
}

// Pools every bag of samples [lo, hi): bag (f, b) into out[b * stride + (first_row + f) * d ..];
// false if an id was out of range.  Two passes: first the address of every looked-up row in
// pooling order (feature by feature, bag by bag), bounds checked, then the sums, each load with
// the row PREFETCH lookups ahead prefetched, across feature boundaries, so the stream of misses
// never drains between tables.  Splitting the passes keeps the summing loop free of per-lookup
// bookkeeping (B=2048 Kaggle gather_bags: 0.93 -> 0.72 ms, 0.60 -> 0.44 ms with every id 0).
// Each feature's rows are decoded in its own format and kind (the switch is per feature, not
// per row); a projected feature pools `width` values into a scratch row, then multiplies by M.
// Feature-major order matters: 0.51 ms feature-major vs 0.89 ms walking sample by sample across
// the 26 tables.  STREAM: write each pooled row with a non-temporal store (a [B, F, d] result
// that the next stage reads much later: no read-for-ownership of its lines).
template <bool STREAM>
bool pool_chunk(const Bags& g, int64_t lo, int64_t hi, float* out, int64_t stride, int64_t first_row) {
  int64_t total = 0;
  for (int64_t f = 0; f < g.nf; ++f)
    total += (g.off[f * g.batch + hi] - g.off[f * g.batch + lo]) * slots_per_lookup(g.at(f, KIND));
  std::vector<const char*> at(total + PREFETCH + 2, reinterpret_cast<const char*>(ZERO_ROW));   // the tail: prefetch targets
  bool ok = true;
  const char** end = at.data();
  for (int64_t f = 0; f < g.nf; ++f) end = addresses(g, f, lo, hi, end, &ok);
  for (int64_t k = 0; k < std::min(PREFETCH, total); ++k) __builtin_prefetch(at[k]);
  const char* const* q = at.data();
  for (int64_t f = 0; f < g.nf; ++f) {
    const int64_t kind = g.at(f, KIND), w = g.at(f, WIDTH), proj = g.at(f, PROJ);
    float* o = out + (first_row + f) * g.d;
    if (kind == PRE) {
      for (int64_t b = lo; b < hi; ++b)
        std::memcpy(o + (b - lo) * stride, g.pre + (b * g.npre + g.at(f, P0)) * g.d, g.d * sizeof(float));
      continue;
    }
    float* dst = proj >= 0 ? projection_scratch((hi - lo) * w) : o;
    const int64_t ds = proj >= 0 ? w : stride;
    if (kind == TT) {
      ok &= sum_tt(g, f, lo, hi, dst, ds);
    } else if (kind == QR) {
      q = sum_qr(g, f, lo, hi, q, dst, ds);
    } else if (kind == HOTCOLD) {
      switch (g.at(f, FMT)) {
        case F32: q = sum_hotcold<F32>(g, f, lo, hi, q, dst, ds); break;
        case F16: q = sum_hotcold<F16>(g, f, lo, hi, q, dst, ds); break;
        case Q8: q = sum_hotcold<Q8>(g, f, lo, hi, q, dst, ds); break;
        case Q4: q = sum_hotcold<Q4>(g, f, lo, hi, q, dst, ds); break;
        default: q = sum_hotcold<Q2>(g, f, lo, hi, q, dst, ds); break;
      }
    } else if (kind == PRUNED) {
      q = sum_pruned(g, f, lo, hi, q, dst, ds);
    } else if (w == 16 && proj < 0) {
      q = sum_any<16, STREAM>(g, f, lo, hi, q, dst, ds, w);
    } else if (w == 16) {
      q = sum_any<16, false>(g, f, lo, hi, q, dst, ds, w);
    } else {
      q = sum_any<0, false>(g, f, lo, hi, q, dst, ds, w);
    }
    if (proj >= 0) {   // o_b = pooled_b M, M [w, d] row-major
      const float* m = reinterpret_cast<const float*>(g.w + proj);
      for (int64_t b = lo; b < hi; ++b) {
        const float* p = dst + (b - lo) * w;
        float* ob = o + (b - lo) * stride;
#ifdef DLRM_FAST_AVX512
        if (g.d == 16) {
          __m512 a = _mm512_setzero_ps();
          for (int64_t k = 0; k < w; ++k) a = _mm512_fmadd_ps(_mm512_set1_ps(p[k]), _mm512_loadu_ps(m + 16 * k), a);
          _mm512_storeu_ps(ob, a);
          continue;
        }
#elif defined(DLRM_FAST_AVX2)
        if (g.d == 16) {
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          for (int64_t k = 0; k < w; ++k) {
            const __m256 pk = _mm256_set1_ps(p[k]);
            a0 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(m + 16 * k), a0);
            a1 = _mm256_fmadd_ps(pk, _mm256_loadu_ps(m + 16 * k + 8), a1);
          }
          _mm256_storeu_ps(ob, a0);
          _mm256_storeu_ps(ob + 8, a1);
          continue;
        }
#endif
        float acc[MAX_D];   // not `= {}`: zeroing all MAX_D floats per bag cost more than the projection
        std::fill(acc, acc + g.d, 0.f);
        for (int64_t k = 0; k < w; ++k) {
          const float pk = p[k];
#pragma omp simd
          for (int64_t c = 0; c < g.d; ++c) acc[c] += pk * m[k * g.d + c];
        }
        std::memcpy(ob, acc, g.d * sizeof(float));
      }
    }
  }
  return ok;
}

template <bool STREAM>
bool pool_features(const Bags& g, int64_t lo, int64_t hi, float* out, int64_t stride, int64_t first_row) {
  return pool_chunk<STREAM>(g, lo, hi, out, stride, first_row);
}

// fn(lo, hi) over chunks of CHUNK samples, in parallel; an out-of-range id anywhere is an error.
template <typename Fn>
void for_chunks(const Bags& g, Fn fn) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, (g.batch + CHUNK - 1) / CHUNK, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      if (!fn(c * CHUNK, std::min(g.batch, (c + 1) * CHUNK))) ok = false;
  });
  TORCH_CHECK(ok.load(), "an index is outside its table's rows (or a remap entry outside the table's parts)");
}

torch::Tensor gather_bags(torch::Tensor w, torch::Tensor idx, torch::Tensor off, torch::Tensor feat, int64_t d,
                          torch::Tensor pre) {
  const Bags g = check_bags(w, idx, off, feat, d, pre);
  auto out = torch::empty({g.batch, g.nf, g.d}, torch::kFloat);
  float* op = out.data_ptr<float>();
  const bool aligned = reinterpret_cast<uintptr_t>(op) % 64 == 0;   // torch's allocator aligns to 64
  for_chunks(g, [&](int64_t lo, int64_t hi) {
    float* o = op + lo * g.nf * g.d;
    return aligned ? pool_features<true>(g, lo, hi, o, g.nf * g.d, 0) : pool_features<false>(g, lo, hi, o, g.nf * g.d, 0);
  });
#if defined(DLRM_FAST_AVX512) || defined(DLRM_FAST_AVX2)
  _mm_sfence();
#endif
  return out;
}

}  // namespace

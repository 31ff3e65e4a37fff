// Whole int8 MLPs in one call on AVX2 (torch-fast-int8 on CPUs without AVX512-VNNI).
// Built by targets/native/avx2_mlp.py for the avx2 ISA tier (targets/native/cpp_extension.py).
//
//   Avx2Int8Mlp(packed, sw, b, relu, n, k_in, kp, final_w, final_b)   (kp: k_in padded, even)
//     .forward(x f32 [B, K])           -> y f32 [B, N_last], or logits f32 [B] (final_w given)
//     .from_quant(q s8 [B, Kp], s [B]) -> the same, from an input already quantized per row
//
// Numerics: those of kernels/dlrm_vnni.cpp, exactly (the same integer sums): weights W_l ≈
// diag(sw_l) Q_l, Q_l int8 per output channel; a signed input (the first layer, or after a layer
// without ReLU) is s8 q = round(x / s), s = max|x| / 127; an input after a ReLU is u8 q =
// round(y / s), s = max y / 255; acc = Σ_k q[k] Q[c, k] exact in s32; y = acc sa sw + b, ReLU.
// A width-1 last layer (final_w) is an f32 dot product of the last hidden activations.
// Arithmetic: activations and weights widened to s16 and multiplied by VPMADDWD (s16 × s16, pairs
// summed into s32: exact, no saturation, signed and unsigned inputs alike).  VPMADDUBSW (u8 × s8)
// would do twice the products per instruction but sums its pairs in saturating s16, which u8
// activations overflow (2 · 255 · 127 > 32767); FBGEMM avoids that with 7-bit activations, which
// would change the numerics: this kernel keeps them.  16 MACs per instruction against 8 for an
// fp32 FMA.
// Schedule: BLOCK samples at a time through every layer (int8_mlp_blocks.h); per layer,
// for each panel of NV x 8 output columns, MR rows of accumulators in registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "int8_mlp_blocks.h"
#include "quantize_row.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DLRM_AVX2_INT8 1
#endif

namespace {

inline void widen(const int8_t* q, int64_t kp, int16_t* a) {
  for (int64_t c = 0; c < kp; ++c) a[c] = q[c];
}

std::string avx2_usable() {
#ifdef DLRM_AVX2_INT8
  return "";
#else
  return "this build has no AVX2 + FMA (compiled for an ISA tier without them)";
#endif
}

#ifdef DLRM_AVX2_INT8
constexpr int64_t BLOCK = 48;   // samples per block: a multiple of MR
constexpr int MR = 6;           // rows per register tile
constexpr int NV = 2;           // 8-column vectors per register tile: 12 accumulators + 2 weights + 1 input

struct Layer {
  torch::Tensor packed;   // s16 [N/8, Kp/2, 8, 2]: [nt, k2, c, j] = Q[8 nt + c, 2 k2 + j]
  torch::Tensor sw, b;    // f32 [N]
  bool relu;
  int64_t n, kp;
};

// Y[r, c0 .. c0 + 8 NVT) for rows [0, MRT) of the block at A (s16 rows of kp): MRT x NVT
// accumulators in named registers, the weights pinned by an empty asm (as an array GCC kept the
// accumulators on the stack: kernels/dlrm_vnni.cpp measured the same).
#define DLRM_ACC_ROW(r) __m256i r##0 = _mm256_setzero_si256(), r##1 = r##0
#define DLRM_MADD_ROW(r, row)                                                      \
  {                                                                                \
    int32_t pair;                                                                  \
    std::memcpy(&pair, a + (row) * kp + 2 * k2, 4);                                \
    const __m256i av = _mm256_set1_epi32(pair);                                    \
    r##0 = _mm256_add_epi32(r##0, _mm256_madd_epi16(av, w0));                      \
    if constexpr (NVT > 1) r##1 = _mm256_add_epi32(r##1, _mm256_madd_epi16(av, w1)); \
  }
template <int MRT, int NVT>
inline void tile(const int16_t* a, int64_t kp, const int16_t* w, int64_t k2s, const Layer& l, const float* sa,
                 int64_t c0, float* y, int64_t ny) {
  static_assert(MR == 6 && MRT >= 1 && MRT <= MR && NVT >= 1 && NVT <= 2, "the named-register tile is (1..6) x (1..2)");
  DLRM_ACC_ROW(p);
  DLRM_ACC_ROW(q);
  DLRM_ACC_ROW(u);
  DLRM_ACC_ROW(v);
  DLRM_ACC_ROW(e);
  DLRM_ACC_ROW(f);
  for (int64_t k2 = 0; k2 < k2s; ++k2) {
    __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k2 * 16));
    __m256i w1 = NVT > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (k2s + k2) * 16)) : w0;
    asm("" : "+x"(w0), "+x"(w1));
    DLRM_MADD_ROW(p, 0)
    if constexpr (MRT > 1) DLRM_MADD_ROW(q, 1)
    if constexpr (MRT > 2) DLRM_MADD_ROW(u, 2)
    if constexpr (MRT > 3) DLRM_MADD_ROW(v, 3)
    if constexpr (MRT > 4) DLRM_MADD_ROW(e, 4)
    if constexpr (MRT > 5) DLRM_MADD_ROW(f, 5)
  }
  const __m256i acc[MR][2] = {{p0, p1}, {q0, q1}, {u0, u1}, {v0, v1}, {e0, e1}, {f0, f1}};
  const float* sw = l.sw.data_ptr<float>() + c0;
  const float* b = l.b.data_ptr<float>() + c0;
  for (int vv = 0; vv < NVT; ++vv) {
    const __m256 swv = _mm256_loadu_ps(sw + 8 * vv), bv = _mm256_loadu_ps(b + 8 * vv);
    for (int r = 0; r < MRT; ++r) {
      __m256 o = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][vv]), _mm256_mul_ps(_mm256_set1_ps(sa[r]), swv), bv);
      if (l.relu) o = _mm256_max_ps(o, _mm256_setzero_ps());
      _mm256_storeu_ps(y + r * ny + c0 + 8 * vv, o);
    }
  }
}
#undef DLRM_ACC_ROW
#undef DLRM_MADD_ROW

// One layer for the block's first `rows` samples: A [rows, kp] s16 -> Y [rows, n] f32 (MR rows
// per tile, the last tile as many as are left).
void layer_block(const Layer& l, const int16_t* a, const float* sa, float* y, int64_t rows) {
  const int64_t k2s = l.kp / 2, nts = l.n / 8;
  const int16_t* w = l.packed.data_ptr<int16_t>();
  for (int64_t nt = 0; nt < nts; nt += NV) {
    const int16_t* panel = w + nt * k2s * 16;
    for (int64_t m = 0; m < rows; m += MR) {
      dlrm::with_count<MR>(std::min<int64_t>(MR, rows - m), [&]<int MRT>() {
        dlrm::with_count<NV>(std::min<int64_t>(NV, nts - nt), [&]<int NVT>() {
          tile<MRT, NVT>(a + m * l.kp, l.kp, panel, k2s, l, sa + m, 8 * nt, y + m * l.n, l.n);
        });
      });
    }
  }
}

// Row y (n values >= 0, after a ReLU) -> a = round(y / s) in [0, 255] as s16, s = max / 255.
inline void quantize_row_u8(const float* y, int64_t n, int64_t kp, int16_t* a, float* s) {
  float top = 0.f;
  for (int64_t c = 0; c < n; ++c) top = std::max(top, y[c]);
  const float scale = top > 0.f ? top / 255.f : 1.f, inv = 1.f / scale;
  for (int64_t c = 0; c < n; ++c) a[c] = static_cast<int16_t>(static_cast<int32_t>(y[c] * inv + 0.5f));
  std::fill(a + n, a + kp, int16_t(0));
  *s = scale;
}

// The arithmetic dlrm::run_blocks (int8_mlp_blocks.h) drives.
struct Avx2Kernel {
  using Act = int16_t;
  using Layer = ::Layer;
  static constexpr int64_t BLOCK = ::BLOCK;
  static void layer_block(const Layer& l, const int16_t* a, const float* sa, float* y, int64_t rows) {
    ::layer_block(l, a, sa, y, rows);
  }
  static void requantize(const Layer& l, const Layer& next, const float* y, int16_t* a, float* s) {
    if (l.relu) {
      quantize_row_u8(y, l.n, next.kp, a, s);
    } else {
      thread_local std::vector<int8_t> q;
      q.resize(next.kp);
      quantize_row(y, l.n, next.kp, q.data(), s);
      widen(q.data(), next.kp, a);
    }
  }
  static float dot(const float* y, const float* w, int64_t n) {   // n % 8 == 0
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(y + c), _mm256_loadu_ps(w + c), acc);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float sum = 0.f;
    for (float v : lanes) sum += v;
    return sum;
  }
};
#endif

class Avx2Int8Mlp {
 public:
  Avx2Int8Mlp(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> sw, std::vector<torch::Tensor> b,
              std::vector<bool> relu, std::vector<int64_t> n, int64_t k_in, int64_t kp, torch::Tensor final_w,
              double final_b)
      : k_in_(k_in), kp_(kp), final_w_(final_w.contiguous()), final_b_(static_cast<float>(final_b)) {
    TORCH_CHECK(avx2_usable().empty(), avx2_usable());
    const size_t count = packed.size();
    TORCH_CHECK(count > 0 && sw.size() == count && b.size() == count && relu.size() == count && n.size() == count,
                "one packed weight, scale, bias, relu and n per layer");
    TORCH_CHECK(k_in > 0 && kp >= k_in && kp % 2 == 0, "kp must be even and >= k_in");
#ifdef DLRM_AVX2_INT8
    for (size_t i = 0; i < count; ++i) {
      TORCH_CHECK(n[i] > 0 && n[i] % 8 == 0, "layer widths must be multiples of 8");
      TORCH_CHECK(packed[i].scalar_type() == torch::kShort && packed[i].is_contiguous() &&
                  packed[i].numel() == n[i] * kp, "layer ", i, ": packed weights must be s16 [N/8, Kp/2, 8, 2]");
      for (const auto* t : {&sw[i], &b[i]})
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n[i], "layer ", i, ": f32 [N]");
      layers_.push_back({packed[i], sw[i], b[i], relu[i], n[i], kp});
      kp = n[i];
    }
    TORCH_CHECK(final_w_.numel() == 0 || (final_w_.scalar_type() == torch::kFloat && final_w_.numel() == n.back()),
                "final_w must be empty or f32 [N_last]");
#endif
  }

  int64_t kp() const { return kp_; }

  torch::Tensor forward(torch::Tensor x) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) == k_in_, "x must be f32 [B, ", k_in_, "]");
    x = x.contiguous();
    const float* xp = x.data_ptr<float>();
    const int64_t k = k_in_, p = kp();
    return run(x.size(0), [&](int64_t row, int16_t* a, float* s) {
      thread_local std::vector<int8_t> q;
      q.resize(p);
      quantize_row(xp + row * k, k, p, q.data(), s);
      widen(q.data(), p, a);
    });
  }

  torch::Tensor from_quant(torch::Tensor q, torch::Tensor s) const {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous() && q.size(1) == kp(),
                "q must be s8 [B, ", kp(), "]");
    TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.numel() == q.size(0), "s must be f32 [B]");
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    const int64_t p = kp();
    return run(q.size(0), [&](int64_t row, int16_t* a, float* sa) {
      widen(qp + row * p, p, a);
      *sa = sp[row];
    });
  }

 private:
  template <typename Load>
  torch::Tensor run(int64_t batch, Load load) const {
#ifdef DLRM_AVX2_INT8
    return dlrm::run_blocks<Avx2Kernel>(layers_, kp(), batch, final_w_, final_b_, load);
#else
    (void)batch, (void)load;
    TORCH_CHECK(false, avx2_usable());
#endif
  }

  int64_t k_in_, kp_;
  torch::Tensor final_w_;
  float final_b_;
#ifdef DLRM_AVX2_INT8
  std::vector<Layer> layers_;
#endif
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("avx2_usable", &avx2_usable);
  pybind11::class_<Avx2Int8Mlp>(m, "Avx2Int8Mlp")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<bool>, std::vector<int64_t>, int64_t, int64_t, torch::Tensor, double>())
      .def("forward", &Avx2Int8Mlp::forward)
      .def("from_quant", &Avx2Int8Mlp::from_quant)
      .def_property_readonly("kp", &Avx2Int8Mlp::kp);
}

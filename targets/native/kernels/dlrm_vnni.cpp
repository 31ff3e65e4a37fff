// Whole int8 MLPs in one call on AVX512-VNNI (torch-fast-int8 where the CPU has no AMX).
// Built at load time by targets/native/vnni_mlp.py (torch C++ extension, -O3 -march=native).
//
//   VnniMlp(packed, sw, b, comp, relu, n, k_in, kp, final_w, final_b)   (kp: k_in padded, % 4 == 0)
//     .forward(x f32 [B, K])           -> y f32 [B, N_last], or logits f32 [B] (final_w given)
//     .from_quant(q s8 [B, Kp], s [B]) -> the same, from an input already quantized per row
//
// Numerics, per layer l (weights W_l ≈ diag(sw_l) Q_l, Q_l int8 per output channel):
//   input a (u8) with row scale sa: signed inputs (the first layer, or after a layer without
//   ReLU) are s8 q = round(x / s), s = max|x| / 127, stored as u8 q + 128 with the column sums
//   comp = 128 Σ_k Q[c, k] subtracted from the accumulator; inputs after a ReLU are u8,
//   q = round(x / s), s = max x / 255 (one bit more than s8 for values that are never negative);
//   acc = Σ_k a[k] Q[c, k] in s32 (VPDPBUSD: u8 x s8, exact), y = (acc - comp) sa sw + b, ReLU.
//   A width-1 last layer (final_w) is an f32 dot product of the last hidden activations.
// Schedule: BLOCK samples at a time through every layer (int8_mlp_blocks.h); per layer, for each
// panel of NV x 16 output columns (its weights, <= 32 KiB, stay in L1) every MR rows form an
// MR x NV register tile of accumulators.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <string>
#include <vector>

#include "int8_mlp_blocks.h"
#include "quantize_row.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define DLRM_VNNI 1
#endif

namespace {

std::string vnni_usable() {
#ifdef DLRM_VNNI
  return "";
#else
  return "this build has no AVX512-VNNI (compiled for an ISA tier without it)";
#endif
}

// s8 row q -> the u8 form q + 128 of a signed input.
inline void shift_row(const int8_t* q, int64_t kp, uint8_t* a) {
  for (int64_t c = 0; c < kp; ++c) a[c] = static_cast<uint8_t>(q[c]) ^ 0x80u;
}

#ifdef DLRM_VNNI
constexpr int64_t BLOCK = 48;   // samples per block: a multiple of MR
constexpr int MR = 6;           // rows per register tile
constexpr int NV = 4;           // 16-column vectors per register tile (MR * NV accumulators)

struct Layer {
  torch::Tensor packed;   // s8 [N/16, Kp/4, 16, 4]: [nt, k4, c, q] = Q[16 nt + c, 4 k4 + q]
  torch::Tensor sw, b;    // f32 [N]
  torch::Tensor comp;     // s32 [N]: 128 Σ_k Q[c, k] (used when the input is signed)
  bool relu, signed_in;
  int64_t n, kp;
};

// Y[r, c0 .. c0 + 16 NVT) for rows [0, MRT) of the tile at A (u8 rows of kp): MRT x NVT
// accumulators in named registers (as an array, GCC 12 kept them on the stack or in two copies
// moved every step: the whole MLPs 1.5-1.6x slower than Int8Mlp's _int_mm + epilogues).
#define DLRM_ACC_ROW(r) __m512i r##0 = _mm512_setzero_si512(), r##1 = r##0, r##2 = r##0, r##3 = r##0
#define DLRM_DP_ROW(r, row)                                                                   \
  {                                                                                           \
    int32_t four;                                                                             \
    std::memcpy(&four, a + (row) * kp + 4 * k4, 4);                                           \
    const __m512i av = _mm512_set1_epi32(four);                                               \
    r##0 = _mm512_dpbusd_epi32(r##0, av, w0);                                                 \
    if constexpr (NVT > 1) r##1 = _mm512_dpbusd_epi32(r##1, av, w1);                          \
    if constexpr (NVT > 2) r##2 = _mm512_dpbusd_epi32(r##2, av, w2);                          \
    if constexpr (NVT > 3) r##3 = _mm512_dpbusd_epi32(r##3, av, w3);                          \
  }
template <int MRT, int NVT>
inline void tile(const uint8_t* a, int64_t kp, const int8_t* w, int64_t k4s, const Layer& l, const float* sa,
                 int64_t c0, float* y, int64_t ny) {
  static_assert(MR == 6 && MRT >= 1 && MRT <= MR && NVT >= 1 && NVT <= 4, "the named-register tile is (1..6) x (1..4)");
  DLRM_ACC_ROW(p);
  DLRM_ACC_ROW(q);
  DLRM_ACC_ROW(u);
  DLRM_ACC_ROW(v);
  DLRM_ACC_ROW(e);
  DLRM_ACC_ROW(f);
  for (int64_t k4 = 0; k4 < k4s; ++k4) {
    __m512i w0 = _mm512_loadu_si512(w + k4 * 64);
    __m512i w1 = NVT > 1 ? _mm512_loadu_si512(w + (k4s + k4) * 64) : w0;
    __m512i w2 = NVT > 2 ? _mm512_loadu_si512(w + (2 * k4s + k4) * 64) : w0;
    __m512i w3 = NVT > 3 ? _mm512_loadu_si512(w + (3 * k4s + k4) * 64) : w0;
    asm("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));   // keep them in registers: else GCC folds
                                                          // them into every VPDPBUSD, a load each
    DLRM_DP_ROW(p, 0)
    if constexpr (MRT > 1) DLRM_DP_ROW(q, 1)
    if constexpr (MRT > 2) DLRM_DP_ROW(u, 2)
    if constexpr (MRT > 3) DLRM_DP_ROW(v, 3)
    if constexpr (MRT > 4) DLRM_DP_ROW(e, 4)
    if constexpr (MRT > 5) DLRM_DP_ROW(f, 5)
  }
  const __m512i acc[MR][4] = {{p0, p1, p2, p3}, {q0, q1, q2, q3}, {u0, u1, u2, u3},
                                  {v0, v1, v2, v3}, {e0, e1, e2, e3}, {f0, f1, f2, f3}};
  const float* sw = l.sw.data_ptr<float>() + c0;
  const float* b = l.b.data_ptr<float>() + c0;
  const int32_t* comp = l.comp.data_ptr<int32_t>() + c0;
  for (int v = 0; v < NVT; ++v) {
    const __m512 swv = _mm512_loadu_ps(sw + 16 * v), bv = _mm512_loadu_ps(b + 16 * v);
    const __m512i cv = l.signed_in ? _mm512_loadu_si512(comp + 16 * v) : _mm512_setzero_si512();
    for (int r = 0; r < MRT; ++r) {
      const __m512 g = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], cv));
      __m512 o = _mm512_fmadd_ps(g, _mm512_mul_ps(_mm512_set1_ps(sa[r]), swv), bv);
      if (l.relu) o = _mm512_max_ps(o, _mm512_setzero_ps());
      _mm512_storeu_ps(y + r * ny + c0 + 16 * v, o);
    }
  }
}
#undef DLRM_ACC_ROW
#undef DLRM_DP_ROW

// One layer for the block's first `rows` samples: A [rows, kp] u8 -> Y [rows, n] f32 (MR rows per
// tile, the last tile as many as are left: a batch of 1 costs one row, not a block).
void layer_block(const Layer& l, const uint8_t* a, const float* sa, float* y, int64_t rows) {
  const int64_t k4s = l.kp / 4, nts = l.n / 16;
  const int8_t* w = l.packed.data_ptr<int8_t>();
  for (int64_t nt = 0; nt < nts; nt += NV) {
    const int8_t* panel = w + nt * k4s * 64;
    for (int64_t m = 0; m < rows; m += MR) {
      dlrm::with_count<MR>(std::min<int64_t>(MR, rows - m), [&]<int MRT>() {
        dlrm::with_count<NV>(std::min<int64_t>(NV, nts - nt), [&]<int NVT>() {
          tile<MRT, NVT>(a + m * l.kp, l.kp, panel, k4s, l, sa + m, 16 * nt, y + m * l.n, l.n);
        });
      });
    }
  }
}

// Row y (n >= 0 values, after a ReLU) -> u8 a[0 .. kp) with a = round(y / s), s = max / 255.
inline void quantize_row_u8(const float* y, int64_t n, int64_t kp, uint8_t* a, float* s) {
  __m512 mv = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(y + c));   // n % 16 == 0
  const float top = _mm512_reduce_max_ps(mv);
  const float scale = top > 0.f ? top / 255.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / scale), half = _mm512_set1_ps(0.5f);
  for (int64_t c = 0; c < n; c += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + c),
                     _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(_mm512_fmadd_ps(_mm512_loadu_ps(y + c), inv, half))));
  std::memset(a + n, 0, kp - n);
  *s = scale;
}

// The arithmetic dlrm::run_blocks (int8_mlp_blocks.h) drives.
struct VnniKernel {
  using Act = uint8_t;
  using Layer = ::Layer;
  static constexpr int64_t BLOCK = ::BLOCK;
  static void layer_block(const Layer& l, const uint8_t* a, const float* sa, float* y, int64_t rows) {
    ::layer_block(l, a, sa, y, rows);
  }
  static void requantize(const Layer& l, const Layer& next, const float* y, uint8_t* a, float* s) {
    if (!next.signed_in) {
      quantize_row_u8(y, l.n, next.kp, a, s);
    } else {
      quantize_row(y, l.n, next.kp, reinterpret_cast<int8_t*>(a), s);
      shift_row(reinterpret_cast<int8_t*>(a), next.kp, a);
    }
  }
  static float dot(const float* y, const float* w, int64_t n) {   // n % 16 == 0
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(y + c), _mm512_loadu_ps(w + c), acc);
    return _mm512_reduce_add_ps(acc);
  }
};
#endif

class VnniMlp {
 public:
  VnniMlp(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> sw, std::vector<torch::Tensor> b,
          std::vector<torch::Tensor> comp, std::vector<bool> relu, std::vector<int64_t> n, int64_t k_in,
          int64_t kp, torch::Tensor final_w, double final_b)
      : k_in_(k_in), kp_(kp), final_w_(final_w.contiguous()), final_b_(static_cast<float>(final_b)) {
    TORCH_CHECK(vnni_usable().empty(), vnni_usable());
    const size_t count = packed.size();
    TORCH_CHECK(count > 0 && sw.size() == count && b.size() == count && comp.size() == count &&
                relu.size() == count && n.size() == count, "one packed weight, scale, bias, comp, relu and n per layer");
    TORCH_CHECK(k_in > 0 && kp >= k_in && kp % 4 == 0, "kp must be a multiple of 4 and >= k_in");
#ifdef DLRM_VNNI
    for (size_t i = 0; i < count; ++i) {
      TORCH_CHECK(n[i] > 0 && n[i] % 16 == 0, "layer widths must be multiples of 16");
      TORCH_CHECK(packed[i].scalar_type() == torch::kChar && packed[i].is_contiguous() &&
                  packed[i].numel() == n[i] * kp, "layer ", i, ": packed weights must be s8 [N/16, Kp/4, 16, 4]");
      for (const auto* t : {&sw[i], &b[i]})
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n[i], "layer ", i, ": f32 [N]");
      TORCH_CHECK(comp[i].scalar_type() == torch::kInt && comp[i].numel() == n[i], "layer ", i, ": comp must be s32 [N]");
      layers_.push_back({packed[i], sw[i], b[i], comp[i].contiguous(), relu[i], i == 0 || !relu[i - 1], n[i], kp});
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
    return run(x.size(0), [&](int64_t row, uint8_t* a, float* s) {
      int8_t* q = reinterpret_cast<int8_t*>(a);
      quantize_row(xp + row * k, k, p, q, s);
      shift_row(q, p, a);
    });
  }

  torch::Tensor from_quant(torch::Tensor q, torch::Tensor s) const {
    TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous() && q.size(1) == kp(),
                "q must be s8 [B, ", kp(), "]");
    TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.numel() == q.size(0), "s must be f32 [B]");
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    const int64_t p = kp();
    return run(q.size(0), [&](int64_t row, uint8_t* a, float* sa) {
      shift_row(qp + row * p, p, a);
      *sa = sp[row];
    });
  }

 private:
  template <typename Load>
  torch::Tensor run(int64_t batch, Load load) const {
#ifdef DLRM_VNNI
    return dlrm::run_blocks<VnniKernel>(layers_, kp(), batch, final_w_, final_b_, load);
#else
    (void)batch, (void)load;
    TORCH_CHECK(false, vnni_usable());
#endif
  }

  int64_t k_in_, kp_;
  torch::Tensor final_w_;
  float final_b_;
#ifdef DLRM_VNNI
  std::vector<Layer> layers_;
#endif
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vnni_usable", &vnni_usable);
  pybind11::class_<VnniMlp>(m, "VnniMlp")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<bool>, std::vector<int64_t>, int64_t, int64_t,
                          torch::Tensor, double>())
      .def("forward", &VnniMlp::forward)
      .def("from_quant", &VnniMlp::from_quant)
      .def_property_readonly("kp", &VnniMlp::kp);
}

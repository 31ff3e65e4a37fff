// Fused CPU kernels around torch._int_mm for int8 DLRM MLPs and the dot interaction.
// Built at load time by targets/int8_kernels.py (torch C++ extension, -O3 -march=native -fopenmp-simd).
//   quantize_rows(x[M,K] f32, Kp)            -> (q[M,Kp] s8, s[M] f32)   q = round(x / s), s = max|x_row| / 127
//   dequant_act(acc[M,N] s32, sa[M], sw[N], b[N], relu)        -> y[M,N] f32   y = acc*sa*sw + b (relu)
//   dequant_act_quant(acc, sa, sw, b, Kp)    -> (q[M,Kp] s8, s[M])       the next layer's input, never f32 in memory
//   dot_interaction_quant(x[B,d], e[F,B,d], pi[P], pj[P], Kp) -> (q[B,Kp] s8, s[B])
//       row b = [x_b, <t_i, t_j> for (i, j) in pairs], T_b = [x_b; e_0b; ..; e_{F-1}b], then quantize_rows
//   dot_interaction(x, e, pi, pj)            -> z[B, d+P] f32 (same row, unquantized)
// Padding columns K..Kp-1 are zero.  Pair indices are checked once by the caller (< F+1).  All loops are plain C++ for the compiler to vectorise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t GRAIN = 16;   // rows per parallel task

inline void quantize_row(const float* x, int64_t k, int64_t kp, int8_t* q, float* s) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < k; ++c) m = std::max(m, std::fabs(x[c]));
  float scale = m > 0.f ? m / 127.f : 1.f;
  float inv = 1.f / scale;
#pragma omp simd
  for (int64_t c = 0; c < k; ++c) {   // round half away from zero (|x * inv| <= 127)
    float v = x[c] * inv;
    q[c] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.f ? 0.5f : -0.5f)));
  }
  for (int64_t c = k; c < kp; ++c) q[c] = 0;
  *s = scale;
}

std::vector<torch::Tensor> quantize_rows(torch::Tensor x, int64_t kp) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x must be f32 [M, K]");
  x = x.contiguous();
  int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(kp >= k, "Kp must be >= K");
  auto q = torch::empty({m, kp}, torch::kChar);
  auto s = torch::empty({m}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, m, GRAIN, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) quantize_row(xp + r * k, k, kp, qp + r * kp, sp + r);
  });
  return {q, s};
}

inline void dequant_row(const int32_t* acc, float sa, const float* sw, const float* b, int64_t n, bool relu,
                        float* y) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    float v = static_cast<float>(acc[c]) * sa * sw[c] + b[c];
    y[c] = relu ? std::max(v, 0.f) : v;
  }
}

void check_dequant(const torch::Tensor& acc, const torch::Tensor& sa, const torch::Tensor& sw, const torch::Tensor& b) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kInt && acc.is_contiguous(), "acc must be s32 [M, N]");
  TORCH_CHECK(sa.numel() == acc.size(0) && sw.numel() == acc.size(1) && b.numel() == acc.size(1),
              "scales/bias do not match acc");
}

torch::Tensor dequant_act(torch::Tensor acc, torch::Tensor sa, torch::Tensor sw, torch::Tensor b, bool relu) {
  check_dequant(acc, sa, sw, b);
  int64_t m = acc.size(0), n = acc.size(1);
  auto y = torch::empty({m, n}, torch::kFloat);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *sap = sa.data_ptr<float>(), *swp = sw.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, GRAIN, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) dequant_row(ap + r * n, sap[r], swp, bp, n, relu, yp + r * n);
  });
  return y;
}

std::vector<torch::Tensor> dequant_act_quant(torch::Tensor acc, torch::Tensor sa, torch::Tensor sw, torch::Tensor b,
                                             int64_t kp) {
  check_dequant(acc, sa, sw, b);
  int64_t m = acc.size(0), n = acc.size(1);
  TORCH_CHECK(kp >= n, "Kp must be >= N");
  auto q = torch::empty({m, kp}, torch::kChar);
  auto s = torch::empty({m}, torch::kFloat);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *sap = sa.data_ptr<float>(), *swp = sw.data_ptr<float>(), *bp = b.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, m, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> row(n);
    for (int64_t r = lo; r < hi; ++r) {
      dequant_row(ap + r * n, sap[r], swp, bp, n, true, row.data());
      quantize_row(row.data(), n, kp, qp + r * kp, sp + r);
    }
  });
  return {q, s};
}

// Row b of the dot interaction: T_b = [x_b; e_0b; ..; e_{F-1}b] gathered into t, then
// out = [x_b, <T_i, T_j> for each kept pair (pi[k], pj[k])].  D > 0 fixes d at compile time.
template <int64_t D>
inline void interaction_row(const float* x, const float* e, int64_t batch, int64_t nf, int64_t d, int64_t b,
                            const int32_t* pi, const int32_t* pj, int64_t p, float* t, float* out) {
  const int64_t dd = D > 0 ? D : d;
  for (int64_t c = 0; c < dd; ++c) t[c] = out[c] = x[b * dd + c];
  for (int64_t f = 0; f < nf; ++f) {
    const float* src = e + (f * batch + b) * dd;
    for (int64_t c = 0; c < dd; ++c) t[(f + 1) * dd + c] = src[c];
  }
  for (int64_t k = 0; k < p; ++k) {
    const float* u = t + pi[k] * dd;
    const float* v = t + pj[k] * dd;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < dd; ++c) acc += u[c] * v[c];
    out[dd + k] = acc;
  }
}

// The same row when the pairs are dlrm's strict lower triangle, (i, j < i) row-major: the pairs of
// row i sit contiguously at out[d + i(i-1)/2 ..].  T is stored transposed and padded to NV
// columns (tt[c][j], zero beyond F+1), so row i of the Gram matrix T Tᵀ is NV/16 vector
// accumulators updated by d broadcast-FMAs: G_i[j] = sum_c T[i][c] * tt[c][j].
template <int64_t D, int64_t NV>
inline void interaction_row_tril(const float* x, const float* e, int64_t batch, int64_t nf, int64_t b,
                                 float* tt, float* out) {
  const int64_t nv = nf + 1;
  for (int64_t c = 0; c < D; ++c) {
    tt[c * NV] = out[c] = x[b * D + c];
    for (int64_t j = nv; j < NV; ++j) tt[c * NV + j] = 0.f;
  }
  for (int64_t f = 0; f < nf; ++f) {
    const float* src = e + (f * batch + b) * D;
    for (int64_t c = 0; c < D; ++c) tt[c * NV + f + 1] = src[c];
  }
  float* z = out + D;
  for (int64_t i = 1; i < nv; ++i) {
    float acc[NV] = {0.f};
    for (int64_t c = 0; c < D; ++c) {
      const float a = tt[c * NV + i];
#pragma omp simd
      for (int64_t j = 0; j < NV; ++j) acc[j] += a * tt[c * NV + j];
    }
    float* zi = z + i * (i - 1) / 2;
    for (int64_t j = 0; j < i; ++j) zi[j] = acc[j];
  }
}

constexpr int64_t TRIL_D = 16, TRIL_NV = 32;   // the unrolled case: d = 16, up to 31 features

void check_interaction(const torch::Tensor& x, const torch::Tensor& e, const torch::Tensor& pi, const torch::Tensor& pj) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be f32 [B, d]");
  TORCH_CHECK(e.dim() == 3 && e.scalar_type() == torch::kFloat && e.is_contiguous() && e.size(1) == x.size(0) &&
              e.size(2) == x.size(1), "e must be f32 [F, B, d] matching x");
  TORCH_CHECK(pi.scalar_type() == torch::kInt && pj.scalar_type() == torch::kInt && pi.numel() == pj.numel(),
              "pairs must be two s32 vectors of one length");
}

// Runs fn(b, t, row) for every row, with the interaction row written to `row` (length d + P).
template <typename Fn>
void for_interaction_rows(const torch::Tensor& x, const torch::Tensor& e, const torch::Tensor& pi,
                          const torch::Tensor& pj, Fn fn) {
  int64_t batch = x.size(0), d = x.size(1), nf = e.size(0), p = pi.numel();
  const float *xp = x.data_ptr<float>(), *ep = e.data_ptr<float>();
  const int32_t *pip = pi.data_ptr<int32_t>(), *pjp = pj.data_ptr<int32_t>();
  bool tril = p == nf * (nf + 1) / 2;   // caller passes dlrm's lower triangle or an explicit list
  for (int64_t k = 0; tril && k < p; ++k) tril = pip[k] * (pip[k] - 1) / 2 + pjp[k] == k && pjp[k] < pip[k];
  const bool fast = tril && d == TRIL_D && nf + 1 <= TRIL_NV;
  at::parallel_for(0, batch, GRAIN, [&](int64_t lo, int64_t hi) {
    std::vector<float> t((nf + 1) * d), row(d + p), tt(TRIL_D * TRIL_NV);
    for (int64_t b = lo; b < hi; ++b) {
      if (fast) interaction_row_tril<TRIL_D, TRIL_NV>(xp, ep, batch, nf, b, tt.data(), row.data());
      else if (d == 16) interaction_row<16>(xp, ep, batch, nf, d, b, pip, pjp, p, t.data(), row.data());
      else interaction_row<0>(xp, ep, batch, nf, d, b, pip, pjp, p, t.data(), row.data());
      fn(b, row.data());
    }
  });
}

torch::Tensor dot_interaction(torch::Tensor x, torch::Tensor e, torch::Tensor pi, torch::Tensor pj) {
  check_interaction(x, e, pi, pj);
  int64_t width = x.size(1) + pi.numel();
  auto z = torch::empty({x.size(0), width}, torch::kFloat);
  float* zp = z.data_ptr<float>();
  for_interaction_rows(x, e, pi, pj, [&](int64_t b, const float* row) {
    std::copy(row, row + width, zp + b * width);
  });
  return z;
}

std::vector<torch::Tensor> dot_interaction_quant(torch::Tensor x, torch::Tensor e, torch::Tensor pi, torch::Tensor pj,
                                                 int64_t kp) {
  check_interaction(x, e, pi, pj);
  int64_t width = x.size(1) + pi.numel();
  TORCH_CHECK(kp >= width, "Kp must be >= d + P");
  auto q = torch::empty({x.size(0), kp}, torch::kChar);
  auto s = torch::empty({x.size(0)}, torch::kFloat);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  for_interaction_rows(x, e, pi, pj, [&](int64_t b, const float* row) {
    quantize_row(row, width, kp, qp + b * kp, sp + b);
  });
  return {q, s};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows);
  m.def("dequant_act", &dequant_act);
  m.def("dequant_act_quant", &dequant_act_quant);
  m.def("dot_interaction", &dot_interaction);
  m.def("dot_interaction_quant", &dot_interaction_quant);
}

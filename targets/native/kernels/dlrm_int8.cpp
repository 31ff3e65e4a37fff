// Fused CPU kernels around torch._int_mm for int8 DLRM MLPs (the interaction's int8 output is
// dlrm_fast.cpp's embed_interact_q8).
// Built at load time by targets/native/int8_kernels.py (torch C++ extension, -O3 -march=native -fopenmp-simd).
//   quantize_rows(x[M,K] f32, Kp)            -> (q[M,Kp] s8, s[M] f32)   q = round(x / s), s = max|x_row| / 127
//   dequant_act(acc[M,N] s32, sa[M], sw[N], b[N], relu)        -> y[M,N] f32   y = acc*sa*sw + b (relu)
//   dequant_act_quant(acc, sa, sw, b, Kp)    -> (q[M,Kp] s8, s[M])       the next layer's input, never f32 in memory
// Padding columns K..Kp-1 are zero.  All loops are plain C++ for the compiler to vectorise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

#include "quantize_row.h"

namespace {
constexpr int64_t GRAIN = 16;   // rows per parallel task

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows);
  m.def("dequant_act", &dequant_act);
  m.def("dequant_act_quant", &dequant_act_quant);
}

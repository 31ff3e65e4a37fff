// The MLP side of the torch-fast path that is ours: final_dot (a width-1 last layer accumulated in
// f32) and the whole model for a few samples in one call (SmallModel: bf16 weights as AVX512-BF16
// pairs, f32 accumulation, the numerics of the large-batch path).
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "embed_interact.h"

namespace {

// The top MLP's last layer when it has one output: logit[b] = sum_k y[b, k] w[k] + bias, from the
// bf16 activations of the layer before, accumulated in f32 (a bf16 logit would lose ~3 digits).
torch::Tensor final_dot(torch::Tensor y, torch::Tensor w, double bias) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kBFloat16 && y.is_contiguous(), "y must be bf16 [B, K]");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.numel() == y.size(1), "w must be f32 [K]");
  const int64_t batch = y.size(0), k = y.size(1);
  auto out = torch::empty({batch}, torch::kFloat);
  const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>());
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float b0 = static_cast<float>(bias);
  at::parallel_for(0, batch, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const uint16_t* row = yp + b * k;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < k; ++c) acc += bf16_to_f32(row[c]) * wp[c];
      op[b] = acc + b0;
    }
  });
  return out;
}

// An MLP for small_forward: per layer the weight as bf16 pairs P [ceil(K/2), N, 2] with
// P[c, j, q] = W[j, 2c + q] (0 past K): the operand layout of AVX512-BF16's dot product, which
// multiplies two bf16 inputs by two bf16 weights and adds both into an f32 lane; bias f32 [N].
struct Layers {
  std::vector<const uint32_t*> wp;   // pairs of bf16 as 32-bit words: wp[c * N + j]
  std::vector<const float*> bias;
  std::vector<int64_t> k, n;
  std::vector<bool> relu;
};

Layers check_layers(const std::vector<torch::Tensor>& wp, const std::vector<torch::Tensor>& bias,
                    const std::vector<bool>& relu, int64_t k_in) {
  TORCH_CHECK(!wp.empty() && wp.size() == bias.size() && wp.size() == relu.size(), "one weight, bias, relu per layer");
  Layers l;
  for (size_t i = 0; i < wp.size(); ++i) {
    TORCH_CHECK(wp[i].dim() == 3 && wp[i].scalar_type() == torch::kBFloat16 && wp[i].is_contiguous() &&
                wp[i].size(0) == (k_in + 1) / 2 && wp[i].size(2) == 2 && bias[i].scalar_type() == torch::kFloat &&
                bias[i].is_contiguous() && bias[i].numel() == wp[i].size(1),
                "layer shapes do not chain (weight bf16 [ceil(K/2), N, 2], bias f32 [N])");
    l.wp.push_back(reinterpret_cast<const uint32_t*>(wp[i].data_ptr<at::BFloat16>()));
    l.bias.push_back(bias[i].data_ptr<float>());
    l.k.push_back(k_in);
    l.n.push_back(wp[i].size(1));
    l.relu.push_back(relu[i]);
    k_in = wp[i].size(1);
  }
  return l;
}

#ifdef DLRM_FAST_AVX512
// Outputs [j0, j0 + 16 NV) of y = b + x W^T for one sample (x as bf16 pairs), NV accumulators
// kept in registers across the whole K loop; masked at the tail of n.
template <int NV>
inline void matvec_block(const uint32_t* x2, int64_t k2, const uint32_t* wp, const float* bias, int64_t n,
                         int64_t j0, bool relu, float* y) {
  __mmask16 mask[NV];
  __m512 acc[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t rem = n - j0 - v * 16;
    mask[v] = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1);
    acc[v] = _mm512_maskz_loadu_ps(mask[v], bias + j0 + v * 16);
  }
  for (int64_t c = 0; c < k2; ++c) {
    if (x2[c] == 0) continue;   // both inputs zero (after a ReLU, often)
    const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x2[c]));
    const uint32_t* w = wp + c * n + j0;
    for (int v = 0; v < NV; ++v)
      acc[v] = _mm512_dpbf16_ps(acc[v], a, (__m512bh)_mm512_maskz_loadu_epi32(mask[v], w + v * 16));
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 out = relu ? _mm512_max_ps(acc[v], _mm512_setzero_ps()) : acc[v];
    _mm512_mask_storeu_ps(y + j0 + v * 16, mask[v], out);
  }
}
#endif

// y = b + x W^T (f32 accumulation), ReLU if relu, for one sample; x: k2 pairs of bf16.
void matvec_bf16(const uint32_t* x2, int64_t k2, const uint32_t* wp, const float* bias, int64_t n, bool relu,
                 float* y) {
#ifdef DLRM_FAST_AVX512
  int64_t j0 = 0;
  for (; j0 + 128 <= n; j0 += 128) matvec_block<8>(x2, k2, wp, bias, n, j0, relu, y);
  switch ((n - j0 + 15) / 16) {
    case 0: break;
    case 1: matvec_block<1>(x2, k2, wp, bias, n, j0, relu, y); break;
    case 2: matvec_block<2>(x2, k2, wp, bias, n, j0, relu, y); break;
    case 3: matvec_block<3>(x2, k2, wp, bias, n, j0, relu, y); break;
    case 4: matvec_block<4>(x2, k2, wp, bias, n, j0, relu, y); break;
    case 5: matvec_block<5>(x2, k2, wp, bias, n, j0, relu, y); break;
    case 6: matvec_block<6>(x2, k2, wp, bias, n, j0, relu, y); break;
    default: matvec_block<7>(x2, k2, wp, bias, n, j0, relu, y); break;
  }
#else
  std::memcpy(y, bias, n * sizeof(float));
  for (int64_t c = 0; c < k2; ++c) {
    if (x2[c] == 0) continue;
    const float a0 = bf16_to_f32(x2[c] & 0xffffu), a1 = bf16_to_f32(x2[c] >> 16);
    for (int64_t j = 0; j < n; ++j)
      y[j] += a0 * bf16_to_f32(wp[c * n + j] & 0xffffu) + a1 * bf16_to_f32(wp[c * n + j] >> 16);
  }
  if (relu)
    for (int64_t j = 0; j < n; ++j) y[j] = std::max(y[j], 0.f);
#endif
}

// M samples through an MLP: x [M, K_0] bf16 -> [M, N_last] f32; each layer's f32 output is
// rounded to bf16 as the next layer's input (the numerics of the oneDNN bf16 path).
std::vector<float> mlp_rows(const Layers& l, const uint16_t* x, int64_t m) {
  std::vector<uint16_t> in;
  std::vector<float> y;
  for (size_t i = 0; i < l.wp.size(); ++i) {
    const int64_t k = l.k[i], k2 = (k + 1) / 2, n = l.n[i];
    if (i == 0) {
      in.assign(m * 2 * k2, 0);
      for (int64_t r = 0; r < m; ++r) std::memcpy(in.data() + r * 2 * k2, x + r * k, k * sizeof(uint16_t));
    } else {
      in.assign(m * 2 * k2, 0);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < k; ++c) in[r * 2 * k2 + c] = to_bf16(y[r * k + c]);
    }
    y.resize(m * n);
    for (int64_t r = 0; r < m; ++r)
      matvec_bf16(reinterpret_cast<const uint32_t*>(in.data() + r * 2 * k2), k2, l.wp[i], l.bias[i], n, l.relu[i],
                  y.data() + r * n);
  }
  return y;
}

// The whole model for a few samples in one call (batch-1 serving: per-op dispatch would cost more
// than the math): x = bottom(dense), z = embed_interact(.., x, ..), logit = top(z), in the
// numerics of the large-batch path (bf16 weights and layer inputs, f32 accumulation).
torch::Tensor small_forward(torch::Tensor dense, torch::Tensor w, torch::Tensor idx, torch::Tensor off,
                            torch::Tensor feat, int64_t d, torch::Tensor pre,
                            std::vector<torch::Tensor> bottom_wt,
                            std::vector<torch::Tensor> bottom_b, std::vector<bool> bottom_relu,
                            std::vector<torch::Tensor> top_wt, std::vector<torch::Tensor> top_b,
                            std::vector<bool> top_relu, int64_t order, int64_t kp) {
  TORCH_CHECK(dense.dim() == 2 && dense.scalar_type() == torch::kFloat && dense.is_contiguous(), "dense must be f32 [B, n]");
  const Layers bottom = check_layers(bottom_wt, bottom_b, bottom_relu, dense.size(1));
  const Layers top = check_layers(top_wt, top_b, top_relu, kp);
  TORCH_CHECK(top.n.back() == 1, "the top MLP must end in one output");
  const int64_t batch = dense.size(0);
  TORCH_CHECK(bottom.n.back() == d, "the bottom MLP must end in d = ", d, " outputs");
  std::vector<uint16_t> dense16(dense.numel());
  for (int64_t c = 0; c < dense.numel(); ++c) dense16[c] = to_bf16(dense.data_ptr<float>()[c]);
  const std::vector<float> xv = mlp_rows(bottom, dense16.data(), batch);
  const torch::Tensor x = torch::from_blob(const_cast<float*>(xv.data()), {batch, d}, torch::kFloat);
  const torch::Tensor z = embed_interact(w, idx, off, feat, d, pre, x, order, kp, false);
  const std::vector<float> logits =
      mlp_rows(top, reinterpret_cast<const uint16_t*>(z.data_ptr<at::BFloat16>()), batch);
  auto out = torch::empty({batch}, torch::kFloat);
  std::memcpy(out.data_ptr<float>(), logits.data(), batch * sizeof(float));
  return out;
}

// small_forward with its weights bound once (a Python call then converts three tensors, not
// six lists: ~5 us of the ~28 us of a batch-1 call).
struct SmallModel {
  torch::Tensor w, feat;
  int64_t d;
  std::vector<torch::Tensor> bottom_wt, bottom_b, top_wt, top_b;
  std::vector<bool> bottom_relu, top_relu;
  int64_t order, kp;

  torch::Tensor forward(torch::Tensor dense, torch::Tensor idx, torch::Tensor off, torch::Tensor pre) const {
    return small_forward(dense, w, idx, off, feat, d, pre, bottom_wt, bottom_b, bottom_relu, top_wt, top_b,
                         top_relu, order, kp);
  }
};

}  // namespace

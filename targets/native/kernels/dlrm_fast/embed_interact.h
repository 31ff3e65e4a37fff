// The top MLP's input straight from the canonical batch: z bf16 (torch-fast's MLPs) or z
// quantized per row to int8 (torch-fast-int8's, quantize_row.h).
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "../quantize_row.h"
#include "interaction.h"

namespace {

torch::Tensor embed_interact(torch::Tensor w, torch::Tensor idx, torch::Tensor off, torch::Tensor feat, int64_t d,
                             torch::Tensor pre, torch::Tensor x, int64_t order, int64_t kp, bool generic) {
  const Bags g = check_bags(w, idx, off, feat, d, pre);
  auto z = torch::empty({g.batch, kp}, torch::kBFloat16);
  uint16_t* zp = reinterpret_cast<uint16_t*>(z.data_ptr<at::BFloat16>());
  const int64_t width = interaction_width(g.nf, g.d, order);
  for_interaction_rows<uint16_t>(g, x, order, kp, generic, [&](int64_t b, auto write) {
    uint16_t* zb = zp + b * kp;
    write(zb);
    std::memset(zb + width, 0, (kp - width) * sizeof(uint16_t));
  });
  return z;
}

// embed_interact for an int8 top MLP: each f32 row z_b quantized on the spot (quantize_row.h),
// q [B, kp] int8 (zero beyond d + pairs) and s [B] f32 with z_b ≈ s_b q_b.
std::vector<torch::Tensor> embed_interact_q8(torch::Tensor w, torch::Tensor idx, torch::Tensor off,
                                             torch::Tensor feat, int64_t d, torch::Tensor pre, torch::Tensor x,
                                             int64_t order, int64_t kp, bool generic) {
  const Bags g = check_bags(w, idx, off, feat, d, pre);
  auto q = torch::empty({g.batch, kp}, torch::kChar);
  auto s = torch::empty({g.batch}, torch::kFloat);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  const int64_t width = interaction_width(g.nf, g.d, order);
  for_interaction_rows<float>(g, x, order, kp, generic, [&](int64_t b, auto write) {
    thread_local std::vector<float> row;
    row.resize(kp);
    write(row.data());
    quantize_row(row.data(), width, kp, qp + b * kp, sp + b);
  });
  return {q, s};
}

}  // namespace

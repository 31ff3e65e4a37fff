// The block schedule of the one-call int8 MLP kernels (dlrm_vnni.cpp, mlp_int8_avx2.cpp): BLOCK
// samples at a time through every layer, so the activations stay in L1/L2 and never reach memory
// as int32 or f32 at batch size.  A kernel K supplies its arithmetic:
//   K::Act                               a layer input's element (u8 for VNNI, s16 for AVX2)
//   K::Layer                             one layer (.n outputs, .kp padded inputs)
//   K::BLOCK                             samples per block (a multiple of its register tile's rows)
//   K::layer_block(l, a, sa, y, rows)    A [rows, l.kp] Act, row scales sa -> Y [rows, l.n] f32 (rows <= BLOCK)
//   K::requantize(l, next, y, a, s)      one row of l's output -> next's input row and its scale
//   K::dot(y, w, n)                      f32 dot product (a width-1 last layer)
// The last block computes only the rows it has (a batch of 1 is one row through every layer).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace dlrm {

// f.template operator()<N>() with N = n (1 <= n <= MAX) as a compile-time constant: a register
// tile's row or vector count, chosen at run time, as the template argument the tile needs.
template <int MAX, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_count<MAX - 1>(n, std::forward<F>(f));
  }
  f.template operator()<MAX>();
}

// load(row, a, s) writes sample `row`'s first-layer input (kp wide) and its scale.  Returns
// f32 [batch, N_last], or the logits f32 [batch] when final_w (f32 [N_last]) is not empty.
template <typename K, typename Load>
torch::Tensor run_blocks(const std::vector<typename K::Layer>& layers, int64_t kp, int64_t batch,
                         const torch::Tensor& final_w, float final_b, Load load) {
  constexpr int64_t BLOCK = K::BLOCK;
  using Act = typename K::Act;
  const bool final = final_w.numel() > 0;
  torch::Tensor out = final ? torch::empty({batch}, torch::kFloat) : torch::empty({batch, int64_t(layers.back().n)}, torch::kFloat);
  float* op = out.data_ptr<float>();
  int64_t widest = kp;
  for (const auto& l : layers) widest = std::max(widest, l.n);
  at::parallel_for(0, (batch + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Act> a(BLOCK * widest);
    std::vector<float> y(BLOCK * widest), sa(BLOCK);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t lo = blk * BLOCK, rows = std::min(BLOCK, batch - lo);
      for (int64_t r = 0; r < rows; ++r) load(lo + r, a.data() + r * kp, &sa[r]);
      for (size_t i = 0; i < layers.size(); ++i) {
        const auto& l = layers[i];
        K::layer_block(l, a.data(), sa.data(), y.data(), rows);
        if (i + 1 == layers.size()) break;
        const auto& next = layers[i + 1];
        for (int64_t r = 0; r < rows; ++r)
          K::requantize(l, next, y.data() + r * l.n, a.data() + r * next.kp, &sa[r]);
      }
      const int64_t n = layers.back().n;
      if (final) {
        const float* w = final_w.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) op[lo + r] = K::dot(y.data() + r * n, w, n) + final_b;
      } else {
        std::memcpy(op + lo * n, y.data(), rows * n * sizeof(float));
      }
    }
  });
  return out;
}

}  // namespace dlrm

// CPU kernels of the torch-fast path: huge-page tables, a sample-major fused multi-table lookup,
// and the lookup fused with the dot interaction, writing the top MLP's bf16 input directly.
// Built at load time by targets/native/fast_kernels.py (torch C++ extension, -O3 -march=native).
// This file is the module's contract and its registration; the kernels are the headers of
// dlrm_fast/, included below in dependency order into this one translation unit.
//
//   huge_empty(bytes)          -> W uint8 [bytes] in 2 MiB-aligned memory advised MADV_HUGEPAGE
//   Tables (the "table arguments" W, feat, d, pre of every call below): everything a lookup reads
//   lies in W; feat int64 [F, NCOL] describes feature f: its row format, its kind (rows, hash, QR,
//   hot-cold, pruned, TT, or pooled before the call: pre [B, P, d]) and where its parts lie
//   (dlrm_fast/tables.h says how).
//   gather_bags(W, idx, off, feat, d, pre)                   -> e [B, F, d] f32
//       e[b, f] = sum_{p in [off[f*B+b], off[f*B+b+1])} row(f, idx[p])   (mean: / max(1, len)),
//       decoded in registers and summed in f32 (a quantized bag sums scale q and adds the biases
//       once: sum_k (s_k q_k + b_k) = sum_k s_k q_k + sum_k b_k)
//   embed_interact(W, idx, off, feat, d, pre, x, order, kp, generic) -> z [B, kp] bf16
//       T_b = [x_b; e[b, 0]; ..; e[b, F-1]] (F+1 vectors of d), G = T_b T_bᵀ,
//       z_b = [x_b, G[i, j] for the kept pairs in `order`, 0 ...]  (order 0: dlrm j < i,
//       1: dlrm-self j <= i, 2: torchrec j > i; row-major in i), rounded to bf16 once.
//   embed_interact_q8(same)    -> (q [B, kp] int8, s [B] f32): z_b in f32, then quantized per row
//       (quantize_row.h): the input of torch-fast-int8's int8 top MLP.
//   keep_freed_memory(bytes) -> bool   glibc malloc keeps freed buffers below `bytes` for reuse
//   final_dot(y, w, bias)      -> logits [B] f32 = y w + bias, y bf16 [B, K] (a last layer of width 1)
//   SmallModel(W, feat, d, bottom weights, bottom b, top weights, top b, bottom relu, top relu,
//              order, kp)(dense, idx, off, pre) -> logits [B] f32: the whole model in one call (tiny B)
//
// The parts (dlrm_fast/), each including the parts it builds on:
//   common.h          includes, the ISA tier the build targets (DLRM_FAST_AVX512 / _AVX2 / neither),
//                     the sizes the loops are tuned to
//   memory.h          huge_empty, keep_freed_memory
//   tables.h          the table layout (formats, kinds, feat's columns) and its check (check_bags)
//   pool_rows.h       one row decoded per format; pooling the bags of plain rows (ROW, HASH)
//   pool_kinds.h      pooling QR, hot-cold, pruned and TT bags
//   gather.h          every feature of a chunk of samples pooled, prefetched; gather_bags
//   interaction.h     the Gram of a sample's tile, its kept pairs written (generic, AVX-512, AVX2)
//   embed_interact.h  embed_interact (bf16 z), embed_interact_q8 (int8 z)
//   small_model.h     final_dot, SmallModel
// cpp_extension.py hashes every header under kernels/ into the module's name: editing any part
// rebuilds the module.
#include "dlrm_fast/common.h"
#include "dlrm_fast/memory.h"
#include "dlrm_fast/tables.h"
#include "dlrm_fast/pool_rows.h"
#include "dlrm_fast/pool_kinds.h"
#include "dlrm_fast/gather.h"
#include "dlrm_fast/interaction.h"
#include "dlrm_fast/embed_interact.h"
#include "dlrm_fast/small_model.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("huge_empty", &huge_empty);
  m.def("keep_freed_memory", &keep_freed_memory);
  m.def("gather_bags", &gather_bags);
  m.def("embed_interact", &embed_interact);
  m.def("embed_interact_q8", &embed_interact_q8);
  m.def("final_dot", &final_dot);
  pybind11::class_<SmallModel>(m, "SmallModel")
      .def(pybind11::init<torch::Tensor, torch::Tensor, int64_t, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<bool>, std::vector<bool>, int64_t, int64_t>())
      .def("__call__", &SmallModel::forward);
}

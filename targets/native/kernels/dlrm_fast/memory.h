// Memory the torch-fast path allocates: the tables' huge-page buffer and glibc's reuse of freed
// activation buffers.
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include "common.h"

namespace {

torch::Tensor huge_empty(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "bytes must be >= 0");
  const int64_t total = (std::max<int64_t>(bytes, 64) + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  void* p = std::aligned_alloc(HUGE_PAGE, total);
  TORCH_CHECK(p != nullptr, "could not allocate ", total, " bytes for the tables");
  madvise(p, total, MADV_HUGEPAGE);   // advisory: without THP the table still works, on 4 KiB pages
  return torch::from_blob(p, {bytes}, [](void* q) { std::free(q); }, torch::kByte);
}

// Serve allocations below `bytes` from the heap and keep freed memory there (glibc's mmap and trim
// thresholds), so each call's activations reuse pages instead of faulting fresh ones in: a fresh
// 1.5 MiB buffer (z at B=2048) costs ~0.4 ms of page faults on this VM, and glibc's own threshold
// moves with whatever was freed last.  false where the C library has no such knobs.
bool keep_freed_memory(int64_t bytes) {
#if defined(__GLIBC__)
  return mallopt(M_MMAP_THRESHOLD, static_cast<int>(bytes)) == 1 && mallopt(M_TRIM_THRESHOLD, static_cast<int>(2 * bytes)) == 1;
#else
  return false;
#endif
}

}  // namespace

// What every part of the torch-fast kernels shares: the includes, the ISA tier the build targets
// (DLRM_FAST_AVX512 / DLRM_FAST_AVX2 / neither), and the sizes the loops are tuned to.
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

// ISA tiers (the build's -march is the tier's: targets/native/cpp_extension.py): the AVX-512 forms
// need BF16 and VBMI2 (bf16 conversion, compress stores); the AVX2 forms (AVX2 + FMA + F16C,
// x86-64-v3) serve every other x86-64 tier; otherwise plain loops the compiler vectorises.
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define DLRM_FAST_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DLRM_FAST_AVX2 1
#endif

namespace {
constexpr int64_t PREFETCH = 32;   // lookups ahead, across features (B=2048 Kaggle: 8..128 within 10%)
constexpr int64_t CHUNK = 256;    // samples per tile: [CHUNK, 32, 16] f32 = 512 KiB stays in L2
constexpr int64_t HUGE_PAGE = int64_t(2) << 20;
constexpr int64_t MAX_D = 1024;

}  // namespace

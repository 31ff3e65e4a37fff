// A whole MLP of Linear (+ ReLU) layers in bf16 on AMX tiles, in one call (targets/native/amx_mlp.py).
//
//   amx_usable() -> str             "" when this CPU and kernel let the process use AMX-BF16, else why not
//   AmxMlp(packed, bias, relu, n, k_in, final_w, final_b)
//     (x [B, k_in] f32 or bf16) -> y bf16 [B, n_last], or logits f32 [B] with a width-1 last layer
//
// Math, per layer l: h_l = act(h_{l-1} W_lᵀ + b_l), h_0 = x rounded to bf16, products summed in
// f32 by TDPBF16PS, bias and ReLU in f32, h_l rounded to bf16 once (oneDNN's bf16 numerics).  A
// width-1 last layer (``final_w``) is a f32 dot product of the last hidden bf16 row, as
// ``final_dot`` does, so the logit is not rounded to bf16.
//
// Layout: W_l [N, K] is packed (amx_mlp.pack) into B tiles of 16 k-pairs x 16 columns:
// tile (nt, kb) = 512 bf16 at (nt * KB + kb) * 512, element [r][2c + q] = W[16 nt + c][32 kb + 2r + q]
// (zero past N and K).  Rows go through all layers in blocks of 32 samples, the activations of a
// block in two [32, max width] bf16 buffers that stay in L1/L2, so no layer's output travels
// through memory and there is one call per MLP (oneDNN: one call per layer, and calls add up:
// its bottom MLP over 128-row chunks took 3.16 ms vs 0.90 in one go; its K = 13 first layer ran
// at 0.12 TFLOP/s).  Each 32 x 32 output block is four C tiles
// accumulated over K in 32-wide steps from two A tiles (the block's rows) and two B tiles.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DLRM_AMX 1
#endif

namespace {
constexpr int64_t ROWS = 32;        // samples per block: two A tiles of 16 rows
constexpr int64_t TILE_ELEMS = 512; // bf16 per B tile (16 rows x 64 bytes)

std::string amx_usable() {
#ifdef DLRM_AMX
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return "this CPU has no AMX-TILE / AMX-BF16";
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0)
    return "the kernel refused AMX tile state to this process (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return "";
#else
  return "these kernels were built without AMX-BF16 support";
#endif
}

#ifdef DLRM_AMX
struct TileConfig {   // ldtilecfg's 64-byte layout, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline uint16_t to_bf16(float v) {
  return static_cast<uint16_t>(_mm_cvtsi128_si32(reinterpret_cast<__m128i>(_mm_cvtneps_pbh(_mm_set_ss(v)))));
}

// Every tile is 16 rows x 64 bytes: tmm0-3 C (f32 16x16), tmm4-5 A (bf16 16x32), tmm6-7 B.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}
#endif

template <typename T>
struct Aligned {   // a zeroed, 64-byte aligned scratch array
  std::unique_ptr<T, decltype(&std::free)> p;
  explicit Aligned(int64_t n)
      : p(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)), &std::free) {
    TORCH_CHECK(p != nullptr, "out of memory for the MLP scratch");
    std::memset(p.get(), 0, n * sizeof(T));
  }
  T* data() const { return p.get(); }
};

struct Layer {
  torch::Tensor packed;   // bf16 B tiles, see the header
  std::vector<float> bias;  // f32 [n_pad], zero past N
  int64_t n, k_pad, n_pad;
  bool relu;
};

class AmxMlp {
 public:
  AmxMlp(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> bias, std::vector<bool> relu,
         std::vector<int64_t> n, int64_t k_in, torch::Tensor final_w, double final_b)
      : k_in_(k_in), final_b_(static_cast<float>(final_b)) {
    const std::string why = amx_usable();
    TORCH_CHECK(why.empty(), why);
    const size_t count = packed.size();
    TORCH_CHECK(count > 0 && bias.size() == count && relu.size() == count && n.size() == count,
                "one packed weight, bias, relu flag and width per layer");
    int64_t k = k_in;
    for (size_t l = 0; l < count; ++l) {
      Layer layer;
      layer.n = n[l];
      layer.k_pad = (k + 31) / 32 * 32;
      layer.n_pad = (n[l] + 15) / 16 * 16;
      layer.relu = relu[l];
      TORCH_CHECK(packed[l].scalar_type() == torch::kBFloat16 && packed[l].is_contiguous() &&
                      packed[l].numel() == layer.n_pad * layer.k_pad,
                  "layer ", l, ": packed weight must be contiguous bf16 of n_pad * k_pad = ", layer.n_pad * layer.k_pad);
      TORCH_CHECK(bias[l].numel() == n[l], "layer ", l, ": bias must have ", n[l], " entries");
      layer.packed = packed[l];
      auto b = bias[l].to(torch::kFloat).contiguous();
      layer.bias.assign(layer.n_pad, 0.f);
      std::memcpy(layer.bias.data(), b.data_ptr<float>(), n[l] * sizeof(float));
      width_ = std::max({width_, layer.k_pad, (layer.n_pad + 31) / 32 * 32});
      layers_.push_back(std::move(layer));
      k = n[l];
    }
    if (final_w.numel() > 0) {
      TORCH_CHECK(final_w.numel() == k, "the width-1 last layer must have ", k, " weights");
      auto w = final_w.to(torch::kFloat).contiguous();
      final_w_.assign(w.data_ptr<float>(), w.data_ptr<float>() + k);
    }
  }

  torch::Tensor forward(torch::Tensor x) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k_in_, "x must be [B, ", k_in_, "]");
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be f32 or bf16");
    x = x.contiguous();
    const int64_t batch = x.size(0), n_out = layers_.back().n;
    const bool final = !final_w_.empty();
    auto y = final ? torch::empty({batch}, torch::kFloat) : torch::empty({batch, n_out}, torch::kBFloat16);
#ifdef DLRM_AMX
    const bool f32 = x.scalar_type() == torch::kFloat;
    const char* xp = static_cast<const char*>(x.data_ptr());
    const int64_t blocks = (batch + ROWS - 1) / ROWS;
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      configure_tiles();
      // 64-byte aligned: a tile row that straddles two cache lines costs two accesses
      Aligned<uint16_t> buf0(ROWS * width_), buf1(ROWS * width_);
      Aligned<float> c(ROWS * 32);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t r0 = blk * ROWS, rows = std::min(ROWS, batch - r0);
        // A full block of bf16 rows whose width is a multiple of 32 is read by the tile loads in
        // place: copying it first costs more than the copy (stores, then tile loads of the
        // same lines, stall; B=2048 top MLP 1.28 -> 1.16 ms with the copy gone)
        const bool direct = !f32 && rows == ROWS && k_in_ % 32 == 0;
        const uint16_t* in = reinterpret_cast<const uint16_t*>(xp) + r0 * k_in_;
        int64_t ld = k_in_;
        if (!direct) load_rows(xp, f32, r0, rows, buf0.data()), in = buf0.data(), ld = width_;
        uint16_t* out = buf1.data();
        for (const Layer& layer : layers_) {
          run_layer(layer, in, ld, out, c.data());
          in = out, ld = width_;
          out = out == buf1.data() ? buf0.data() : buf1.data();
        }
        store_rows(in, r0, rows, final, y);
      }
      _tile_release();
    });
#endif
    return y;
  }

 private:
#ifdef DLRM_AMX
  // Rows [r0, r0 + rows) of x into buf [32, width_] bf16, zero in the padding rows and columns.
  void load_rows(const char* xp, bool f32, int64_t r0, int64_t rows, uint16_t* buf) const {
    for (int64_t r = 0; r < ROWS; ++r) {
      uint16_t* dst = buf + r * width_;
      std::memset(dst, 0, layers_[0].k_pad * sizeof(uint16_t));
      if (r >= rows) continue;
      if (f32) {
        const float* src = reinterpret_cast<const float*>(xp) + (r0 + r) * k_in_;
        for (int64_t j = 0; j < k_in_; ++j) dst[j] = to_bf16(src[j]);
      } else {
        std::memcpy(dst, xp + (r0 + r) * k_in_ * 2, k_in_ * sizeof(uint16_t));
      }
    }
  }

  // out[:, 0:n_pad] = act(in[:, 0:k_pad] Wᵀ + b) for one block (``in`` rows ``ld`` apart, ``out``
  // rows width_ apart), and zeros up to the next multiple of 32 (the next layer's K padding).
  void run_layer(const Layer& L, const uint16_t* in, int64_t ld, uint16_t* out, float* c) const {
    const int64_t kb_count = L.k_pad / 32, stride = ld * 2;
    const uint16_t* w = reinterpret_cast<const uint16_t*>(L.packed.data_ptr());
    for (int64_t n0 = 0; n0 < L.n_pad; n0 += 32) {
      const bool pair = n0 + 16 < L.n_pad;   // two column tiles, or the last 16 columns alone
      const uint16_t* w0 = w + (n0 / 16) * kb_count * TILE_ELEMS;
      const uint16_t* w1 = w0 + kb_count * TILE_ELEMS;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        _tile_loadd(4, in + kb * 32, stride);
        _tile_loadd(5, in + 16 * ld + kb * 32, stride);
        _tile_loadd(6, w0 + kb * TILE_ELEMS, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (pair) {
          _tile_loadd(7, w1 + kb * TILE_ELEMS, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c, 128);
      _tile_stored(2, c + 16 * 32, 128);
      if (pair) {
        _tile_stored(1, c + 16, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
      }
      const __m512 b0 = _mm512_loadu_ps(L.bias.data() + n0);
      const __m512 b1 = pair ? _mm512_loadu_ps(L.bias.data() + n0 + 16) : _mm512_setzero_ps();
      const __m512 zero = _mm512_setzero_ps();
      for (int64_t r = 0; r < ROWS; ++r) {
        __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + r * 32), b0);
        __m512 v1 = pair ? _mm512_add_ps(_mm512_loadu_ps(c + r * 32 + 16), b1) : zero;
        if (L.relu) v0 = _mm512_max_ps(v0, zero), v1 = _mm512_max_ps(v1, zero);
        const __m512bh h = _mm512_cvtne2ps_pbh(v1, v0);   // low half v0, high half v1
        _mm512_storeu_si512(out + r * width_ + n0, reinterpret_cast<__m512i>(h));
      }
    }
  }

  // The block's valid rows of the last activation into y: bf16 [B, n], or the f32 dot product
  // with the width-1 last layer.
  void store_rows(const uint16_t* h, int64_t r0, int64_t rows, bool final, torch::Tensor& y) const {
    const int64_t n = layers_.back().n;
    if (!final) {
      uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr()) + r0 * n;
      for (int64_t r = 0; r < rows; ++r) std::memcpy(yp + r * n, h + r * width_, n * sizeof(uint16_t));
      return;
    }
    float* yp = y.data_ptr<float>() + r0;
    const int64_t n16 = n / 16 * 16;
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* row = h + r * width_;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < n16; j += 16) {   // bf16 -> f32 is a 16-bit shift
        const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(row + j))), 16);
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(bits), _mm512_loadu_ps(final_w_.data() + j), acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t j = n16; j < n; ++j) {
        const uint32_t bits = static_cast<uint32_t>(row[j]) << 16;
        float v;
        std::memcpy(&v, &bits, 4);
        s += v * final_w_[j];
      }
      yp[r] = s + final_b_;
    }
  }
#endif

  std::vector<Layer> layers_;
  int64_t k_in_, width_ = 32;
  std::vector<float> final_w_;
  float final_b_;
};
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_usable", &amx_usable);
  pybind11::class_<AmxMlp>(m, "AmxMlp")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<bool>,
                          std::vector<int64_t>, int64_t, torch::Tensor, double>())
      .def("__call__", &AmxMlp::forward);
}

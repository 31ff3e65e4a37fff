// How the tables lie in W and how feat describes them, and the check of every call's table
// arguments (W, idx, off, feat, d, pre) before any kernel reads them (Bags).
// Part of kernels/dlrm_fast.cpp, its only includer (one translation unit: internal linkage, the
// compiler sees every kernel at once, as when this was one file).
//
//   W: every byte a lookup reads; feat int64 [F, NCOL] describes feature f (columns: enum Col), d
//   is the model's embedding dim.  Row formats (fmt): 0 f32 (4w bytes), 1 fp16 (2w), 2 int8
//   row-wise (w codes, f32 scale, f32 bias: w + 8), 3 int4 row-wise (ceil(w/2) bytes of codes, low
//   nibble first, fp16 scale, fp16 bias), 4 int2 row-wise (ceil(w/4) bytes, low bits first, fp16
//   scale, fp16 bias) (FBGEMM's fused row-wise layouts, as passes/quantized.py writes them):
//   value = scale q + bias.
//   Kinds (rewrite.core.embedding.FusedLookup; id i < rows[f], else an error):
//       ROW      row(i) = R[i]                     (R: `width` values per row in format fmt at base)
//       HASH     row(i) = R[h(i)], h(i) = ((a (i mod p) + b) mod p) mod m, p = 2^31 - 1
//       QR       row(i) = op(Q[i / c], S[i mod c]) (f32; op mult / add / concat; pool_first: op of
//                the pooled parts)
//       HOTCOLD  row(i) = H[s] if s = remap[i] >= 0 else R[-s - 1]   (H f32; R in format fmt)
//       PRUNED   row(i) = pad_d(B_l[o]), (l, o) = (remap[i] >> bits, remap[i] mod 2^bits), B_l f32
//       PRE      the bag is already pooled: pre [B, P, d] column P0 (a representation the engine
//                evaluates with torch ops)
//       TT       row(i) = C[slot(i)] if i is cached, else vec(G_1[i_1] G_2[i_2] .. G_K[i_K]), i_k the
//                mixed-radix digits of i (base p_k), cores f32 or int8 row-wise (code scale + bias)
//   then e = pool(rows) (sum, or mean: / max(1, len)), and e @ M when PROJ >= 0 (M f32 [width, d]).
#pragma once

#include "common.h"

namespace {

enum Format : int64_t { F32 = 0, F16 = 1, Q8 = 2, Q4 = 3, Q2 = 4 };

inline int64_t row_bytes(int64_t fmt, int64_t d) {
  switch (fmt) {
    case F32: return 4 * d;
    case F16: return 2 * d;
    case Q8: return d + 8;
    case Q4: return (d + 1) / 2 + 4;
    default: return (d + 3) / 4 + 4;
  }
}

enum Kind : int64_t { ROW = 0, HASH = 1, QR = 2, HOTCOLD = 3, PRUNED = 4, PRE = 5, TT = 6 };
// feat's columns; P0.. are the kind's: HASH (a, b, m); QR (c, byte base of S, op 0 mult / 1 add /
// 2 concat, pool_first); HOTCOLD (byte base of remap, its element bytes 2 / 4, byte base of H, H's
// rows, R's rows); PRUNED (byte base of remap, element bytes, bits, byte base of the level table
// int64 [L, 3] = (byte base of B_l, its width, its rows), L); PRE (column of pre); TT (byte base of
// its int64 table: TT_HEAD header entries, then TT_CORE per core, see TtTable).
enum Col : int64_t { KIND = 0, FMT, BASE, ROWS, WIDTH, MEAN, PROJ, P0, P1, P2, P3, P4, NCOL };
constexpr uint64_t PRIME = 2147483647u;   // 2^31 - 1: the universal hash's p (passes/universal_hash.py)

struct Bags {
  const char* w;                   // the tables' bytes
  const int64_t *idx, *off, *feat;
  const float* pre;                // [B, npre, d]: the pooled bags of the PRE features
  int64_t npre, nf, batch, d;
  int64_t at(int64_t f, int64_t c) const { return feat[f * NCOL + c]; }
};

// A remap entry (int16 or int32).
inline int64_t remap_at(const char* r, int64_t bytes, uint64_t i) {
  if (bytes == 2) {
    int16_t v;
    std::memcpy(&v, r + 2 * i, 2);
    return v;
  }
  int32_t v;
  std::memcpy(&v, r + 4 * i, 4);
  return v;
}

// A TT feature's int64 table in W: header [K, cache rows, cache base, index base, index bytes (2 / 4:
// a slot map over the rows, -1 = not cached; 0: sorted int32 ids padded with 2^31 - 1), index
// length, 0, 0], then per core [base, p, q, r_in, r_out, bits (32 / 8), scale-bias base (int8:
// f32 [p, 2]), 0].
constexpr int64_t TT_HEAD = 8, TT_CORE = 8, TT_MAX_CORES = 8;

struct TtTable {
  const int64_t* t;
  int64_t cores() const { return t[0]; }
  const int64_t* core(int64_t k) const { return t + TT_HEAD + TT_CORE * k; }
};

template <typename Inside>
void check_tt(const torch::Tensor& w, int64_t f, const int64_t* c, int64_t d, Inside inside) {
  inside(f, c[P0], 1, 8 * TT_HEAD, 8, "tt table");
  const char* wb = static_cast<const char*>(w.data_ptr());
  const TtTable tt{reinterpret_cast<const int64_t*>(wb + c[P0])};
  const int64_t k = tt.cores();
  TORCH_CHECK(k >= 1 && k <= TT_MAX_CORES, "feature ", f, ": tt needs 1 .. ", TT_MAX_CORES, " cores");
  inside(f, c[P0], 1, 8 * (TT_HEAD + TT_CORE * k), 8, "tt table");
  int64_t rows = 1, width = 1, r = 1;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t* g = tt.core(j);
    TORCH_CHECK(g[1] >= 1 && g[2] >= 1 && g[3] == r && g[4] >= 1 && (g[5] == 32 || g[5] == 8) && g[3] * g[2] <= MAX_D * 64 &&
                g[2] * g[4] <= MAX_D * 64, "feature ", f, ": tt core ", j, " has a bad shape");
    const int64_t n = g[3] * g[2] * g[4];
    inside(f, g[0], g[1], g[5] == 32 ? 4 * n : n, g[5] == 32 ? 4 : 1, "tt core");
    if (g[5] == 8) inside(f, g[6], g[1], 8, 4, "tt core scales");
    rows = std::min<int64_t>(rows * g[1], int64_t(1) << 62);
    width *= g[2];
    r = g[4];
  }
  TORCH_CHECK(r == 1 && width == d && c[WIDTH] == d && rows >= c[ROWS], "feature ", f,
              ": tt cores must end in rank 1, multiply out to d and cover the rows");
  const int64_t* h = tt.t;
  if (h[1] > 0) {
    inside(f, h[2], h[1], 4 * d, 4, "tt cache");
    TORCH_CHECK(h[4] == 0 || h[4] == 2 || h[4] == 4, "feature ", f, ": tt cache index of int16 / int32 or sorted ids");
    inside(f, h[3], h[5], h[4] == 0 ? 4 : h[4], 4, "tt cache index");
    TORCH_CHECK(h[4] == 0 || h[5] >= c[ROWS], "feature ", f, ": the tt slot map must cover the rows");
  }
}

Bags check_bags(const torch::Tensor& w, const torch::Tensor& idx, const torch::Tensor& off, const torch::Tensor& feat,
                int64_t d, const torch::Tensor& pre) {
  TORCH_CHECK(w.is_contiguous(), "W must be contiguous");
  TORCH_CHECK(d > 0 && d <= MAX_D, "d must be in [1, ", MAX_D, "]");
  for (const auto* t : {&idx, &off})
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->is_contiguous() && t->dim() == 1,
                "indices and offsets must be contiguous int64 vectors");
  TORCH_CHECK(feat.scalar_type() == torch::kLong && feat.is_contiguous() && feat.dim() == 2 && feat.size(1) == NCOL,
              "feat must be contiguous int64 [F, ", int64_t(NCOL), "]");
  const int64_t nf = feat.size(0);
  TORCH_CHECK(nf > 0 && (off.numel() - 1) % nf == 0, "one feat row per feature; offsets must have F*B+1 entries");
  const int64_t batch = (off.numel() - 1) / nf;
  const int64_t bytes = w.numel() * static_cast<int64_t>(w.element_size());
  const int64_t* fp = feat.data_ptr<int64_t>();
  auto inside = [&](int64_t f, int64_t b0, int64_t n, int64_t rb, int64_t align, const char* what) {
    TORCH_CHECK(b0 >= 0 && n >= 0 && rb >= 0 && b0 % align == 0 && b0 + n * rb <= bytes, "feature ", f, ": its ",
                what, " lies outside W or is misaligned");
  };
  bool has_pre = false;
  for (int64_t f = 0; f < nf; ++f) {
    const int64_t* c = fp + f * NCOL;
    const int64_t kind = c[KIND], fmt = c[FMT], width = c[WIDTH], rows = c[ROWS];
    TORCH_CHECK(kind >= ROW && kind <= TT, "feature ", f, ": kind ", kind, " is not 0 (row) .. 6 (tt)");
    TORCH_CHECK(fmt >= F32 && fmt <= Q2, "feature ", f, ": format ", fmt, " is not 0 (f32) .. 4 (int2 row-wise)");
    TORCH_CHECK(width >= 1 && width <= MAX_D && rows >= 0 && (c[MEAN] == 0 || c[MEAN] == 1),
                "feature ", f, ": width must be in [1, ", MAX_D, "], rows >= 0, mean 0 or 1");
    const int64_t out_width = kind == QR && c[P2] == 2 ? 2 * width : width;
    if (c[PROJ] >= 0) inside(f, c[PROJ], width, 4 * d, 4, "projection");
    else TORCH_CHECK(out_width == d, "feature ", f, ": rows of width ", out_width, " need a projection to d = ", d);
    const int64_t align = fmt <= F16 ? 4 : 1;
    if (kind == ROW) {
      inside(f, c[BASE], rows, row_bytes(fmt, width), align, "table");
    } else if (kind == HASH) {
      TORCH_CHECK(c[P0] >= 1 && c[P0] < int64_t(PRIME) && c[P1] >= 0 && c[P1] < int64_t(PRIME) && c[P2] >= 1,
                  "feature ", f, ": hash needs 1 <= a < p, 0 <= b < p, m >= 1");
      inside(f, c[BASE], c[P2], row_bytes(fmt, width), align, "hashed table");
    } else if (kind == QR) {
      TORCH_CHECK(c[P0] >= 1 && c[P2] >= 0 && c[P2] <= 2 && (c[P3] == 0 || c[P3] == 1),
                  "feature ", f, ": qr needs c >= 1, op 0..2, pool_first 0 or 1");
      inside(f, c[BASE], (rows + c[P0] - 1) / c[P0], 4 * width, 4, "quotient table");
      inside(f, c[P1], c[P0], 4 * width, 4, "remainder table");
    } else if (kind == HOTCOLD) {
      TORCH_CHECK(c[P1] == 2 || c[P1] == 4, "feature ", f, ": the remap holds int16 or int32");
      inside(f, c[P0], rows, c[P1], 1, "remap");
      inside(f, c[P2], c[P3], 4 * width, 4, "hot table");
      inside(f, c[BASE], c[P4], row_bytes(fmt, width), align, "cold table");
    } else if (kind == PRUNED) {
      TORCH_CHECK((c[P1] == 2 || c[P1] == 4) && c[P2] >= 1 && c[P2] <= 31 && c[P4] >= 1,
                  "feature ", f, ": pruned needs an int16 / int32 remap, 1..31 offset bits, >= 1 level");
      inside(f, c[P0], rows, c[P1], 1, "remap");
      inside(f, c[P3], c[P4], 24, 8, "level table");
      for (int64_t l = 0; l < c[P4]; ++l) {
        const int64_t* lv = reinterpret_cast<const int64_t*>(static_cast<const char*>(w.data_ptr()) + c[P3]) + 3 * l;
        TORCH_CHECK(lv[1] >= 0 && lv[1] <= width, "feature ", f, ": level ", l, " is wider than the row");
        inside(f, lv[0], lv[2], 4 * lv[1], 4, "level block");
      }
    } else if (kind == TT) {
      check_tt(w, f, c, d, inside);
    } else {
      has_pre = true;
      TORCH_CHECK(c[P0] >= 0, "feature ", f, ": pre column must be >= 0");
    }
  }
  int64_t npre = 0;
  if (has_pre) {
    TORCH_CHECK(pre.scalar_type() == torch::kFloat && pre.is_contiguous() && pre.dim() == 3 && pre.size(0) == batch &&
                pre.size(2) == d, "pre must be contiguous f32 [B, P, d]");
    npre = pre.size(1);
    for (int64_t f = 0; f < nf; ++f)
      TORCH_CHECK(fp[f * NCOL + KIND] != PRE || fp[f * NCOL + P0] < npre, "feature ", f, ": pre column out of range");
  }
  const int64_t* op = off.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[nf * batch] == idx.numel(), "offsets must run from 0 to len(indices)");
  return {static_cast<const char*>(w.data_ptr()), idx.data_ptr<int64_t>(), op, fp,
          has_pre ? pre.data_ptr<float>() : nullptr, npre, nf, batch, d};
}

}  // namespace

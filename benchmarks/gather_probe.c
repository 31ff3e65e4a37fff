/* The memory system's limit for the Kaggle lookup pattern, without torch: what the embedding
 * stage could reach on this machine (docs/performance.md, "Why the lookup stops ...").
 *
 *   cc -O3 -march=native -o /tmp/gather_probe benchmarks/gather_probe.c
 *   /tmp/gather_probe HUGE PREFETCH MODE [ELEMENT_BYTES]      e.g. /tmp/gather_probe 1 32 0
 *
 * 26 fp32 tables with the Criteo Kaggle row counts, d = 16 (2.16 GB), 2048 uniform ids per table
 * per batch, fresh ids every batch, visited table by table as torch-fast does; HUGE 1 advises
 * 2 MiB pages (MADV_HUGEPAGE); PREFETCH lookups ahead within a table (0: none).  MODE 0 writes
 * each row to out[b][f] (a [B, F, d] result), 1 only sums the rows (no stores), 2 visits only
 * the 5 tables above 1 M rows (writing rows).  ELEMENT_BYTES 2 stores 2-byte elements (32-byte
 * rows, the size of torch-fast's fp16 tables; widened to f32 as bf16 bits, a shift, since only
 * the memory traffic is being measured), 4 (default) fp32.  Prints one JSON line: mean and best ms per batch
 * over 37 batches after 3 of warm-up, and rows/s for all 26 x 2048 lookups.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static const long ROWS[26] = {1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                              27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572};
enum { F = 26, B = 2048, D = 16, BATCHES = 40, WARMUP = 3 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s HUGE(0|1) PREFETCH MODE(0|1|2) [ELEMENT_BYTES(2|4)]\n", argv[0]);
    return 2;
  }
  const int huge = atoi(argv[1]), pf = atoi(argv[2]), mode = atoi(argv[3]);
  const int eb = argc == 5 ? atoi(argv[4]) : 4;
  if (eb != 2 && eb != 4) return 2;
  long base[F], total_rows = 0;
  for (int f = 0; f < F; f++) base[f] = total_rows, total_rows += ROWS[f];
  const size_t page = (size_t)2 << 20, bytes = ((size_t)total_rows * D * eb + page - 1) / page * page;
  char* w = aligned_alloc(page, bytes);
  float* out = aligned_alloc(64, (size_t)B * F * D * 4);
  int64_t* idx = malloc((size_t)BATCHES * F * B * 8);
  if (!w || !out || !idx) return 1;
  if (huge) madvise(w, bytes, MADV_HUGEPAGE);
  memset(w, 1, bytes);
  uint64_t s = 88172645463325252ull;
  for (long i = 0; i < (long)BATCHES * F * B; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    idx[i] = (int64_t)(s % (uint64_t)ROWS[(i / B) % F]);
  }
  float sink[D] = {0};
  double sum = 0, best = 1e9;
  for (int n = 0; n < BATCHES; n++) {
    const int64_t* ix = idx + (size_t)n * F * B;
    const double t0 = now();
    for (int f = 0; f < F; f++) {
      if (mode == 2 && ROWS[f] < 1000000) continue;
      const char* wf = w + base[f] * D * eb;
      const int64_t* xf = ix + f * B;
      for (int b = 0; b < B; b++) {
        if (pf && b + pf < B) __builtin_prefetch(wf + xf[b + pf] * D * eb);
        const char* r = wf + xf[b] * D * eb;
        float* o = mode == 1 ? sink : out + ((size_t)b * F + f) * D;
        for (int c = 0; c < D; c++) {
          float v;
          if (eb == 4) {
            memcpy(&v, r + 4 * c, 4);
          } else {
            uint16_t h;
            memcpy(&h, r + 2 * c, 2);
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&v, &bits, 4);
          }
          o[c] = mode == 1 ? o[c] + v : v;
        }
      }
    }
    const double t = now() - t0;
    if (n >= WARMUP) sum += t, best = t < best ? t : best;
  }
  const double mean = sum / (BATCHES - WARMUP);
  printf("{\"huge\": %d, \"prefetch\": %d, \"mode\": %d, \"element_bytes\": %d, \"mean_ms\": %.3f, \"best_ms\": %.3f, "
         "\"rows_per_s\": %.0f}\n", huge, pf, mode, eb, mean * 1e3, best * 1e3, F * B / mean);
  return out[5] + sink[3] > 0 ? 0 : 1;
}

// Instruction throughput of the operations our MLP kernels are built from, on one core: the
// ceiling each ISA tier's kernel can reach, measured, not taken from a table.
//
//   gcc -O2 -o /tmp/isa_peaks benchmarks/isa_peaks.c && /tmp/isa_peaks > benchmarks/results/isa_peaks_<host>.json
//
// Each test is a loop of 12 independent accumulator chains (more than latency x throughput on
// any x86 core we meet), written in assembly so the compiler cannot spill or reorder it:
//   fma_ymm / fma_zmm          VFMADD231PS: 8 / 16 fp32 multiply-adds (the fp32 MLPs, oneDNN)
//   madd_add_ymm               VPMADDWD + VPADDD: 16 exact s16 x s16 products summed into s32
//                              (kernels/mlp_int8_avx2.cpp's inner step, the AVX2 int8 tier)
//   madd_add_bcast_ymm         the same with one VPBROADCASTD per two multiplies (its 6x2 tile)
//   maddubs_ymm                VPMADDUBSW alone: 32 u8 x s8 products into saturating s16 pairs
//   dpbusd_zmm                 VPDPBUSD: 64 u8 x s8 products into s32 (kernels/dlrm_vnni.cpp)
// and the clock, from a chain of dependent integer adds (one per cycle on every x86 core).
// Rates are instructions per ns and per cycle, multiply-adds per cycle, and the GOP/s (2 per
// multiply-add) a kernel made of nothing else would reach: per ns is the measured figure, per
// cycle divides by a clock that itself moves on a shared VM.  Tests the CPU
// lacks (AVX-512 on an AVX2-only host) are reported as absent by name, never run.
#include <stdio.h>
#include <string.h>
#include <time.h>

#define ITERS 50000000L

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define Y12(op, src)                                                                                    \
  op " " src ",%%ymm0,%%ymm0\n" op " " src ",%%ymm1,%%ymm1\n" op " " src ",%%ymm2,%%ymm2\n"               \
  op " " src ",%%ymm3,%%ymm3\n" op " " src ",%%ymm4,%%ymm4\n" op " " src ",%%ymm5,%%ymm5\n"               \
  op " " src ",%%ymm6,%%ymm6\n" op " " src ",%%ymm7,%%ymm7\n" op " " src ",%%ymm8,%%ymm8\n"               \
  op " " src ",%%ymm9,%%ymm9\n" op " " src ",%%ymm10,%%ymm10\n" op " " src ",%%ymm11,%%ymm11\n"
#define Z12(op)                                                                                         \
  op " %%zmm31,%%zmm30,%%zmm16\n" op " %%zmm31,%%zmm30,%%zmm17\n" op " %%zmm31,%%zmm30,%%zmm18\n"       \
  op " %%zmm31,%%zmm30,%%zmm19\n" op " %%zmm31,%%zmm30,%%zmm20\n" op " %%zmm31,%%zmm30,%%zmm21\n"       \
  op " %%zmm31,%%zmm30,%%zmm22\n" op " %%zmm31,%%zmm30,%%zmm23\n" op " %%zmm31,%%zmm30,%%zmm24\n"       \
  op " %%zmm31,%%zmm30,%%zmm25\n" op " %%zmm31,%%zmm30,%%zmm26\n" op " %%zmm31,%%zmm30,%%zmm27\n"
#define MADD_ADD(acc) "vpmaddwd %%ymm15,%%ymm14,%%ymm12\n vpaddd %%ymm12," acc "," acc "\n"
#define MADD_ADD_BCAST(off, a, b)                                                                       \
  "vpbroadcastd " off "(%1),%%ymm13\n vpmaddwd %%ymm15,%%ymm13,%%ymm12\n vpaddd %%ymm12," a "," a "\n"  \
  "vpmaddwd %%ymm14,%%ymm13,%%ymm12\n vpaddd %%ymm12," b "," b "\n"
#define YMM_CLOBBER "ymm0", "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", "ymm10", \
                    "ymm11", "ymm12", "ymm13", "ymm14", "ymm15", "cc"
#define ZMM_CLOBBER "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21", "zmm22", "zmm23", "zmm24", "zmm25", \
                    "zmm26", "zmm27", "zmm30", "zmm31", "cc"

static int buffer[64];

static double clock_ghz(void) {
  long n = 4 * ITERS, x = 0;
  double t = now();
  asm volatile("1:\n add $1,%1\n add $1,%1\n add $1,%1\n add $1,%1\n sub $4,%0\n jnz 1b\n"
               : "+r"(n), "+r"(x) :: "cc");
  return 4.0 * ITERS / (now() - t) / 1e9;
}

// A function timing ITERS passes of `body` (12 instructions of the measured kind), after
// `setup`: instructions of that kind per ns.  `attr`: the target the registers need.
#define TIMED(attr, name, setup, body, clobber, ...)                                               \
  attr static double name(void) {                                                                    \
    long n = ITERS;                                                                                 \
    double t = now();                                                                               \
    asm volatile(setup "1:\n" body "dec %0\n jnz 1b\n" : "+r"(n) : __VA_ARGS__ : clobber);           \
    return 12.0 * ITERS / (now() - t) / 1e9;                                                        \
  }

TIMED(, fma_ymm, "vxorps %%ymm15,%%ymm15,%%ymm15\n", Y12("vfmadd231ps", "%%ymm15"), YMM_CLOBBER)
TIMED(, madd_add_ymm, "vpxor %%ymm15,%%ymm15,%%ymm15\n vpxor %%ymm14,%%ymm14,%%ymm14\n",
      MADD_ADD("%%ymm0") MADD_ADD("%%ymm1") MADD_ADD("%%ymm2") MADD_ADD("%%ymm3") MADD_ADD("%%ymm4")
      MADD_ADD("%%ymm5") MADD_ADD("%%ymm6") MADD_ADD("%%ymm7") MADD_ADD("%%ymm8") MADD_ADD("%%ymm9")
      MADD_ADD("%%ymm10") MADD_ADD("%%ymm11"), YMM_CLOBBER)
TIMED(, madd_add_bcast_ymm, "vpxor %%ymm15,%%ymm15,%%ymm15\n vpxor %%ymm14,%%ymm14,%%ymm14\n",
      MADD_ADD_BCAST("0", "%%ymm0", "%%ymm1") MADD_ADD_BCAST("4", "%%ymm2", "%%ymm3")
      MADD_ADD_BCAST("8", "%%ymm4", "%%ymm5") MADD_ADD_BCAST("12", "%%ymm6", "%%ymm7")
      MADD_ADD_BCAST("16", "%%ymm8", "%%ymm9") MADD_ADD_BCAST("20", "%%ymm10", "%%ymm11"),
      YMM_CLOBBER, "r"(buffer))
TIMED(, maddubs_ymm, "vpxor %%ymm15,%%ymm15,%%ymm15\n", Y12("vpmaddubsw", "%%ymm15"), YMM_CLOBBER)
TIMED(__attribute__((target("avx512f"))), fma_zmm,
      "vpxord %%zmm31,%%zmm31,%%zmm31\n vpxord %%zmm30,%%zmm30,%%zmm30\n", Z12("vfmadd231ps"), ZMM_CLOBBER)
TIMED(__attribute__((target("avx512f"))), dpbusd_zmm,
      "vpxord %%zmm31,%%zmm31,%%zmm31\n vpxord %%zmm30,%%zmm30,%%zmm30\n", Z12("vpdpbusd"), ZMM_CLOBBER)

static void cpu_model(char* out, size_t size) {   // /proc/cpuinfo's "model name", or "unknown"
  snprintf(out, size, "unknown");
  FILE* f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[256];
  while (fgets(line, sizeof line, f)) {
    char* colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) == 0 && colon) {
      snprintf(out, size, "%s", colon + 2);
      out[strcspn(out, "\n\"\\")] = 0;
      break;
    }
  }
  fclose(f);
}

static double best(double (*f)(void)) {   // the fastest of 3: the machine is shared
  double b = 0;
  for (int i = 0; i < 3; ++i) {
    const double r = f();
    if (r > b) b = r;
  }
  return b;
}

static void emit(const char* name, const char* needs, int present, double (*f)(void), double macs, double ghz,
                 int* first) {
  printf("%s  \"%s\": ", *first ? "" : ",\n", name);
  *first = 0;
  if (!present) {
    printf("{\"absent\": \"this CPU lacks %s\"}", needs);
    return;
  }
  const double per_ns = best(f);
  printf("{\"per_ns\": %.3f, \"per_cycle\": %.3f, \"macs_per_cycle\": %.1f, \"gop_per_s\": %.0f}", per_ns,
         per_ns / ghz, per_ns / ghz * macs, 2 * macs * per_ns);
}

int main(void) {
  __builtin_cpu_init();
  memset(buffer, 1, sizeof buffer);
  const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const int vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  double ghz = 0;
  for (int i = 0; i < 3; ++i) {
    const double g = clock_ghz();
    if (g > ghz) ghz = g;
  }
  char model[128];
  cpu_model(model, sizeof model);
  printf("{\n  \"schema\": \"isa_peaks/1\",\n  \"cpu\": \"%s\",\n  \"clock_ghz\": %.3f,\n  \"tests\": {\n",
         model, ghz);
  int first = 1;
  emit("fma_ymm", "avx2 + fma", avx2, fma_ymm, 8, ghz, &first);
  emit("madd_add_ymm", "avx2", avx2, madd_add_ymm, 16, ghz, &first);
  emit("madd_add_bcast_ymm", "avx2", avx2, madd_add_bcast_ymm, 16, ghz, &first);
  emit("maddubs_ymm", "avx2", avx2, maddubs_ymm, 32, ghz, &first);
  emit("fma_zmm", "avx512f", avx512, fma_zmm, 16, ghz, &first);
  emit("dpbusd_zmm", "avx512_vnni", vnni, dpbusd_zmm, 64, ghz, &first);
  printf("\n  }\n}\n");
  return 0;
}

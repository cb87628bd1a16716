/* Peak multiply-accumulate throughput of one core of this CPU (bench/peak/README.md).
 *
 * Each kernel runs a loop of independent accumulator chains (enough to cover the latency of
 * the instruction), so only the issue rate limits it: the result is the most MACs per second
 * a single thread can ever get from that instruction path. Kernels whose instructions the CPU
 * lacks are skipped. Output: one JSON object on stdout.
 *
 *   fp32_fma_avx2    vfmadd231ps ymm       8 MACs per instruction
 *   fp32_fma_avx512  vfmadd231ps zmm      16 MACs per instruction
 *   int8_avx2        vpmaddubsw + vpmaddwd + vpaddd ymm   32 u8*s8 MACs per 3 instructions
 *   int8_avx512bw    the same on zmm                      64 MACs per 3 instructions
 *   int8_vnni_avx512 vpdpbusd zmm         64 u8*s8 MACs per instruction
 *
 * Build: gcc -O2 -o peak peak.c ; run: ./peak [seconds per kernel]
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef void (*kernel_fn)(long);

#define Y12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)

#define FMA_Y(i) "vfmadd231ps %%ymm12, %%ymm13, %%ymm" #i "\n\t"
static void fp32_fma_avx2(long n) {
    __asm__ volatile(
        "vxorps %%ymm12, %%ymm12, %%ymm12\n\tvxorps %%ymm13, %%ymm13, %%ymm13\n\t"
        "1:\n\t" Y12(FMA_Y) "dec %0\n\tjnz 1b\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "cc");
}

#define FMA_Z(i) "vfmadd231ps %%zmm12, %%zmm13, %%zmm" #i "\n\t"
__attribute__((target("avx512f"))) static void fp32_fma_avx512(long n) {
    __asm__ volatile(
        "vxorps %%xmm12, %%xmm12, %%xmm12\n\tvxorps %%xmm13, %%xmm13, %%xmm13\n\t"
        "1:\n\t" Y12(FMA_Z) "dec %0\n\tjnz 1b\n\tvzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "cc");
}

/* u8 x s8 -> s16 pairs (vpmaddubsw), s16 pairs -> s32 (vpmaddwd with ones), accumulate. */
#define I8_Y(t, a)                                                                     \
    "vpmaddubsw %%ymm13, %%ymm14, %%ymm" #t "\n\t"                                    \
    "vpmaddwd %%ymm15, %%ymm" #t ", %%ymm" #t "\n\t"                                  \
    "vpaddd %%ymm" #t ", %%ymm" #a ", %%ymm" #a "\n\t"
static void int8_avx2(long n) {
    __asm__ volatile(
        "vpxor %%ymm13, %%ymm13, %%ymm13\n\tvpxor %%ymm14, %%ymm14, %%ymm14\n\t"
        "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\t"
        "1:\n\t" I8_Y(0, 6) I8_Y(1, 7) I8_Y(2, 8) I8_Y(3, 9) I8_Y(4, 10) I8_Y(5, 11)
        "dec %0\n\tjnz 1b\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm13", "xmm14", "xmm15", "cc");
}

#define I8_Z(t, a)                                                                     \
    "vpmaddubsw %%zmm13, %%zmm14, %%zmm" #t "\n\t"                                    \
    "vpmaddwd %%zmm15, %%zmm" #t ", %%zmm" #t "\n\t"                                  \
    "vpaddd %%zmm" #t ", %%zmm" #a ", %%zmm" #a "\n\t"
__attribute__((target("avx512bw"))) static void int8_avx512bw(long n) {
    __asm__ volatile(
        "vpxord %%zmm13, %%zmm13, %%zmm13\n\tvpxord %%zmm14, %%zmm14, %%zmm14\n\t"
        "vpternlogd $0xff, %%zmm15, %%zmm15, %%zmm15\n\t"
        "1:\n\t" I8_Z(0, 6) I8_Z(1, 7) I8_Z(2, 8) I8_Z(3, 9) I8_Z(4, 10) I8_Z(5, 11)
        "dec %0\n\tjnz 1b\n\tvzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm13", "xmm14", "xmm15", "cc");
}

#define VNNI_Z(i) "vpdpbusd %%zmm12, %%zmm13, %%zmm" #i "\n\t"
__attribute__((target("avx512f,avx512vnni"))) static void int8_vnni_avx512(long n) {
    __asm__ volatile(
        "vpxord %%zmm12, %%zmm12, %%zmm12\n\tvpxord %%zmm13, %%zmm13, %%zmm13\n\t"
        "1:\n\t" Y12(VNNI_Z) "dec %0\n\tjnz 1b\n\tvzeroupper\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "cc");
}

/* Best of 5 timed runs of about `seconds` each; GMAC/s by wall time and by this thread's CPU
 * time (they differ when another process takes the core; the CPU-time figure is the core's). */
static void probe(const char *name, kernel_fn fn, double macs_per_iter, double seconds,
                  int *first) {
    long n = 1000;
    double t0, t;
    fn(n);
    for (;;) { /* calibrate the iteration count to about `seconds` */
        t0 = now(CLOCK_MONOTONIC);
        fn(n);
        t = now(CLOCK_MONOTONIC) - t0;
        if (t > seconds / 4) break;
        n *= 4;
    }
    n = (long)(n * seconds / t) + 1;
    double best_wall = 0, best_cpu = 0;
    for (int r = 0; r < 5; r++) {
        double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_THREAD_CPUTIME_ID);
        fn(n);
        double w = now(CLOCK_MONOTONIC) - w0, c = now(CLOCK_THREAD_CPUTIME_ID) - c0;
        double gw = n * macs_per_iter / w / 1e9, gc = n * macs_per_iter / c / 1e9;
        if (gw > best_wall) best_wall = gw;
        if (gc > best_cpu) best_cpu = gc;
    }
    printf("%s\"%s\": {\"gmacs_wall\": %.2f, \"gmacs_cpu\": %.2f}", *first ? "" : ", ", name,
           best_wall, best_cpu);
    *first = 0;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0.2;
    int first = 1;
    __builtin_cpu_init();
    printf("{");
    if (__builtin_cpu_supports("fma")) probe("fp32_fma_avx2", fp32_fma_avx2, 12 * 8, seconds, &first);
    if (__builtin_cpu_supports("avx512f"))
        probe("fp32_fma_avx512", fp32_fma_avx512, 12 * 16, seconds, &first);
    if (__builtin_cpu_supports("avx2")) probe("int8_avx2", int8_avx2, 6 * 32, seconds, &first);
    if (__builtin_cpu_supports("avx512bw"))
        probe("int8_avx512bw", int8_avx512bw, 6 * 64, seconds, &first);
    if (__builtin_cpu_supports("avx512vnni"))
        probe("int8_vnni_avx512", int8_vnni_avx512, 12 * 64, seconds, &first);
    printf("}\n");
    return 0;
}

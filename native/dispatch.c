/* Public API: CPU-feature dispatch over the per-ISA kernel tables, and a multithreaded matmul. */

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define EQ_IQ_GRIDS_DEFINE /* the codebooks are defined here, once */
#include "iq_grids.h"

#include "blocks.h"
#include "kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>

/* AVX2 + FMA + F16C, and an OS that saves the YMM registers (XCR0 bits 1 and 2). */
static int probe_avx2(void) {
    unsigned a, b, c, d, xcr0_lo, xcr0_hi;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (fma | osxsave | avx | f16c)) != (fma | osxsave | avx | f16c)) return 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 6u) != 6u) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1u;
}

#endif

float eq_half_table[1 << 16];

#ifndef EQ_IQ4NL_VALUES
#error "EQ_IQ4NL_VALUES (ggml's kvalues_iq4nl) is passed in by native/build_native.py's COMPILE_ARGS"
#endif
const int8_t eq_iq4nl_values[16] = {EQ_IQ4NL_VALUES};
typedef char eq_iq4nl_values_count[sizeof((const int8_t[]){EQ_IQ4NL_VALUES}) == 16 ? 1 : -1];

static struct {
    pthread_once_t once;
    int avx2, best;
} cpu = {PTHREAD_ONCE_INIT, 0, EQ_ISA_SCALAR};

/* Once per process: probe the CPU (cpuid is slow, a VM exit under virtualization) and fill the half table. */
static void setup(void) {
    for (uint32_t h = 0; h < (1u << 16); ++h) eq_half_table[h] = eq_half_to_float((uint16_t)h);
#if defined(__x86_64__)
    cpu.avx2 = probe_avx2();
    if (cpu.avx2) cpu.best = EQ_ISA_AVX2;
#endif
#if defined(__aarch64__)
    cpu.best = EQ_ISA_NEON; /* Advanced SIMD is part of the AArch64 baseline */
#endif
}

static const eq_kernel_table *kernels(int isa) {
    pthread_once(&cpu.once, setup);
    switch (isa == EQ_ISA_BEST ? cpu.best : isa) {
    case EQ_ISA_SCALAR: return &eq_scalar_kernels;
#if defined(__x86_64__)
    case EQ_ISA_AVX2: return cpu.avx2 ? &eq_avx2_kernels : NULL;
#endif
#if defined(__aarch64__)
    case EQ_ISA_NEON: return &eq_neon_kernels;
#endif
    default: return NULL;
    }
}

int eq_isa_available(int isa) { return isa != EQ_ISA_BEST && kernels(isa) != NULL; }

int eq_isa_best(void) {
    pthread_once(&cpu.once, setup);
    return cpu.best;
}

static const struct { int block, size, activation; } TYPES[EQ_NTYPES] = {
    [EQ_Q4_0] = {32, 18, EQ_Q8_0}, [EQ_Q4_1] = {32, 20, EQ_Q8_1}, [EQ_Q5_0] = {32, 22, EQ_Q8_0},
    [EQ_Q5_1] = {32, 24, EQ_Q8_1}, [EQ_Q8_0] = {32, 34, EQ_Q8_0}, [EQ_Q8_1] = {32, 36, -1},
    [EQ_Q2_K] = {256, 84, EQ_Q8_K}, [EQ_Q3_K] = {256, 110, EQ_Q8_K}, [EQ_Q4_K] = {256, 144, EQ_Q8_K},
    [EQ_Q5_K] = {256, 176, EQ_Q8_K}, [EQ_Q6_K] = {256, 210, EQ_Q8_K}, [EQ_Q8_K] = {256, 292, -1},
    [EQ_IQ4_NL] = {32, 18, EQ_Q8_0}, [EQ_IQ4_XS] = {256, 136, EQ_Q8_K},
    [EQ_IQ2_XXS] = {256, 66, EQ_Q8_K}, [EQ_IQ2_XS] = {256, 74, EQ_Q8_K}, [EQ_IQ2_S] = {256, 82, EQ_Q8_K},
    [EQ_IQ3_XXS] = {256, 98, EQ_Q8_K}, [EQ_IQ3_S] = {256, 110, EQ_Q8_K}, [EQ_IQ1_S] = {256, 50, EQ_Q8_K},
    [EQ_IQ1_M] = {256, 56, EQ_Q8_K},
};

static int known(int type) { return type >= 0 && type < EQ_NTYPES && TYPES[type].block > 0; }
int eq_block_size(int type) { return known(type) ? TYPES[type].block : 0; }
int eq_type_size(int type) { return known(type) ? TYPES[type].size : 0; }
int eq_activation_type(int type) { return known(type) && TYPES[type].activation > 0 ? TYPES[type].activation : -1; }

static size_t row_bytes(int type, int64_t n) { return (size_t)(n / TYPES[type].block) * (size_t)TYPES[type].size; }
static int whole_blocks(int type, int64_t n) { return known(type) && n > 0 && n % TYPES[type].block == 0; }

int eq_dequantize_row(int isa, int type, const void *blocks, float *out, int64_t n) {
    const eq_kernel_table *k = kernels(isa);
    if (!k || !whole_blocks(type, n) || !k->dequantize[type]) return -1;
    k->dequantize[type](blocks, out, n);
    return 0;
}

int eq_quantize_row(int isa, int act_type, const float *x, void *blocks, int64_t n) {
    const eq_kernel_table *k = kernels(isa);
    if (!k || !whole_blocks(act_type, n) || !k->quantize[act_type]) return -1;
    k->quantize[act_type](x, blocks, n);
    return 0;
}

int eq_vec_dot(int isa, int type, int n, const void *weights, const void *activations, float *out) {
    return eq_dot_rows(isa, type, n, 1, weights, 0, activations, out);
}

int eq_dot_rows(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
                const void *activations, float *out) {
    const eq_kernel_table *k = kernels(isa);
    if (!k || !whole_blocks(type, n) || !k->dot[type] || rows < 0) return -1;
    const eq_dot_fn dot = k->dot[type];
    for (int64_t r = 0; r < rows; ++r) out[r] = dot(n, (const char *)weights + (size_t)r * row_stride, activations);
    return 0;
}

/* ---- matmul ---- */

typedef struct {
    eq_dot_fn dot;
    int n;
    int64_t rows, m, row0, row1;
    const char *weights, *activations;
    size_t row_stride, act_stride;
    float *y;
} matmul_slice;

/* Weight rows [row0, row1) against every activation row, a few weight rows at a time so they stay in cache. */
static void *matmul_run(void *arg) {
    const matmul_slice *s = (const matmul_slice *)arg;
    enum { ROW_TILE = 16 };
    for (int64_t r0 = s->row0; r0 < s->row1; r0 += ROW_TILE) {
        const int64_t r1 = r0 + ROW_TILE < s->row1 ? r0 + ROW_TILE : s->row1;
        for (int64_t i = 0; i < s->m; ++i) {
            const char *a = s->activations + (size_t)i * s->act_stride;
            for (int64_t r = r0; r < r1; ++r) s->y[i * s->rows + r] = s->dot(s->n, s->weights + (size_t)r * s->row_stride, a);
        }
    }
    return NULL;
}

int eq_matmul(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
              int64_t m, const float *x, float *y, int n_threads) {
    const eq_kernel_table *k = kernels(isa);
    const int act = eq_activation_type(type);
    if (!k || act < 0 || !whole_blocks(type, n) || !k->dot[type] || !k->quantize[act] || rows < 0 || m < 0) return -1;
    if (rows == 0 || m == 0) return 0;

    const size_t act_stride = row_bytes(act, n);
    char *qx = (char *)malloc(act_stride * (size_t)m);
    if (!qx) return -2;
    for (int64_t i = 0; i < m; ++i) k->quantize[act](x + i * (int64_t)n, qx + (size_t)i * act_stride, n);

    if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > rows) n_threads = (int)rows;

    matmul_slice *slices = (matmul_slice *)calloc((size_t)n_threads, sizeof *slices);
    pthread_t *threads = (pthread_t *)calloc((size_t)n_threads, sizeof *threads);
    int *started = (int *)calloc((size_t)n_threads, sizeof *started);
    if (!slices || !threads || !started) {
        free(qx), free(slices), free(threads), free(started);
        return -2;
    }
    for (int t = 0; t < n_threads; ++t) {
        slices[t] = (matmul_slice){k->dot[type], n, rows, m, rows * t / n_threads, rows * (t + 1) / n_threads,
                                   (const char *)weights, qx, row_stride, act_stride, y};
    }
    /* Slice 0 runs on the calling thread; a slice whose thread cannot start runs here too. */
    for (int t = 1; t < n_threads; ++t) started[t] = pthread_create(&threads[t], NULL, matmul_run, &slices[t]) == 0;
    matmul_run(&slices[0]);
    for (int t = 1; t < n_threads; ++t) {
        if (started[t]) pthread_join(threads[t], NULL);
        else matmul_run(&slices[t]);
    }
    free(started), free(qx), free(slices), free(threads);
    return 0;
}

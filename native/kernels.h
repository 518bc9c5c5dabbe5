/* Quantized dot-product kernels: one table of functions per instruction set, and the public API over them.
 *
 * Type codes are GGML's (enum ggml_type).  Each weight type is paired with the activation type ggml-cpu's
 * `vec_dot_type` names for it: Q4_0/Q5_0/Q8_0/IQ4_NL with Q8_0, Q4_1/Q5_1 with Q8_1, Q2_K..Q6_K/IQ4_XS and the
 * lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M: dots only, lattice.h) with Q8_K.
 *
 * Every ISA reproduces the float arithmetic of the matching ggml-cpu code path (integer parts are exact in any
 * order; what must match is which partial sums are converted to float, and the order of the float multiplies,
 * fused multiply-adds and additions):
 *   scalar  ggml's *_generic functions and *_ref activation quantizers as GCC builds them for an FMA target
 *           (default -ffp-contract=fast fuses `a*b + c`; we write those fusions out as fmaf; clang fuses only
 *           within one expression, so a clang-built ggml may round some generic sums differently)
 *   avx2    ggml-cpu/arch/x86/quants.c built with -mavx2 -mfma -mf16c
 *   neon    ggml-cpu/arch/arm/quants.c on AArch64 with the dot-product lane layout of SDOT
 * The sources are compiled with -ffp-contract=off, so no fusion happens beyond the ones written.
 */

#ifndef EQ_KERNELS_H
#define EQ_KERNELS_H

#include <stddef.h>
#include <stdint.h>

enum {
    EQ_Q4_0 = 2, EQ_Q4_1 = 3, EQ_Q5_0 = 6, EQ_Q5_1 = 7, EQ_Q8_0 = 8, EQ_Q8_1 = 9,
    EQ_Q2_K = 10, EQ_Q3_K = 11, EQ_Q4_K = 12, EQ_Q5_K = 13, EQ_Q6_K = 14, EQ_Q8_K = 15,
    EQ_IQ2_XXS = 16, EQ_IQ2_XS = 17, EQ_IQ3_XXS = 18, EQ_IQ1_S = 19, EQ_IQ4_NL = 20, EQ_IQ3_S = 21, EQ_IQ2_S = 22,
    EQ_IQ4_XS = 23, EQ_IQ1_M = 29,
    EQ_NTYPES = 30
};

enum { EQ_ISA_BEST = -1, EQ_ISA_SCALAR = 0, EQ_ISA_AVX2 = 1, EQ_ISA_NEON = 2, EQ_NISA = 3 };

/* n = elements in the row (a multiple of the block size). */
typedef void (*eq_dequantize_fn)(const void *blocks, float *out, int64_t n);
typedef void (*eq_quantize_fn)(const float *x, void *blocks, int64_t n);
typedef float (*eq_dot_fn)(int n, const void *weights, const void *activations);

typedef struct {
    eq_dequantize_fn dequantize[EQ_NTYPES]; /* weight types, and Q8_0/Q8_1/Q8_K activations */
    eq_quantize_fn quantize[EQ_NTYPES];     /* activation types Q8_0, Q8_1, Q8_K */
    eq_dot_fn dot[EQ_NTYPES];               /* weight type x its activation type */
} eq_kernel_table;

extern const eq_kernel_table eq_scalar_kernels;

/* float value of every IEEE half bit pattern, filled by dispatch.c before any table but the scalar one is used. */
extern float eq_half_table[1 << 16];
#if defined(__x86_64__) || defined(_M_X64)
extern const eq_kernel_table eq_avx2_kernels;
#endif
#if defined(__aarch64__)
extern const eq_kernel_table eq_neon_kernels;
#endif

/* ---- public API (dispatch.c); `isa` is an EQ_ISA_* value, EQ_ISA_BEST picks the fastest this CPU runs ---- */

int eq_isa_available(int isa);
int eq_isa_best(void);
int eq_activation_type(int type);            /* -1 if `type` has no dot kernel */
int eq_block_size(int type);                 /* elements per block, 0 if unknown */
int eq_type_size(int type);                  /* bytes per block, 0 if unknown */

/* Return 0 on success, -1 for an unknown type/ISA or a row length that is not a multiple of the block. */
int eq_dequantize_row(int isa, int type, const void *blocks, float *out, int64_t n);
int eq_quantize_row(int isa, int act_type, const float *x, void *blocks, int64_t n);
int eq_vec_dot(int isa, int type, int n, const void *weights, const void *activations, float *out);

/* out[r] = dot(row r of `weights`, activations) for r < rows; one thread.  Rows are `row_stride` bytes apart. */
int eq_dot_rows(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
                const void *activations, float *out);

/* y[i, r] = x[i, :] . w[r, :]: activations x (m x n float32, row-major) quantized to the weight type's
 * activation type exactly as ggml-cpu does, then dotted with every weight row (rows x n blocks, `row_stride`
 * bytes apart); y is m x rows float32.  Rows are split across `n_threads` POSIX threads (<= 0: all cores). */
int eq_matmul(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
              int64_t m, const float *x, float *y, int n_threads);

#endif

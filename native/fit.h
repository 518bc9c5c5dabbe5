/* Block fits in C: the scales and codes convert/codecs chooses (and libggml's ggml_quantize_chunk), byte for byte.
 *
 * A fresh C rendering of our numpy codecs (convert/codecs/search_affine.py, search_symmetric.py, kquant_scales.py,
 * legacy_*.py, q*_*.py, iquant_nl.py, iq4_*.py), one group at a time: every float32 operation is the numpy code's,
 * in its order and association, so the bytes are the same.  They are the reference; tests/test_fit_conformance.py
 * compares all three.  (The lattice types' numpy search is convert/codecs/lattice_search.py.)
 *
 * Types (GGML codes, as in kernels.h): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, and the
 * lattice i-quants IQ3_XXS, IQ3_S, IQ2_S, IQ1_M (fit_lattice.h) with and without an importance vector, IQ2_XXS,
 * IQ2_XS and IQ1_S only with one (as ggml), Q8_0 (which ignores it).  Compiled with -ffp-contract=off: no fused multiply-add may
 * change a rounding.
 */

#ifndef EQ_FIT_H
#define EQ_FIT_H

#include <stdint.h>

/* 1 if eq_fit_rows handles `type`, else 0. */
int eq_fit_supported(int type);

/* Quantize `rows` rows of `n_per_row` float32 (row-major, contiguous) into GGUF blocks at `out` (rows of
 * n_per_row / block * type_size bytes, contiguous).  `importance`: n_per_row float32 per-column weights, or NULL.
 * `isa` (kernels.h's EQ_ISA_*) picks the build: EQ_ISA_SCALAR the portable one (SSE2 / NEON vectors, as the
 * compiler's baseline allows), EQ_ISA_AVX2 fit_avx2.c's, EQ_ISA_BEST the fastest this CPU runs; all write the same
 * bytes.  One thread, no allocation.  Returns 0, or -1 for an unsupported type or ISA, or a row length that is not
 * a multiple of the block size. */
int eq_fit_rows(int isa, int type, const float *x, void *out, int64_t rows, int64_t n_per_row,
                const float *importance);

/* fit_avx2.c's build (x86-64 only; call through eq_fit_rows, which checks the CPU). */
int eq_fit_rows_avx2(int type, const float *x, void *out, int64_t rows, int64_t n_per_row, const float *importance);

#endif

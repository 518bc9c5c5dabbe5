/* Block fits built with -mavx2 (native/build_native.py's SOURCE_FLAGS): fit_rows.h's LANES-wide vectors in one
 * AVX register.  fit.c calls it only when cpuid says AVX2 is there.  The bytes are the portable build's: every
 * operation is the same IEEE float32 operation, and -ffp-contract=off keeps FMA out. */

#if defined(__x86_64__) || defined(_M_X64)

#include "fit_rows.h"

int eq_fit_rows_avx2(int type, const float *x, void *out, int64_t rows, int64_t n_per_row, const float *importance) {
    return fit_rows(type, x, out, rows, n_per_row, importance);
}

#endif

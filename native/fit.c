/* Block fits, public API (fit.h): the portable build of fit_rows.h, and the choice of build per call. */

#include "fit_rows.h"

int eq_fit_supported(int type) { return fit_supported(type); }

int eq_fit_rows(int isa, int type, const float *x, void *out, int64_t rows, int64_t n_per_row,
                const float *importance) {
    if (isa == EQ_ISA_BEST) isa = eq_isa_available(EQ_ISA_AVX2) ? EQ_ISA_AVX2 : EQ_ISA_SCALAR;
    switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case EQ_ISA_AVX2:
        return eq_isa_available(EQ_ISA_AVX2) ? eq_fit_rows_avx2(type, x, out, rows, n_per_row, importance) : -1;
#endif
#if defined(__aarch64__)
    case EQ_ISA_NEON: /* the portable build is NEON code there */
#endif
    case EQ_ISA_SCALAR: return fit_rows(type, x, out, rows, n_per_row, importance);
    default: return -1;
    }
}

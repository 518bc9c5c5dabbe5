/* ggml's own AArch64 dot products as the oracle for neon.c.  tests/test_native.py cross-compiles this harness with
 * our kernels and with ggml-cpu's quants.c and arch/arm/quants.c (from the llama.cpp sources that
 * scripts/build_llama_tools.sh unpacks), then runs it under qemu-user:
 *
 *   ggml_arm TYPE...        e.g. ggml_arm IQ4_NL IQ4_XS Q4_K
 *
 * For each type: random blocks (f16 scales Gaussian * 0.01) dotted with activations our NEON quantizer made from
 * Gaussian rows, at a long row, an odd number of blocks and a single block; eq_vec_dot(EQ_ISA_NEON) against
 * ggml_vec_dot_* bit for bit.  One line per type; exit status 1 if any result differs or a type is unknown.
 *
 * ggml's files also hold functions that call into ggml-base (quantizers, lookup-table setup); the dots never reach
 * them, so the test links with those symbols left unresolved.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#include "kernels.h"

typedef void (*ggml_vec_dot)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);

#define GGML_DOTS(X)                                                                                  \
    X(Q4_0, q4_0_q8_0) X(Q4_1, q4_1_q8_1) X(Q5_0, q5_0_q8_0) X(Q5_1, q5_1_q8_1) X(Q8_0, q8_0_q8_0) \
    X(Q2_K, q2_K_q8_K) X(Q3_K, q3_K_q8_K) X(Q4_K, q4_K_q8_K) X(Q5_K, q5_K_q8_K) X(Q6_K, q6_K_q8_K) \
    X(IQ4_NL, iq4_nl_q8_0) X(IQ4_XS, iq4_xs_q8_K)

#define DECLARE(type, suffix) void ggml_vec_dot_##suffix(int, float *, size_t, const void *, size_t, const void *, size_t, int);
GGML_DOTS(DECLARE)

static const struct {
    const char *name;
    int type;
    ggml_vec_dot dot;
} TYPES[] = {
#define ENTRY(t, suffix) {#t, EQ_##t, ggml_vec_dot_##suffix},
    GGML_DOTS(ENTRY)
};

/* Byte offsets of the f16 fields in each block type (-1 ends the list), as in consistency.c. */
static void half_fields(int type, int out[3]) {
    static const int at[EQ_NTYPES][3] = {
        [EQ_Q4_0] = {0, -1}, [EQ_Q4_1] = {0, 2, -1}, [EQ_Q5_0] = {0, -1}, [EQ_Q5_1] = {0, 2, -1},
        [EQ_Q8_0] = {0, -1}, [EQ_Q2_K] = {80, 82, -1}, [EQ_Q3_K] = {108, -1}, [EQ_Q4_K] = {0, 2, -1},
        [EQ_Q5_K] = {0, 2, -1}, [EQ_Q6_K] = {208, -1}, [EQ_IQ4_NL] = {0, -1}, [EQ_IQ4_XS] = {0, -1},
    };
    memcpy(out, at[type], sizeof at[type]);
}

/* ---- deterministic random numbers ---- */

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

static float gaussian(void) {
    const float u = ((float)(next_u32() >> 8) + 1.0f) * 0x1p-24f, v = (float)(next_u32() >> 8) * 0x1p-24f;
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

/* Rows of `n` elements whose results differ between our NEON kernel and ggml's, out of `rows`. */
static int compare(int t, int n, int rows) {
    const int type = TYPES[t].type, act = eq_activation_type(type);
    const size_t size = (size_t)eq_type_size(type), blocks = (size_t)(n / eq_block_size(type));
    uint8_t *w = malloc(blocks * size), *a = malloc((size_t)(n / eq_block_size(act) * eq_type_size(act)));
    float *x = malloc(sizeof(float) * (size_t)n);
    int halves[3], differ = 0;
    half_fields(type, halves);
    for (int r = 0; r < rows; ++r) {
        for (size_t i = 0; i < blocks * size; ++i) w[i] = (uint8_t)next_u32();
        for (size_t b = 0; b < blocks; ++b)
            for (const int *f = halves; *f >= 0; ++f) {
                const uint16_t h = eq_float_to_half(0.01f * gaussian());
                memcpy(w + b * size + *f, &h, 2);
            }
        const float scale = r % 3 == 0 ? 30.0f : r % 3 == 1 ? 1.0f : 1e-3f;
        for (int i = 0; i < n; ++i) x[i] = scale * gaussian();
        float ours = 0.0f, theirs = 0.0f;
        if (eq_quantize_row(EQ_ISA_NEON, act, x, a, n) != 0 || eq_vec_dot(EQ_ISA_NEON, type, n, w, a, &ours) != 0) {
            printf("%s: our NEON kernels refused n = %d\n", TYPES[t].name, n);
            exit(1);
        }
        TYPES[t].dot(n, &theirs, 0, w, 0, a, 0, 1);
        differ += memcmp(&ours, &theirs, sizeof ours) != 0;
    }
    free(w), free(a), free(x);
    return differ;
}

int main(int argc, char **argv) {
    int failed = 0;
    for (int k = 1; k < argc; ++k) {
        int t = 0, n_types = (int)(sizeof TYPES / sizeof TYPES[0]);
        while (t < n_types && strcmp(TYPES[t].name, argv[k]) != 0) ++t;
        if (t == n_types) {
            printf("%s: unknown type\n", argv[k]);
            return 1;
        }
        const int block = eq_block_size(TYPES[t].type), rows = 200;
        const int sizes[3] = {4096, block == 32 ? 32 * 37 : 256 * 3, block}; /* long, odd block count, one block */
        int differ = 0;
        for (int s = 0; s < 3; ++s) differ += compare(t, sizes[s], rows);
        printf("%s: %d of %d results differ from ggml's\n", argv[k], differ, 3 * rows);
        failed |= differ != 0;
    }
    return failed;
}

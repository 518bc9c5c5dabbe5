/* Consistency harness: the fastest ISA this CPU runs (NEON on AArch64, AVX2 on x86-64) against the scalar
 * reference, through the public API.  tests/test_native.py builds it natively and, for AArch64, with a cross
 * compiler under qemu-user.  Exit status 0 when every check passes; one line per failure otherwise.
 *
 *   dequantize       bit-identical (same source, vectorized per ISA)
 *   Q8_K quantize    bit-identical (both are ggml's reference quantizer)
 *   Q8_0/Q8_1        identical except where x/d lies exactly halfway between integers, which ggml's SIMD
 *                    quantizers (and so ours) round to even, its reference away from zero
 *   dot, exact data  bit-identical: every scale is +-0.5, 1 or 2 and activations are small integers, so every
 *                    float operation is exact and the order of the sums cannot matter; this checks the integer
 *                    paths (unpacking, lanes, bsums) of every type exactly
 *   dot, random data within a float-summation bound: |best - scalar| <= 8 (blocks + 16) eps sum|w_i a_i|
 *   matmul           bit-identical to quantize + dot of each row, with threads
 */

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "blocks.h"
#include "kernels.h"

static const int WEIGHT_TYPES[] = {EQ_Q4_0, EQ_Q4_1, EQ_Q5_0, EQ_Q5_1, EQ_Q8_0, EQ_Q2_K, EQ_Q3_K, EQ_Q4_K, EQ_Q5_K, EQ_Q6_K,
                                   EQ_IQ4_NL, EQ_IQ4_XS};
#define N_WEIGHT_TYPES (int)(sizeof WEIGHT_TYPES / sizeof WEIGHT_TYPES[0])

/* Byte offsets of the f16 fields in each block type (-1 ends the list). */
static const int HALF_FIELDS[EQ_NTYPES][3] = {
    [EQ_Q4_0] = {0, -1}, [EQ_Q4_1] = {0, 2, -1}, [EQ_Q5_0] = {0, -1}, [EQ_Q5_1] = {0, 2, -1},
    [EQ_Q8_0] = {0, -1}, [EQ_Q2_K] = {80, 82, -1}, [EQ_Q3_K] = {108, -1}, [EQ_Q4_K] = {0, 2, -1},
    [EQ_Q5_K] = {0, 2, -1}, [EQ_Q6_K] = {208, -1}, [EQ_IQ4_NL] = {0, -1}, [EQ_IQ4_XS] = {0, -1},
};

static int failures = 0;

#define CHECK(cond, ...)                 \
    do {                                 \
        if (!(cond)) {                   \
            printf("FAIL: " __VA_ARGS__); \
            printf("\n");                \
            ++failures;                  \
        }                                \
    } while (0)

/* ---- deterministic random numbers ---- */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) {
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1Dull) >> 32);
}

static float uniform(void) { return (float)(next_u32() >> 8) * 0x1p-24f; }

static float gaussian(void) {
    const float u = uniform() + 0x1p-25f, v = uniform();
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * v);
}

static void random_bytes(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = (uint8_t)next_u32();
}

static void put_half(uint8_t *p, float v) {
    const uint16_t h = eq_float_to_half(v);
    memcpy(p, &h, 2);
}

/* ---- inputs ---- */

enum { EXACT, RANDOM };

static size_t row_bytes(int type, int n) { return (size_t)(n / eq_block_size(type) * eq_type_size(type)); }

/* Random codes; scales +-{0.5, 1, 2} (EXACT) or Gaussian * 0.01 (RANDOM). */
static void make_weights(int type, int rows, int n, uint8_t *w, int mode) {
    const size_t size = (size_t)eq_type_size(type);
    const size_t blocks = (size_t)rows * (size_t)(n / eq_block_size(type));
    random_bytes(w, blocks * size);
    for (size_t b = 0; b < blocks; ++b)
        for (const int *f = HALF_FIELDS[type]; *f >= 0; ++f) {
            const float exact = (float)(1 << (next_u32() % 3)) * 0.5f * (next_u32() & 1 ? 1.0f : -1.0f);
            put_half(w + b * size + *f, mode == EXACT ? exact : 0.01f * gaussian());
        }
}

/* EXACT: codes in [-2, 2] and d = 1, with consistent Q8_1 sums and Q8_K bsums.  RANDOM: scalar-quantized x. */
static void make_activations(int act, int n, const float *x, uint8_t *a, int mode) {
    if (mode == RANDOM) {
        CHECK(eq_quantize_row(EQ_ISA_SCALAR, act, x, a, n) == 0, "quantize type %d", act);
        return;
    }
    if (act == EQ_Q8_K) {
        eq_q8_K *y = (eq_q8_K *)a;
        for (int i = 0; i < n / EQ_QK_K; ++i) {
            y[i].d = 1.0f;
            for (int j = 0; j < EQ_QK_K; ++j) y[i].qs[j] = (int8_t)((int)(next_u32() % 5) - 2);
            for (int g = 0; g < 16; ++g) {
                int s = 0;
                for (int j = 0; j < 16; ++j) s += y[i].qs[16 * g + j];
                y[i].bsums[g] = (int16_t)s;
            }
        }
        return;
    }
    const size_t size = (size_t)eq_type_size(act), qs_at = act == EQ_Q8_1 ? 4 : 2;
    for (int i = 0; i < n / EQ_QK; ++i) {
        uint8_t *b = a + (size_t)i * size;
        int sum = 0;
        for (int j = 0; j < EQ_QK; ++j) {
            const int8_t q = (int8_t)((int)(next_u32() % 5) - 2);
            b[qs_at + j] = (uint8_t)q;
            sum += q;
        }
        put_half(b, 1.0f);
        if (act == EQ_Q8_1) put_half(b + 2, (float)sum);
    }
}

/* The activations' float values, for the error bound. */
static void activation_values(int act, int n, const uint8_t *a, float *out) {
    for (int i = 0; i < n; ++i) {
        if (act == EQ_Q8_K) {
            const eq_q8_K *y = (const eq_q8_K *)a + i / EQ_QK_K;
            out[i] = y->d * (float)y->qs[i % EQ_QK_K];
        } else {
            const uint8_t *b = a + (size_t)(i / EQ_QK) * (size_t)eq_type_size(act);
            uint16_t d;
            memcpy(&d, b, 2);
            out[i] = eq_half_to_float(d) * (float)(int8_t)b[(act == EQ_Q8_1 ? 4 : 2) + i % EQ_QK];
        }
    }
}

/* ---- checks ---- */

static void check_dequantize(int isa, int type, int n) {
    const int rows = 8;
    uint8_t *w = malloc(row_bytes(type, n) * rows);
    float *ref = malloc(sizeof(float) * (size_t)n), *got = malloc(sizeof(float) * (size_t)n);
    make_weights(type, rows, n, w, RANDOM);
    for (int r = 0; r < rows; ++r) {
        const uint8_t *row = w + (size_t)r * row_bytes(type, n);
        CHECK(eq_dequantize_row(EQ_ISA_SCALAR, type, row, ref, n) == 0 && eq_dequantize_row(isa, type, row, got, n) == 0,
              "dequantize type %d", type);
        CHECK(memcmp(ref, got, sizeof(float) * (size_t)n) == 0, "dequantize type %d row %d differs", type, r);
    }
    free(w), free(ref), free(got);
}

static void check_quantize(int isa, int act, int n) {
    const size_t bytes = row_bytes(act, n);
    uint8_t *ref = malloc(bytes), *got = malloc(bytes);
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int trial = 0; trial < 16; ++trial) {
        const float scale = trial % 2 ? 1e-3f : 10.0f;
        for (int i = 0; i < n; ++i) x[i] = scale * gaussian();
        if (trial == 1) /* halfway cases: with 127 in every block, d = 1 and x/d = x = k + 0.5 */
            for (int i = 0; i < n; ++i) x[i] = i % EQ_QK == 0 ? 127.0f : (float)((int)(next_u32() % 252) - 126) + 0.5f;
        if (trial == 2) memset(x, 0, sizeof(float) * (size_t)n);
        CHECK(eq_quantize_row(EQ_ISA_SCALAR, act, x, ref, n) == 0 && eq_quantize_row(isa, act, x, got, n) == 0, "quantize %d", act);
        if (act == EQ_Q8_K) {
            CHECK(memcmp(ref, got, bytes) == 0, "Q8_K quantize differs (trial %d)", trial);
            continue;
        }
        const size_t size = (size_t)eq_type_size(act), qs_at = act == EQ_Q8_1 ? 4 : 2;
        for (int i = 0; i < n / EQ_QK; ++i) {
            const uint8_t *rb = ref + i * size, *gb = got + i * size;
            CHECK(memcmp(rb, gb, 2) == 0, "type %d block %d: d differs", act, i);
            uint16_t dh;
            memcpy(&dh, rb, 2);
            float amax = 0.0f;
            for (int j = 0; j < EQ_QK; ++j) amax = fmaxf(amax, fabsf(x[i * EQ_QK + j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int ties = 0;
            for (int j = 0; j < EQ_QK; ++j) {
                const int r = (int8_t)rb[qs_at + j], g = (int8_t)gb[qs_at + j];
                const float v = x[i * EQ_QK + j] * id;
                const int tie = fabsf(v - truncf(v)) == 0.5f;
                ties += tie;
                CHECK(tie ? (g & 1) == 0 && fabsf((float)g - v) == 0.5f : r == g, "type %d block %d elem %d: scalar %d, isa %d (x/d = %.9g)",
                      act, i, j, r, g, v);
            }
            if (act == EQ_Q8_1 && !ties) CHECK(memcmp(rb + 2, gb + 2, 2) == 0, "Q8_1 block %d: s differs", i);
        }
    }
    free(ref), free(got), free(x);
}

static void check_dots(int isa, int type, int n, int mode) {
    const int rows = 64, act = eq_activation_type(type);
    const size_t wbytes = row_bytes(type, n);
    uint8_t *w = malloc(wbytes * rows), *a = malloc(row_bytes(act, n));
    float *x = malloc(sizeof(float) * (size_t)n), *ref = malloc(sizeof(float) * rows), *got = malloc(sizeof(float) * rows);
    float *wv = malloc(sizeof(float) * (size_t)n), *av = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; ++i) x[i] = gaussian();
    make_weights(type, rows, n, w, mode);
    make_activations(act, n, x, a, mode);
    CHECK(eq_dot_rows(EQ_ISA_SCALAR, type, n, rows, w, wbytes, a, ref) == 0 && eq_dot_rows(isa, type, n, rows, w, wbytes, a, got) == 0,
          "dot type %d", type);
    activation_values(act, n, a, av);
    const double blocks = (double)n / eq_block_size(type);
    for (int r = 0; r < rows; ++r) {
        if (mode == EXACT) {
            CHECK(ref[r] == got[r], "dot type %d n %d row %d (exact data): scalar %.9g, isa %.9g", type, n, r, ref[r], got[r]);
            continue;
        }
        eq_dequantize_row(EQ_ISA_SCALAR, type, w + (size_t)r * wbytes, wv, n);
        double mag = 0.0;
        for (int i = 0; i < n; ++i) mag += fabs((double)wv[i] * av[i]);
        const double bound = 8.0 * (blocks + 16.0) * FLT_EPSILON * mag;
        CHECK(fabs((double)ref[r] - got[r]) <= bound, "dot type %d n %d row %d: scalar %.9g, isa %.9g, bound %.3g", type, n, r, ref[r], got[r], bound);
    }
    free(w), free(a), free(x), free(ref), free(got), free(wv), free(av);
}

static void check_matmul(int isa, int type, int n) {
    const int rows = 37, m = 5, act = eq_activation_type(type);
    const size_t wbytes = row_bytes(type, n), abytes = row_bytes(act, n);
    uint8_t *w = malloc(wbytes * rows), *a = malloc(abytes);
    float *x = malloc(sizeof(float) * (size_t)n * m), *y = malloc(sizeof(float) * rows * m), *col = malloc(sizeof(float) * rows);
    make_weights(type, rows, n, w, RANDOM);
    for (int i = 0; i < n * m; ++i) x[i] = gaussian();
    CHECK(eq_matmul(isa, type, n, rows, w, wbytes, m, x, y, 3) == 0, "matmul type %d", type);
    for (int i = 0; i < m; ++i) {
        eq_quantize_row(isa, act, x + (size_t)i * n, a, n);
        eq_dot_rows(isa, type, n, rows, w, wbytes, a, col);
        CHECK(memcmp(col, y + (size_t)i * rows, sizeof(float) * rows) == 0, "matmul type %d row %d differs from quantize + dot", type, i);
    }
    free(w), free(a), free(x), free(y), free(col);
}

static void check_rejections(int isa) {
    float out;
    uint8_t buf[512] = {0};
    CHECK(eq_vec_dot(isa, EQ_Q4_K, 255, buf, buf, &out) == -1, "row length 255 accepted for Q4_K");
    CHECK(eq_vec_dot(isa, EQ_Q8_K, 256, buf, buf, &out) == -1, "Q8_K accepted as a weight type");
    CHECK(eq_vec_dot(isa, 1, 32, buf, buf, &out) == -1, "F16 accepted");
    CHECK(eq_quantize_row(isa, EQ_Q4_0, (const float *)buf, buf, 32) == -1, "Q4_0 accepted as an activation type");
    CHECK(eq_vec_dot(42, EQ_Q8_0, 32, buf, buf, &out) == -1, "unknown ISA accepted");
}

int main(void) {
    const int isa = eq_isa_best();
    static const char *names[] = {"scalar", "avx2", "neon"};
    printf("best ISA: %s\n", names[isa]);
    if (isa == EQ_ISA_SCALAR) {
        printf("nothing to compare: only the scalar kernels run here\n");
        return 0;
    }
    check_rejections(isa);
    for (int a = 0; a < 3; ++a) check_quantize(isa, (const int[]){EQ_Q8_0, EQ_Q8_1, EQ_Q8_K}[a], 1024);
    for (int t = 0; t < N_WEIGHT_TYPES; ++t) {
        const int type = WEIGHT_TYPES[t];
        check_dequantize(isa, type, 1024);
        /* 1024 and an odd number of 32-element blocks (NEON and IQ4_NL pair them) / super-blocks */
        for (int k = 0; k < 2; ++k) {
            const int n = k == 0 ? 1024 : (eq_block_size(type) == 32 ? 32 * 37 : 256 * 3);
            check_dots(isa, type, n, EXACT);
            check_dots(isa, type, n, RANDOM);
        }
        check_matmul(isa, type, 512);
    }
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures != 0;
}

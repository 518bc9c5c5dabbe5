/* Row dequantization, bit-identical to gguf-py (gguf.quants.dequantize; Q8_1 and Q8_K, which it lacks, as ggml's
 * dequantize_row_q8_K): per element `scale * q`, `scale * q + m` or `(d*sc) * q - (dmin*m)` in float32, in exactly
 * that order.
 *
 * Plain C written so compilers vectorize it; every ISA's translation unit includes this file and so gets its own
 * vectorized build (-ffp-contract=off keeps the multiply and the add separate everywhere).
 */

#ifndef EQ_DEQUANT_H
#define EQ_DEQUANT_H

#include "blocks.h"

static void dequantize_q4_0(const void *vb, float *y, int64_t n) {
    const eq_q4_0 *b = (const eq_q4_0 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * (float)((b[i].qs[j] & 15) - 8);
            y[j + 16] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void dequantize_q4_1(const void *vb, float *y, int64_t n) {
    const eq_q4_1 *b = (const eq_q4_1 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d), m = eq_half_to_float(b[i].m);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * (float)(b[i].qs[j] & 15) + m;
            y[j + 16] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}

/* The 32 fifth bits of a Q5 block as 0/16 per element. */
static inline void q5_high_bits(const uint8_t qh[4], int hi[32]) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    for (int j = 0; j < 32; ++j) hi[j] = (int)((bits >> j) & 1u) << 4;
}

static void dequantize_q5_0(const void *vb, float *y, int64_t n) {
    const eq_q5_0 *b = (const eq_q5_0 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d);
        int hi[32];
        q5_high_bits(b[i].qh, hi);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * (float)(((b[i].qs[j] & 15) | hi[j]) - 16);
            y[j + 16] = d * (float)(((b[i].qs[j] >> 4) | hi[j + 16]) - 16);
        }
    }
}

static void dequantize_q5_1(const void *vb, float *y, int64_t n) {
    const eq_q5_1 *b = (const eq_q5_1 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d), m = eq_half_to_float(b[i].m);
        int hi[32];
        q5_high_bits(b[i].qh, hi);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * (float)((b[i].qs[j] & 15) | hi[j]) + m;
            y[j + 16] = d * (float)((b[i].qs[j] >> 4) | hi[j + 16]) + m;
        }
    }
}

static void dequantize_q8_0(const void *vb, float *y, int64_t n) {
    const eq_q8_0 *b = (const eq_q8_0 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d);
        for (int j = 0; j < 32; ++j) y[j] = (float)b[i].qs[j] * d;
    }
}

/* Activation blocks, for checking kernels against float arithmetic: d * q. */
static void dequantize_q8_1(const void *vb, float *y, int64_t n) {
    const eq_q8_1 *b = (const eq_q8_1 *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d);
        for (int j = 0; j < 32; ++j) y[j] = (float)b[i].qs[j] * d;
    }
}

static void dequantize_q8_K(const void *vb, float *y, int64_t n) {
    const eq_q8_K *b = (const eq_q8_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K)
        for (int j = 0; j < EQ_QK_K; ++j) y[j] = b[i].d * (float)b[i].qs[j];
}

static void dequantize_q2_K(const void *vb, float *y, int64_t n) {
    const eq_q2_K *b = (const eq_q2_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        for (int e = 0; e < EQ_QK_K; ++e) {
            const uint8_t sc = b[i].scales[e / 16];
            const int q = (b[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            y[e] = (d * (float)(sc & 15)) * (float)q - dmin * (float)(sc >> 4);
        }
    }
}

static void dequantize_q3_K(const void *vb, float *y, int64_t n) {
    const eq_q3_K *b = (const eq_q3_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d);
        int8_t sc[16];
        eq_q3k_scales(b[i].scales, sc);
        for (int e = 0; e < EQ_QK_K; ++e) {
            const int lo = (b[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            const int high_clear = !((b[i].hmask[e % 32] >> (e / 32)) & 1);
            y[e] = (d * (float)sc[e / 16]) * (float)(lo - 4 * high_clear);
        }
    }
}

static void dequantize_q4_K(const void *vb, float *y, int64_t n) {
    const eq_q4_K *b = (const eq_q4_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        const eq_words4 words = eq_k4_scales_mins(b[i].scales);
        const uint8_t *sm = (const uint8_t *)words.w;
        for (int e = 0; e < EQ_QK_K; ++e) {
            const uint8_t byte = b[i].qs[32 * (e / 64) + e % 32];
            const int q = (e % 64) < 32 ? byte & 15 : byte >> 4;
            y[e] = (d * (float)sm[e / 32]) * (float)q - dmin * (float)sm[8 + e / 32];
        }
    }
}

static void dequantize_q5_K(const void *vb, float *y, int64_t n) {
    const eq_q5_K *b = (const eq_q5_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        const eq_words4 words = eq_k4_scales_mins(b[i].scales);
        const uint8_t *sm = (const uint8_t *)words.w;
        for (int e = 0; e < EQ_QK_K; ++e) {
            const uint8_t byte = b[i].qs[32 * (e / 64) + e % 32];
            const int q = ((e % 64) < 32 ? byte & 15 : byte >> 4) | (((b[i].qh[e % 32] >> (e / 32)) & 1) << 4);
            y[e] = (d * (float)sm[e / 32]) * (float)q - dmin * (float)sm[8 + e / 32];
        }
    }
}

static void dequantize_q6_K(const void *vb, float *y, int64_t n) {
    const eq_q6_K *b = (const eq_q6_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d);
        for (int e = 0; e < EQ_QK_K; ++e) {
            const uint8_t byte = b[i].ql[64 * (e / 128) + e % 64];
            const int lo = (e % 128) < 64 ? byte & 15 : byte >> 4;
            const int hi = (b[i].qh[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            y[e] = (d * (float)b[i].scales[e / 16]) * (float)((lo | (hi << 4)) - 32);
        }
    }
}

/* Designated initializer for an eq_kernel_table's `dequantize` member. */
#define EQ_DEQUANTIZE_ENTRIES                                                                      \
    [EQ_Q4_0] = dequantize_q4_0, [EQ_Q4_1] = dequantize_q4_1, [EQ_Q5_0] = dequantize_q5_0,       \
    [EQ_Q5_1] = dequantize_q5_1, [EQ_Q8_0] = dequantize_q8_0, [EQ_Q2_K] = dequantize_q2_K,       \
    [EQ_Q3_K] = dequantize_q3_K, [EQ_Q4_K] = dequantize_q4_K, [EQ_Q5_K] = dequantize_q5_K,       \
    [EQ_Q6_K] = dequantize_q6_K, [EQ_Q8_1] = dequantize_q8_1, [EQ_Q8_K] = dequantize_q8_K

#endif

/* Row dequantization, bit-identical to gguf-py (gguf.quants.dequantize; Q8_1 and Q8_K, which it lacks, as ggml's
 * dequantize_row_q8_K): per element `scale * q`, `scale * q + m` or `(d*sc) * q - (dmin*m)` in float32, in exactly
 * that order (IQ4_NL: d * v[i], IQ4_XS: (d*(ls-32)) * v[i]).
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

/* K-quants, one 16- or 32-element sub-block at a time so the per-element work is a multiply and a subtract. */

static void dequantize_q2_K(const void *vb, float *y, int64_t n) {
    const eq_q2_K *b = (const eq_q2_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        for (int s = 0; s < 16; ++s) { /* elements 16s..: plane (s/2)%4 of qs[32(s/8) + 16(s%2) ..] */
            const float dl = d * (float)(b[i].scales[s] & 15), ml = dmin * (float)(b[i].scales[s] >> 4);
            const uint8_t *qs = b[i].qs + 32 * (s / 8) + 16 * (s % 2);
            const int shift = 2 * ((s / 2) % 4);
            for (int l = 0; l < 16; ++l) y[16 * s + l] = dl * (float)((qs[l] >> shift) & 3) - ml;
        }
    }
}

static void dequantize_q3_K(const void *vb, float *y, int64_t n) {
    const eq_q3_K *b = (const eq_q3_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d);
        int8_t sc[16];
        eq_q3k_scales(b[i].scales, sc);
        for (int s = 0; s < 16; ++s) { /* as Q2_K, minus 4 where bit s/2 of hmask[16(s%2) + l] is clear */
            const float dl = d * (float)sc[s];
            const uint8_t *qs = b[i].qs + 32 * (s / 8) + 16 * (s % 2), *hm = b[i].hmask + 16 * (s % 2);
            const int shift = 2 * ((s / 2) % 4), plane = s / 2;
            for (int l = 0; l < 16; ++l) y[16 * s + l] = dl * (float)(((qs[l] >> shift) & 3) - 4 * (~hm[l] >> plane & 1));
        }
    }
}

static void dequantize_q4_K(const void *vb, float *y, int64_t n) {
    const eq_q4_K *b = (const eq_q4_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        const eq_words4 words = eq_k4_scales_mins(b[i].scales);
        const uint8_t *sm = (const uint8_t *)words.w;
        for (int j = 0; j < 4; ++j) { /* elements 64j..: low nibbles of qs[32j..] (sub-block 2j), then high */
            const float d0 = d * (float)sm[2 * j], m0 = dmin * (float)sm[8 + 2 * j];
            const float d1 = d * (float)sm[2 * j + 1], m1 = dmin * (float)sm[8 + 2 * j + 1];
            const uint8_t *qs = b[i].qs + 32 * j;
            for (int l = 0; l < 32; ++l) {
                y[64 * j + l] = d0 * (float)(qs[l] & 15) - m0;
                y[64 * j + 32 + l] = d1 * (float)(qs[l] >> 4) - m1;
            }
        }
    }
}

static void dequantize_q5_K(const void *vb, float *y, int64_t n) {
    const eq_q5_K *b = (const eq_q5_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d), dmin = eq_half_to_float(b[i].dmin);
        const eq_words4 words = eq_k4_scales_mins(b[i].scales);
        const uint8_t *sm = (const uint8_t *)words.w;
        for (int j = 0; j < 4; ++j) { /* as Q4_K, bit 4 from bit 2j (low nibbles) or 2j+1 (high) of qh[l] */
            const float d0 = d * (float)sm[2 * j], m0 = dmin * (float)sm[8 + 2 * j];
            const float d1 = d * (float)sm[2 * j + 1], m1 = dmin * (float)sm[8 + 2 * j + 1];
            const uint8_t *qs = b[i].qs + 32 * j, *qh = b[i].qh;
            for (int l = 0; l < 32; ++l) {
                y[64 * j + l] = d0 * (float)((qs[l] & 15) | (qh[l] >> (2 * j) & 1) << 4) - m0;
                y[64 * j + 32 + l] = d1 * (float)((qs[l] >> 4) | (qh[l] >> (2 * j + 1) & 1) << 4) - m1;
            }
        }
    }
}

static void dequantize_q6_K(const void *vb, float *y, int64_t n) {
    const eq_q6_K *b = (const eq_q6_K *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d);
        for (int s = 0; s < 16; ++s) { /* element 128h + 32k + l, h = s/8, k = (s/2)%4, l = 16(s%2) + j */
            const int h = s / 8, k = (s / 2) % 4;
            const float dl = d * (float)b[i].scales[s];
            const uint8_t *ql = b[i].ql + 64 * h + 32 * (k % 2) + 16 * (s % 2), *qh = b[i].qh + 32 * h + 16 * (s % 2);
            const int nibble_shift = k < 2 ? 0 : 4;
            for (int j = 0; j < 16; ++j)
                y[16 * s + j] = dl * (float)((((ql[j] >> nibble_shift) & 15) | ((qh[j] >> (2 * k)) & 3) << 4) - 32);
        }
    }
}

/* IQ4_NL/IQ4_XS: 32-element (sub-)blocks whose 4-bit indices pick eq_iq4nl_values, laid out as Q4_0's nibbles. */

static void dequantize_iq4_nl(const void *vb, float *y, int64_t n) {
    const eq_iq4_nl *b = (const eq_iq4_nl *)vb;
    for (int64_t i = 0; i < n / EQ_QK; ++i, y += EQ_QK) {
        const float d = eq_half_to_float(b[i].d);
        for (int j = 0; j < 16; ++j) {
            y[j] = d * (float)eq_iq4nl_values[b[i].qs[j] & 15];
            y[j + 16] = d * (float)eq_iq4nl_values[b[i].qs[j] >> 4];
        }
    }
}

static void dequantize_iq4_xs(const void *vb, float *y, int64_t n) {
    const eq_iq4_xs *b = (const eq_iq4_xs *)vb;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, y += EQ_QK_K) {
        const float d = eq_half_to_float(b[i].d);
        int8_t ls[8];
        eq_iq4xs_scales(b[i].scales_h, b[i].scales_l, ls);
        for (int j = 0; j < 8; ++j) { /* sub-block j: elements 32j.., indices in qs[16j..] */
            const float dl = d * (float)ls[j];
            const uint8_t *qs = b[i].qs + 16 * j;
            for (int l = 0; l < 16; ++l) {
                y[32 * j + l] = dl * (float)eq_iq4nl_values[qs[l] & 15];
                y[32 * j + 16 + l] = dl * (float)eq_iq4nl_values[qs[l] >> 4];
            }
        }
    }
}

/* Designated initializer for an eq_kernel_table's `dequantize` member. */
#define EQ_DEQUANTIZE_ENTRIES                                                                      \
    [EQ_Q4_0] = dequantize_q4_0, [EQ_Q4_1] = dequantize_q4_1, [EQ_Q5_0] = dequantize_q5_0,       \
    [EQ_Q5_1] = dequantize_q5_1, [EQ_Q8_0] = dequantize_q8_0, [EQ_Q2_K] = dequantize_q2_K,       \
    [EQ_Q3_K] = dequantize_q3_K, [EQ_Q4_K] = dequantize_q4_K, [EQ_Q5_K] = dequantize_q5_K,       \
    [EQ_Q6_K] = dequantize_q6_K, [EQ_Q8_1] = dequantize_q8_1, [EQ_Q8_K] = dequantize_q8_K,       \
    [EQ_IQ4_NL] = dequantize_iq4_nl, [EQ_IQ4_XS] = dequantize_iq4_xs

#endif

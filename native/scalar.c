/* Scalar reference kernels: the arithmetic of ggml-cpu's *_generic dot products and *_ref quantizers.
 *
 * GCC builds ggml's generic C with -ffp-contract=fast, so on an FMA target every `acc + a*b` whose product has
 * no other use becomes one fused multiply-add.  We spell those fusions out with fmaf() (correctly rounded
 * everywhere, in hardware or in libm), so this file gives the same bits on any CPU.  Integer partial sums are
 * exact, so only their grouping before conversion to float matters: the K-quant kernels keep ggml's eight
 * float lanes, lane l collecting the elements e with e % 8 == l.
 */

#include <math.h>

#include "dequant.h"
#include "kernels.h"
#include "lattice.h"

/* ---- activation quantizers (ggml's quantize_row_q8_{0,1,K}_ref) ---- */

static float block_absmax(const float *x, int n) {
    float amax = 0.0f;
    for (int j = 0; j < n; ++j) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

/* d = amax/127, q = roundf(x / d) (ties away from zero), through the reciprocal 1/d. */
static void quantize_q8_0(const float *x, void *vy, int64_t n) {
    eq_q8_0 *y = (eq_q8_0 *)vy;
    for (int64_t i = 0; i < n / EQ_QK; ++i, x += EQ_QK) {
        const float d = block_absmax(x, EQ_QK) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = eq_float_to_half(d);
        for (int j = 0; j < EQ_QK; ++j) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* Q8_0 plus s = d * sum(q), which Q4_1/Q5_1 dots use for their offsets. */
static void quantize_q8_1(const float *x, void *vy, int64_t n) {
    eq_q8_1 *y = (eq_q8_1 *)vy;
    for (int64_t i = 0; i < n / EQ_QK; ++i, x += EQ_QK) {
        const float d = block_absmax(x, EQ_QK) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < EQ_QK; ++j) {
            y[i].qs[j] = (int8_t)roundf(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = eq_float_to_half(d);
        y[i].s = eq_float_to_half((float)sum * d);
    }
}

/* Round to nearest, ties to even, for |v| < 2^22: add 1.5*2^23 and read the low mantissa bits. */
static inline int round_even(float v) {
    const float shifted = v + 12582912.0f;
    int32_t bits;
    memcpy(&bits, &shifted, 4);
    return (bits & 0x007fffff) - 0x00400000;
}

/* Q8_K: the element of largest magnitude (the first, on ties) maps to -127 exactly; d = 1/iscale in float32. */
static void quantize_q8_K(const float *x, void *vy, int64_t n) {
    eq_q8_K *y = (eq_q8_K *)vy;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, x += EQ_QK_K) {
        const float max = eq_first_absmax(x, EQ_QK_K);
        if (max == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < EQ_QK_K; ++j) {
            const int v = round_even(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < 16; ++g) {
            int sum = 0;
            for (int j = 0; j < 16; ++j) sum += y[i].qs[16 * g + j];
            y[i].bsums[g] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ---- legacy 32-element blocks: one exact integer sum per block ---- */

static float dot_q4_0(int n, const void *vx, const void *vy) {
    const eq_q4_0 *x = (const eq_q4_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        int isum = 0;
        for (int j = 0; j < 16; ++j)
            isum += ((x[i].qs[j] & 15) - 8) * y[i].qs[j] + ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        sum = fmaf((float)isum * eq_half_to_float(x[i].d), eq_half_to_float(y[i].d), sum);
    }
    return sum;
}

static float dot_q4_1(int n, const void *vx, const void *vy) {
    const eq_q4_1 *x = (const eq_q4_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        int isum = 0;
        for (int j = 0; j < 16; ++j) isum += (x[i].qs[j] & 15) * y[i].qs[j] + (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        const float dd = eq_half_to_float(x[i].d) * eq_half_to_float(y[i].d);
        const float ms = eq_half_to_float(x[i].m) * eq_half_to_float(y[i].s);
        sum += fmaf(dd, (float)isum, ms);
    }
    return sum;
}

/* Integer dot of one Q5 block's unsigned 5-bit codes (q) with 32 int8 activations, and of `offset` with them. */
static int q5_block_dot(const uint8_t qs[16], const uint8_t qh[4], const int8_t *a, int offset) {
    int hi[32], isum = 0;
    q5_high_bits(qh, hi);
    for (int j = 0; j < 16; ++j)
        isum += (((qs[j] & 15) | hi[j]) - offset) * a[j] + (((qs[j] >> 4) | hi[j + 16]) - offset) * a[j + 16];
    return isum;
}

static float dot_q5_0(int n, const void *vx, const void *vy) {
    const eq_q5_0 *x = (const eq_q5_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        const int isum = q5_block_dot(x[i].qs, x[i].qh, y[i].qs, 16);
        sum = fmaf(eq_half_to_float(x[i].d) * eq_half_to_float(y[i].d), (float)isum, sum);
    }
    return sum;
}

static float dot_q5_1(int n, const void *vx, const void *vy) {
    const eq_q5_1 *x = (const eq_q5_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        const int isum = q5_block_dot(x[i].qs, x[i].qh, y[i].qs, 0);
        const float dd = eq_half_to_float(x[i].d) * eq_half_to_float(y[i].d);
        const float ms = eq_half_to_float(x[i].m) * eq_half_to_float(y[i].s);
        sum += fmaf(dd, (float)isum, ms);
    }
    return sum;
}

static float dot_q8_0(int n, const void *vx, const void *vy) {
    const eq_q8_0 *x = (const eq_q8_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        int isum = 0;
        for (int j = 0; j < EQ_QK; ++j) isum += x[i].qs[j] * y[i].qs[j];
        sum = fmaf((float)isum, eq_half_to_float(x[i].d) * eq_half_to_float(y[i].d), sum);
    }
    return sum;
}

/* ---- K-quants ----
 *
 * Each super-block is first decoded to 256 signed codes q[e] (element order), then reduced exactly in integers.
 * Where ggml's generic code keeps eight float lanes, lane l collects the elements e with e % 8 == l.
 */

typedef struct { float v[8]; } lanes8;

static inline void lanes_fma(lanes8 *acc, float d, const int32_t isum[8]) {
    for (int l = 0; l < 8; ++l) acc->v[l] = fmaf(d, (float)isum[l], acc->v[l]);
}

static inline float lanes_total(float start, const lanes8 *acc) {
    for (int l = 0; l < 8; ++l) start += acc->v[l];
    return start;
}

/* lanes[e % 8] = sum of scale[e / 16] * q[e] * a[e], one 16-element sub-block at a time. */
static inline void k_lane_sums(const int8_t q[EQ_QK_K], const int8_t *a, const int scale16[16], int32_t lanes[8]) {
    for (int l = 0; l < 8; ++l) lanes[l] = 0;
    for (int g = 0; g < 16; ++g) {
        const int8_t *qg = q + 16 * g, *ag = a + 16 * g;
        for (int l = 0; l < 8; ++l) lanes[l] += scale16[g] * (qg[l] * ag[l] + qg[l + 8] * ag[l + 8]);
    }
}

/* Sum over the 16 sub-blocks of scale16[s] times the dot of q and a over sub-block s. */
static inline int k_sub_sums(const int8_t q[EQ_QK_K], const int8_t *a, const int scale16[16]) {
    int total = 0;
    for (int g = 0; g < 16; ++g) {
        int s = 0;
        for (int j = 0; j < 16; ++j) s += q[16 * g + j] * a[16 * g + j];
        total += scale16[g] * s;
    }
    return total;
}

/* Sum over the 16 sub-blocks of mins[s] * bsums[s]. */
static inline int bsum_dot(const int16_t bsums[16], const int mins16[16]) {
    int s = 0;
    for (int j = 0; j < 16; ++j) s += bsums[j] * mins16[j];
    return s;
}

/* Two-bit planes (Q2_K, Q3_K): element 128h + 32k + l is bits 2k..2k+1 of qs[32h + l]. */
static inline void two_bit_codes(const uint8_t qs[64], int8_t q[EQ_QK_K]) {
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < 32; ++l) q[128 * h + 32 * k + l] = (int8_t)((qs[32 * h + l] >> (2 * k)) & 3);
}

/* Nibbles (Q4_K, Q5_K): element 64j + l is the low nibble of qs[32j + l], element 64j + 32 + l its high nibble. */
static inline void nibble_codes(const uint8_t qs[128], int8_t q[EQ_QK_K]) {
    for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 32; ++l) {
            q[64 * j + l] = (int8_t)(qs[32 * j + l] & 15);
            q[64 * j + 32 + l] = (int8_t)(qs[32 * j + l] >> 4);
        }
}

static float dot_q2_K(int n, const void *vx, const void *vy) {
    const eq_q2_K *x = (const eq_q2_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t q[EQ_QK_K];
        int sc[16], mins[16];
        two_bit_codes(x[i].qs, q);
        for (int s = 0; s < 16; ++s) {
            sc[s] = x[i].scales[s] & 15;
            mins[s] = x[i].scales[s] >> 4;
        }
        const float dall = y[i].d * eq_half_to_float(x[i].d);
        const float dmin = y[i].d * eq_half_to_float(x[i].dmin);
        sum += fmaf(dall, (float)k_sub_sums(q, y[i].qs, sc), -(dmin * (float)bsum_dot(y[i].bsums, mins)));
    }
    return sum;
}

static float dot_q3_K(int n, const void *vx, const void *vy) {
    const eq_q3_K *x = (const eq_q3_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    lanes8 acc = {{0}};
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t q[EQ_QK_K], sc8[16];
        int sc[16];
        int32_t lanes[8];
        two_bit_codes(x[i].qs, q);
        for (int p = 0; p < 8; ++p) /* element 32p + l: high bit p of hmask[l], clear meaning minus 4 */
            for (int l = 0; l < 32; ++l) q[32 * p + l] = (int8_t)(q[32 * p + l] - 4 * (~x[i].hmask[l] >> p & 1));
        eq_q3k_scales(x[i].scales, sc8);
        for (int s = 0; s < 16; ++s) sc[s] = sc8[s];
        k_lane_sums(q, y[i].qs, sc, lanes);
        lanes_fma(&acc, eq_half_to_float(x[i].d) * y[i].d, lanes);
    }
    return lanes_total(0.0f, &acc);
}

/* One Q4_K/Q5_K super-block with codes q (0..31) and 8 sub-blocks of 32, each with a 6-bit scale and min:
 * the lanes take d * (scale-weighted lane sums), `sum` takes -dmin * (min-weighted bsums), both fused. */
static inline void k4_superblock(lanes8 *acc, float *sum, uint16_t d, uint16_t dmin, const uint8_t scales[12],
                                 const int8_t q[EQ_QK_K], const eq_q8_K *y) {
    const eq_words4 words = eq_k4_scales_mins(scales);
    const uint8_t *sm = (const uint8_t *)words.w;
    int sc[16], mins[16];
    int32_t lanes[8];
    for (int s = 0; s < 16; ++s) {
        sc[s] = sm[s / 2];
        mins[s] = sm[8 + s / 2];
    }
    k_lane_sums(q, y->qs, sc, lanes);
    lanes_fma(acc, eq_half_to_float(d) * y->d, lanes);
    *sum = fmaf(-(eq_half_to_float(dmin) * y->d), (float)bsum_dot(y->bsums, mins), *sum);
}

static float dot_q4_K(int n, const void *vx, const void *vy) {
    const eq_q4_K *x = (const eq_q4_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    lanes8 acc = {{0}};
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t q[EQ_QK_K];
        nibble_codes(x[i].qs, q);
        k4_superblock(&acc, &sum, x[i].d, x[i].dmin, x[i].scales, q, &y[i]);
    }
    return lanes_total(sum, &acc);
}

static float dot_q5_K(int n, const void *vx, const void *vy) {
    const eq_q5_K *x = (const eq_q5_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    lanes8 acc = {{0}};
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t q[EQ_QK_K];
        nibble_codes(x[i].qs, q);
        for (int p = 0; p < 8; ++p) /* element 32p + l: bit 4 is bit p of qh[l] */
            for (int l = 0; l < 32; ++l) q[32 * p + l] = (int8_t)(q[32 * p + l] | (x[i].qh[l] >> p & 1) << 4);
        k4_superblock(&acc, &sum, x[i].d, x[i].dmin, x[i].scales, q, &y[i]);
    }
    return lanes_total(sum, &acc);
}

static float dot_q6_K(int n, const void *vx, const void *vy) {
    const eq_q6_K *x = (const eq_q6_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    lanes8 acc = {{0}};
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t q[EQ_QK_K];
        int sc[16];
        int32_t lanes[8];
        for (int h = 0; h < 2; ++h) /* element 128h + 32k + l: nibble of ql[64h + 32(k%2) + l], bits 2k.. of qh[32h + l] */
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < 32; ++l) {
                    const uint8_t byte = x[i].ql[64 * h + 32 * (k % 2) + l];
                    const int lo = k < 2 ? byte & 15 : byte >> 4;
                    const int hi = (x[i].qh[32 * h + l] >> (2 * k)) & 3;
                    q[128 * h + 32 * k + l] = (int8_t)((lo | (hi << 4)) - 32);
                }
        for (int s = 0; s < 16; ++s) sc[s] = x[i].scales[s];
        k_lane_sums(q, y[i].qs, sc, lanes);
        lanes_fma(&acc, eq_half_to_float(x[i].d) * y[i].d, lanes);
    }
    return lanes_total(0.0f, &acc);
}

/* ---- IQ4_NL / IQ4_XS: 4-bit indices into eq_iq4nl_values, one exact integer sum per 32 elements ---- */

/* Integer dot of 32 IQ4 elements (16 index bytes, Q4_0's nibble order) with 32 int8 activations. */
static inline int iq4_block_dot(const uint8_t qs[16], const int8_t *a) {
    int isum = 0;
    for (int j = 0; j < 16; ++j) isum += eq_iq4nl_values[qs[j] & 15] * a[j] + eq_iq4nl_values[qs[j] >> 4] * a[j + 16];
    return isum;
}

static float dot_iq4_nl(int n, const void *vx, const void *vy) {
    const eq_iq4_nl *x = (const eq_iq4_nl *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i)
        sum = fmaf(eq_half_to_float(y[i].d) * eq_half_to_float(x[i].d), (float)iq4_block_dot(x[i].qs, y[i].qs), sum);
    return sum;
}

/* One fma per 32-element sub-block, its scale d*y.d*(ls-32) rounded in that order. */
static float dot_iq4_xs(int n, const void *vx, const void *vy) {
    const eq_iq4_xs *x = (const eq_iq4_xs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = eq_half_to_float(x[i].d) * y[i].d;
        int8_t ls[8];
        eq_iq4xs_scales(x[i].scales_h, x[i].scales_l, ls);
        for (int j = 0; j < 8; ++j)
            sum = fmaf(d * (float)ls[j], (float)iq4_block_dot(x[i].qs + 16 * j, y[i].qs + 32 * j), sum);
    }
    return sum;
}

const eq_kernel_table eq_scalar_kernels = {
    .dequantize = {EQ_DEQUANTIZE_ENTRIES},
    .quantize = {[EQ_Q8_0] = quantize_q8_0, [EQ_Q8_1] = quantize_q8_1, [EQ_Q8_K] = quantize_q8_K},
    .dot = {[EQ_Q4_0] = dot_q4_0, [EQ_Q4_1] = dot_q4_1, [EQ_Q5_0] = dot_q5_0, [EQ_Q5_1] = dot_q5_1,
            [EQ_Q8_0] = dot_q8_0, [EQ_Q2_K] = dot_q2_K, [EQ_Q3_K] = dot_q3_K, [EQ_Q4_K] = dot_q4_K,
            [EQ_Q5_K] = dot_q5_K, [EQ_Q6_K] = dot_q6_K, [EQ_IQ4_NL] = dot_iq4_nl, [EQ_IQ4_XS] = dot_iq4_xs,
            EQ_LATTICE_GENERIC_DOTS},
};

/* NEON kernels (AArch64), following the float arithmetic of ggml-cpu's arch/arm code path.
 *
 *   legacy (32-element blocks)  blocks in pairs: even blocks into acc0[4], odd into acc1[4], each
 *                               acc[l] = fma(lane sum l, dx*dy, acc[l]) with SDOT's lane layout (lane l holds
 *                               elements 4l..4l+3 and 16+4l..16+4l+3); result vaddv(acc0) + vaddv(acc1)
 *                               (+ the m*s terms); an odd last block is added as the generic code does
 *   K-quants                    exact integer sums per super-block, then one or two scalar fmas per block
 *   IQ4_NL                      blocks in pairs, exact integer sums, sum += fma(d0, sum0, d1 * sum1) (GCC fuses
 *                               the first product of ggml's `sum += d0*sum0 + d1*sum1`); an odd last block as generic
 *   IQ4_XS                      exact integer sum per super-block (sub-block sums times ls-32), one scalar fma
 *   lattice i-quants            scalar.c's (ggml's generic arithmetic, lattice.h), not ggml's arch/arm code: untested
 *                               against an Arm ggml
 *   Q8_0/Q8_1 activations       d = amax/127, q = round-half-even(x * (1/d))
 *   Q8_K activations            ggml's reference quantizer, as in scalar.c
 *
 * ggml itself writes these fmas as `acc + a*b` and relies on GCC's default contraction; we write them out.
 * Without the dot-product extension, SDOT is emulated with widening multiplies in the same lane layout (ggml's own
 * fallback pairs lanes differently, so a ggml built without +dotprod rounds legacy-type sums differently).
 * Q8_K keeps the reference's two roundings of x*iscale + 1.5*2^23; a GCC build of ggml-base for AArch64 may fuse
 * them.  Neither can be checked against ggml here (no Arm build of it): tests compare NEON with scalar.c.
 * The K-quant and IQ4 dots are checked against ggml's own arch/arm code, cross-compiled by GCC and run under qemu
 * (tests/test_native.py, native/tests/ggml_arm.c).  The legacy dots are not: ggml accumulates them with
 * vmlaq_n_f32, which GCC 12's arm_neon.h keeps unfused (a multiply, then an add), where acc above is fused.
 */

#if defined(__aarch64__)

#include <arm_neon.h>
#include <math.h>

#include "dequant.h"
#include "kernels.h"
#include "lattice.h"

/* ---- helpers ---- */

static inline float half_to_float(uint16_t h) {
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

static inline uint16_t float_to_half(float x) {
    const __fp16 f = (__fp16)x; /* round to nearest even */
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
}

/* acc[l] += sum of a[4l+k] * b[4l+k], k < 4 (SDOT, or the same sums from widening multiplies). */
static inline int32x4_t dot_quads(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t hi = vmull_high_s8(a, b);
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}

/* Integer dot of 32 codes (two registers) with 32 activations, in 4 lanes. */
static inline int32x4_t dot32(int8x16_t q0, int8x16_t q1, const int8_t *a) {
    return dot_quads(dot_quads(vdupq_n_s32(0), q0, vld1q_s8(a)), q1, vld1q_s8(a + 16));
}

/* Full integer dot of 16 codes with 16 activations. */
static inline int32_t dot16(int8x16_t q, const int8_t *a) { return vaddvq_s32(dot_quads(vdupq_n_s32(0), q, vld1q_s8(a))); }

/* The 32 fifth bits of a Q5 block as 0x10 bytes: elements 0..15 in lo, 16..31 in hi. */
static inline void q5_high(const uint8_t qh[4], uint8x16_t *lo, uint8x16_t *hi) {
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t mask = vld1q_u8(bit), fifth = vdupq_n_u8(0x10);
    *lo = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1])), mask), fifth);
    *hi = vandq_u8(vtstq_u8(vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3])), mask), fifth);
}

/* ---- activation quantizers ---- */

static inline float absmax32(const float *x) {
    float32x4_t m = vabsq_f32(vld1q_f32(x));
    for (int j = 4; j < 32; j += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + j)));
    return vmaxvq_f32(m);
}

/* Returns sum(q) for Q8_1. */
static inline int quantize_block32(const float *x, int8_t *qs, float *d_out) {
    const float d = absmax32(x) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32x4_t sum = vdupq_n_s32(0);
    for (int j = 0; j < 32; j += 8) {
        const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j), id));
        const int32x4_t b = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j + 4), id));
        sum = vaddq_s32(sum, vaddq_s32(a, b));
        vst1_s8(qs + j, vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(b))));
    }
    *d_out = d;
    return vaddvq_s32(sum);
}

static void quantize_q8_0(const float *x, void *vy, int64_t n) {
    eq_q8_0 *y = (eq_q8_0 *)vy;
    for (int64_t i = 0; i < n / EQ_QK; ++i, x += EQ_QK) {
        float d;
        quantize_block32(x, y[i].qs, &d);
        y[i].d = float_to_half(d);
    }
}

static void quantize_q8_1(const float *x, void *vy, int64_t n) {
    eq_q8_1 *y = (eq_q8_1 *)vy;
    for (int64_t i = 0; i < n / EQ_QK; ++i, x += EQ_QK) {
        float d;
        const int sum = quantize_block32(x, y[i].qs, &d);
        y[i].d = float_to_half(d);
        y[i].s = float_to_half(d * (float)sum);
    }
}

static void quantize_q8_K(const float *x, void *vy, int64_t n) {
    eq_q8_K *y = (eq_q8_K *)vy;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, x += EQ_QK_K) {
        const float max = eq_first_absmax(x, EQ_QK_K);
        if (max == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.0f / max;
        const int32x4_t top = vdupq_n_s32(127);
        for (int j = 0; j < EQ_QK_K; j += 16) {
            int32x4_t q[4];
            for (int k = 0; k < 4; ++k) q[k] = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j + 4 * k), iscale)), top);
            const int16x8_t lo = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
            const int16x8_t hi = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
            vst1q_s8(y[i].qs + j, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
            y[i].bsums[j / 16] = (int16_t)vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ---- legacy blocks ---- */

/* Signed 4-bit codes - 8, elements 0..15 and 16..31. */
static inline void q4_0_codes(const uint8_t qs[16], int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t v = vld1q_u8(qs);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), vdupq_n_s8(8));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
}

static float dot_q4_0(int n, const void *vx, const void *vy) {
    const eq_q4_0 *x = (const eq_q4_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    const int nb = n / EQ_QK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        int8x16_t l0, h0, l1, h1;
        q4_0_codes(x[i].qs, &l0, &h0);
        q4_0_codes(x[i + 1].qs, &l1, &h1);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(dot32(l0, h0, y[i].qs)), half_to_float(x[i].d) * half_to_float(y[i].d));
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(dot32(l1, h1, y[i + 1].qs)), half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d));
    }
    float sum = vaddvq_f32(acc0) + vaddvq_f32(acc1);
    if (i < nb) {
        int8x16_t l, h;
        q4_0_codes(x[i].qs, &l, &h);
        sum = fmaf((float)vaddvq_s32(dot32(l, h, y[i].qs)) * half_to_float(x[i].d), half_to_float(y[i].d), sum);
    }
    return sum;
}

static inline void q4_1_codes(const uint8_t qs[16], int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t v = vld1q_u8(qs);
    *lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
    *hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
}

static float dot_q4_1(int n, const void *vx, const void *vy) {
    const eq_q4_1 *x = (const eq_q4_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    const int nb = n / EQ_QK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float summs = 0.0f;
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        summs += fmaf(half_to_float(x[i].m), half_to_float(y[i].s), half_to_float(x[i + 1].m) * half_to_float(y[i + 1].s));
        int8x16_t l0, h0, l1, h1;
        q4_1_codes(x[i].qs, &l0, &h0);
        q4_1_codes(x[i + 1].qs, &l1, &h1);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(dot32(l0, h0, y[i].qs)), half_to_float(x[i].d) * half_to_float(y[i].d));
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(dot32(l1, h1, y[i + 1].qs)), half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d));
    }
    float sum = vaddvq_f32(acc0) + vaddvq_f32(acc1) + summs;
    if (i < nb) {
        int8x16_t l, h;
        q4_1_codes(x[i].qs, &l, &h);
        const float dd = half_to_float(x[i].d) * half_to_float(y[i].d);
        sum += fmaf(dd, (float)vaddvq_s32(dot32(l, h, y[i].qs)), half_to_float(x[i].m) * half_to_float(y[i].s));
    }
    return sum;
}

/* 5-bit codes, minus `offset` (16 for Q5_0, 0 for Q5_1). */
static inline void q5_codes(const uint8_t qs[16], const uint8_t qh[4], int8_t offset, int8x16_t *lo, int8x16_t *hi) {
    uint8x16_t hbit_lo, hbit_hi;
    q5_high(qh, &hbit_lo, &hbit_hi);
    const uint8x16_t v = vld1q_u8(qs);
    *lo = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(v, vdupq_n_u8(15)), hbit_lo)), vdupq_n_s8(offset));
    *hi = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(v, 4), hbit_hi)), vdupq_n_s8(offset));
}

static float dot_q5_0(int n, const void *vx, const void *vy) {
    const eq_q5_0 *x = (const eq_q5_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    const int nb = n / EQ_QK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        int8x16_t l0, h0, l1, h1;
        q5_codes(x[i].qs, x[i].qh, 16, &l0, &h0);
        q5_codes(x[i + 1].qs, x[i + 1].qh, 16, &l1, &h1);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(dot32(l0, h0, y[i].qs)), half_to_float(x[i].d) * half_to_float(y[i].d));
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(dot32(l1, h1, y[i + 1].qs)), half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d));
    }
    float sum = vaddvq_f32(acc0) + vaddvq_f32(acc1);
    if (i < nb) {
        int8x16_t l, h;
        q5_codes(x[i].qs, x[i].qh, 16, &l, &h);
        sum = fmaf(half_to_float(x[i].d) * half_to_float(y[i].d), (float)vaddvq_s32(dot32(l, h, y[i].qs)), sum);
    }
    return sum;
}

static float dot_q5_1(int n, const void *vx, const void *vy) {
    const eq_q5_1 *x = (const eq_q5_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    const int nb = n / EQ_QK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    float summs0 = 0.0f, summs1 = 0.0f;
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        summs0 = fmaf(half_to_float(x[i].m), half_to_float(y[i].s), summs0);
        summs1 = fmaf(half_to_float(x[i + 1].m), half_to_float(y[i + 1].s), summs1);
        int8x16_t l0, h0, l1, h1;
        q5_codes(x[i].qs, x[i].qh, 0, &l0, &h0);
        q5_codes(x[i + 1].qs, x[i + 1].qh, 0, &l1, &h1);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(dot32(l0, h0, y[i].qs)), half_to_float(x[i].d) * half_to_float(y[i].d));
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(dot32(l1, h1, y[i + 1].qs)), half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d));
    }
    float sum = vaddvq_f32(acc0) + vaddvq_f32(acc1) + summs0 + summs1;
    if (i < nb) {
        int8x16_t l, h;
        q5_codes(x[i].qs, x[i].qh, 0, &l, &h);
        const float dd = half_to_float(x[i].d) * half_to_float(y[i].d);
        sum += fmaf(dd, (float)vaddvq_s32(dot32(l, h, y[i].qs)), half_to_float(x[i].m) * half_to_float(y[i].s));
    }
    return sum;
}

static float dot_q8_0(int n, const void *vx, const void *vy) {
    const eq_q8_0 *x = (const eq_q8_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    const int nb = n / EQ_QK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        const int32x4_t p0 = dot32(vld1q_s8(x[i].qs), vld1q_s8(x[i].qs + 16), y[i].qs);
        const int32x4_t p1 = dot32(vld1q_s8(x[i + 1].qs), vld1q_s8(x[i + 1].qs + 16), y[i + 1].qs);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p0), half_to_float(x[i].d) * half_to_float(y[i].d));
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(p1), half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d));
    }
    float sum = vaddvq_f32(acc0) + vaddvq_f32(acc1);
    if (i < nb) {
        const int32x4_t p = dot32(vld1q_s8(x[i].qs), vld1q_s8(x[i].qs + 16), y[i].qs);
        sum = fmaf((float)vaddvq_s32(p), half_to_float(x[i].d) * half_to_float(y[i].d), sum);
    }
    return sum;
}

/* ---- K-quants: exact integer sums per super-block ---- */

/* sum over the 16 sub-blocks of scale16[s] * bsums[s] (scales given as 16 int8). */
static inline int32_t bsums_dot(const int16_t bsums[16], int8x16_t scales) {
    const int16x8_t s0 = vmovl_s8(vget_low_s8(scales)), s1 = vmovl_s8(vget_high_s8(scales));
    const int16x8_t b0 = vld1q_s16(bsums), b1 = vld1q_s16(bsums + 8);
    int32x4_t p = vmull_s16(vget_low_s16(s0), vget_low_s16(b0));
    p = vmlal_s16(p, vget_high_s16(s0), vget_high_s16(b0));
    p = vmlal_s16(p, vget_low_s16(s1), vget_low_s16(b1));
    p = vmlal_s16(p, vget_high_s16(s1), vget_high_s16(b1));
    return vaddvq_s32(p);
}

static float dot_q2_K(int n, const void *vx, const void *vy) {
    const eq_q2_K *x = (const eq_q2_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const uint8x16_t m3 = vdupq_n_u8(3);
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = -y[i].d * half_to_float(x[i].dmin);
        const uint8x16_t packed = vld1q_u8(x[i].scales);
        sum = fmaf(dmin, (float)bsums_dot(y[i].bsums, vreinterpretq_s8_u8(vshrq_n_u8(packed, 4))), sum);
        uint8_t sc[16];
        vst1q_u8(sc, vandq_u8(packed, vdupq_n_u8(15)));
        int32_t isum = 0;
        for (int h = 0; h < 2; ++h) {
            const uint8x16_t b0 = vld1q_u8(x[i].qs + 32 * h), b1 = vld1q_u8(x[i].qs + 32 * h + 16);
            const int8_t *a = y[i].qs + 128 * h;
            for (int k = 0; k < 4; ++k) { /* plane k: elements 32k.. of this half, sub-blocks 8h+2k, 8h+2k+1 */
                const int8x16_t q0 = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(b0, vdupq_n_s8((int8_t)(-2 * k))), m3));
                const int8x16_t q1 = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(b1, vdupq_n_s8((int8_t)(-2 * k))), m3));
                isum += dot16(q0, a + 32 * k) * sc[8 * h + 2 * k] + dot16(q1, a + 32 * k + 16) * sc[8 * h + 2 * k + 1];
            }
        }
        sum = fmaf(d, (float)isum, sum);
    }
    return sum;
}

static float dot_q3_K(int n, const void *vx, const void *vy) {
    const eq_q3_K *x = (const eq_q3_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const uint8x16_t m3 = vdupq_n_u8(3), one = vdupq_n_u8(1);
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        int8_t sc[16];
        eq_q3k_scales(x[i].scales, sc);
        const uint8x16_t hm0 = vld1q_u8(x[i].hmask), hm1 = vld1q_u8(x[i].hmask + 16);
        int32_t isum = 0;
        for (int h = 0; h < 2; ++h) {
            const uint8x16_t b0 = vld1q_u8(x[i].qs + 32 * h), b1 = vld1q_u8(x[i].qs + 32 * h + 16);
            const int8_t *a = y[i].qs + 128 * h;
            for (int k = 0; k < 4; ++k) {
                const int8x16_t shift = vdupq_n_s8((int8_t)(-2 * k)), plane = vdupq_n_s8((int8_t)-(4 * h + k));
                /* code = low two bits - 4 where the high bit is clear */
                const uint8x16_t four0 = vshlq_n_u8(vbicq_u8(one, vshlq_u8(hm0, plane)), 2);
                const uint8x16_t four1 = vshlq_n_u8(vbicq_u8(one, vshlq_u8(hm1, plane)), 2);
                const int8x16_t q0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshlq_u8(b0, shift), m3)), vreinterpretq_s8_u8(four0));
                const int8x16_t q1 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(vshlq_u8(b1, shift), m3)), vreinterpretq_s8_u8(four1));
                isum += dot16(q0, a + 32 * k) * sc[8 * h + 2 * k] + dot16(q1, a + 32 * k + 16) * sc[8 * h + 2 * k + 1];
            }
        }
        sum = fmaf(d, (float)isum, sum);
    }
    return sum;
}

/* Q4_K/Q5_K: sum over the 8 sub-blocks of min * (bsums of its two 16-element halves). */
static inline int32_t k4_min_dot(eq_words4 scales_mins, const int16_t bsums[16]) {
    uint8_t sm[16];
    memcpy(sm, scales_mins.w, 16);
    const int16x8_t mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(sm + 8)));
    const int16x8_t pair_sums = vpaddq_s16(vld1q_s16(bsums), vld1q_s16(bsums + 8));
    const int32x4_t p = vmlal_s16(vmull_s16(vget_low_s16(mins), vget_low_s16(pair_sums)), vget_high_s16(mins), vget_high_s16(pair_sums));
    return vaddvq_s32(p);
}

static float dot_q4_K(int n, const void *vx, const void *vy) {
    const eq_q4_K *x = (const eq_q4_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = y[i].d * half_to_float(x[i].dmin);
        const eq_words4 sm = eq_k4_scales_mins(x[i].scales);
        const uint8_t *scale = (const uint8_t *)sm.w;
        sum = fmaf(-dmin, (float)k4_min_dot(sm, y[i].bsums), sum);
        int32_t isum = 0;
        for (int j = 0; j < 4; ++j) {
            const uint8x16_t b0 = vld1q_u8(x[i].qs + 32 * j), b1 = vld1q_u8(x[i].qs + 32 * j + 16);
            const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(b0, vdupq_n_u8(15))), lo1 = vreinterpretq_s8_u8(vandq_u8(b1, vdupq_n_u8(15)));
            const int8x16_t hi0 = vreinterpretq_s8_u8(vshrq_n_u8(b0, 4)), hi1 = vreinterpretq_s8_u8(vshrq_n_u8(b1, 4));
            isum += vaddvq_s32(dot32(lo0, lo1, y[i].qs + 64 * j)) * scale[2 * j]
                  + vaddvq_s32(dot32(hi0, hi1, y[i].qs + 64 * j + 32)) * scale[2 * j + 1];
        }
        sum = fmaf(d, (float)isum, sum);
    }
    return sum;
}

static float dot_q5_K(int n, const void *vx, const void *vy) {
    const eq_q5_K *x = (const eq_q5_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const uint8x16_t one = vdupq_n_u8(1);
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = y[i].d * half_to_float(x[i].dmin);
        const eq_words4 sm = eq_k4_scales_mins(x[i].scales);
        const uint8_t *scale = (const uint8_t *)sm.w;
        const int32_t mins = k4_min_dot(sm, y[i].bsums);
        const uint8x16_t hb0 = vld1q_u8(x[i].qh), hb1 = vld1q_u8(x[i].qh + 16);
        int32_t isum = 0;
        for (int j = 0; j < 4; ++j) {
            const uint8x16_t b0 = vld1q_u8(x[i].qs + 32 * j), b1 = vld1q_u8(x[i].qs + 32 * j + 16);
            const int8x16_t s_lo = vdupq_n_s8((int8_t)(-2 * j)), s_hi = vdupq_n_s8((int8_t)(-2 * j - 1));
            const uint8x16_t h00 = vshlq_n_u8(vandq_u8(vshlq_u8(hb0, s_lo), one), 4), h01 = vshlq_n_u8(vandq_u8(vshlq_u8(hb1, s_lo), one), 4);
            const uint8x16_t h10 = vshlq_n_u8(vandq_u8(vshlq_u8(hb0, s_hi), one), 4), h11 = vshlq_n_u8(vandq_u8(vshlq_u8(hb1, s_hi), one), 4);
            const int8x16_t lo0 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(b0, vdupq_n_u8(15)), h00));
            const int8x16_t lo1 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(b1, vdupq_n_u8(15)), h01));
            const int8x16_t hi0 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(b0, 4), h10));
            const int8x16_t hi1 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(b1, 4), h11));
            isum += vaddvq_s32(dot32(lo0, lo1, y[i].qs + 64 * j)) * scale[2 * j]
                  + vaddvq_s32(dot32(hi0, hi1, y[i].qs + 64 * j + 32)) * scale[2 * j + 1];
        }
        sum += fmaf(d, (float)isum, -(dmin * (float)mins));
    }
    return sum;
}

static float dot_q6_K(int n, const void *vx, const void *vy) {
    const eq_q6_K *x = (const eq_q6_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const uint8x16_t m15 = vdupq_n_u8(15), m3 = vdupq_n_u8(3);
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const int8_t *sc = x[i].scales;
        /* codes are stored +32: subtract 32 * sum(scale * bsum) once */
        const int32_t offset = 32 * bsums_dot(y[i].bsums, vld1q_s8(sc));
        int32_t isum = 0;
        for (int h = 0; h < 2; ++h) {
            const uint8_t *ql = x[i].ql + 64 * h, *qh = x[i].qh + 32 * h;
            const int8_t *a = y[i].qs + 128 * h;
            for (int half = 0; half < 2; ++half) { /* element columns 0..15, then 16..31 */
                const uint8x16_t l0 = vld1q_u8(ql + 16 * half), l1 = vld1q_u8(ql + 32 + 16 * half);
                const uint8x16_t hb = vld1q_u8(qh + 16 * half);
                const uint8x16_t q[4] = {
                    vorrq_u8(vandq_u8(l0, m15), vshlq_n_u8(vandq_u8(hb, m3), 4)),
                    vorrq_u8(vandq_u8(l1, m15), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 2), m3), 4)),
                    vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 4), m3), 4)),
                    vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(hb, 6), 4)),
                };
                for (int k = 0; k < 4; ++k) /* plane k: elements 32k + 16*half .., sub-block 8h + 2k + half */
                    isum += dot16(vreinterpretq_s8_u8(q[k]), a + 32 * k + 16 * half) * sc[8 * h + 2 * k + half];
            }
        }
        sum = fmaf(half_to_float(x[i].d) * y[i].d, (float)(isum - offset), sum);
    }
    return sum;
}

/* ---- IQ4_NL / IQ4_XS ---- */

/* 16 index bytes -> the values they select: elements 0..15 (low nibbles) and 16..31 (high nibbles). */
static inline void iq4_codes(int8x16_t table, const uint8_t qs[16], int8x16_t *lo, int8x16_t *hi) {
    const uint8x16_t v = vld1q_u8(qs);
    *lo = vqtbl1q_s8(table, vandq_u8(v, vdupq_n_u8(15)));
    *hi = vqtbl1q_s8(table, vshrq_n_u8(v, 4));
}

static float dot_iq4_nl(int n, const void *vx, const void *vy) {
    const eq_iq4_nl *x = (const eq_iq4_nl *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    const int nb = n / EQ_QK;
    const int8x16_t table = vld1q_s8(eq_iq4nl_values);
    float sum = 0.0f;
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        int8x16_t l0, h0, l1, h1;
        iq4_codes(table, x[i].qs, &l0, &h0);
        iq4_codes(table, x[i + 1].qs, &l1, &h1);
        const float s0 = (float)vaddvq_s32(dot32(l0, h0, y[i].qs)), s1 = (float)vaddvq_s32(dot32(l1, h1, y[i + 1].qs));
        const float d0 = half_to_float(x[i].d) * half_to_float(y[i].d), d1 = half_to_float(x[i + 1].d) * half_to_float(y[i + 1].d);
        sum += fmaf(d0, s0, d1 * s1);
    }
    if (i < nb) {
        int8x16_t l, h;
        iq4_codes(table, x[i].qs, &l, &h);
        sum = fmaf(half_to_float(y[i].d) * half_to_float(x[i].d), (float)vaddvq_s32(dot32(l, h, y[i].qs)), sum);
    }
    return sum;
}

static float dot_iq4_xs(int n, const void *vx, const void *vy) {
    const eq_iq4_xs *x = (const eq_iq4_xs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int8x16_t table = vld1q_s8(eq_iq4nl_values);
    float sum = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t ls[8];
        eq_iq4xs_scales(x[i].scales_h, x[i].scales_l, ls);
        int32_t isum = 0;
        for (int j = 0; j < 8; ++j) { /* sub-block j: elements 32j.., indices in qs[16j..] */
            int8x16_t lo, hi;
            iq4_codes(table, x[i].qs + 16 * j, &lo, &hi);
            isum += vaddvq_s32(dot32(lo, hi, y[i].qs + 32 * j)) * ls[j];
        }
        sum = fmaf(half_to_float(x[i].d) * y[i].d, (float)isum, sum);
    }
    return sum;
}

const eq_kernel_table eq_neon_kernels = {
    .dequantize = {EQ_DEQUANTIZE_ENTRIES},
    .quantize = {[EQ_Q8_0] = quantize_q8_0, [EQ_Q8_1] = quantize_q8_1, [EQ_Q8_K] = quantize_q8_K},
    .dot = {[EQ_Q4_0] = dot_q4_0, [EQ_Q4_1] = dot_q4_1, [EQ_Q5_0] = dot_q5_0, [EQ_Q5_1] = dot_q5_1,
            [EQ_Q8_0] = dot_q8_0, [EQ_Q2_K] = dot_q2_K, [EQ_Q3_K] = dot_q3_K, [EQ_Q4_K] = dot_q4_K,
            [EQ_Q5_K] = dot_q5_K, [EQ_Q6_K] = dot_q6_K, [EQ_IQ4_NL] = dot_iq4_nl, [EQ_IQ4_XS] = dot_iq4_xs,
            EQ_LATTICE_GENERIC_DOTS},
};

#endif

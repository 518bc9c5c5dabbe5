/* AVX2 + FMA + F16C kernels, bit-identical to ggml-cpu's x86 AVX2 code path.
 *
 * The build compiles only this file with -mavx2 -mfma -mf16c; dispatch.c calls into it only after cpuid says
 * the CPU and OS support those.  The float arithmetic mirrors ggml's x86 kernels exactly:
 *
 *   legacy (32-element blocks)  acc[8] += (dx*dy) * lane sums of 4 consecutive products   (vfmadd)
 *   Q2_K                        acc[8] += -dmin*y.d * (min*bsum pairs); acc[8] += d*y.d * lane sums
 *   Q3_K, Q6_K                  acc[8] += d*y.d * lane sums        (Q6_K lanes carry their own -32 correction)
 *   Q4_K                        acc[8] += d*y.d * lane sums;  acc_m[4] += -dmin*y.d * (min*bsum pairs)
 *   Q5_K                        acc[8] += d*y.d * lane sums;  summs = fma(-dmin*y.d, sum(min*bsum), summs)
 *   IQ4_NL                      as legacy, but block pairs: even blocks into acc0[8], odd into acc1[8], then
 *                               hsum8(acc0 + acc1); an odd last block is fma'd onto that as the generic code does
 *   IQ4_XS                      acc[8] += d*y.d * lane sums, each lane summed over the 8 sub-blocks times ls-32
 *
 * where lane l of a 32-element chunk holds its elements 4l..4l+3, and the result is hsum8(acc) (+ the rest),
 * hsum8 adding the upper four lanes onto the lower four, then lanes 2,3 onto 0,1, then lane 1 onto 0.
 */

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <math.h>

#include "dequant.h"
#include "kernels.h"
#include "lattice.h"

/* ---- helpers ---- */

/* A table load beats vcvtph2ps on a scalar here (the kernels convert one or two scales per block). */
static inline float half_to_float(uint16_t h) { return eq_half_table[h]; }
static inline uint16_t float_to_half(float f) { return (uint16_t)_cvtss_sh(f, 0); }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum4_i32(__m128i s) {
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

static inline int hsum8_i32(__m256i v) {
    return hsum4_i32(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

static inline __m128i words128(eq_words4 v) { return _mm_set_epi32((int)v.w[3], (int)v.w[2], (int)v.w[1], (int)v.w[0]); }

/* 16 bytes of packed nibbles -> 32 bytes: low nibbles (elements 0..15), then high nibbles (16..31). */
static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (byte j <- bit j). */
static inline __m256i bits_to_bytes(const uint8_t p[4]) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)eq_load_u32(p)),
                                               _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

/* unsigned u8 x signed i8 -> 8 int32 lanes, lane l = sum of products 4l..4l+3. */
static inline __m256i dot_u8i8_quads(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* signed x signed -> 16 int16 lanes, lane k = a[2k]*b[2k] + a[2k+1]*b[2k+1], through |a| and sign(a)*b so maddubs
 * applies (|a| <= 128 as unsigned, so a pair never saturates). */
static inline __m256i dot_i8_pairs(__m256i a, __m256i b) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

/* signed x signed -> 8 int32 lanes, lane l = sum of products 4l..4l+3. */
static inline __m256i dot_i8_quads(__m256i a, __m256i b) { return _mm256_madd_epi16(dot_i8_pairs(a, b), _mm256_set1_epi16(1)); }

/* int16 element k of each 128-bit half of v (which holds 8 int16), broadcast across its half. */
static inline __m256i broadcast16(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)((2 * k) | (2 * k + 1) << 8)));
}

/* From 8 int16 scales duplicated in both halves: scale k across the low half, scale k+1 across the high one
 * (the two 16-element sub-blocks of a 32-element chunk). */
static inline __m256i scale_pair(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, _mm256_set_m128i(_mm_set1_epi16((short)((2 * k + 2) | (2 * k + 3) << 8)),
                                                   _mm_set1_epi16((short)((2 * k) | (2 * k + 1) << 8))));
}

/* 16 int8 scales -> two vectors of int16, the first 8 (resp. last 8) duplicated in both halves. */
static inline void scales16_halves(__m128i scales8, __m256i out[2]) {
    const __m256i all = _mm256_cvtepi8_epi16(scales8);
    out[0] = _mm256_permute2x128_si256(all, all, 0x00);
    out[1] = _mm256_permute2x128_si256(all, all, 0x11);
}

/* ---- activation quantizers ---- */

static inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* 32 int32 in four vectors -> 32 int8 in element order (values fit, so saturation never triggers). */
static inline void store_i8x32(int8_t *dst, __m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* ggml x86 Q8_0/Q8_1: d = amax/127, q = round-half-even(x * (127/amax)); returns sum(q) for Q8_1. */
static inline int quantize_block32(const float *x, int8_t *qs, float *d_out) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(amax, abs_ps(v[k]));
    }
    const float max = max8(amax);
    const __m256 id = _mm256_set1_ps(max != 0.0f ? 127.0f / max : 0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    store_i8x32(qs, q[0], q[1], q[2], q[3]);
    *d_out = max / 127.0f;
    return hsum8_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
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

/* Q8_K as ggml's reference (x86 uses it too): iscale = -127/x[first index of max |x|], q = min(127, rne(x*iscale)). */
static void quantize_q8_K(const float *x, void *vy, int64_t n) {
    eq_q8_K *y = (eq_q8_K *)vy;
    for (int64_t i = 0; i < n / EQ_QK_K; ++i, x += EQ_QK_K) {
        const float max = eq_first_absmax(x, EQ_QK_K);
        if (max == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.0f / max;
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127);
        for (int j = 0; j < EQ_QK_K; j += 32) {
            __m256i q[4];
            for (int k = 0; k < 4; ++k)
                q[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), vs)), top);
            store_i8x32(y[i].qs + j, q[0], q[1], q[2], q[3]);
            y[i].bsums[j / 16] = (int16_t)hsum8_i32(_mm256_add_epi32(q[0], q[1]));
            y[i].bsums[j / 16 + 1] = (int16_t)hsum8_i32(_mm256_add_epi32(q[2], q[3]));
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ---- legacy blocks ---- */

static float dot_q4_0(int n, const void *vx, const void *vy) {
    const eq_q4_0 *x = (const eq_q4_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK; ++i) {
        const __m256 d = _mm256_set1_ps(half_to_float(x[i].d) * half_to_float(y[i].d));
        const __m256i q = _mm256_sub_epi8(unpack_nibbles(x[i].qs), _mm256_set1_epi8(8));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_quads(q, load256(y[i].qs))), acc);
    }
    return hsum8(acc);
}

static float dot_q4_1(int n, const void *vx, const void *vy) {
    const eq_q4_1 *x = (const eq_q4_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        summs = fmaf(half_to_float(x[i].m), half_to_float(y[i].s), summs);
        const __m256 d = _mm256_set1_ps(half_to_float(x[i].d) * half_to_float(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8i8_quads(unpack_nibbles(x[i].qs), load256(y[i].qs))), acc);
    }
    return hsum8(acc) + summs;
}

static float dot_q5_0(int n, const void *vx, const void *vy) {
    const eq_q5_0 *x = (const eq_q5_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK; ++i) {
        const __m256 d = _mm256_set1_ps(half_to_float(x[i].d) * half_to_float(y[i].d));
        /* q - 16 as int8: OR-ing 0xF0 into a nibble subtracts 16, so set it where the fifth bit is clear */
        const __m256i minus16 = _mm256_andnot_si256(bits_to_bytes(x[i].qh), _mm256_set1_epi8((char)0xF0));
        const __m256i q = _mm256_or_si256(unpack_nibbles(x[i].qs), minus16);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_quads(q, load256(y[i].qs))), acc);
    }
    return hsum8(acc);
}

static float dot_q5_1(int n, const void *vx, const void *vy) {
    const eq_q5_1 *x = (const eq_q5_1 *)vx;
    const eq_q8_1 *y = (const eq_q8_1 *)vy;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int i = 0; i < n / EQ_QK; ++i) {
        summs = fmaf(half_to_float(x[i].m), half_to_float(y[i].s), summs);
        const __m256 d = _mm256_set1_ps(half_to_float(x[i].d) * half_to_float(y[i].d));
        const __m256i q = _mm256_or_si256(unpack_nibbles(x[i].qs), _mm256_and_si256(bits_to_bytes(x[i].qh), _mm256_set1_epi8(16)));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8i8_quads(q, load256(y[i].qs))), acc);
    }
    return hsum8(acc) + summs;
}

static float dot_q8_0(int n, const void *vx, const void *vy) {
    const eq_q8_0 *x = (const eq_q8_0 *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK; ++i) {
        const __m256 d = _mm256_set1_ps(half_to_float(x[i].d) * half_to_float(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_quads(load256(x[i].qs), load256(y[i].qs))), acc);
    }
    return hsum8(acc);
}

/* ---- K-quants ---- */

static float dot_q2_K(int n, const void *vx, const void *vy) {
    const eq_q2_K *x = (const eq_q2_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = -y[i].d * half_to_float(x[i].dmin);
        const __m128i packed = _mm_loadu_si128((const __m128i *)x[i].scales);
        const __m128i mins8 = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
        const __m256i min_bsums = _mm256_madd_epi16(_mm256_cvtepi8_epi16(mins8), load256(y[i].bsums));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(min_bsums), acc);

        __m256i scales[2];
        scales16_halves(_mm_and_si128(packed, _mm_set1_epi8(15)), scales);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) { /* 128-element halves: one byte of codes per element column, 4 planes */
            const __m256i bits = load256(x[i].qs + 32 * h);
            const int8_t *a = y[i].qs + 128 * h;
            for (int k = 0; k < 4; ++k) {
                const __m256i q = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * k), m3);
                const __m256i p = _mm256_maddubs_epi16(q, load256(a + 32 * k));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(scales[h], 2 * k), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

static float dot_q3_K(int n, const void *vx, const void *vy) {
    const eq_q3_K *x = (const eq_q3_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const eq_words4 biased = eq_q3k_biased_scales(x[i].scales);
        __m256i scales[2];
        scales16_halves(_mm_sub_epi8(words128(biased), _mm_set1_epi8(32)), scales);
        const __m256i hmask = load256(x[i].hmask);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            const __m256i bits = load256(x[i].qs + 32 * h);
            const int8_t *a = y[i].qs + 128 * h;
            for (int k = 0; k < 4; ++k) {
                const int plane = 4 * h + k;
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * k), m3);
                /* 4 where the high bit is clear (the code is lo - 4), else 0 */
                const __m256i four = _mm256_slli_epi16(_mm256_andnot_si256(_mm256_srli_epi16(hmask, plane), one), 2);
                const __m256i av = load256(a + 32 * k);
                const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(lo, av), _mm256_maddubs_epi16(four, av));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(scales[h], 2 * k), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

/* Q4_K/Q5_K: from the 8 scales and 8 mins, the scales as int16 in both halves, and 4 int32 lanes of
 * min . (bsums summed per 32-element sub-block). */
static inline __m128i k4_min_bsums(eq_words4 scales_mins, const int16_t bsums[16], __m256i *scales_dup) {
    const __m256i sm16 = _mm256_cvtepu8_epi16(words128(scales_mins));
    const __m128i pair_sums = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums), _mm_loadu_si128((const __m128i *)(bsums + 8)));
    *scales_dup = _mm256_permute2x128_si256(sm16, sm16, 0x00);
    return _mm_madd_epi16(_mm256_extracti128_si256(sm16, 1), pair_sums);
}

static float dot_q4_K(int n, const void *vx, const void *vy) {
    const eq_q4_K *x = (const eq_q4_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = -y[i].d * half_to_float(x[i].dmin);
        __m256i scales;
        const __m128i mins = k4_min_bsums(eq_k4_scales_mins(x[i].scales), y[i].bsums, &scales);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(mins), acc_m);

        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) { /* 64 elements: low nibbles = sub-block 2j, high nibbles = 2j+1 */
            const __m256i bits = load256(x[i].qs + 32 * j);
            const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(bits, m4), load256(y[i].qs + 64 * j));
            const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), load256(y[i].qs + 64 * j + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(broadcast16(scales, 2 * j), lo),
                                                           _mm256_madd_epi16(broadcast16(scales, 2 * j + 1), hi)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    return hsum8(acc) + _mm_cvtss_f32(acc_m);
}

static float dot_q5_K(int n, const void *vx, const void *vy) {
    const eq_q5_K *x = (const eq_q5_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.0f;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const float dmin = -y[i].d * half_to_float(x[i].dmin);
        __m256i scales;
        const __m128i mins = k4_min_bsums(eq_k4_scales_mins(x[i].scales), y[i].bsums, &scales);
        summs = fmaf(dmin, (float)hsum4_i32(mins), summs);

        const __m256i hbits = load256(x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            const __m256i bits = load256(x[i].qs + 32 * j);
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(bits, m4), h0);
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h1);
            const __m256i p0 = _mm256_maddubs_epi16(q0, load256(y[i].qs + 64 * j));
            const __m256i p1 = _mm256_maddubs_epi16(q1, load256(y[i].qs + 64 * j + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(broadcast16(scales, 2 * j), p0),
                                                           _mm256_madd_epi16(broadcast16(scales, 2 * j + 1), p1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc) + summs;
}

static float dot_q6_K(int n, const void *vx, const void *vy) {
    const eq_q6_K *x = (const eq_q6_K *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const float d = y[i].d * half_to_float(x[i].d);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        /* codes are stored +32: subtract 32 * scale * bsum, paired per lane as the lanes below are */
        const __m256i offset = _mm256_slli_epi32(_mm256_madd_epi16(load256(y[i].bsums), _mm256_cvtepi8_epi16(sc8)), 5);
        __m256i scales[2];
        scales16_halves(sc8, scales);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            const __m256i l0 = load256(x[i].ql + 64 * h), l1 = load256(x[i].ql + 64 * h + 32);
            const __m256i hb = load256(x[i].qh + 32 * h);
            const int8_t *a = y[i].qs + 128 * h;
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4)),
            };
            for (int k = 0; k < 4; ++k) {
                const __m256i p = _mm256_maddubs_epi16(q[k], load256(a + 32 * k));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale_pair(scales[h], 2 * k), p));
            }
        }
        sumi = _mm256_sub_epi32(sumi, offset);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

/* ---- IQ4_NL / IQ4_XS ---- */

/* eq_iq4nl_values in both 128-bit halves, for a per-half byte shuffle. */
static inline __m256i iq4_table(void) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)eq_iq4nl_values)); }

/* 16 index bytes -> the 32 values they select, in element order (low nibbles, then high ones). */
static inline __m256i iq4_values(__m256i table, const uint8_t *qs) { return _mm256_shuffle_epi8(table, unpack_nibbles(qs)); }

static float dot_iq4_nl(int n, const void *vx, const void *vy) {
    const eq_iq4_nl *x = (const eq_iq4_nl *)vx;
    const eq_q8_0 *y = (const eq_q8_0 *)vy;
    const int nb = n / EQ_QK;
    const __m256i table = iq4_table();
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        const __m256 d0 = _mm256_set1_ps(half_to_float(y[i].d) * half_to_float(x[i].d));
        const __m256 d1 = _mm256_set1_ps(half_to_float(y[i + 1].d) * half_to_float(x[i + 1].d));
        const __m256i p0 = dot_i8_quads(iq4_values(table, x[i].qs), load256(y[i].qs));
        const __m256i p1 = dot_i8_quads(iq4_values(table, x[i + 1].qs), load256(y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    if (i < nb) {
        const int isum = hsum8_i32(dot_i8_quads(iq4_values(table, x[i].qs), load256(y[i].qs)));
        sum = fmaf(half_to_float(y[i].d) * half_to_float(x[i].d), (float)isum, sum);
    }
    return sum;
}

static float dot_iq4_xs(int n, const void *vx, const void *vy) {
    const eq_iq4_xs *x = (const eq_iq4_xs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m256i table = iq4_table();
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        int8_t ls[8];
        eq_iq4xs_scales(x[i].scales_h, x[i].scales_l, ls);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) { /* sub-block j: pairs of products, then pairs of pairs times ls_j - 32 */
            const __m256i p = dot_i8_pairs(iq4_values(table, x[i].qs + 16 * j), load256(y[i].qs + 32 * j));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set1_epi16(ls[j])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum8(acc);
}

/* ---- lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M; layouts in lattice.h) ----
 *
 * Per 32 elements: the points' magnitudes as unsigned bytes (IQ1: the signed -1/0/1 values), the signs applied to
 * the activations, maddubs into pairs, madd with the scale of each 16, so lane l of the super-block's int32 vector
 * collects ls * products over elements 4l..4l+3 of every 32 (exact); then, as ggml's x86 code:
 *   IQ2_*, IQ3_*  acc[8] = fma(d*y.d, lanes, acc);  result 0.125 (IQ2), 0.25 (IQ3_XXS) or 1 (IQ3_S) * hsum8(acc)
 *   IQ1_S         acc[8] = fma(d*y.d, lanes, acc);  acc1 = fma(d*y.d, sum(ls * delta * bsums), acc1);
 *                 result fma(0.125, acc1, hsum8(acc))
 *   IQ1_M         acc1[8] = fma(d*y.d, lanes, acc1);  acc2[8] = fma(d*y.d, delta lanes, acc2);
 *                 result fma(0.125, hsum8(acc2), hsum8(acc1))
 * Only the lane contents and these float steps must match ggml; how the integers get there is ours.  Indices, sign
 * bytes and scales are decoded a super-block at a time with vector ops (per-lookup scalar decoding made IQ1_M half as
 * fast as ggml), and for the next super-block (IQ2_S, IQ1_S, IQ1_M indices: the one after) while the current one's
 * dots run: decoded just before its dots, that chain stands in front of all of them and the core cannot overlap
 * enough of it (IQ2_XXS: 0.98x ggml's so, 1.14x with the same instructions a block ahead).  The 7-bit sign indices
 * are completed with their parity (ksigns' rule, tested bit-exact against ggml) instead of a lookup.
 */

/* Loops over the 32-element chunks of a super-block are unrolled, so that each chunk's shuffle controls and lane
 * picks are constants (GCC's own heuristics stop unrolling some of them). */
#define EQ_UNROLL8 _Pragma("GCC unroll 8")

static inline __m256i lattice_lanes(__m256i sum, __m256i magnitude, __m256i signed_y, __m256i scale16) {
    return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_y), scale16));
}

/* (x ^ m) - m: x negated where m is 0xFF */
static inline __m256i negate_where(__m256i x, __m256i m) { return _mm256_sub_epi8(_mm256_xor_si256(x, m), m); }

/* The 16 scales 2*l+1 of 4-bit nibbles (IQ2_XS, IQ2_S: byte c holds the scales of elements 32c..32c+15 and
 * 32c+16..32c+31) as int16: the low nibbles in the low 128 bits, the high ones in the high 128, so that
 * broadcast16(v, c) is chunk c's pair. */
static inline __m256i nibble_scales16(const uint8_t sc[8]) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)sc), m4 = _mm_set1_epi8(15);
    const __m256i wide = _mm256_set_m128i(_mm_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4)), _mm_cvtepu8_epi16(_mm_and_si128(v, m4)));
    return _mm256_add_epi16(_mm256_slli_epi16(wide, 1), _mm256_set1_epi16(1));
}

/* The odd 32-bit words of a super-block's 64 bytes (IQ2_XXS; IQ3_XXS's last 32 bytes are those words alone): its 8
 * metadata words, (m0 m1 m4 m5 | m2 m3 m6 m7) from the shuffle, then 64-bit quarters reordered. */
static inline __m256i xxs_meta(const uint8_t q[64]) {
    const __m256 words0 = _mm256_castsi256_ps(load256(q)), words1 = _mm256_castsi256_ps(load256(q + 32));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(words0, words1, 0xdd)), 0xd8);
}

/* From the 8 metadata words of a super-block (IQ2_XXS, IQ3_XXS; lane c: four 7-bit sign indices and ls << 28): lane c
 * of `signs` the 32 sign bits of chunk c (each 7-bit index moved to its own byte and completed with its parity in bit
 * 7, ksigns' rule, from a 16-entry table of the parity of b ^ (b >> 4)), and lane c of `scales` its scale 2*ls + 1 in
 * both 16-bit halves. */
static inline void xxs_signs_scales(__m256i meta, __m256i *signs, __m256i *scales) {
    const __m256i parity = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                            0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    const __m256i m7 = _mm256_set1_epi32(0x7f);
    __m256i b = _mm256_or_si256(_mm256_and_si256(meta, m7), _mm256_and_si256(_mm256_slli_epi32(meta, 1), _mm256_slli_epi32(m7, 8)));
    b = _mm256_or_si256(b, _mm256_and_si256(_mm256_slli_epi32(meta, 2), _mm256_slli_epi32(m7, 16)));
    b = _mm256_or_si256(b, _mm256_and_si256(_mm256_slli_epi32(meta, 3), _mm256_slli_epi32(m7, 24)));
    const __m256i folded = _mm256_and_si256(_mm256_xor_si256(b, _mm256_srli_epi16(b, 4)), _mm256_set1_epi8(15));
    *signs = _mm256_or_si256(b, _mm256_shuffle_epi8(parity, folded));
    const __m256i ls = _mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(meta, 28), 1), _mm256_set1_epi32(1));
    *scales = _mm256_or_si256(ls, _mm256_slli_epi32(ls, 16));
}

/* Byte j of the result: byte 4k + j/8 of each 128-bit half of v (both halves holding the same 16 bytes), i.e. bytes
 * 4k..4k+3 each spread over 8 bytes: one in-lane shuffle per 32 elements, where a broadcast first would be two. */
static inline __m256i spread8(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, _mm256_add_epi8(_mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303),
                                                  _mm256_set1_epi8((char)(4 * k))));
}

/* 0xFF in byte j where bit j of 32-bit word k of each 128-bit half of `words` (both halves alike) is set. */
static inline __m256i word_bits_to_bytes(__m256i words, int k) {
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread8(words, k), bit), bit);
}

/* 32-bit lane c of v in all eight lanes (chunk c's scale pair from xxs_signs_scales). */
static inline __m256i lane32(__m256i v, int c) { return _mm256_permutevar8x32_epi32(v, _mm256_set1_epi32(c)); }

/* The signs and scales of the next super-block are decoded (xxs_signs_scales) while this one's dots run; two chunks a
 * step, into two sums. */
static float dot_iq2_xxs(int n, const void *vx, const void *vy) {
    const eq_iq2_xxs *x = (const eq_iq2_xxs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int nb = n / EQ_QK_K;
    __m256 acc = _mm256_setzero_ps();
    __m256i next_signs, next_scales;
    xxs_signs_scales(xxs_meta(x[0].qs), &next_signs, &next_scales);
    for (int i = 0; i < nb; ++i) {
        const uint8_t *q = x[i].qs;
        const __m256i signs = next_signs, scales = next_scales;
        if (i + 1 < nb) xxs_signs_scales(xxs_meta(x[i + 1].qs), &next_signs, &next_scales);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        EQ_UNROLL8
        for (int h = 0; h < 2; ++h) {
            const __m256i half = _mm256_permute2x128_si256(signs, signs, h ? 0x11 : 0x00); /* chunks 4h..4h+3 */
            EQ_UNROLL8
            for (int k = 0; k < 4; k += 2) {
                const int c = 4 * h + k;
                const uint8_t *q0 = q + 8 * c, *q1 = q0 + 8;
                const __m256i g0 = _mm256_set_epi64x((long long)eq_iq2xxs_grid[q0[3]], (long long)eq_iq2xxs_grid[q0[2]],
                                                     (long long)eq_iq2xxs_grid[q0[1]], (long long)eq_iq2xxs_grid[q0[0]]);
                const __m256i g1 = _mm256_set_epi64x((long long)eq_iq2xxs_grid[q1[3]], (long long)eq_iq2xxs_grid[q1[2]],
                                                     (long long)eq_iq2xxs_grid[q1[1]], (long long)eq_iq2xxs_grid[q1[0]]);
                sum0 = lattice_lanes(sum0, g0, negate_where(load256(y[i].qs + 32 * c), word_bits_to_bytes(half, k)), lane32(scales, c));
                sum1 = lattice_lanes(sum1, g1, negate_where(load256(y[i].qs + 32 * c + 32), word_bits_to_bytes(half, k + 1)),
                                     lane32(scales, c + 1));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return 0.125f * hsum8(acc);
}

/* IQ2_XS's 32 9-bit indices (q & 511) to idx, and the 8 sign bits of each 8 weights as byte k of the result: the 7
 * stored ones plus their parity (ksigns' rule), from a 16-entry parity table of s ^ (s >> 4). */
static inline __m256i iq2xs_decode(const uint16_t qs[32], uint16_t idx[32]) {
    const __m256i parity = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                            0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    __m256i sb[2];
    for (int half = 0; half < 2; ++half) {
        const __m256i v = load256(qs + 16 * half);
        _mm256_storeu_si256((__m256i *)(idx + 16 * half), _mm256_and_si256(v, _mm256_set1_epi16(511)));
        const __m256i s7 = _mm256_srli_epi16(v, 9);
        const __m256i odd = _mm256_shuffle_epi8(parity, _mm256_and_si256(_mm256_xor_si256(s7, _mm256_srli_epi16(s7, 4)), _mm256_set1_epi16(15)));
        sb[half] = _mm256_or_si256(s7, _mm256_and_si256(odd, _mm256_set1_epi16(0xff)));
    }
    return _mm256_permute4x64_epi64(_mm256_packus_epi16(sb[0], sb[1]), 0xd8);
}

static float dot_iq2_xs(int n, const void *vx, const void *vy) {
    const eq_iq2_xs *x = (const eq_iq2_xs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int nb = n / EQ_QK_K;
    __m256 acc = _mm256_setzero_ps();
    uint16_t idx[2][32];
    __m256i next_signs = iq2xs_decode(x[0].qs, idx[0]);
    for (int i = 0; i < nb; ++i) {
        const uint16_t *q = idx[i & 1];
        const __m256i signs = next_signs;
        if (i + 1 < nb) next_signs = iq2xs_decode(x[i + 1].qs, idx[(i + 1) & 1]);
        const __m256i ls = nibble_scales16(x[i].scales);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        EQ_UNROLL8
        for (int h = 0; h < 2; ++h) {
            const __m256i half = _mm256_permute2x128_si256(signs, signs, h ? 0x11 : 0x00); /* chunks 4h..4h+3 */
            EQ_UNROLL8
            for (int k = 0; k < 4; k += 2, q += 8) {
                const int c = 4 * h + k;
                const __m256i g0 = _mm256_set_epi64x((long long)eq_iq2xs_grid[q[3]], (long long)eq_iq2xs_grid[q[2]],
                                                     (long long)eq_iq2xs_grid[q[1]], (long long)eq_iq2xs_grid[q[0]]);
                const __m256i g1 = _mm256_set_epi64x((long long)eq_iq2xs_grid[q[7]], (long long)eq_iq2xs_grid[q[6]],
                                                     (long long)eq_iq2xs_grid[q[5]], (long long)eq_iq2xs_grid[q[4]]);
                sum0 = lattice_lanes(sum0, g0, negate_where(load256(y[i].qs + 32 * c), word_bits_to_bytes(half, k)), broadcast16(ls, c));
                sum1 = lattice_lanes(sum1, g1, negate_where(load256(y[i].qs + 32 * c + 32), word_bits_to_bytes(half, k + 1)),
                                     broadcast16(ls, c + 1));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return 0.125f * hsum8(acc);
}

/* IQ2_S's 32 10-bit indices: qs[k] | bits 2(k%4).. of qh[k/4] << 8.  Each qh byte is spread to 4 bytes, masked to
 * its pair of bits, widened and multiplied into place (AVX2 has no per-element 16-bit shift). */
static inline void iq2s_indices(const uint8_t qs[32], const uint8_t qh[8], uint16_t idx[32]) {
    uint64_t h;
    memcpy(&h, qh, 8);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)h),
                                               _mm256_set_epi64x(0x0707070706060606LL, 0x0505050504040404LL, 0x0303030302020202LL, 0x0101010100000000LL));
    const __m256i bits = _mm256_and_si256(spread, _mm256_set1_epi32((int)0xc0300c03u));
    const __m256i into_place = _mm256_set1_epi64x(0x0004001000400100LL); /* 256, 64, 16, 4 */
    for (int half = 0; half < 2; ++half) {
        const __m128i b = half ? _mm256_extracti128_si256(bits, 1) : _mm256_castsi256_si128(bits);
        const __m256i high = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(b), into_place);
        const __m256i low = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * half)));
        _mm256_storeu_si256((__m256i *)(idx + 16 * half), _mm256_or_si256(high, low));
    }
}

/* IQ3_S's 64 9-bit indices: qs[k] | bit k%8 of qh[k/8] << 8, as iq2s_indices does it. */
static inline void iq3s_indices(const uint8_t qs[64], const uint8_t qh[8], uint16_t idx[64]) {
    uint64_t h;
    memcpy(&h, qh, 8);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i into_place = _mm256_set_epi64x(0x0002000400080010LL, 0x0020004000800100LL, 0x0002000400080010LL, 0x0020004000800100LL);
    for (int quarter = 0; quarter < 4; ++quarter) { /* bytes 2q, 2q+1 of qh: indices 16q..16q+15 */
        const __m128i spread = _mm_shuffle_epi8(_mm_cvtsi64_si128((long long)h),
                                                _mm_set_epi64x(0x0101010101010101LL * (2 * quarter + 1), 0x0101010101010101LL * (2 * quarter)));
        const __m128i bits = _mm_and_si128(spread, _mm256_castsi256_si128(bit));
        const __m256i high = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(bits), into_place);
        const __m256i low = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16 * quarter)));
        _mm256_storeu_si256((__m256i *)(idx + 16 * quarter), _mm256_or_si256(high, low));
    }
}

static float dot_iq2_s(int n, const void *vx, const void *vy) {
    const eq_iq2_s *x = (const eq_iq2_s *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int nb = n / EQ_QK_K;
    __m256 acc = _mm256_setzero_ps();
    uint16_t idx[4][32];
    for (int i = 0; i < 2 && i < nb; ++i) iq2s_indices(x[i].qs, x[i].qh, idx[i]);
    for (int i = 0; i < nb; ++i) {
        const uint16_t *k = idx[i & 3];
        if (i + 2 < nb) iq2s_indices(x[i + 2].qs, x[i + 2].qh, idx[(i + 2) & 3]);
        const __m256i ls = nibble_scales16(x[i].scales);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        EQ_UNROLL8
        for (int c = 0; c < 8; c += 2, k += 8) {
            const __m256i g0 = _mm256_set_epi64x((long long)eq_iq2s_grid[k[3]], (long long)eq_iq2s_grid[k[2]],
                                                 (long long)eq_iq2s_grid[k[1]], (long long)eq_iq2s_grid[k[0]]);
            const __m256i g1 = _mm256_set_epi64x((long long)eq_iq2s_grid[k[7]], (long long)eq_iq2s_grid[k[6]],
                                                 (long long)eq_iq2s_grid[k[5]], (long long)eq_iq2s_grid[k[4]]);
            sum0 = lattice_lanes(sum0, g0, negate_where(load256(y[i].qs + 32 * c), bits_to_bytes(x[i].signs + 4 * c)),
                                 broadcast16(ls, c));
            sum1 = lattice_lanes(sum1, g1, negate_where(load256(y[i].qs + 32 * c + 32), bits_to_bytes(x[i].signs + 4 * c + 4)),
                                 broadcast16(ls, c + 1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return 0.125f * hsum8(acc);
}

static float dot_iq3_xxs(int n, const void *vx, const void *vy) {
    const eq_iq3_xxs *x = (const eq_iq3_xxs *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int nb = n / EQ_QK_K;
    __m256 acc = _mm256_setzero_ps();
    __m256i next_signs, next_scales;
    xxs_signs_scales(load256(x[0].qs + 64), &next_signs, &next_scales);
    for (int i = 0; i < nb; ++i) {
        const uint8_t *q = x[i].qs;
        const __m256i signs = next_signs, scales = next_scales;
        if (i + 1 < nb) xxs_signs_scales(load256(x[i + 1].qs + 64), &next_signs, &next_scales);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        EQ_UNROLL8
        for (int h = 0; h < 2; ++h) {
            const __m256i half = _mm256_permute2x128_si256(signs, signs, h ? 0x11 : 0x00); /* chunks 4h..4h+3 */
            EQ_UNROLL8
            for (int k = 0; k < 4; k += 2) {
                const int c = 4 * h + k;
                const uint8_t *q0 = q + 8 * c, *q1 = q0 + 8;
                const __m256i g0 = _mm256_set_epi32((int)eq_iq3xxs_grid[q0[7]], (int)eq_iq3xxs_grid[q0[6]], (int)eq_iq3xxs_grid[q0[5]],
                                                    (int)eq_iq3xxs_grid[q0[4]], (int)eq_iq3xxs_grid[q0[3]], (int)eq_iq3xxs_grid[q0[2]],
                                                    (int)eq_iq3xxs_grid[q0[1]], (int)eq_iq3xxs_grid[q0[0]]);
                const __m256i g1 = _mm256_set_epi32((int)eq_iq3xxs_grid[q1[7]], (int)eq_iq3xxs_grid[q1[6]], (int)eq_iq3xxs_grid[q1[5]],
                                                    (int)eq_iq3xxs_grid[q1[4]], (int)eq_iq3xxs_grid[q1[3]], (int)eq_iq3xxs_grid[q1[2]],
                                                    (int)eq_iq3xxs_grid[q1[1]], (int)eq_iq3xxs_grid[q1[0]]);
                sum0 = lattice_lanes(sum0, g0, negate_where(load256(y[i].qs + 32 * c), word_bits_to_bytes(half, k)), lane32(scales, c));
                sum1 = lattice_lanes(sum1, g1, negate_where(load256(y[i].qs + 32 * c + 32), word_bits_to_bytes(half, k + 1)),
                                     lane32(scales, c + 1));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return 0.25f * hsum8(acc);
}

static float dot_iq3_s(int n, const void *vx, const void *vy) {
    const eq_iq3_s *x = (const eq_iq3_s *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        const uint8_t *q = x[i].qs;
        __m256i sum = _mm256_setzero_si256();
        uint16_t idx[64];
        iq3s_indices(q, x[i].qh, idx);
        for (int c = 0; c < 8; ++c) {
            const uint16_t *k = idx + 8 * c; /* scalar loads beat a gather here */
            const __m256i g = _mm256_set_epi32((int)eq_iq3s_grid[k[7]], (int)eq_iq3s_grid[k[6]], (int)eq_iq3s_grid[k[5]],
                                               (int)eq_iq3s_grid[k[4]], (int)eq_iq3s_grid[k[3]], (int)eq_iq3s_grid[k[2]],
                                               (int)eq_iq3s_grid[k[1]], (int)eq_iq3s_grid[k[0]]);
            const int ls = 2 * ((x[i].scales[c / 2] >> (4 * (c % 2))) & 15) + 1;
            sum = lattice_lanes(sum, g, negate_where(load256(y[i].qs + 32 * c), bits_to_bytes(x[i].signs + 4 * c)),
                                _mm256_set1_epi16((short)ls));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum8(acc);
}

/* IQ1 values g in {-1, 0, 1}: the int16 pairs ls*g*y of 32 elements, ls the unsigned byte scale of each element (at most
 * 15).  sign(y, g) is g*y (0 where g is), so the scale rides in maddubs' unsigned operand, and with |y| <= 128 a pair is
 * at most 3840 in magnitude: eight chunks add up in int16 (<= 30720) before one madd widens them to ggml's int32 lanes
 * (sum over chunks of ls * 4 consecutive products), the same integers as a madd with the scale per chunk. */
static inline __m256i iq1_pairs(__m256i g, __m256i yv, __m256i ls8) { return _mm256_maddubs_epi16(ls8, _mm256_sign_epi8(yv, g)); }

/* The 32 11-bit indices of an IQ1_S super-block: index 4c + l = qs[4c + l] | bits 3l..3l+2 of qh[c] << 8, eight
 * at a time in 32-bit lanes, packed to uint16. */
static inline void iq1s_indices(const uint8_t qs[32], const uint16_t qh[8], uint16_t idx[32]) {
    const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)qh));
    /* bits 3l..3l+2 to 8..10: left by 8 - 3l for l < 3, right by 1 for l = 3 (a shift by 32 gives 0) */
    const __m256i left = _mm256_setr_epi32(8, 5, 2, 32, 8, 5, 2, 32), right = _mm256_setr_epi32(32, 32, 32, 1, 32, 32, 32, 1);
    const __m256i m = _mm256_set1_epi32(0x700);
    __m256i part[4];
    for (int t = 0; t < 4; ++t) {
        const __m256i w = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(2 * t, 2 * t, 2 * t, 2 * t, 2 * t + 1, 2 * t + 1,
                                                                                2 * t + 1, 2 * t + 1));
        const __m256i high = _mm256_or_si256(_mm256_sllv_epi32(w, left), _mm256_srlv_epi32(w, right));
        part[t] = _mm256_or_si256(_mm256_and_si256(high, m), _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * t))));
    }
    /* packus works within 128-bit halves: (0 lo, 1 lo, 0 hi, 1 hi) -> reorder the 64-bit quarters */
    const __m256i p01 = _mm256_permute4x64_epi64(_mm256_packus_epi32(part[0], part[1]), 0xd8);
    const __m256i p23 = _mm256_permute4x64_epi64(_mm256_packus_epi32(part[2], part[3]), 0xd8);
    /* 128-bit stores: the 16-bit loads that follow forward from them more reliably than from 256-bit ones */
    _mm_storeu_si128((__m128i *)idx, _mm256_castsi256_si128(p01));
    _mm_storeu_si128((__m128i *)(idx + 8), _mm256_extracti128_si256(p01, 1));
    _mm_storeu_si128((__m128i *)(idx + 16), _mm256_castsi256_si128(p23));
    _mm_storeu_si128((__m128i *)(idx + 24), _mm256_extracti128_si256(p23, 1));
}

static float dot_iq1_s(int n, const void *vx, const void *vy) {
    const eq_iq1_s *x = (const eq_iq1_s *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const int nb = n / EQ_QK_K;
    __m256 acc = _mm256_setzero_ps();
    float acc1 = 0.0f;
    uint16_t idx[4][32];
    for (int i = 0; i < 2 && i < nb; ++i) iq1s_indices(x[i].qs, x[i].qh, idx[i]);
    for (int i = 0; i < nb; ++i) {
        const uint16_t *k = idx[i & 3];
        if (i + 2 < nb) iq1s_indices(x[i + 2].qs, x[i + 2].qh, idx[(i + 2) & 3]);
        /* per 32 elements c (a 32-bit lane each): ls = 2*((qh >> 12) & 7) + 1, negated where the shift is; the shift
         * part is then sum(+-ls * (bsums[2c] + bsums[2c+1])) in one vector pass */
        const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x[i].qh));
        const __m256i ls = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(words, 12), _mm256_set1_epi32(7)), 1),
                                            _mm256_set1_epi32(1));
        const __m256i neg = _mm256_srai_epi32(_mm256_slli_epi32(words, 16), 31);
        const __m256i pairs = _mm256_madd_epi16(load256(y[i].bsums), _mm256_set1_epi16(1));
        const int delta_sum = hsum8_i32(_mm256_mullo_epi32(pairs, _mm256_sub_epi32(_mm256_xor_si256(ls, neg), neg)));
        const __m256i ls8 = _mm256_mullo_epi32(ls, _mm256_set1_epi32(0x01010101)); /* lane c: chunk c's scale in each byte */
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        EQ_UNROLL8
        for (int c = 0; c < 8; c += 2, k += 8) {
            const __m256i g0 = _mm256_set_epi64x((long long)eq_iq1s_grid[k[3]], (long long)eq_iq1s_grid[k[2]],
                                                 (long long)eq_iq1s_grid[k[1]], (long long)eq_iq1s_grid[k[0]]);
            const __m256i g1 = _mm256_set_epi64x((long long)eq_iq1s_grid[k[7]], (long long)eq_iq1s_grid[k[6]],
                                                 (long long)eq_iq1s_grid[k[5]], (long long)eq_iq1s_grid[k[4]]);
            sum0 = _mm256_add_epi16(sum0, iq1_pairs(g0, load256(y[i].qs + 32 * c), lane32(ls8, c)));
            sum1 = _mm256_add_epi16(sum1, iq1_pairs(g1, load256(y[i].qs + 32 * c + 32), lane32(ls8, c + 1)));
        }
        const __m256i sum = _mm256_madd_epi16(_mm256_add_epi16(sum0, sum1), _mm256_set1_epi16(1));
        const float d = y[i].d * half_to_float(x[i].d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum), acc);
        acc1 = fmaf(d, (float)delta_sum, acc1);
    }
    return fmaf(0.125f, acc1, hsum8(acc));
}

/* The 32 11-bit indices of an IQ1_M super-block: byte k of qs, and the low 3 bits of nibble k of qh, as the
 * interleaved bytes (low, high) of each uint16. */
static inline void iq1m_indices(const uint8_t qs[32], const uint8_t qh[16], uint16_t idx[32]) {
    const __m128i h = _mm_loadu_si128((const __m128i *)qh), m7 = _mm_set1_epi8(7);
    const __m128i lo = _mm_and_si128(h, m7), hi = _mm_and_si128(_mm_srli_epi16(h, 4), m7);
    const __m128i high0 = _mm_unpacklo_epi8(lo, hi), high1 = _mm_unpackhi_epi8(lo, hi); /* nibbles 0..15, 16..31 */
    const __m128i q0 = _mm_loadu_si128((const __m128i *)qs), q1 = _mm_loadu_si128((const __m128i *)(qs + 16));
    _mm_storeu_si128((__m128i *)idx, _mm_unpacklo_epi8(q0, high0));
    _mm_storeu_si128((__m128i *)(idx + 8), _mm_unpackhi_epi8(q0, high0));
    _mm_storeu_si128((__m128i *)(idx + 16), _mm_unpacklo_epi8(q1, high1));
    _mm_storeu_si128((__m128i *)(idx + 24), _mm_unpackhi_epi8(q1, high1));
}

static float dot_iq1_m(int n, const void *vx, const void *vy) {
    const eq_iq1_m *x = (const eq_iq1_m *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    const __m128i one = _mm_set1_epi8(1), bit3 = _mm_set1_epi8(0x08), bit7 = _mm_set1_epi8((char)0x80);
    const int nb = n / EQ_QK_K;
    __m256 acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    uint16_t idx[4][32];
    for (int i = 0; i < 2 && i < nb; ++i) iq1m_indices(x[i].qs, x[i].qh, idx[i]);
    for (int i = 0; i < nb; ++i) {
        const uint16_t *sc = x[i].scales;
        /* the 16 scales 2l+1 as bytes in each 128-bit half: 16-bit lane 4e + w of the shifted copies is 3-bit field e
         * of word w (sub-block s = 4w + e); packed to bytes and the halves' 64-bit quarters paired up, sub-block s is at
         * byte 4(s%4) + s/4 */
        uint64_t sc64;
        memcpy(&sc64, sc, 8);
        __m256i ls16 = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)sc64), _mm256_setr_epi64x(0, 3, 6, 9));
        ls16 = _mm256_add_epi16(_mm256_slli_epi16(_mm256_and_si256(ls16, _mm256_set1_epi16(7)), 1), _mm256_set1_epi16(1));
        const __m256i ls8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(ls16, ls16), 0x88);
        /* the shift of each 8 elements g (bit 3 of nibble g of qh) as a byte -1 or +1, groups 0..15 and 16..31 each in
         * both halves of a vector, so that spread8 takes chunk c's four */
        const __m128i h = _mm_loadu_si128((const __m128i *)x[i].qh);
        const __m128i lo = _mm_cmpeq_epi8(_mm_and_si128(h, bit3), bit3), hi = _mm_cmpeq_epi8(_mm_and_si128(h, bit7), bit7);
        const __m128i shift0 = _mm_or_si128(_mm_unpacklo_epi8(lo, hi), one), shift1 = _mm_or_si128(_mm_unpackhi_epi8(lo, hi), one);
        const __m256i shifts[2] = {_mm256_set_m128i(shift0, shift0), _mm256_set_m128i(shift1, shift1)};
        const uint16_t *k = idx[i & 3];
        if (i + 2 < nb) iq1m_indices(x[i + 2].qs, x[i + 2].qh, idx[(i + 2) & 3]);
        __m256i sum1[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, sum2[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        EQ_UNROLL8
        for (int c = 0; c < 8; ++c, k += 4) {
            const __m256i g = _mm256_set_epi64x((long long)eq_iq1s_grid[k[3]], (long long)eq_iq1s_grid[k[2]],
                                                (long long)eq_iq1s_grid[k[1]], (long long)eq_iq1s_grid[k[0]]);
            const __m256i yc = load256(y[i].qs + 32 * c);
            const int s0 = 2 * c, s1 = 2 * c + 1; /* the sub-blocks of the chunk's two halves */
            const __m256i ls = _mm256_shuffle_epi8(ls8, _mm256_set_m128i(_mm_set1_epi8((char)(4 * (s1 % 4) + s1 / 4)),
                                                                         _mm_set1_epi8((char)(4 * (s0 % 4) + s0 / 4))));
            sum1[c % 2] = _mm256_add_epi16(sum1[c % 2], iq1_pairs(g, yc, ls));
            sum2[c % 2] = _mm256_add_epi16(sum2[c % 2], iq1_pairs(spread8(shifts[c / 4], c % 4), yc, ls));
        }
        const __m256i lanes1 = _mm256_madd_epi16(_mm256_add_epi16(sum1[0], sum1[1]), _mm256_set1_epi16(1));
        const __m256i lanes2 = _mm256_madd_epi16(_mm256_add_epi16(sum2[0], sum2[1]), _mm256_set1_epi16(1));
        const __m256 d = _mm256_set1_ps(y[i].d * half_to_float(eq_iq1m_d(sc)));
        acc1 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes1), acc1);
        acc2 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes2), acc2);
    }
    return fmaf(0.125f, hsum8(acc2), hsum8(acc1));
}

const eq_kernel_table eq_avx2_kernels = {
    .dequantize = {EQ_DEQUANTIZE_ENTRIES},
    .quantize = {[EQ_Q8_0] = quantize_q8_0, [EQ_Q8_1] = quantize_q8_1, [EQ_Q8_K] = quantize_q8_K},
    .dot = {[EQ_Q4_0] = dot_q4_0, [EQ_Q4_1] = dot_q4_1, [EQ_Q5_0] = dot_q5_0, [EQ_Q5_1] = dot_q5_1,
            [EQ_Q8_0] = dot_q8_0, [EQ_Q2_K] = dot_q2_K, [EQ_Q3_K] = dot_q3_K, [EQ_Q4_K] = dot_q4_K,
            [EQ_Q5_K] = dot_q5_K, [EQ_Q6_K] = dot_q6_K, [EQ_IQ4_NL] = dot_iq4_nl, [EQ_IQ4_XS] = dot_iq4_xs,
            [EQ_IQ2_XXS] = dot_iq2_xxs, [EQ_IQ2_XS] = dot_iq2_xs, [EQ_IQ2_S] = dot_iq2_s, [EQ_IQ3_XXS] = dot_iq3_xxs,
            [EQ_IQ3_S] = dot_iq3_s, [EQ_IQ1_S] = dot_iq1_s, [EQ_IQ1_M] = dot_iq1_m},
};

#endif

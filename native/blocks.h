/* GGML block layouts, half-precision conversion and scale unpacking shared by every ISA's kernels.
 *
 * The layouts are the GGUF on-disk format (QK_K = 256).  All multi-byte fields are little-endian; the
 * kernels assume a little-endian host (x86-64, AArch64).
 *
 *   type   bytes  fields (in order)                                  element value
 *   Q4_0    18    d:f16, qs[16] (nibbles)                            d*(q-8)
 *   Q4_1    20    d:f16, m:f16, qs[16]                               d*q + m
 *   Q5_0    22    d:f16, qh[4] (bit 5 of element j = bit j), qs[16]   d*(q-16)
 *   Q5_1    24    d:f16, m:f16, qh[4], qs[16]                        d*q + m
 *   Q8_0    34    d:f16, qs[32] (int8)                               d*q
 *   Q8_1    36    d:f16, s:f16 (= d * sum(qs)), qs[32]               (activations only)
 *   Q2_K    84    scales[16] (lo nibble scale, hi nibble min), qs[64], d:f16, dmin:f16
 *   Q3_K   110    hmask[32], qs[64], scales[12] (16 x 6 bit, -32), d:f16
 *   Q4_K   144    d:f16, dmin:f16, scales[12] (8 x 6-bit scale, 8 x 6-bit min), qs[128]
 *   Q5_K   176    d:f16, dmin:f16, scales[12], qh[32], qs[128]
 *   Q6_K   210    ql[128], qh[64], scales[16] (int8), d:f16
 *   Q8_K   292    d:f32, qs[256] (int8), bsums[16] (int16, sums of 16 qs)  (activations only)
 *   IQ4_NL  18    d:f16, qs[16] (4-bit indices i)                    d*v[i]
 *   IQ4_XS 136    d:f16, scales_h:u16, scales_l[4], qs[128]          (d*(ls-32))*v[i], ls per 32 elements
 *
 * v = eq_iq4nl_values, ggml's kvalues_iq4nl (16 int8, ascending, -127..113).
 *
 * In the 32-element legacy blocks, element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble.
 * K-quant bit planes (element e of a 256-element super-block, 16-element sub-block s = e / 16):
 *
 *   Q2_K/Q3_K  low bits  (qs[32*(e/128) + e%32] >> 2*((e%128)/32)) & 3;  Q3_K high bit: hmask[e%32] bit e/32,
 *              *clear* meaning "subtract 4"
 *   Q4_K/Q5_K  nibble    qs[32*(e/64) + e%32], low nibble when (e%64) < 32;  Q5_K bit 4: qh[e%32] bit e/32
 *   Q6_K       nibble    ql[64*(e/128) + e%64], low nibble when (e%128) < 64;
 *              bits 4-5  (qh[32*(e/128) + e%32] >> 2*((e%128)/32)) & 3;  value q - 32
 *
 * IQ4_NL and IQ4_XS store their indices as the legacy blocks do, per 32 elements (IQ4_XS sub-block j = e / 32 in
 * qs[16j..16j+15]).  IQ4_XS's eight 6-bit sub-block scales ls_j are split over two fields:
 *
 *   scales_l[k]   bits 7..4: ls_{2k+1} bits 3..0     bits 3..0: ls_{2k} bits 3..0
 *   scales_h      bits 2j+1..2j: ls_j bits 5..4     (j = 0..7, bit 0 the lowest)
 */

#ifndef EQ_BLOCKS_H
#define EQ_BLOCKS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define EQ_QK 32  /* elements per legacy block */
#define EQ_QK_K 256 /* elements per K-quant super-block */

typedef struct { uint16_t d; uint8_t qs[16]; } eq_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } eq_q4_1;
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } eq_q5_0;
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } eq_q5_1;
typedef struct { uint16_t d; int8_t qs[32]; } eq_q8_0;
typedef struct { uint16_t d, s; int8_t qs[32]; } eq_q8_1;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } eq_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } eq_q3_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } eq_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } eq_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } eq_q6_K;
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } eq_q8_K;
typedef struct { uint16_t d; uint8_t qs[16]; } eq_iq4_nl;
typedef struct { uint16_t d, scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } eq_iq4_xs;

#define EQ_CHECK_SIZE(t, n) typedef char eq_size_check_##t[sizeof(eq_##t) == (n) ? 1 : -1]
EQ_CHECK_SIZE(q4_0, 18); EQ_CHECK_SIZE(q4_1, 20); EQ_CHECK_SIZE(q5_0, 22); EQ_CHECK_SIZE(q5_1, 24);
EQ_CHECK_SIZE(q8_0, 34); EQ_CHECK_SIZE(q8_1, 36); EQ_CHECK_SIZE(q2_K, 84); EQ_CHECK_SIZE(q3_K, 110);
EQ_CHECK_SIZE(q4_K, 144); EQ_CHECK_SIZE(q5_K, 176); EQ_CHECK_SIZE(q6_K, 210); EQ_CHECK_SIZE(q8_K, 292);
EQ_CHECK_SIZE(iq4_nl, 18); EQ_CHECK_SIZE(iq4_xs, 136);

/* ggml's kvalues_iq4nl, defined in dispatch.c from the EQ_IQ4NL_VALUES that native/build_native.py reads out of
 * gguf-py, so the C kernels and the numpy codecs share one table. */
extern const int8_t eq_iq4nl_values[16];

/* Exact IEEE half -> float (subnormals, infinities and NaNs included). */
static inline float eq_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        const float f = (float)man * 0x1p-24f; /* exact: man < 2^10 */
        return sign ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE half, round to nearest even (what F16C's _cvtss_sh(x, 0) and ggml's reference do). */
static inline uint16_t eq_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);
    const int e = (int)(ax >> 23) - 127; /* unbiased exponent */
    if (e > 15) return sign | 0x7c00u;
    uint32_t man = (ax & 0x7fffffu) | 0x800000u, shift;
    uint32_t base;
    if (e >= -14) { /* normal half: keep 10 of 23 mantissa bits */
        shift = 13;
        base = ((uint32_t)(e + 15) << 10) | ((man >> 13) & 0x3ffu);
    } else { /* subnormal half: units of 2^-24 */
        if (ax == 0 || e < -25) return sign;
        shift = (uint32_t)(-e - 1);
        base = man >> shift;
    }
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (base & 1u))) base++; /* a carry into the exponent is correct */
    return sign | (uint16_t)base;
}

/* The element of largest magnitude, the first one on ties (its sign sets Q8_K's scale); 0 for an all-zero block. */
static inline float eq_first_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; ++j)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    return max;
}

static inline uint32_t eq_load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Sixteen bytes as four little-endian words, so SIMD code can build a register from them without a round trip
 * through memory. */
typedef struct { uint32_t w[4]; } eq_words4;

/* The 8 six-bit scales then the 8 six-bit mins of a Q4_K/Q5_K super-block, as bytes 0..7 and 8..15:
 *
 *   sub-block j < 4:  scale = s[j] & 63,                           min = s[j+4] & 63
 *   sub-block j >= 4: scale = (s[j+4] & 15) | (s[j-4] >> 6) << 4,   min = (s[j+4] >> 4) | (s[j] >> 6) << 4
 *
 * computed four sub-blocks at a time. */
static inline eq_words4 eq_k4_scales_mins(const uint8_t s[12]) {
    const uint32_t a0 = eq_load_u32(s), a1 = eq_load_u32(s + 4), a2 = eq_load_u32(s + 8);
    const eq_words4 r = {{
        a0 & 0x3f3f3f3fu,
        (a2 & 0x0f0f0f0fu) | ((a0 >> 6) & 0x03030303u) << 4,
        a1 & 0x3f3f3f3fu,
        ((a2 >> 4) & 0x0f0f0f0fu) | ((a1 >> 6) & 0x03030303u) << 4,
    }};
    return r;
}

/* The 16 scales of a Q3_K super-block as stored, six bits each, biased by +32 (subtract 32 for the signed scale):
 *   low nibble: s[j] & 15 (j < 8) or s[j-8] >> 4;  high two bits: (s[8 + j%4] >> 2*(j/4)) & 3 */
static inline eq_words4 eq_q3k_biased_scales(const uint8_t s[12]) {
    const uint32_t a0 = eq_load_u32(s), a1 = eq_load_u32(s + 4), a2 = eq_load_u32(s + 8);
    const eq_words4 r = {{
        (a0 & 0x0f0f0f0fu) | (a2 & 0x03030303u) << 4,
        (a1 & 0x0f0f0f0fu) | ((a2 >> 2) & 0x03030303u) << 4,
        ((a0 >> 4) & 0x0f0f0f0fu) | ((a2 >> 4) & 0x03030303u) << 4,
        ((a1 >> 4) & 0x0f0f0f0fu) | ((a2 >> 6) & 0x03030303u) << 4,
    }};
    return r;
}

/* The signed Q3_K scales as bytes. */
static inline void eq_q3k_scales(const uint8_t s[12], int8_t out[16]) {
    const eq_words4 biased = eq_q3k_biased_scales(s);
    memcpy(out, biased.w, 16);
    for (int j = 0; j < 16; ++j) out[j] = (int8_t)(out[j] - 32);
}

/* The eight signed scales ls_j - 32 of an IQ4_XS super-block (layout above). */
static inline void eq_iq4xs_scales(uint16_t scales_h, const uint8_t scales_l[4], int8_t out[8]) {
    for (int j = 0; j < 8; ++j) {
        const int ls = ((scales_l[j / 2] >> (4 * (j % 2))) & 15) | ((scales_h >> (2 * j)) & 3) << 4;
        out[j] = (int8_t)(ls - 32);
    }
}

#endif

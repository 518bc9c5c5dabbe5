/* The lattice i-quants (IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M): block layouts, and their dots with
 * Q8_K activations in the arithmetic of ggml's *_generic functions (scalar.c's table, and neon.c's, which mirrors it).
 *
 * Every weight is a coordinate of one codebook point (iq_grids.h, generated from gguf-py) times a sign and a
 * sub-block scale; the integer sum over a super-block is exact in any order, so these kernels decode a super-block
 * into signed int8 values, per-16 scales ls and (IQ1) per-8 shift signs, and add the products as integers.
 *
 *   type     bytes  fields (in order)
 *   IQ2_XXS   66    d:f16, 8 x (4 index bytes, u32: 4 x 7-bit sign index | ls << 28)       per 32 elements
 *   IQ2_XS    74    d:f16, qs[32] u16 (9-bit index | 7-bit sign index << 9), scales[8] (ls lo | ls hi << 4, per 16)
 *   IQ2_S     82    d:f16, qs[32] (index bits 0..7), signs[32] (8 sign bits per 8), qh[8] (index bits 8..9, 2 per
 *                   index), scales[8] (as IQ2_XS)
 *   IQ3_XXS   98    d:f16, qs[64] (index per 4), 8 x u32 (4 x 7-bit sign index | ls << 28)    per 32 elements
 *   IQ3_S    110    d:f16, qs[64] (index bits 0..7), qh[8] (bit 8 of the 8 indices of 32 elements), signs[32]
 *                   (8 sign bits per 8), scales[4] (ls lo | ls hi << 4, per 32)
 *   IQ1_S     50    d:f16, qs[32] (index bits 0..7), qh[8] u16 (index bits 8..10 at 3l | ls << 12 | shift << 15)
 *   IQ1_M     56    qs[32], qh[16] (per 16: index bits 8..10 | shift << 3, twice), scales[8] (4 x u16: 4 x 3-bit
 *                   ls | a nibble of d's f16 << 12)
 *
 * A 7-bit sign index s selects ksigns[s] (the 8th sign is the parity of the other 7).  Element values and the
 * float result of ggml's generic code (GCC fuses `sumf += d * bsum`, which we write as fmaf):
 *
 *   IQ2_XXS/IQ2_XS/IQ2_S  sumf = fma(d*y.d, sum(ls * g * ±y), sumf), ls = 2*l+1;  result 0.125 * sumf
 *   IQ3_XXS               the same, result 0.25 * sumf;  IQ3_S the same, result sumf
 *   IQ1_S/IQ1_M           sumf = fma(d*y.d, fma(0.125, sum(ls * delta * y), sum(ls * g * y)), sumf),
 *                         g in {-1, 0, 1}, delta = ±1 per 32 (IQ1_S) or per 8 (IQ1_M)
 */

#ifndef EQ_LATTICE_H
#define EQ_LATTICE_H

#include "blocks.h"
#include "iq_grids.h"

typedef struct { uint16_t d; uint8_t qs[64]; } eq_iq2_xxs;
typedef struct { uint16_t d; uint16_t qs[32]; uint8_t scales[8]; } eq_iq2_xs;
typedef struct { uint16_t d; uint8_t qs[32]; uint8_t signs[32]; uint8_t qh[8]; uint8_t scales[8]; } eq_iq2_s;
typedef struct { uint16_t d; uint8_t qs[96]; } eq_iq3_xxs;
typedef struct { uint16_t d; uint8_t qs[64]; uint8_t qh[8]; uint8_t signs[32]; uint8_t scales[4]; } eq_iq3_s;
typedef struct { uint16_t d; uint8_t qs[32]; uint16_t qh[8]; } eq_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint16_t scales[4]; } eq_iq1_m;
EQ_CHECK_SIZE(iq2_xxs, 66); EQ_CHECK_SIZE(iq2_xs, 74); EQ_CHECK_SIZE(iq2_s, 82); EQ_CHECK_SIZE(iq3_xxs, 98);
EQ_CHECK_SIZE(iq3_s, 110); EQ_CHECK_SIZE(iq1_s, 50); EQ_CHECK_SIZE(iq1_m, 56);

/* IQ1_M's d: the top nibbles of its four scale words. */
static inline uint16_t eq_iq1m_d(const uint16_t sc[4]) {
    return (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
}

static inline int eq_iq1m_ls(const uint16_t sc[4], int s) { return 2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1; }

/* One decoded super-block: w the 256 signed grid values (signs applied), ls the scale 2l+1 of each 16 elements,
 * neg (IQ1 only) whether each 8 elements' shift is negative. */
typedef struct { int8_t w[256]; int ls[16]; uint8_t neg[32]; } eq_lattice_block;

static inline void put_point8(int8_t *w, uint64_t point, uint8_t signs) {
    for (int j = 0; j < 8; ++j) {
        const int8_t g = (int8_t)(point >> (8 * j));
        w[j] = (signs >> j) & 1 ? (int8_t)-g : g;
    }
}

static inline void put_point4(int8_t *w, uint32_t point, uint8_t signs) {
    for (int j = 0; j < 4; ++j) {
        const int8_t g = (int8_t)(point >> (8 * j));
        w[j] = (signs >> j) & 1 ? (int8_t)-g : g;
    }
}

static inline void decode_iq2_xxs(const eq_iq2_xxs *b, eq_lattice_block *o) {
    for (int c = 0; c < 8; ++c) {
        const uint32_t meta = eq_load_u32(b->qs + 8 * c + 4);
        for (int l = 0; l < 4; ++l)
            put_point8(o->w + 32 * c + 8 * l, eq_iq2xxs_grid[b->qs[8 * c + l]], eq_ksigns_iq2xs[(meta >> (7 * l)) & 127]);
        o->ls[2 * c] = o->ls[2 * c + 1] = 2 * (int)(meta >> 28) + 1;
    }
}

static inline void decode_iq2_xs(const eq_iq2_xs *b, eq_lattice_block *o) {
    for (int k = 0; k < 32; ++k) put_point8(o->w + 8 * k, eq_iq2xs_grid[b->qs[k] & 511], eq_ksigns_iq2xs[b->qs[k] >> 9]);
    for (int s = 0; s < 16; ++s) o->ls[s] = 2 * ((b->scales[s / 2] >> (4 * (s % 2))) & 15) + 1;
}

static inline void decode_iq2_s(const eq_iq2_s *b, eq_lattice_block *o) {
    for (int k = 0; k < 32; ++k)
        put_point8(o->w + 8 * k, eq_iq2s_grid[b->qs[k] | ((b->qh[k / 4] >> (2 * (k % 4))) & 3) << 8], b->signs[k]);
    for (int s = 0; s < 16; ++s) o->ls[s] = 2 * ((b->scales[s / 2] >> (4 * (s % 2))) & 15) + 1;
}

static inline void decode_iq3_xxs(const eq_iq3_xxs *b, eq_lattice_block *o) {
    for (int c = 0; c < 8; ++c) {
        const uint32_t meta = eq_load_u32(b->qs + 64 + 4 * c);
        for (int l = 0; l < 4; ++l) {
            const uint8_t s = eq_ksigns_iq2xs[(meta >> (7 * l)) & 127];
            put_point4(o->w + 32 * c + 8 * l, eq_iq3xxs_grid[b->qs[8 * c + 2 * l]], s);
            put_point4(o->w + 32 * c + 8 * l + 4, eq_iq3xxs_grid[b->qs[8 * c + 2 * l + 1]], (uint8_t)(s >> 4));
        }
        o->ls[2 * c] = o->ls[2 * c + 1] = 2 * (int)(meta >> 28) + 1;
    }
}

static inline void decode_iq3_s(const eq_iq3_s *b, eq_lattice_block *o) {
    for (int k = 0; k < 64; ++k) {
        const uint32_t point = eq_iq3s_grid[b->qs[k] | ((b->qh[k / 8] >> (k % 8)) & 1) << 8];
        put_point4(o->w + 4 * k, point, (uint8_t)(b->signs[k / 2] >> (4 * (k % 2))));
    }
    for (int s = 0; s < 16; ++s) o->ls[s] = 2 * ((b->scales[s / 4] >> (4 * ((s / 2) % 2))) & 15) + 1;
}

static inline void decode_iq1_s(const eq_iq1_s *b, eq_lattice_block *o) {
    for (int k = 0; k < 32; ++k) {
        const uint16_t h = b->qh[k / 4];
        put_point8(o->w + 8 * k, eq_iq1s_grid[b->qs[k] | ((h >> (3 * (k % 4))) & 7) << 8], 0);
        o->neg[k] = (uint8_t)(h >> 15);
    }
    for (int s = 0; s < 16; ++s) o->ls[s] = 2 * ((b->qh[s / 2] >> 12) & 7) + 1;
}

static inline void decode_iq1_m(const eq_iq1_m *b, eq_lattice_block *o) {
    for (int k = 0; k < 32; ++k) {
        const uint8_t h = (uint8_t)(b->qh[k / 2] >> (4 * (k % 2)));
        put_point8(o->w + 8 * k, eq_iq1s_grid[b->qs[k] | (h & 7) << 8], 0);
        o->neg[k] = (h >> 3) & 1;
    }
    for (int s = 0; s < 16; ++s) o->ls[s] = eq_iq1m_ls(b->scales, s);
}

/* sum(ls * w * y) over the super-block (exact). */
static inline int lattice_isum(const eq_lattice_block *o, const int8_t *y) {
    int sum = 0;
    for (int s = 0; s < 16; ++s) {
        int part = 0;
        for (int j = 0; j < 16; ++j) part += o->w[16 * s + j] * y[16 * s + j];
        sum += o->ls[s] * part;
    }
    return sum;
}

/* sum(ls * delta * y) over the super-block, delta = -1 where the 8 elements' shift is negative (exact). */
static inline int lattice_delta_isum(const eq_lattice_block *o, const int8_t *y) {
    int sum = 0;
    for (int k = 0; k < 32; ++k) {
        int part = 0;
        for (int j = 0; j < 8; ++j) part += y[8 * k + j];
        sum += o->ls[k / 2] * (o->neg[k] ? -part : part);
    }
    return sum;
}

#define EQ_LATTICE_GENERIC_DOT(name, block_t, decode, factor)                                       \
    static inline float name(int n, const void *vx, const void *vy) {                                \
        const block_t *x = (const block_t *)vx;                                                     \
        const eq_q8_K *y = (const eq_q8_K *)vy;                                                     \
        float sumf = 0.0f;                                                                          \
        eq_lattice_block o;                                                                         \
        for (int i = 0; i < n / EQ_QK_K; ++i) {                                                    \
            decode(&x[i], &o);                                                                      \
            sumf = fmaf(eq_half_to_float(x[i].d) * y[i].d, (float)lattice_isum(&o, y[i].qs), sumf); \
        }                                                                                           \
        return factor * sumf;                                                                       \
    }

EQ_LATTICE_GENERIC_DOT(generic_dot_iq2_xxs, eq_iq2_xxs, decode_iq2_xxs, 0.125f)
EQ_LATTICE_GENERIC_DOT(generic_dot_iq2_xs, eq_iq2_xs, decode_iq2_xs, 0.125f)
EQ_LATTICE_GENERIC_DOT(generic_dot_iq2_s, eq_iq2_s, decode_iq2_s, 0.125f)
EQ_LATTICE_GENERIC_DOT(generic_dot_iq3_xxs, eq_iq3_xxs, decode_iq3_xxs, 0.25f)
EQ_LATTICE_GENERIC_DOT(generic_dot_iq3_s, eq_iq3_s, decode_iq3_s, 1.0f)

static inline float generic_dot_iq1_s(int n, const void *vx, const void *vy) {
    const eq_iq1_s *x = (const eq_iq1_s *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    float sumf = 0.0f;
    eq_lattice_block o;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        decode_iq1_s(&x[i], &o);
        const float inner = fmaf(0.125f, (float)lattice_delta_isum(&o, y[i].qs), (float)lattice_isum(&o, y[i].qs));
        sumf = fmaf(eq_half_to_float(x[i].d) * y[i].d, inner, sumf);
    }
    return sumf;
}

static inline float generic_dot_iq1_m(int n, const void *vx, const void *vy) {
    const eq_iq1_m *x = (const eq_iq1_m *)vx;
    const eq_q8_K *y = (const eq_q8_K *)vy;
    float sumf = 0.0f;
    eq_lattice_block o;
    for (int i = 0; i < n / EQ_QK_K; ++i) {
        decode_iq1_m(&x[i], &o);
        const float inner = fmaf(0.125f, (float)lattice_delta_isum(&o, y[i].qs), (float)lattice_isum(&o, y[i].qs));
        sumf = fmaf(eq_half_to_float(eq_iq1m_d(x[i].scales)) * y[i].d, inner, sumf);
    }
    return sumf;
}

#define EQ_LATTICE_GENERIC_DOTS                                                                            \
    [EQ_IQ2_XXS] = generic_dot_iq2_xxs, [EQ_IQ2_XS] = generic_dot_iq2_xs, [EQ_IQ2_S] = generic_dot_iq2_s,  \
    [EQ_IQ3_XXS] = generic_dot_iq3_xxs, [EQ_IQ3_S] = generic_dot_iq3_s, [EQ_IQ1_S] = generic_dot_iq1_s,    \
    [EQ_IQ1_M] = generic_dot_iq1_m

#endif

/* Block fits in C, the same float32 arithmetic as our numpy codecs (see fit.h): the implementation, included by
 * fit.c (portable build) and fit_avx2.c (-mavx2), each of which gets its own vectorized copy.
 *
 * Each numpy search works element-major on many groups at once, and so do the C searches, on LANES groups (the
 * vector lanes; see "searches over LANES groups" below), with the same steps:
 *
 *   numpy (convert/codecs)                     here
 *   search_affine.make_qkx2_quants (= qkx3)    search_affine     weighted (scale, min) search, grids with a min
 *   search_affine.make_qp_quants               search_qp         values >= 0 to scale * L (super-block scales; one set)
 *   search_symmetric.make_qx_quants            search_qx         weighted symmetric scale from 19 trial grids
 *   search_symmetric.make_q3_quants            search_q3         symmetric scale by coordinate descent (one group)
 *   iquant_nl.sub_block_scales                 search_iq4        weighted scale onto the IQ4 table, 16 trial grids
 *   lattice_search.search                      lattice_search    scale and codebook points (fit_lattice.h), per sub-block
 *
 * What keeps the bytes equal: sums accumulate element after element from 0 (or from the first term where numpy's
 * in_order_sum(from_zero=False) does), products associate left to right as numpy evaluates them, nearest_int is
 * the 1.5 * 2^23 trick on the float's bits, float -> small int casts behave as numpy's on x86 (NaN and out of
 * range give INT_MIN, of which the low byte is kept), and each per-group branch tests numpy's mask condition
 * (NaN compares false).
 */

#ifndef EQ_FIT_ROWS_H
#define EQ_FIT_ROWS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"
#include "fit.h"
#include "kernels.h"

#define GROUP_MAX_EPS 1e-15f /* a group whose largest magnitude is below this is all zeros */
#define MAGIC 12582912.0f    /* 1.5 * 2^23: v + MAGIC holds round(v) in its low mantissa bits */
#define ROUND_HALF_DOWN 0x1.fffffep-2f /* the float below 0.5: roundf(v) = trunc(v + copysign(it, v)) */

/* ggml's nearest_int (round half to even for |v| <= 2^22; particular garbage beyond, reproduced). */
static inline int32_t nearest_int(float v) {
    const float f = v + MAGIC;
    int32_t i;
    memcpy(&i, &f, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t clamp_int(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : v > hi ? hi : v; }

static inline int32_t min_int(int32_t a, int32_t b) { return a < b ? a : b; }

/* numpy's float32 -> int32 on x86 (cvttss2si): truncate; NaN and out of range give INT_MIN. */
static inline int32_t trunc_int(float v) {
    return v >= -2147483648.0f && v < 2147483648.0f ? (int32_t)v : INT32_MIN;
}

/* The low byte of trunc_int: numpy's float32 -> int8/uint8 casts. */
static inline uint8_t low_byte(float v) { return (uint8_t)trunc_int(v); }

/* numpy's argmax(|x|) scan (the first maximum; the first NaN wins): the largest magnitude, and the signed value
 * there (+0 unless the magnitude is > 0). */
static inline void signed_peak(const float *x, int n, float *amax, float *peak) {
    int at = 0;
    float best = fabsf(x[0]);
    for (int i = 1; i < n && !isnan(best); ++i) {
        const float a = fabsf(x[i]);
        if (a > best || isnan(a)) {
            best = a;
            at = i;
        }
    }
    *amax = best;
    *peak = best > 0 ? x[at] : 0.0f;
}

/* ---- searches over LANES groups at once ----
 *
 * The affine and symmetric searches run on LANES groups side by side, element i of group g at [i * LANES + g], in
 * GCC/Clang vector types whose lanes are the groups: each group's sums still add its elements in order, and the
 * per-group branches become selects on masks (all ones where the numpy mask is true), evaluated for every lane as
 * numpy evaluates them.  vf/vi are one vector register: 4 lanes (SSE2, NEON) or 8 (AVX). */

#if defined(__AVX__)
#define LANES 8
#else
#define LANES 4 /* SSE2 / NEON registers: wider generic vectors would be split lane by lane */
#endif
#define VECTOR_INLINE static inline __attribute__((always_inline)) /* vf by value stays in registers */

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

VECTOR_INLINE vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

VECTOR_INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

VECTOR_INLINE vf vsplat(float s) {
    const vf zero = {0};
    return zero + s;
}

VECTOR_INLINE vi isplat(int32_t s) {
    const vi zero = {0};
    return zero + s;
}

VECTOR_INLINE vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

VECTOR_INLINE vi iselect(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }

VECTOR_INLINE vf vabs(vf v) { return (vf)((vi)v & isplat(0x7fffffff)); }

/* nearest_int on every lane, clamped to [lo, hi] and returned as float (exact: |hi|, |lo| < 2^22). */
VECTOR_INLINE vf nearest_int_clamped(vf v, int32_t lo, int32_t hi) {
    vi q = ((vi)(v + vsplat(MAGIC)) & isplat(0x007fffff)) - isplat(0x00400000);
    q = iselect(q < isplat(lo), isplat(lo), q);
    q = iselect(q > isplat(hi), isplat(hi), q);
    return (vf)(q + isplat(0x4b400000)) - vsplat(MAGIC); /* small int -> float through MAGIC's bits */
}

/* ---- grids with a min: w ~ scale * L - the_min, L in [0, nmax] ---- */

VECTOR_INLINE void affine_levels(const float *x, int n, vf lo, vf iscale, int nmax, vf *L) {
    for (int i = 0; i < n; ++i) L[i] = nearest_int_clamped((vload(x + i * LANES) - lo) * iscale, 0, nmax);
}

/* sum_i w_i * |scale * L_i + offset - x_i| (mad) or its square, per group. */
VECTOR_INLINE vf affine_error(const float *x, const float *w, int n, vf scale, vf offset, const vf *L, int use_mad) {
    vf err = {0};
    for (int i = 0; i < n; ++i) {
        const vf diff = scale * L[i] + offset - vload(x + i * LANES);
        err += (use_mad ? vabs(diff) : diff * diff) * vload(w + i * LANES);
    }
    return err;
}

/* make_qkx2_quants on LANES groups of n <= 32: scale[g], the_min[g] = -min >= 0, codes (side by side). */
static void search_affine(const float *x, const float *w, int n, int nmax, float rmin, float rdelta, int nstep,
                          int use_mad, float *scale_out, float *the_min, uint8_t *codes) {
    const vf zero = {0};
    vf lo = vload(x), hi = lo, sum_w = vload(w), sum_x = sum_w * lo;
    for (int i = 1; i < n; ++i) {
        const vf v = vload(x + i * LANES), wi = vload(w + i * LANES);
        lo = vselect(v < lo, v, lo);
        hi = vselect(v > hi, v, hi);
        sum_w += wi;
        sum_x += wi * v;
    }
    lo = vselect(lo > zero, zero, lo);
    const vi flat = ~(hi > lo); /* all codes 0, scale 0 */
    const vf flat_min = lo;
    vf iscale = vsplat((float)nmax) / (hi - lo), scale = vsplat(1.0f) / iscale;
    vf L[32], cand[32];
    affine_levels(x, n, lo, iscale, nmax, L);
    vf best = affine_error(x, w, n, scale, lo, L, use_mad);
    for (int step = 0; nstep >= 1 && step <= nstep; ++step) {
        /* rescaled from the current best min, which may have moved on an earlier step */
        iscale = vsplat(rmin + rdelta * (float)step + (float)nmax) / (hi - lo);
        affine_levels(x, n, lo, iscale, nmax, cand);
        vf sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            const vf wl = vload(w + i * LANES) * cand[i];
            sum_l += wl;
            sum_l2 += wl * cand[i];
            sum_xl += wl * vload(x + i * LANES);
        }
        const vf det = sum_w * sum_l2 - sum_l * sum_l;
        vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const vi clamp = this_min > zero;
        this_min = vselect(clamp, zero, this_min);
        this_scale = vselect(clamp, sum_xl / sum_l2, this_scale);
        const vf err = affine_error(x, w, n, this_scale, this_min, cand, use_mad);
        const vi better = (det > zero) & (err < best);
        for (int i = 0; i < n; ++i) L[i] = vselect(better, cand[i], L[i]);
        best = vselect(better, err, best);
        scale = vselect(better, this_scale, scale);
        lo = vselect(better, this_min, lo);
    }
    for (int i = 0; i < n; ++i) {
        float l[LANES];
        vstore(l, vselect(flat, zero, L[i]));
        for (int g = 0; g < LANES; ++g) codes[i * LANES + g] = (uint8_t)l[g];
    }
    vstore(scale_out, vselect(flat, zero, scale));
    vstore(the_min, -vselect(flat, flat_min, lo));
}

/* sum_i w_i * (x_i - L_i / iscale)^2 with L = nearest_int(iscale * x) kept as `first` does (low byte) or capped
 * at nmax. */
static inline float qp_error(const float *x, const float *w, int n, int nmax, float iscale, int first) {
    const float inv = 1.0f / iscale;
    float s = 0.0f;
    for (int i = 0; i < n; ++i) {
        const int32_t l = nearest_int(iscale * x[i]);
        const float diff = x[i] - inv * (float)(first ? (l & 0xff) : min_int(nmax, l));
        s += w[i] * diff * diff;
    }
    return s;
}

/* make_qp_quants (n <= 32: the K-quants' 16 scales, IQ2_XXS's sub-blocks of 32): returns the scale, codes in L
 * (negative levels wrap as uint8). */
static float search_qp(const float *x, const float *w, int n, int nmax, uint8_t *L) {
    float top = 0.0f;
    for (int i = 0; i < n; ++i) top = top > x[i] ? top : x[i];
    if (top < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)nmax / top;
    float best = qp_error(x, w, n, nmax, iscale, 1);
    for (int step = -4; step <= 4; ++step) {
        if (!step) continue;
        const float is = (0.1f * (float)step + (float)nmax) / top;
        const float mse = qp_error(x, w, n, nmax, is, 0);
        if (mse < best) {
            best = mse;
            iscale = is;
        }
    }
    int32_t code[32];
    float wx[32], sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float l = (float)min_int(nmax, nearest_int(iscale * x[i]));
        wx[i] = w[i] * x[i];
        sumlx += wx[i] * l;
        suml2 += w[i] * l * l;
        code[i] = (int32_t)l & 0xff;
    }
    for (int pass = 0; pass < 5; ++pass) { /* move one code at a time while the fit quality rises */
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float old = (float)code[i];
            const float slx = sumlx - wx[i] * old, sl2 = suml2 - w[i] * old * old;
            const int32_t fresh = min_int(nmax, nearest_int(x[i] * sl2 / slx));
            const float f = (float)fresh;
            const float slx_new = slx + wx[i] * f, sl2_new = sl2 + w[i] * f * f;
            if (slx > 0 && sl2 > 0 && fresh != code[i] && slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new) {
                code[i] = fresh & 0xff;
                sumlx = slx_new;
                suml2 = sl2_new;
                changed = 1;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)code[i];
    return suml2 > 0 ? sumlx / suml2 : 0.0f;
}

/* ---- symmetric grids: w ~ scale * l, l in [-nmax, nmax - 1], stored as l + nmax ---- */

/* clip(rint(v), lo, hi) as search_symmetric's levels(): NaN stays NaN, as np.maximum/np.minimum keep it. */
VECTOR_INLINE vf qx_level(vf v, vf lo, vf hi) {
    vf r = (v + vsplat(MAGIC)) - vsplat(MAGIC); /* rint for |v| <= 2^22; beyond, past the clamps with v's sign */
    r = vselect(r < lo, lo, r);
    return vselect(r > hi, hi, r);
}

/* signed_peak per group: numpy's argmax(|x|) (the first maximum; the first NaN wins, and stays). */
VECTOR_INLINE void signed_peak_lanes(const float *x, int n, vf *amax, vf *peak) {
    vf top = vabs(vload(x)), at = vload(x);
    for (int i = 1; i < n; ++i) {
        const vf v = vload(x + i * LANES), a = vabs(v);
        const vi take = ((a > top) | (a != a)) & (top == top);
        top = vselect(take, a, top);
        at = vselect(take, v, at);
    }
    *amax = top;
    *peak = vselect(top > (vf){0}, at, (vf){0});
}

VECTOR_INLINE void qx_sums(const float *x, const float *w, const vf *wx, int n, vf iscale, int nmax, vf *sumlx,
                           vf *suml2) {
    const vf lo = vsplat((float)-nmax), hi = vsplat((float)(nmax - 1));
    vf slx = {0}, sl2 = {0};
    for (int i = 0; i < n; ++i) {
        const vf l = qx_level(vload(x + i * LANES) * iscale, lo, hi);
        slx += wx[i] * l;
        sl2 += vload(w + i * LANES) * l * l;
    }
    *sumlx = slx;
    *suml2 = sl2;
}

/* make_qx_quants on LANES groups of n <= 32: scale[g], codes l + nmax (side by side); all-zero groups give 0, 0. */
static void search_qx(const float *x, const float *w, int n, int nmax, float *scale_out, uint8_t *codes) {
    const vf zero = {0};
    vf amax, peak, wx[32], sumlx, suml2;
    signed_peak_lanes(x, n, &amax, &peak);
    for (int i = 0; i < n; ++i) wx[i] = vload(w + i * LANES) * vload(x + i * LANES);
    vf best_iscale = vsplat((float)-nmax) / peak;
    qx_sums(x, w, wx, n, best_iscale, nmax, &sumlx, &suml2);
    vf scale = vselect(suml2 != zero, sumlx / suml2, zero), best = scale * sumlx;
    for (int step = -9; step <= 9; ++step) {
        if (!step) continue;
        const vf iscale = vsplat(-((float)nmax + 0.1f * (float)step)) / peak;
        qx_sums(x, w, wx, n, iscale, nmax, &sumlx, &suml2);
        const vi better = (suml2 > zero) & (sumlx * sumlx > best * suml2);
        const vf s = sumlx / suml2;
        best_iscale = vselect(better, iscale, best_iscale);
        scale = vselect(better, s, scale);
        best = vselect(better, s * sumlx, best);
    }
    const vi blank = amax < vsplat(GROUP_MAX_EPS);
    const vf lo = vsplat((float)-nmax), hi = vsplat((float)(nmax - 1));
    for (int i = 0; i < n; ++i) {
        float u[LANES];
        vstore(u, qx_level(vload(x + i * LANES) * best_iscale, lo, hi) + vsplat((float)nmax));
        for (int g = 0; g < LANES; ++g) codes[i * LANES + g] = low_byte(u[g]);
    }
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) codes[i * LANES + g] = blank[g] ? 0 : codes[i * LANES + g];
    vstore(scale_out, vselect(blank, zero, scale));
}

/* make_q3_quants (n <= 16, weights x^2): returns the scale, codes l + nmax in L. */
static float search_q3(const float *x, int n, int nmax, uint8_t *L) {
    float amax, peak, w[16], wx[16], lv[16], sumlx = 0.0f, suml2 = 0.0f;
    signed_peak(x, n, &amax, &peak);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    const float iscale = (float)-nmax / peak;
    for (int i = 0; i < n; ++i) {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
        lv[i] = (float)clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
        sumlx += wx[i] * lv[i];
        suml2 += w[i] * lv[i] * lv[i];
    }
    for (int pass = 0; pass < 5; ++pass) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float li = lv[i];
            const float slx_rest = sumlx - wx[i] * li, sl2_rest = suml2 - w[i] * li * li;
            const float fresh = (float)clamp_int(nearest_int(x[i] * sl2_rest / slx_rest), -nmax, nmax - 1);
            const float slx = slx_rest + wx[i] * fresh, sl2 = sl2_rest + w[i] * fresh * fresh;
            if (slx_rest > 0 && fresh != li && sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                lv[i] = fresh;
                sumlx = slx;
                suml2 = sl2;
                changed = 1;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)((int32_t)lv[i] + nmax);
    return suml2 > 0 ? sumlx / suml2 : 0.0f;
}

/* ---- K-quants with a scale and a min per sub-block (Q2_K, Q4_K, Q5_K) ---- */

static inline float sum_squares(const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

/* Final codes on the stored grid: q = clip(nearest_int((x + dmin*min) / (d*scale)), 0, nmax); a sub-block whose
 * step is zero keeps its search codes. */
static inline void requantize_affine(const float *x, int group, float d, float dmin, uint8_t scale, uint8_t min,
                                     int nmax, uint8_t *q) {
    const float step = d * (float)scale, shift = dmin * (float)min;
    if (step == 0) return;
    for (int i = 0; i < group; ++i) q[i] = (uint8_t)clamp_int(nearest_int((x[i] + shift) / step), 0, nmax);
}

typedef struct {
    int nmax;
    float rmin, rdelta; /* quantize_row_*_ref's search */
    int nstep;
    int clamp_imatrix_scales;
} sixbit_params;

static const sixbit_params Q4_K_PARAMS = {15, -1.0f, 0.1f, 20, 0};
static const sixbit_params Q5_K_PARAMS = {31, -0.5f, 0.1f, 15, 1};

/* LANES groups of n values side by side, group g from src + g * stride; groups from `count` on are zeros. */
static inline void side_by_side(const float *src, int n, int stride, int count, float *out) {
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) out[i * LANES + g] = g < count ? src[g * stride + i] : 0.0f;
}

/* The codes of the first `count` groups back in place: group g to q + g * stride. */
static inline void codes_back(const uint8_t *codes, int n, int stride, int count, uint8_t *q) {
    for (int g = 0; g < count; ++g)
        for (int i = 0; i < n; ++i) q[g * stride + i] = codes[i * LANES + g];
}

/* wt = imp * sqrt(sigma2 + x^2), side by side as x is: the K-quant and legacy importance weighting. */
static inline void importance_weights(const float *imp, const float *xt, int n, int stride, int count, float sigma2,
                                      float *wt) {
    side_by_side(imp, n, stride, count, wt);
    for (int k = 0; k < n * LANES; ++k) wt[k] = wt[k] * sqrtf(sigma2 + xt[k] * xt[k]);
}

/* Per-group sums of n side-by-side values, from 0 in element order. */
static inline void lane_sums(const float *t, int n, float *sum) {
    for (int g = 0; g < LANES; ++g) sum[g] = 0.0f;
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < LANES; ++g) sum[g] += t[i * LANES + g];
}

/* Q4_K/Q5_K super-block (kquant_scales.SixBitScaleMinCodec.fit): d, dmin, the 12 scale bytes, codes q[256]. */
static void fit_sixbit(const float *x, const float *imp, const sixbit_params *p, uint16_t *d16, uint16_t *dmin16,
                       uint8_t s[12], uint8_t q[256]) {
    float xt[32 * LANES], wt[32 * LANES], sub_scale[8], sub_min[8], sw[8];
    uint8_t codes[32 * LANES], ls[8], lm[8];
    const float sigma2 = imp ? 2.0f * sum_squares(x, 256) / 256.0f : 0.0f;
    for (int j = 0; j < 8; j += LANES) { /* LANES sub-blocks at a time */
        side_by_side(x + 32 * j, 32, 32, LANES, xt);
        if (!imp) { /* weights |x| + rms(sub-block) */
            float sq[LANES], av_x[LANES];
            for (int k = 0; k < 32 * LANES; ++k) wt[k] = xt[k] * xt[k];
            lane_sums(wt, 32, sq);
            for (int g = 0; g < LANES; ++g) av_x[g] = sqrtf(sq[g] / 32.0f);
            for (int k = 0; k < 32 * LANES; ++k) wt[k] = av_x[k % LANES] + fabsf(xt[k]);
            search_affine(xt, wt, 32, p->nmax, p->rmin, p->rdelta, p->nstep, 0, sub_scale + j, sub_min + j, codes);
        } else { /* weights importance * sqrt(sigma2 + x^2) */
            importance_weights(imp + 32 * j, xt, 32, 32, LANES, sigma2, wt);
            lane_sums(wt, 32, sw + j);
            search_affine(xt, wt, 32, p->nmax, -0.9f, 0.05f, 36, 0, sub_scale + j, sub_min + j, codes);
        }
        codes_back(codes, 32, 32, LANES, q + 32 * j);
    }
    if (!imp) { /* the largest scale and min set d and dmin */
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 8; ++j) {
            if (sub_scale[j] > max_scale) max_scale = sub_scale[j];
            if (sub_min[j] > max_min) max_min = sub_min[j];
        }
        const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        for (int j = 0; j < 8; ++j) {
            ls[j] = (uint8_t)min_int(63, nearest_int(inv_scale * sub_scale[j]) & 0xff);
            lm[j] = (uint8_t)min_int(63, nearest_int(inv_min * sub_min[j]) & 0xff);
        }
        *d16 = eq_float_to_half(max_scale / 63.0f);
        *dmin16 = eq_float_to_half(max_min / 63.0f);
    } else { /* the 8 scales and mins by a weighted search */
        const float d_block = search_qp(sub_scale, sw, 8, 63, ls);
        const float m_block = search_qp(sub_min, sw, 8, 63, lm);
        if (p->clamp_imatrix_scales)
            for (int j = 0; j < 8; ++j) {
                ls[j] = ls[j] < 63 ? ls[j] : 63;
                lm[j] = lm[j] < 63 ? lm[j] : 63;
            }
        *d16 = eq_float_to_half(d_block);
        *dmin16 = eq_float_to_half(m_block);
    }
    /* 6-bit packing as kquant_scales.pack_scale_min_6bit writes it (values above 63 leak as they do there) */
    for (int j = 0; j < 4; ++j) {
        s[j] = (uint8_t)(ls[j] | (uint8_t)((ls[4 + j] >> 4) << 6));
        s[4 + j] = (uint8_t)(lm[j] | (uint8_t)((lm[4 + j] >> 4) << 6));
        s[8 + j] = (uint8_t)((ls[4 + j] & 0x0f) | ((lm[4 + j] & 0x0f) << 4));
    }
    /* requantize with the scales as decoded from those bytes */
    const eq_words4 sm = eq_k4_scales_mins(s);
    uint8_t scales_mins[16];
    memcpy(scales_mins, sm.w, 16);
    const float d = eq_half_to_float(*d16), dmin = eq_half_to_float(*dmin16);
    for (int j = 0; j < 8; ++j)
        requantize_affine(x + 32 * j, 32, d, dmin, scales_mins[j], scales_mins[8 + j], p->nmax, q + 32 * j);
}

/* Codes of a 256-weight super-block as Q4_K's nibbles: byte l of chunk c = q[64c + l] | q[64c + 32 + l] << 4. */
static void pack_k_nibbles(const uint8_t q[256], uint8_t qs[128]) {
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l)
            qs[32 * c + l] = (uint8_t)((q[64 * c + l] & 0x0f) | (q[64 * c + 32 + l] & 0x0f) << 4);
}

static void fit_q4_k(const float *x, const float *imp, void *block) {
    eq_q4_K *b = block;
    uint8_t q[256];
    fit_sixbit(x, imp, &Q4_K_PARAMS, &b->d, &b->dmin, b->scales, q);
    pack_k_nibbles(q, b->qs);
}

static void fit_q5_k(const float *x, const float *imp, void *block) {
    eq_q5_K *b = block;
    uint8_t q[256];
    fit_sixbit(x, imp, &Q5_K_PARAMS, &b->d, &b->dmin, b->scales, q);
    memset(b->qh, 0, 32);
    for (int g = 0; g < 8; ++g)
        for (int j = 0; j < 32; ++j) b->qh[j] |= (uint8_t)((q[32 * g + j] >> 4) << g);
    pack_k_nibbles(q, b->qs);
}

/* Q2_K super-block (q2_k.Q2_K.fit): 16 sub-blocks of 16, LANES at a time. */
static void fit_q2_k(const float *x, const float *imp, void *block) {
    eq_q2_K *b = block;
    float xt[16 * LANES], wt[16 * LANES], sub_scale[16], sub_min[16], sw[16];
    uint8_t q[256], byte[16], codes[16 * LANES];
    const float sigma2 = imp ? sum_squares(x, 256) / 256.0f : 0.0f;
    for (int j = 0; j < 16; j += LANES) {
        side_by_side(x + 16 * j, 16, 16, LANES, xt);
        if (!imp) { /* weights |x|, absolute error */
            for (int k = 0; k < 16 * LANES; ++k) wt[k] = fabsf(xt[k]);
            search_affine(xt, wt, 16, 3, -0.5f, 0.1f, 15, 1, sub_scale + j, sub_min + j, codes);
        } else { /* weights importance * sqrt(sigma2 + x^2) */
            importance_weights(imp + 16 * j, xt, 16, 16, LANES, sigma2, wt);
            lane_sums(wt, 16, sw + j);
            search_affine(xt, wt, 16, 3, -0.9f, 0.05f, 36, 0, sub_scale + j, sub_min + j, codes);
        }
        codes_back(codes, 16, 16, LANES, q + 16 * j);
    }
    if (!imp) { /* 4-bit scales and mins relative to the largest */
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 16; ++j) {
            if (sub_scale[j] > max_scale) max_scale = sub_scale[j];
            if (sub_min[j] > max_min) max_min = sub_min[j];
        }
        const float inv_scale = 15.0f / max_scale, inv_min = 15.0f / max_min;
        for (int j = 0; j < 16; ++j) {
            const int32_t ls = max_scale > 0 ? nearest_int(inv_scale * sub_scale[j]) & 0xff : 0;
            const int32_t lm = max_min > 0 ? (nearest_int(inv_min * sub_min[j]) & 0x0f) << 4 : 0;
            byte[j] = (uint8_t)(ls | lm);
        }
        b->d = eq_float_to_half(max_scale > 0 ? max_scale / 15.0f : 0.0f);
        b->dmin = eq_float_to_half(max_min > 0 ? max_min / 15.0f : 0.0f);
    } else { /* the 16 scales and mins by a weighted search */
        uint8_t ls[16], lm[16];
        b->d = eq_float_to_half(search_qp(sub_scale, sw, 16, 15, ls));
        b->dmin = eq_float_to_half(search_qp(sub_min, sw, 16, 15, lm));
        for (int j = 0; j < 16; ++j) byte[j] = (uint8_t)(ls[j] | (uint8_t)(lm[j] << 4));
    }
    const float d = eq_half_to_float(b->d), dmin = eq_half_to_float(b->dmin);
    for (int j = 0; j < 16; ++j) {
        requantize_affine(x + 16 * j, 16, d, dmin, byte[j] & 0x0f, byte[j] >> 4, 3, q + 16 * j);
        b->scales[j] = byte[j];
    }
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *u = q + 128 * h + l;
            b->qs[32 * h + l] = (uint8_t)(u[0] | u[32] << 2 | u[64] << 4 | u[96] << 6);
        }
}

/* ---- symmetric K-quants (Q3_K, Q6_K): one fp16 d, 16 integer group scales ---- */

/* Final codes on the stored group scales: clip(nearest_int(x / (d*sc)), -nmax, nmax - 1) + nmax; a group whose
 * step is zero keeps its search codes. */
static void requantize_symmetric(const float *x, float d, const int8_t sc[16], int nmax, uint8_t q[256]) {
    for (int j = 0; j < 16; ++j) {
        const float step = d * (float)sc[j];
        if (step == 0) continue;
        for (int i = 0; i < 16; ++i)
            q[16 * j + i] = (uint8_t)(clamp_int(nearest_int(x[16 * j + i] / step), -nmax, nmax - 1) + nmax);
    }
}

/* Q3_K super-block (q3_k.Q3_K.fit). */
static void fit_q3_k(const float *x, const float *imp, void *block) {
    eq_q3_K *b = block;
    float scales[16];
    int8_t sc[16];
    uint8_t q[256];
    if (!imp) { /* group scales by descent; 6-bit scales relative to the largest */
        for (int j = 0; j < 16; ++j) scales[j] = search_q3(x + 16 * j, 16, 4, q + 16 * j);
        float amax, max_scale;
        signed_peak(scales, 16, &amax, &max_scale);
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < 16; ++j)
            sc[j] = max_scale != 0 ? (int8_t)clamp_int((int8_t)nearest_int(iscale * scales[j]), -32, 31) : -32;
        b->d = eq_float_to_half(max_scale != 0 ? 1.0f / iscale : 0.0f);
    } else { /* weights importance * sqrt(sigma2 + x^2); the 16 scales by make_qx_quants (nmax 32) */
        const float sigma2 = 2.0f * sum_squares(x, 256) / 256.0f;
        float xt[16 * LANES], wt[16 * LANES], sw[16], d[LANES];
        uint8_t codes[16 * LANES];
        for (int j = 0; j < 16; j += LANES) {
            side_by_side(x + 16 * j, 16, 16, LANES, xt);
            importance_weights(imp + 16 * j, xt, 16, 16, LANES, sigma2, wt);
            search_qx(xt, wt, 16, 4, scales + j, codes);
            lane_sums(wt, 16, sw + j);
            codes_back(codes, 16, 16, LANES, q + 16 * j);
        }
        side_by_side(scales, 16, 16, 1, xt); /* one group: the 16 scales, weighted by their groups' weights */
        side_by_side(sw, 16, 16, 1, wt);
        search_qx(xt, wt, 16, 32, d, codes);
        b->d = eq_float_to_half(d[0]);
        for (int j = 0; j < 16; ++j) sc[j] = (int8_t)(codes[j * LANES] - 32);
    }
    requantize_symmetric(x, eq_half_to_float(b->d), sc, 4, q);
    memset(b->hmask, 0, 32);
    for (int k = 0; k < 8; ++k)
        for (int l = 0; l < 32; ++l) b->hmask[l] |= (uint8_t)((q[32 * k + l] >> 2) << k);
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *u = q + 128 * h + l;
            b->qs[32 * h + l] = (uint8_t)((u[0] & 3) | (u[32] & 3) << 2 | (u[64] & 3) << 4 | (u[96] & 3) << 6);
        }
    uint8_t s[16];
    for (int j = 0; j < 16; ++j) s[j] = (uint8_t)(sc[j] + 32);
    for (int j = 0; j < 8; ++j) b->scales[j] = (uint8_t)((s[j] & 0x0f) | (s[j + 8] & 0x0f) << 4);
    for (int m = 0; m < 4; ++m)
        b->scales[8 + m] = (uint8_t)((s[m] >> 4) | (s[4 + m] >> 4) << 2 | (s[8 + m] >> 4) << 4 | (s[12 + m] >> 4) << 6);
}

/* Q6_K super-block (q6_k.Q6_K.fit): 16 groups of 16, LANES at a time. */
static void fit_q6_k(const float *x, const float *imp, void *block) {
    eq_q6_K *b = block;
    float xt[16 * LANES], wt[16 * LANES], scales[16];
    uint8_t q[256], codes[16 * LANES];
    for (int j = 0; j < 16; j += LANES) {
        side_by_side(x + 16 * j, 16, 16, LANES, xt);
        if (imp)
            side_by_side(imp + 16 * j, 16, 16, LANES, wt);
        else
            for (int k = 0; k < 16 * LANES; ++k) wt[k] = xt[k] * xt[k];
        search_qx(xt, wt, 16, 32, scales + j, codes);
        codes_back(codes, 16, 16, LANES, q + 16 * j);
    }
    float max_abs, max_scale;
    signed_peak(scales, 16, &max_abs, &max_scale);
    if (max_abs < GROUP_MAX_EPS) { /* blank super-block */
        memset(b, 0, sizeof *b);
        return;
    }
    const float iscale = -128.0f / max_scale;
    b->d = eq_float_to_half(1.0f / iscale);
    for (int j = 0; j < 16; ++j) b->scales[j] = (int8_t)min_int(127, nearest_int(iscale * scales[j]));
    requantize_symmetric(x, eq_half_to_float(b->d), b->scales, 32, q);
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            const uint8_t *u = q + 128 * h + l;
            b->ql[64 * h + l] = (uint8_t)((u[0] & 0x0f) | (u[64] & 0x0f) << 4);
            b->ql[64 * h + 32 + l] = (uint8_t)((u[32] & 0x0f) | (u[96] & 0x0f) << 4);
            b->qh[32 * h + l] = (uint8_t)((u[0] >> 4) | (u[32] >> 4) << 2 | (u[64] >> 4) << 4 | (u[96] >> 4) << 6);
        }
}

/* ---- 32-weight legacy types, `count` <= LANES consecutive blocks at a time ---- */

/* Q8_0 (q8_0.Q8_0.fit): d = max|x| / 127, q = roundf(x / d); importance is ignored. */
static void fit_q8_0(const float *x, const float *imp, float sigma2, int count, void *out) {
    (void)imp, (void)sigma2;
    for (eq_q8_0 *b = out; count--; ++b, x += 32) {
        float amax = fabsf(x[0]);
        for (int i = 1; i < 32 && !isnan(amax); ++i) {
            const float a = fabsf(x[i]);
            if (a > amax || isnan(a)) amax = a;
        }
        const float d = amax / 127.0f, inv = d != 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; ++i) {
            const float v = x[i] * inv;
            b->qs[i] = (int8_t)low_byte(v + copysignf(ROUND_HALF_DOWN, v)); /* roundf, truncated by the cast */
        }
        b->d = eq_float_to_half(d);
    }
}

/* Q4_0/Q5_0 scales d[b] and codes u[b] in [0, 2 nmax - 1] (legacy_symmetric.SymmetricLegacy): without
 * importance d = peak / -nmax and u = min(2 nmax - 1, (int8)(x / d + nmax + 0.5)); with it make_qx_quants under
 * importance * sqrt(sigma2 + x^2), sigma2 the row's mean square. */
static void fit_symmetric_legacy(const float *x, const float *imp, float sigma2, int count, int nmax, float d[LANES],
                                 uint8_t u[LANES][32]) {
    if (imp) {
        float xt[32 * LANES], wt[32 * LANES];
        uint8_t codes[32 * LANES];
        side_by_side(x, 32, 32, count, xt);
        importance_weights(imp, xt, 32, 32, count, sigma2, wt);
        search_qx(xt, wt, 32, nmax, d, codes);
        codes_back(codes, 32, 32, count, u[0]);
        return;
    }
    for (int b = 0; b < count; ++b, x += 32) {
        float amax, peak;
        signed_peak(x, 32, &amax, &peak);
        d[b] = peak / (float)-nmax;
        const float inv = d[b] != 0 ? 1.0f / d[b] : 0.0f, bias = (float)nmax + 0.5f;
        for (int i = 0; i < 32; ++i) {
            const int8_t v = (int8_t)low_byte(x[i] * inv + bias);
            u[b][i] = (uint8_t)(v < 2 * nmax - 1 ? v : 2 * nmax - 1);
        }
    }
}

static void fit_q4_0(const float *x, const float *imp, float sigma2, int count, void *out) {
    float d[LANES];
    uint8_t u[LANES][32];
    fit_symmetric_legacy(x, imp, sigma2, count, 8, d, u);
    eq_q4_0 *b = out;
    for (int k = 0; k < count; ++k) {
        b[k].d = eq_float_to_half(d[k]);
        for (int j = 0; j < 16; ++j) b[k].qs[j] = (uint8_t)(u[k][j] | (uint8_t)(u[k][j + 16] << 4)); /* unmasked */
    }
}

static void fit_q5_0(const float *x, const float *imp, float sigma2, int count, void *out) {
    float d[LANES];
    uint8_t u[LANES][32];
    fit_symmetric_legacy(x, imp, sigma2, count, 16, d, u);
    eq_q5_0 *b = out;
    for (int k = 0; k < count; ++k) {
        uint32_t qh = 0;
        b[k].d = eq_float_to_half(d[k]);
        for (int j = 0; j < 32; ++j) qh |= (uint32_t)((u[k][j] >> 4) != 0) << j;
        memcpy(b[k].qh, &qh, 4);
        for (int j = 0; j < 16; ++j) b[k].qs[j] = (uint8_t)((u[k][j] & 0x0f) | (u[k][j + 16] & 0x0f) << 4);
    }
}

/* Q4_1/Q5_1 d[b], m[b] and codes q[b] (legacy_affine.LegacyMinCodec): without importance the min/max grid,
 * codes (int8)(v + 0.5) kept as each type's reference does (Q4_1: min(15, .), Q5_1: low 5 bits); with it
 * make_qkx3_quants. */
static void fit_min_legacy(const float *x, const float *imp, float sigma2, int count, int nmax, float d[LANES],
                           float m[LANES], uint8_t q[LANES][32]) {
    if (imp) {
        float xt[32 * LANES], wt[32 * LANES], the_min[LANES];
        uint8_t codes[32 * LANES];
        side_by_side(x, 32, 32, count, xt);
        importance_weights(imp, xt, 32, 32, count, sigma2, wt);
        search_affine(xt, wt, 32, nmax, -0.9f, 0.05f, 36, 0, d, the_min, codes);
        for (int b = 0; b < count; ++b) m[b] = -the_min[b];
        codes_back(codes, 32, 32, count, q[0]);
        return;
    }
    for (int b = 0; b < count; ++b, x += 32) {
        float lo = x[0], hi = x[0];
        for (int i = 1; i < 32; ++i) {
            if (x[i] < lo) lo = x[i];
            if (x[i] > hi) hi = x[i];
        }
        d[b] = (hi - lo) / (float)nmax;
        m[b] = lo;
        const float inv = d[b] != 0 ? 1.0f / d[b] : 0.0f;
        for (int i = 0; i < 32; ++i) {
            const int8_t v = (int8_t)low_byte((x[i] - lo) * inv + 0.5f);
            q[b][i] = nmax == 15 ? (uint8_t)(v < 15 ? v : 15) : (uint8_t)v & 0x1f;
        }
    }
}

static void fit_q4_1(const float *x, const float *imp, float sigma2, int count, void *out) {
    float d[LANES], m[LANES];
    uint8_t q[LANES][32];
    fit_min_legacy(x, imp, sigma2, count, 15, d, m, q);
    eq_q4_1 *b = out;
    for (int k = 0; k < count; ++k) {
        b[k].d = eq_float_to_half(d[k]);
        b[k].m = eq_float_to_half(m[k]);
        for (int j = 0; j < 16; ++j) b[k].qs[j] = (uint8_t)((q[k][j] & 0x0f) | (q[k][j + 16] & 0x0f) << 4);
    }
}

static void fit_q5_1(const float *x, const float *imp, float sigma2, int count, void *out) {
    float d[LANES], m[LANES];
    uint8_t q[LANES][32];
    fit_min_legacy(x, imp, sigma2, count, 31, d, m, q);
    eq_q5_1 *b = out;
    for (int k = 0; k < count; ++k) {
        uint32_t qh = 0;
        b[k].d = eq_float_to_half(d[k]);
        b[k].m = eq_float_to_half(m[k]);
        for (int j = 0; j < 32; ++j) qh |= (uint32_t)((q[k][j] >> 4) & 1) << j;
        memcpy(b[k].qh, &qh, 4);
        for (int j = 0; j < 16; ++j) b[k].qs[j] = (uint8_t)((q[k][j] & 0x0f) | (q[k][j + 16] & 0x0f) << 4);
    }
}

/* ---- IQ4_NL / IQ4_XS: 4-bit indices into ggml's 16 non-uniform values (iquant_nl.py) ---- */

#ifndef EQ_IQ4NL_VALUES
#error "EQ_IQ4NL_VALUES (ggml's kvalues_iq4nl) is passed in by native/build_native.py's COMPILE_ARGS"
#endif
/* The table as float constants (exact: small integers), so the vector searches splat them at compile time. */
static const float IQ4_VALUES[16] = {EQ_IQ4NL_VALUES};

/* iquant_nl.best_index (ggml's best_index_int8): the nearest value's index, a tie going up; at or below the first
 * value 0, at or above the last 15; NaN falls through the bisection to 15. */
static inline uint8_t iq4_index(float v) {
    if (v <= IQ4_VALUES[0]) return 0;
    if (v >= IQ4_VALUES[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < IQ4_VALUES[mid])
            hi = mid;
        else
            lo = mid;
    }
    return (uint8_t)(v - IQ4_VALUES[hi - 1] < IQ4_VALUES[hi] - v ? hi - 1 : hi);
}

/* The value iq4_index picks, on every lane: the neighbours below and above v by compares instead of a bisection
 * (a vector cannot branch per lane), then the same tie test and ends.  A NaN lane compares false everywhere and
 * keeps the top value, as iq4_index's bisection ends there. */
VECTOR_INLINE vf iq4_value(vf v) {
    vf below = vsplat(IQ4_VALUES[0]), above = vsplat(IQ4_VALUES[15]);
    for (int k = 1; k < 15; ++k) below = vselect(v >= vsplat(IQ4_VALUES[k]), vsplat(IQ4_VALUES[k]), below);
    for (int k = 14; k >= 1; --k) above = vselect(v < vsplat(IQ4_VALUES[k]), vsplat(IQ4_VALUES[k]), above);
    vf q = vselect(v - below < above - v, below, above);
    q = vselect(v >= vsplat(IQ4_VALUES[15]), vsplat(IQ4_VALUES[15]), q);
    return vselect(v <= vsplat(IQ4_VALUES[0]), vsplat(IQ4_VALUES[0]), q);
}

/* One trial grid of the search: sum(wt*q*x) and sum(wt*q*q), q the values nearest to iscale*x, (wt*q) first. */
VECTOR_INLINE void iq4_sums(const float *x, const float *w, vf iscale, vf *sumqx, vf *sumq2) {
    vf sqx = {0}, sq2 = {0};
    for (int i = 0; i < 32; ++i) {
        const vf v = vload(x + i * LANES), q = iq4_value(iscale * v), wq = vload(w + i * LANES) * q;
        sqx += wq * v;
        sq2 += wq * q;
    }
    *sumqx = sqx;
    *sumq2 = sq2;
}

/* iquant_nl.sub_block_scales (quantize_row_iq4_nl_impl's search) on LANES groups of 32 side by side: the first grid
 * from the peak, then the 15 trial grids (t - 127) / peak, the one with the largest sumqx^2 / sumq2 winning. */
static void search_iq4(const float *x, const float *w, float *scale_out) {
    const vf zero = {0};
    vf amax, peak, sumqx, sumq2;
    signed_peak_lanes(x, 32, &amax, &peak);
    vf d = -peak / vsplat(-127.0f);
    iq4_sums(x, w, vsplat(1.0f) / d, &sumqx, &sumq2);
    d = vselect(sumq2 > zero, sumqx / sumq2, zero);
    vf best = d * sumqx;
    for (int t = -7; t <= 7; ++t) {
        iq4_sums(x, w, vsplat((float)(t - 127)) / peak, &sumqx, &sumq2);
        const vi better = (sumq2 > zero) & (sumqx * sumqx > best * sumq2);
        d = vselect(better, sumqx / sumq2, d);
        best = vselect(better, d * sumqx, best);
    }
    vstore(scale_out, vselect(amax < vsplat(GROUP_MAX_EPS), zero, d)); /* zero groups divided by a zero peak */
}

/* iquant_nl.indices then pack_halves: 32 indices nearest to x * (1/scale) (1/0 -> 0), two per byte. */
static inline void iq4_codes(const float *x, float scale, uint8_t qs[16]) {
    const float inv = scale != 0 ? 1.0f / scale : 0.0f;
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(iq4_index(inv * x[j]) | iq4_index(inv * x[j + 16]) << 4);
}

/* wt for LANES groups of 32 side by side: x^2, or importance * sqrt(sigma2 + x^2) with sigma2 = sum(x^2) * 2/n
 * over each group's super-block of n (iquant_nl.importance_weights; the product 2/n last, as there). */
static inline void iq4_weights(const float *imp, const float *xt, int count, const float *sigma2, float *wt) {
    if (!imp) {
        for (int k = 0; k < 32 * LANES; ++k) wt[k] = xt[k] * xt[k];
        return;
    }
    side_by_side(imp, 32, 32, count, wt);
    for (int k = 0; k < 32 * LANES; ++k) wt[k] = wt[k] * sqrtf(sigma2[k % LANES] + xt[k] * xt[k]);
}

/* IQ4_NL (iq4_nl.IQ4_NL.fit), `count` <= LANES blocks: each block is its own super-block, so it weighs by its own
 * sum of squares, not the row's (the row's sigma2 the legacy fits share is not used). */
static void fit_iq4_nl(const float *x, const float *imp, float row_sigma2, int count, void *out) {
    (void)row_sigma2;
    float xt[32 * LANES], wt[32 * LANES], sigma2[LANES] = {0}, scale[LANES];
    side_by_side(x, 32, 32, count, xt);
    if (imp)
        for (int g = 0; g < count; ++g) sigma2[g] = sum_squares(x + 32 * g, 32) * (2.0f / 32.0f);
    iq4_weights(imp, xt, count, sigma2, wt);
    search_iq4(xt, wt, scale);
    eq_iq4_nl *b = out;
    for (int k = 0; k < count; ++k) {
        b[k].d = eq_float_to_half(scale[k]);
        iq4_codes(x + 32 * k, scale[k], b[k].qs); /* on the unrounded scale, as ggml */
    }
}

/* IQ4_XS super-block (iq4_xs.IQ4_XS.fit): the 8 sub-block scales by the search, LANES at a time, then
 * d = -s/32 for the signed scale s of largest magnitude (NaN never wins) and l = clamp(nearest_int(s_g / d)). */
static void fit_iq4_xs(const float *x, const float *imp, void *block) {
    eq_iq4_xs *b = block;
    float xt[32 * LANES], wt[32 * LANES], scales[8], sigma2[LANES];
    const float s2 = imp ? sum_squares(x, 256) * (2.0f / 256.0f) : 0.0f;
    for (int g = 0; g < LANES; ++g) sigma2[g] = s2;
    for (int j = 0; j < 8; j += LANES) {
        side_by_side(x + 32 * j, 32, 32, LANES, xt);
        iq4_weights(imp ? imp + 32 * j : NULL, xt, LANES, sigma2, wt);
        search_iq4(xt, wt, scales + j);
    }
    float amax = 0.0f, peak = 0.0f;
    for (int g = 0; g < 8; ++g)
        if (fabsf(scales[g]) > amax) {
            amax = fabsf(scales[g]);
            peak = scales[g];
        }
    const float d = -peak / 32.0f, inv = d != 0 ? 1.0f / d : 0.0f; /* -(+0)/32: an all-zero super-block stores -0 */
    uint16_t scales_h = 0;
    uint8_t ls[8];
    for (int g = 0; g < 8; ++g) {
        const int32_t l = clamp_int(nearest_int(inv * scales[g]), -32, 31);
        ls[g] = (uint8_t)(l + 32);
        scales_h |= (uint16_t)((ls[g] >> 4) << (2 * g));
        iq4_codes(x + 32 * g, d * (float)l, b->qs + 16 * g); /* on the unrounded d */
    }
    for (int k = 0; k < 4; ++k) b->scales_l[k] = (uint8_t)((ls[2 * k] & 15) | (ls[2 * k + 1] & 15) << 4);
    b->scales_h = scales_h;
    b->d = eq_float_to_half(d);
}

#include "fit_lattice.h"

/* ---- rows ---- */

typedef void (*super_block_fit)(const float *x, const float *imp, void *block);
typedef void (*legacy_fit)(const float *x, const float *imp, float sigma2, int count, void *blocks);

static super_block_fit super_block_fit_of(int type) {
    switch (type) {
    case EQ_Q2_K: return fit_q2_k;
    case EQ_Q3_K: return fit_q3_k;
    case EQ_Q4_K: return fit_q4_k;
    case EQ_Q5_K: return fit_q5_k;
    case EQ_Q6_K: return fit_q6_k;
    case EQ_IQ4_XS: return fit_iq4_xs;
    case EQ_IQ3_XXS: return fit_iq3_xxs;
    case EQ_IQ2_XXS: return fit_iq2_xxs;
    case EQ_IQ2_XS: return fit_iq2_xs;
    case EQ_IQ2_S: return fit_iq2_s;
    case EQ_IQ3_S: return fit_iq3_s;
    case EQ_IQ1_S: return fit_iq1_s;
    case EQ_IQ1_M: return fit_iq1_m;
    default: return NULL;
    }
}

static legacy_fit legacy_fit_of(int type) {
    switch (type) {
    case EQ_Q4_0: return fit_q4_0;
    case EQ_Q4_1: return fit_q4_1;
    case EQ_Q5_0: return fit_q5_0;
    case EQ_Q5_1: return fit_q5_1;
    case EQ_Q8_0: return fit_q8_0;
    case EQ_IQ4_NL: return fit_iq4_nl;
    default: return NULL;
    }
}

static int fit_supported(int type) { return super_block_fit_of(type) != NULL || legacy_fit_of(type) != NULL; }

/* eq_fit_rows (fit.h) in this translation unit's build. */
static int fit_rows(int type, const float *x, void *out, int64_t rows, int64_t n, const float *importance) {
    const int block = eq_block_size(type), size = eq_type_size(type);
    if (!fit_supported(type) || block <= 0 || n <= 0 || n % block) return -1;
    /* ggml has no unweighted IQ2_XXS/IQ2_XS/IQ1_S fit (the codecs refuse it); the lattice types need their neighbour lists */
    if ((type == EQ_IQ2_XXS || type == EQ_IQ2_XS || type == EQ_IQ1_S) && !importance) return -1;
    if ((type == EQ_IQ2_XXS || type == EQ_IQ2_XS || type == EQ_IQ2_S || type == EQ_IQ3_XXS || type == EQ_IQ3_S) &&
        !eq_lattice_book_of(type))
        return -1;
    if ((type == EQ_IQ1_S || type == EQ_IQ1_M) && !eq_lattice_book_of(EQ_IQ1_S)) return -1;
    const int64_t nb = n / block;
    const super_block_fit fit_k = super_block_fit_of(type);
    const legacy_fit fit_legacy = legacy_fit_of(type);
    uint8_t *dst = out;
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * n;
        if (fit_k) {
            for (int64_t i = 0; i < nb; ++i, dst += size) fit_k(row + i * block, importance ? importance + i * block : NULL, dst);
            continue;
        }
        /* the legacy importance fits weigh by the row's mean square */
        const float sigma2 = importance ? sum_squares(row, n) / (float)n : 0.0f;
        for (int64_t i = 0; i < nb; i += LANES) {
            const int count = nb - i < LANES ? (int)(nb - i) : LANES;
            fit_legacy(row + i * block, importance ? importance + i * block : NULL, sigma2, count, dst);
            dst += (int64_t)count * size;
        }
    }
    return 0;
}

#endif

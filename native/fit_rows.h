/* Block fits in C, the same float32 arithmetic as our numpy codecs (see fit.h).
 *
 * Each numpy search works element-major on many groups at once; here one group at a time, with the same steps:
 *
 *   numpy (convert/codecs)                     here
 *   search_affine.make_qkx2_quants (= qkx3)    search_affine     weighted (scale, min) search, grids with a min
 *   search_affine.make_qp_quants               search_qp         non-negative values to scale * L (super-block scales)
 *   search_symmetric.make_qx_quants            search_qx         weighted symmetric scale from 19 trial grids
 *   search_symmetric.make_q3_quants            search_q3         symmetric scale by coordinate descent on the codes
 *
 * What keeps the bytes equal: sums accumulate element after element from 0 (or from the first term where numpy's
 * in_order_sum(from_zero=False) does), products associate left to right as numpy evaluates them, nearest_int is
 * the 1.5 * 2^23 trick on the float's bits, float -> small int casts behave as numpy's on x86 (NaN and out of
 * range give INT_MIN, of which the low byte is kept), and each per-group branch tests numpy's mask condition
 * (NaN compares false).
 */

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

/* rint(v) for |v| <= 2^22, NaN and infinities kept; beyond, a value of the same sign past every clamp used here. */
static inline float round_even(float v) { return (v + MAGIC) - MAGIC; }

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

/* ---- grids with a min: w ~ scale * L - the_min, L in [0, nmax] ---- */

static inline void affine_levels(const float *x, int n, float lo, float iscale, int nmax, uint8_t *L) {
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)clamp_int(nearest_int((x[i] - lo) * iscale), 0, nmax);
}

/* sum_i w_i * |scale * L_i + offset - x_i| (mad) or its square. */
static inline float affine_error(const float *x, const float *w, int n, float scale, float offset, const uint8_t *L,
                                 int use_mad) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float diff = scale * (float)L[i] + offset - x[i];
        s += (use_mad ? fabsf(diff) : diff * diff) * w[i];
    }
    return s;
}

/* make_qkx2_quants (n <= 32): returns the scale; *the_min = -min >= 0; codes in L. */
static float search_affine(const float *x, const float *w, int n, int nmax, float rmin, float rdelta, int nstep,
                           int use_mad, float *the_min, uint8_t *L) {
    float lo = x[0], hi = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0.0f;
    if (!(hi > lo)) { /* flat group: codes 0, scale 0 */
        memset(L, 0, (size_t)n);
        *the_min = -lo;
        return 0.0f;
    }
    float iscale = (float)nmax / (hi - lo), scale = 1.0f / iscale;
    affine_levels(x, n, lo, iscale, nmax, L);
    float best = affine_error(x, w, n, scale, lo, L, use_mad);
    uint8_t cand[32];
    for (int step = 0; nstep >= 1 && step <= nstep; ++step) {
        /* rescaled from the current best min, which may have moved on an earlier step */
        iscale = (rmin + rdelta * (float)step + (float)nmax) / (hi - lo);
        affine_levels(x, n, lo, iscale, nmax, cand);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float l = (float)cand[i], wl = w[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {
            this_min = 0.0f;
            this_scale = sum_xl / sum_l2;
        }
        const float err = affine_error(x, w, n, this_scale, this_min, cand, use_mad);
        if (err < best) {
            memcpy(L, cand, (size_t)n);
            best = err;
            scale = this_scale;
            lo = this_min;
        }
    }
    *the_min = -lo;
    return scale;
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

/* make_qp_quants (n <= 16): returns the scale, codes in L (negative levels wrap as uint8). */
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
    int32_t code[16];
    float wx[16], sumlx = 0.0f, suml2 = 0.0f;
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

static inline float qx_level(float v, float lo, float hi) {
    float r = round_even(v);
    r = r < lo ? lo : r; /* NaN stays NaN, as np.maximum/np.minimum keep it */
    return r > hi ? hi : r;
}

static inline void qx_sums(const float *x, const float *w, const float *wx, int n, float iscale, int nmax,
                           float *sumlx, float *suml2) {
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    float slx = 0.0f, sl2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float l = qx_level(x[i] * iscale, lo, hi);
        slx += wx[i] * l;
        sl2 += w[i] * l * l;
    }
    *sumlx = slx;
    *suml2 = sl2;
}

/* make_qx_quants (n <= 32): returns the scale, codes l + nmax in L; all-zero groups give 0 and 0. */
static float search_qx(const float *x, const float *w, int n, int nmax, uint8_t *L) {
    float amax, peak, wx[32], sumlx, suml2;
    signed_peak(x, n, &amax, &peak);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    for (int i = 0; i < n; ++i) wx[i] = w[i] * x[i];
    float best_iscale = (float)-nmax / peak;
    qx_sums(x, w, wx, n, best_iscale, nmax, &sumlx, &suml2);
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int step = -9; step <= 9; ++step) {
        if (!step) continue;
        const float iscale = -((float)nmax + 0.1f * (float)step) / peak;
        qx_sums(x, w, wx, n, iscale, nmax, &sumlx, &suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            best_iscale = iscale;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    for (int i = 0; i < n; ++i) L[i] = low_byte(qx_level(x[i] * best_iscale, lo, hi) + (float)nmax);
    return scale;
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

static inline float sum_of(const float *x, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += x[i];
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

/* Q4_K/Q5_K super-block (kquant_scales.SixBitScaleMinCodec.fit): d, dmin, the 12 scale bytes, codes q[256]. */
static void fit_sixbit(const float *x, const float *imp, const sixbit_params *p, uint16_t *d16, uint16_t *dmin16,
                       uint8_t s[12], uint8_t q[256]) {
    float sub_scale[8], sub_min[8], weights[32];
    uint8_t ls[8], lm[8];
    if (!imp) { /* weights |x| + rms(sub-block); the largest scale and min set d and dmin */
        for (int j = 0; j < 8; ++j) {
            const float *xs = x + 32 * j;
            const float av_x = sqrtf(sum_squares(xs, 32) / 32.0f);
            for (int i = 0; i < 32; ++i) weights[i] = av_x + fabsf(xs[i]);
            sub_scale[j] = search_affine(xs, weights, 32, p->nmax, p->rmin, p->rdelta, p->nstep, 0, &sub_min[j],
                                         q + 32 * j);
        }
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
    } else { /* weights importance * sqrt(sigma2 + x^2); the 8 scales and mins by a weighted search */
        const float sigma2 = 2.0f * sum_squares(x, 256) / 256.0f;
        float sw[8];
        for (int j = 0; j < 8; ++j) {
            const float *xs = x + 32 * j;
            for (int i = 0; i < 32; ++i) weights[i] = imp[32 * j + i] * sqrtf(sigma2 + xs[i] * xs[i]);
            sub_scale[j] = search_affine(xs, weights, 32, p->nmax, -0.9f, 0.05f, 36, 0, &sub_min[j], q + 32 * j);
            sw[j] = sum_of(weights, 32);
        }
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

/* Q2_K super-block (q2_k.Q2KCodec.fit). */
static void fit_q2_k(const float *x, const float *imp, void *block) {
    eq_q2_K *b = block;
    float sub_scale[16], sub_min[16], weights[16];
    uint8_t q[256], byte[16];
    if (!imp) { /* weights |x|, absolute error; 4-bit scales and mins relative to the largest */
        for (int j = 0; j < 16; ++j) {
            const float *xs = x + 16 * j;
            for (int i = 0; i < 16; ++i) weights[i] = fabsf(xs[i]);
            sub_scale[j] = search_affine(xs, weights, 16, 3, -0.5f, 0.1f, 15, 1, &sub_min[j], q + 16 * j);
        }
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
    } else { /* weights importance * sqrt(sigma2 + x^2); the 16 scales and mins by a weighted search */
        const float sigma2 = sum_squares(x, 256) / 256.0f;
        float sw[16];
        uint8_t ls[16], lm[16];
        for (int j = 0; j < 16; ++j) {
            const float *xs = x + 16 * j;
            for (int i = 0; i < 16; ++i) weights[i] = imp[16 * j + i] * sqrtf(sigma2 + xs[i] * xs[i]);
            sw[j] = sum_of(weights, 16);
            sub_scale[j] = search_affine(xs, weights, 16, 3, -0.9f, 0.05f, 36, 0, &sub_min[j], q + 16 * j);
        }
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
        float weights[256], sw[16];
        uint8_t s6[16];
        for (int i = 0; i < 256; ++i) weights[i] = imp[i] * sqrtf(sigma2 + x[i] * x[i]);
        for (int j = 0; j < 16; ++j) {
            scales[j] = search_qx(x + 16 * j, weights + 16 * j, 16, 4, q + 16 * j);
            sw[j] = sum_of(weights + 16 * j, 16);
        }
        b->d = eq_float_to_half(search_qx(scales, sw, 16, 32, s6));
        for (int j = 0; j < 16; ++j) sc[j] = (int8_t)(s6[j] - 32);
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

/* Q6_K super-block (q6_k.Q6_K.fit). */
static void fit_q6_k(const float *x, const float *imp, void *block) {
    eq_q6_K *b = block;
    float weights[256], scales[16];
    uint8_t q[256];
    for (int i = 0; i < 256; ++i) weights[i] = imp ? imp[i] : x[i] * x[i];
    for (int j = 0; j < 16; ++j) scales[j] = search_qx(x + 16 * j, weights + 16 * j, 16, 32, q + 16 * j);
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

/* ---- 32-weight legacy types ---- */

/* Q8_0 (q8_0.Q8_0.fit): d = max|x| / 127, q = roundf(x / d); importance is ignored. */
static void fit_q8_0(const float *x, void *block) {
    eq_q8_0 *b = block;
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

/* Q4_0/Q5_0 codes u in [0, 2 nmax - 1] (q4_0.SymmetricLegacy): without importance d = peak / -nmax and
 * u = min(2 nmax - 1, (int8)(x / d + nmax + 0.5)); with it make_qx_quants under importance * sqrt(sigma2 + x^2),
 * sigma2 the row's mean square. */
static float fit_symmetric_legacy(const float *x, const float *imp, float sigma2, int nmax, uint8_t u[32]) {
    if (imp) {
        float weights[32];
        for (int i = 0; i < 32; ++i) weights[i] = imp[i] * sqrtf(sigma2 + x[i] * x[i]);
        return search_qx(x, weights, 32, nmax, u);
    }
    float amax, peak;
    signed_peak(x, 32, &amax, &peak);
    const float d = peak / (float)-nmax, inv = d != 0 ? 1.0f / d : 0.0f;
    const float bias = (float)nmax + 0.5f;
    for (int i = 0; i < 32; ++i) {
        const int8_t v = (int8_t)low_byte(x[i] * inv + bias);
        u[i] = (uint8_t)(v < 2 * nmax - 1 ? v : 2 * nmax - 1);
    }
    return d;
}

static void fit_q4_0(const float *x, const float *imp, float sigma2, void *block) {
    eq_q4_0 *b = block;
    uint8_t u[32];
    b->d = eq_float_to_half(fit_symmetric_legacy(x, imp, sigma2, 8, u));
    for (int j = 0; j < 16; ++j) b->qs[j] = (uint8_t)(u[j] | (uint8_t)(u[j + 16] << 4)); /* unmasked, as q4_0.pack */
}

static void fit_q5_0(const float *x, const float *imp, float sigma2, void *block) {
    eq_q5_0 *b = block;
    uint8_t u[32];
    uint32_t qh = 0;
    b->d = eq_float_to_half(fit_symmetric_legacy(x, imp, sigma2, 16, u));
    for (int j = 0; j < 32; ++j) qh |= (uint32_t)((u[j] >> 4) != 0) << j;
    memcpy(b->qh, &qh, 4);
    for (int j = 0; j < 16; ++j) b->qs[j] = (uint8_t)((u[j] & 0x0f) | (u[j + 16] & 0x0f) << 4);
}

/* Q4_1/Q5_1 (q4_1.LegacyMinCodec): d and m; without importance the min/max grid, codes (int8)(v + 0.5) kept as
 * each type's reference does (Q4_1: min(15, .), Q5_1: low 5 bits); with it make_qkx3_quants. */
static void fit_min_legacy(const float *x, const float *imp, float sigma2, int nmax, uint16_t *d16, uint16_t *m16,
                           uint8_t q[32]) {
    if (imp) {
        float weights[32], the_min;
        for (int i = 0; i < 32; ++i) weights[i] = imp[i] * sqrtf(sigma2 + x[i] * x[i]);
        *d16 = eq_float_to_half(search_affine(x, weights, 32, nmax, -0.9f, 0.05f, 36, 0, &the_min, q));
        *m16 = eq_float_to_half(-the_min);
        return;
    }
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    const float d = (hi - lo) / (float)nmax, inv = d != 0 ? 1.0f / d : 0.0f;
    for (int i = 0; i < 32; ++i) {
        const int8_t v = (int8_t)low_byte((x[i] - lo) * inv + 0.5f);
        q[i] = nmax == 15 ? (uint8_t)(v < 15 ? v : 15) : (uint8_t)v & 0x1f;
    }
    *d16 = eq_float_to_half(d);
    *m16 = eq_float_to_half(lo);
}

static void fit_q4_1(const float *x, const float *imp, float sigma2, void *block) {
    eq_q4_1 *b = block;
    uint8_t q[32];
    fit_min_legacy(x, imp, sigma2, 15, &b->d, &b->m, q);
    for (int j = 0; j < 16; ++j) b->qs[j] = (uint8_t)((q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4);
}

static void fit_q5_1(const float *x, const float *imp, float sigma2, void *block) {
    eq_q5_1 *b = block;
    uint8_t q[32];
    uint32_t qh = 0;
    fit_min_legacy(x, imp, sigma2, 31, &b->d, &b->m, q);
    for (int j = 0; j < 32; ++j) qh |= (uint32_t)((q[j] >> 4) & 1) << j;
    memcpy(b->qh, &qh, 4);
    for (int j = 0; j < 16; ++j) b->qs[j] = (uint8_t)((q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4);
}

/* ---- rows ---- */

typedef void (*super_block_fit)(const float *x, const float *imp, void *block);
typedef void (*legacy_fit)(const float *x, const float *imp, float sigma2, void *block);

static super_block_fit super_block_fit_of(int type) {
    switch (type) {
    case EQ_Q2_K: return fit_q2_k;
    case EQ_Q3_K: return fit_q3_k;
    case EQ_Q4_K: return fit_q4_k;
    case EQ_Q5_K: return fit_q5_k;
    case EQ_Q6_K: return fit_q6_k;
    default: return NULL;
    }
}

static legacy_fit legacy_fit_of(int type) {
    switch (type) {
    case EQ_Q4_0: return fit_q4_0;
    case EQ_Q4_1: return fit_q4_1;
    case EQ_Q5_0: return fit_q5_0;
    case EQ_Q5_1: return fit_q5_1;
    default: return NULL;
    }
}

int eq_fit_supported(int type) {
    return type == EQ_Q8_0 || super_block_fit_of(type) != NULL || legacy_fit_of(type) != NULL;
}

int eq_fit_rows(int type, const float *x, void *out, int64_t rows, int64_t n, const float *importance) {
    const int block = eq_block_size(type), size = eq_type_size(type);
    if (!eq_fit_supported(type) || block <= 0 || n <= 0 || n % block) return -1;
    const int64_t nb = n / block;
    uint8_t *dst = out;
    const super_block_fit fit_k = super_block_fit_of(type);
    const legacy_fit fit_legacy = legacy_fit_of(type);
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * n;
        /* the legacy importance fits weigh by the row's mean square */
        const float sigma2 = fit_legacy && importance ? sum_squares(row, n) / (float)n : 0.0f;
        for (int64_t i = 0; i < nb; ++i, dst += size) {
            const float *xb = row + i * block, *imp = importance ? importance + i * block : NULL;
            if (fit_k)
                fit_k(xb, imp, dst);
            else if (fit_legacy)
                fit_legacy(xb, imp, sigma2, dst);
            else
                fit_q8_0(xb, dst);
        }
    }
    return 0;
}

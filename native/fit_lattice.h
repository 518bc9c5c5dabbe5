/* The lattice i-quants' fits (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S; IQ1_S, IQ1_M below): convert/codecs/
 * lattice_search.py's search and the codecs' fit (iq2_xxs.py ... iq3_s.py, iq1_s.py, iq1_m.py), one sub-block at a time, every float32 operation the numpy code's
 * in its order (and so ggml's quantize_row_iq*_impl's, which the numpy docstrings follow).  Included by fit_rows.h,
 * after its helpers (nearest_int, search_qp).
 *
 * The numpy search runs every trial on many sub-blocks at once and keeps each sub-block's best with masks; here a
 * sub-block runs its trials in order and keeps the best with the same comparisons, which is the same computation per
 * sub-block.  Sub-blocks that numpy skips (`zero`) are not searched: numpy overwrites their results.  What is
 * vectorized is what numpy computes independently per candidate: a group's distances to its neighbours, LANES
 * neighbours at a time; the sums over a sub-block stay sequential. */

#ifndef EQ_FIT_LATTICE_H
#define EQ_FIT_LATTICE_H

#include <float.h>

#include "iq_grids.h"
#include "lattice_books.h"

enum { REFINE_OFF, REFINE_ALL_IF_OFF, REFINE_ALL }; /* lattice_search.search's `refine` */

/* clamp(nearest_int(0.5 * (iscale * xval - 1)), 0, kmax - 1) of each coordinate of a group, as the level vector u. */
static inline int group_u(const eq_lattice_book *b, const float *xv, float iscale) {
    int u = 0;
    for (int k = 0; k < b->dim; ++k) u |= clamp_int(nearest_int(0.5f * (iscale * xv[k] - 1.0f)), 0, b->kmax - 1) << (b->bits * k);
    return u;
}

/* lattice_search.nearest_points for one group: kmap[u], else the neighbour of least sum((waux * diff) * diff), diff
 * = scale * odd - xval (the first on a tie; a NaN distance counts as inf; none below FLT_MAX: the first).  *on: u is
 * a point.  The distances of LANES neighbours at a time (each lane one neighbour's sum, in coordinate order as
 * numpy's: the same float operations), from the book's padded coordinate-major lists. */
static inline int group_point(const eq_lattice_book *b, int u, const float *xv, const float *wa, float scale, int *on) {
    const int at = b->kmap[u];
    *on = at >= 0;
    if (at >= 0) return at;
    const uint16_t *nb = b->flat + b->start[u];
    const int padded = b->nb_padded[u], dim = b->dim;
    const float *q = b->nb_odd + b->nb_start[u];
    const vf vs = vsplat(scale);
    float best = INFINITY, d2[LANES];
    int pick = 0;
    for (int j = 0; j < padded; j += LANES) {
        vf acc = vsplat(0.0f);
        for (int k = 0; k < dim; ++k) {
            const vf diff = vs * vload(q + k * padded + j) - vsplat(xv[k]);
            acc += (vsplat(wa[k]) * diff) * diff;
        }
        vstore(d2, acc);
        for (int l = 0; l < LANES; ++l)
            if (d2[l] < best) { /* NaN never wins, as numpy's inf; the +inf padding neither */
                best = d2[l];
                pick = j + l;
            }
    }
    return nb[best < FLT_MAX ? pick : 0];
}

/* sumqx = sum((wt * xval) * q), sumq2 = sum((wt * q) * q) over the sub-block, in element order. */
static inline void lattice_sums(const eq_lattice_book *b, const float *xval, const float *wt, int n, const uint16_t *idx,
                                float *sumqx, float *sumq2) {
    float sx = 0.0f, s2 = 0.0f;
    for (int g = 0, i = 0; g < n / b->dim; ++g) { /* element order, without a division per element */
        const float *point = b->odd + idx[g] * b->dim;
        for (int k = 0; k < b->dim; ++k, ++i) {
            sx += wt[i] * xval[i] * point[k];
            s2 += wt[i] * point[k] * point[k];
        }
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* sequential_max: m = x[0]; m = m > x[i] ? m : x[i] (a NaN x[i] wins). */
static inline float lattice_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = m > x[i] ? m : x[i];
    return m;
}

/* lattice_search._search_chunk for one sub-block of n (<= 32) values: the scale (before the sign flip) and the point
 * indices of its n / dim groups.  peak/scale0: as numpy's (the caller passes max and max / top by default). */
static float lattice_search(const eq_lattice_book *b, const float *xval, const float *wt, int n, int tlo, int thi,
                            float step, int refine, float peak, float scale0, uint16_t *index) {
    const int groups = n / b->dim;
    const float top = (float)(2 * b->kmax - 1);
    float waux[32];
    for (int i = 0; i < n; ++i) waux[i] = sqrtf(wt[i]);
    float best = 0.0f, scale = scale0;
    int on[8];
    uint16_t idx[8];
    for (int g = 0; g < groups; ++g) {
        index[g] = (uint16_t)b->kmap[0]; /* levels 0, ggml's memset */
        on[g] = refine == REFINE_OFF;
    }
    for (int t = tlo; t <= thi; ++t) {
        const float iscale = (top + (float)t * step) / peak, this_scale = 1.0f / iscale;
        int on_t[8];
        for (int g = 0; g < groups; ++g) {
            const float *xv = xval + g * b->dim;
            idx[g] = (uint16_t)group_point(b, group_u(b, xv, iscale), xv, waux + g * b->dim, this_scale, &on_t[g]);
        }
        float sumqx, sumq2;
        lattice_sums(b, xval, wt, n, idx, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            for (int g = 0; g < groups; ++g) {
                index[g] = idx[g];
                on[g] = on_t[g];
            }
        }
    }
    int again = scale > 0;
    if (refine != REFINE_ALL) {
        int off = 0;
        for (int g = 0; g < groups; ++g) off |= !on[g];
        again = again && off;
    }
    if (again) {
        const float iscale = 1.0f / scale;
        for (int g = 0; g < groups; ++g) {
            if (refine == REFINE_OFF && on[g]) continue;
            const float *xv = xval + g * b->dim;
            int dummy;
            index[g] = (uint16_t)group_point(b, group_u(b, xv, iscale), xv, waux + g * b->dim, scale, &dummy);
        }
        float sumqx, sumq2;
        lattice_sums(b, xval, wt, n, index, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    return scale;
}

/* lattice_search.search_weights for one super-block: x*x without importance (plain_sigma: 0.25*sigma2 + x*x), else
 * imp * sqrt(sigma2 + x*x), sigma2 = (2*)sum(x*x)/256. */
static void lattice_weights(const float *x, const float *imp, int plain_sigma, int doubled, float *wt) {
    float x2[256];
    for (int i = 0; i < 256; ++i) x2[i] = x[i] * x[i];
    if (!imp && !plain_sigma) {
        memcpy(wt, x2, sizeof x2);
        return;
    }
    float sumx2 = 0.0f;
    for (int i = 0; i < 256; ++i) sumx2 += x2[i];
    const float sigma2 = (doubled ? 2.0f * sumx2 : sumx2) / 256.0f;
    for (int i = 0; i < 256; ++i) wt[i] = imp ? imp[i] * sqrtf(sigma2 + x2[i]) : 0.25f * sigma2 + x2[i];
}

/* lattice_search.even_signs for 8 weights: xval and the 7-bit sign index (an odd count of negatives flips the first
 * weight of least (wt*x)*x back). */
static inline uint8_t even_signs8(const float *x, const float *wt, float *xval) {
    int bits = 0, negs = 0, imin = 0;
    float least = wt[0] * x[0] * x[0];
    for (int i = 0; i < 8; ++i) {
        const int neg = !(x[i] >= 0);
        xval[i] = neg ? -x[i] : x[i];
        bits |= neg << i;
        negs += neg;
        if (i) {
            const float wx2 = wt[i] * x[i] * x[i];
            if (wx2 < least) {
                least = wx2;
                imin = i;
            }
        }
    }
    if (negs & 1) {
        xval[imin] = -xval[imin];
        bits ^= 1 << imin;
    }
    return (uint8_t)(bits & 127);
}

/* Sign bits per 8 weights (bit i: weight i negative, NaN counting as negative) and xval = |x| as numpy's where. */
static inline uint8_t plain_signs8(const float *x, float *xval) {
    int bits = 0;
    for (int i = 0; i < 8; ++i) {
        const int neg = !(x[i] >= 0);
        xval[i] = neg ? -x[i] : x[i];
        bits |= neg << i;
    }
    return (uint8_t)bits;
}

/* lattice_search.super_block_scales: max_scale (from 0), d = fp16(max_scale / 31 * fudge), 4-bit ls. */
static float lattice_scales(const float *scale, int count, float fudge, int use_fudge, uint16_t *dh, uint8_t *ls) {
    float max_scale = 0.0f;
    for (int g = 0; g < count; ++g) max_scale = max_scale > scale[g] ? max_scale : scale[g];
    const float d = max_scale / 31.0f;
    *dh = eq_float_to_half(use_fudge ? d * fudge : d);
    const float id = 1.0f / d;
    for (int g = 0; g < count; ++g) ls[g] = (uint8_t)clamp_int(nearest_int(0.5f * (id * scale[g] - 1.0f)), 0, 15);
    return max_scale;
}

static inline void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_u32(uint8_t *p, uint32_t v) {
    for (int k = 0; k < 4; ++k) p[k] = (uint8_t)(v >> (8 * k));
}

/* IQ3_XXS super-block (iq3_xxs.IQ3_XXS.fit), 98 bytes. */
static void fit_iq3_xxs(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ3_XXS);
    float wt[256], xval[256], scale[8];
    uint8_t signs[32], ls[8];
    uint16_t index[64], dh;
    lattice_weights(x, imp, 0, 1, wt);
    for (int j = 0; j < 32; ++j) signs[j] = even_signs8(x + 8 * j, wt + 8 * j, xval + 8 * j);
    for (int s = 0; s < 8; ++s) {
        const float *xv = xval + 32 * s, mx = lattice_max(xv, 32);
        uint16_t *ix = index + 8 * s;
        if (mx < 1e-8f) { /* GROUP_MAX_EPS_IQ3_XXS */
            scale[s] = 0.0f;
            for (int g = 0; g < 8; ++g) ix[g] = (uint16_t)b->kmap[0];
            for (int k = 0; k < 4; ++k) signs[4 * s + k] = 0;
            continue;
        }
        float sc = lattice_search(b, xv, wt + 32 * s, 32, -15, 15, 0.2f, REFINE_OFF, mx, mx / 15.0f, ix);
        if (sc < 0) { /* "should never happen" in ggml: flip the scale and the sign indices */
            sc = -sc;
            for (int k = 0; k < 4; ++k) signs[4 * s + k] = (uint8_t)(~signs[4 * s + k] & 127);
        }
        scale[s] = sc;
    }
    uint8_t *out = block;
    memset(out, 0, 98);
    const float max_scale = lattice_scales(scale, 8, 1.0125f, 1, &dh, ls);
    if (max_scale == 0) return; /* an all-zero super-block is stored as zeros */
    put_u16(out, dh);
    for (int j = 0; j < 64; ++j) out[2 + j] = (uint8_t)index[j];
    for (int s = 0; s < 8; ++s) {
        uint32_t aux = (uint32_t)ls[s] << 28;
        for (int k = 0; k < 4; ++k) aux |= (uint32_t)signs[4 * s + k] << (7 * k);
        put_u32(out + 66 + 4 * s, aux);
    }
}

/* The IQ2_XXS/IQ2_XS common part: importance required (fit_rows refuses NULL), weights with sigma2 = sum(x^2)/256,
 * even signs; n-weight sub-blocks; IQ2_XXS's first scale from make_qp_quants. */
static void iq2_even_sub_blocks(const eq_lattice_book *b, const float *x, const float *imp, int n, int xxs, float *scale,
                                uint8_t *signs, uint16_t *index) {
    float wt[256], xval[256];
    lattice_weights(x, imp, 0, 0, wt);
    for (int j = 0; j < 32; ++j) signs[j] = even_signs8(x + 8 * j, wt + 8 * j, xval + 8 * j);
    const int per = n / 8;
    for (int s = 0; s < 256 / n; ++s) {
        const float *xv = xval + n * s, *w = wt + n * s, mx = lattice_max(xv, n);
        uint16_t *ix = index + per * s;
        float sc = 0.0f, peak = mx, scale0 = mx / 5.0f;
        int zero = mx < GROUP_MAX_EPS;
        if (xxs) {
            uint8_t L[32];
            scale0 = search_qp(xv, w, n, 4, L); /* make_qp_quants(nmax 4) */
            peak = scale0 * 3.0f;
            zero = zero || peak <= 0;
        }
        if (!zero) {
            sc = lattice_search(b, xv, w, n, xxs ? -6 : -9, xxs ? 6 : 9, 0.1f, xxs ? REFINE_ALL : REFINE_OFF, peak,
                                scale0, ix);
            if (sc < 0) {
                sc = -sc;
                for (int k = 0; k < per; ++k) signs[per * s + k] = (uint8_t)(~signs[per * s + k] & 127);
            }
        } else {
            for (int k = 0; k < per; ++k) signs[per * s + k] = 0, ix[k] = 0;
        }
        scale[s] = sc;
    }
}

/* IQ2_XXS super-block (iq2_xxs.IQ2_XXS.fit), 66 bytes. */
static void fit_iq2_xxs(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ2_XXS);
    float scale[8];
    uint8_t signs[32], ls[8];
    uint16_t index[32], dh;
    iq2_even_sub_blocks(b, x, imp, 32, 1, scale, signs, index);
    uint8_t *out = block;
    memset(out, 0, 66);
    if (lattice_scales(scale, 8, 1.0f, 0, &dh, ls) == 0) return;
    put_u16(out, dh);
    for (int s = 0; s < 8; ++s) {
        uint32_t aux = (uint32_t)ls[s] << 28;
        for (int k = 0; k < 4; ++k) {
            out[2 + 8 * s + k] = (uint8_t)index[4 * s + k];
            aux |= (uint32_t)signs[4 * s + k] << (7 * k);
        }
        put_u32(out + 6 + 8 * s, aux);
    }
}

/* IQ2_XS super-block (iq2_xs.IQ2_XS.fit), 74 bytes. */
static void fit_iq2_xs(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ2_XS);
    float scale[16];
    uint8_t signs[32], ls[16];
    uint16_t index[32], dh;
    iq2_even_sub_blocks(b, x, imp, 16, 0, scale, signs, index);
    uint8_t *out = block;
    memset(out, 0, 74);
    if (lattice_scales(scale, 16, 1.0f, 0, &dh, ls) == 0) return;
    put_u16(out, dh);
    for (int j = 0; j < 32; ++j) put_u16(out + 2 + 2 * j, (uint16_t)(index[j] | (uint16_t)signs[j] << 9));
    for (int k = 0; k < 8; ++k) out[66 + k] = (uint8_t)(ls[2 * k] | ls[2 * k + 1] << 4);
}

/* IQ2_S super-block (iq2_s.IQ2_S.fit), 82 bytes. */
static void fit_iq2_s(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ2_S);
    float wt[256], xval[256], scale[16];
    uint8_t signs[32], ls[16];
    uint16_t index[32], dh;
    lattice_weights(x, imp, 1, 1, wt);
    for (int j = 0; j < 32; ++j) signs[j] = plain_signs8(x + 8 * j, xval + 8 * j);
    for (int s = 0; s < 16; ++s) {
        const float *xv = xval + 16 * s, mx = lattice_max(xv, 16);
        uint16_t *ix = index + 2 * s;
        if (mx < 1e-8f) { /* GROUP_MAX_EPS_IQ2_S: the search's kmap[0], signs as memset */
            scale[s] = 0.0f;
            ix[0] = ix[1] = (uint16_t)b->kmap[0];
            signs[2 * s] = signs[2 * s + 1] = 0;
            continue;
        }
        float sc = lattice_search(b, xv, wt + 16 * s, 16, -9, 9, 0.1f, REFINE_OFF, mx, mx / 5.0f, ix);
        if (sc < 0) { /* flip the scale and every sign bit */
            sc = -sc;
            signs[2 * s] = (uint8_t)~signs[2 * s];
            signs[2 * s + 1] = (uint8_t)~signs[2 * s + 1];
        }
        scale[s] = sc;
    }
    uint8_t *out = block;
    memset(out, 0, 82);
    /* a super-block whose scales are all 0 keeps d = 0 and ls = 0, its indices and signs written */
    if (lattice_scales(scale, 16, 0.9875f, 1, &dh, ls) != 0) {
        put_u16(out, dh);
        for (int k = 0; k < 8; ++k) out[74 + k] = (uint8_t)(ls[2 * k] | ls[2 * k + 1] << 4);
    }
    for (int j = 0; j < 32; ++j) {
        out[2 + j] = (uint8_t)index[j];
        out[34 + j] = signs[j];
        out[66 + j / 4] |= (uint8_t)(((index[j] >> 8) & 3) << (2 * (j % 4)));
    }
}

/* IQ3_S super-block (iq3_s.IQ3_S.fit), 110 bytes: after a skipped (all-zero) sub-block ggml's qs and signs land one
 * sub-block early (the codec's _shifted), qh stays by position. */
static void fit_iq3_s(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ3_S);
    float wt[256], xval[256], scale[8];
    uint8_t signs[32], ls[8];
    uint16_t index[64], dh;
    int zero[8];
    lattice_weights(x, imp, 0, 1, wt);
    for (int j = 0; j < 32; ++j) signs[j] = plain_signs8(x + 8 * j, xval + 8 * j);
    for (int s = 0; s < 8; ++s) {
        const float *xv = xval + 32 * s, mx = lattice_max(xv, 32);
        uint16_t *ix = index + 8 * s;
        zero[s] = mx == 0; /* ggml: `if (!max)` */
        if (zero[s]) {
            scale[s] = 0.0f;
            for (int g = 0; g < 8; ++g) ix[g] = (uint16_t)b->kmap[0];
            continue;
        }
        float sc = lattice_search(b, xv, wt + 32 * s, 32, -9, 9, 0.2f, REFINE_ALL_IF_OFF, mx, mx / 15.0f, ix);
        if (sc < 0) {
            sc = -sc;
            for (int k = 0; k < 4; ++k) signs[4 * s + k] = (uint8_t)~signs[4 * s + k];
        }
        scale[s] = sc;
    }
    uint8_t *out = block;
    memset(out, 0, 110);
    if (lattice_scales(scale, 8, 1.033f, 1, &dh, ls) != 0) {
        put_u16(out, dh);
        for (int k = 0; k < 4; ++k) out[106 + k] = (uint8_t)(ls[2 * k] | ls[2 * k + 1] << 4);
    }
    for (int j = 0; j < 64; ++j) out[66 + j / 8] |= (uint8_t)(((index[j] >> 8) & 1) << (j % 8));
    int slot = 0;
    for (int s = 0; s < 8; ++s) {
        if (zero[s]) continue;
        for (int g = 0; g < 8; ++g) out[2 + 8 * slot + g] = (uint8_t)index[8 * s + g];
        for (int k = 0; k < 4; ++k) out[74 + 4 * slot + k] = signs[4 * s + k];
        ++slot;
    }
}

/* ---- IQ1_S / IQ1_M (iq1_s.py, iq1_m.py): levels -1/0/1 shifted by +-delta, an exhaustive split search ---- */

#define IQ1_DELTA 0.125f

/* iq1_s.SHIFTED: the values of levels 0, 1, 2 under the + shift (negative 0) and the - shift (negative 1). */
static inline void iq1_values(int negative, float v[3]) {
    const float delta = negative ? -IQ1_DELTA : IQ1_DELTA;
    v[0] = -1 + delta, v[1] = delta, v[2] = 1 + delta;
}

/* numpy's float order (argsort kind="stable"): a before b, NaN last. */
static inline int sorts_before(float a, float b) { return a < b || (b != b && a == a); }

/* Stable ascending order of n <= 32 values (numpy's argsort(kind="stable"); glibc's qsort in ggml's build, a merge
 * sort, keeps equal values in order too). */
static void stable_order(const float *x, int n, int *order) {
    for (int i = 0; i < n; ++i) {
        int j = i;
        while (j > 0 && sorts_before(x[i], x[order[j - 1]])) {
            order[j] = order[j - 1];
            --j;
        }
        order[j] = i;
    }
}

/* iq1_s.split_levels: level (rank >= i1) + (rank >= i2) of each weight, back in the weights' own order. */
static void iq1_split_levels(const int *order, int n, int i1, int i2, int *levels) {
    for (int r = 0; r < n; ++r) levels[order[r]] = (r >= i1) + (r >= i2);
}

/* iq1_s.neighbours for one group of 8: kmap of its levels, else the neighbour of least sum((wt*diff)*diff), diff =
 * scale * v[level] - x (first on a tie; NaN as inf; none below FLT_MAX: the first). */
static int iq1_group_point(const eq_lattice_book *b, const int *levels, const float *x, const float *wt, float scale,
                           int negative, int *on) {
    int u = 0;
    for (int k = 0; k < 8; ++k) u |= levels[k] << (2 * k);
    const int at = b->kmap[u];
    *on = at >= 0;
    if (at >= 0) return at;
    /* LANES neighbours at a time (group_point's layout): v[level] = ((2l+1) - 1) * 0.5 - 1 + delta, exact, so the
     * very values of iq1_values; the +inf padding gives an inf or NaN distance, which never wins */
    const uint16_t *nb = b->flat + b->start[u];
    const int padded = b->nb_padded[u];
    const float *q = b->nb_odd + b->nb_start[u];
    const vf vs = vsplat(scale), delta = vsplat(negative ? -IQ1_DELTA : IQ1_DELTA);
    float best = INFINITY, d2[LANES];
    int pick = 0;
    for (int j = 0; j < padded; j += LANES) {
        vf acc = vsplat(0.0f);
        for (int k = 0; k < 8; ++k) {
            const vf v = (vload(q + k * padded + j) - vsplat(1.0f)) * vsplat(0.5f) - vsplat(1.0f) + delta;
            const vf diff = vs * v - vsplat(x[k]);
            acc += (vsplat(wt[k]) * diff) * diff;
        }
        vstore(d2, acc);
        for (int l = 0; l < LANES; ++l)
            if (d2[l] < best) {
                best = d2[l];
                pick = j + l;
            }
    }
    return nb[best < FLT_MAX ? pick : 0];
}

/* The points of a sub-block's n / 8 groups under per-group shifts, then the refit (`again`): sums (wt*q)*x and
 * (wt*q)*q; where a group was off the codebook and both sums are > 0, scale = sumqx / sumq2. */
static float iq1_points(const eq_lattice_book *b, const float *x, const float *wt, int n, const int *levels, float scale,
                        const int *negative, uint16_t *index) {
    int all_on = 1;
    for (int g = 0; g < n / 8; ++g) {
        int on;
        index[g] = (uint16_t)iq1_group_point(b, levels + 8 * g, x + 8 * g, wt + 8 * g, scale, negative[g], &on);
        all_on &= on;
    }
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int g = 0; g < n / 8; ++g) {
        float v[3];
        iq1_values(negative[g], v);
        const float *odd = b->odd + index[g] * 8;
        for (int k = 0; k < 8; ++k) {
            const float q = v[((int)odd[k] - 1) >> 1], wq = wt[8 * g + k] * q;
            sumqx += wq * x[8 * g + k];
            sumq2 += wq * q;
        }
    }
    return !all_on && sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* max |x| of a sub-block as sequential_max(abs). */
static inline float iq1_absmax(const float *x, int n) {
    float m = fabsf(x[0]);
    for (int i = 1; i < n; ++i) m = m > fabsf(x[i]) ? m : fabsf(x[i]);
    return m;
}

/* IQ1_S sub-block of 32 (IQ1_S._fit_chunk): returns 0 when no split was accepted (skipped), else the scale (> 0 or
 * NaN), the 4 indices, *negative: the shift is -delta. */
static int iq1_s_sub_block(const eq_lattice_book *b, const float *x, const float *wt, float *scale_out, uint16_t *index,
                           int *negative) {
    int order[32], levels[32];
    float sumx[33], sumw[33];
    stable_order(x, 32, order);
    sumx[0] = sumw[0] = 0.0f;
    for (int j = 0; j < 32; ++j) {
        sumx[j + 1] = sumx[j] + wt[order[j]] * x[order[j]];
        sumw[j + 1] = sumw[j] + wt[order[j]];
    }
    float best = -FLT_MAX, scale = iq1_absmax(x, 32);
    int bi1 = -1, bi2 = -1, shift = 0;
    for (int i1 = 0; i1 <= 32; ++i1) {
        const float a = sumx[i1] - sumx[0], aw = sumw[i1] - sumw[0];
        for (int i2 = i1; i2 <= 32; ++i2) {
            const float bx = sumx[i2] - sumx[i1], bw = sumw[i2] - sumw[i1];
            const float cx = sumx[32] - sumx[i2], cw = sumw[32] - sumw[i2];
            for (int neg = 0; neg < 2; ++neg) {
                float p[3];
                iq1_values(neg, p);
                const float sumqx = a * p[0] + bx * p[1] + cx * p[2];
                const float sumq2 = aw * p[0] * p[0] + bw * p[1] * p[1] + cw * p[2] * p[2];
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    bi1 = i1, bi2 = i2, shift = neg ? -1 : 1;
                }
            }
        }
    }
    if (!shift) return 0;
    iq1_split_levels(order, 32, bi1, bi2, levels);
    if (scale < 0) { /* flip the levels and the shift */
        for (int i = 0; i < 32; ++i) levels[i] = 2 - levels[i];
        scale = -scale;
        shift = -shift;
    }
    *negative = shift == -1;
    const int neg4[4] = {*negative, *negative, *negative, *negative};
    *scale_out = iq1_points(b, x, wt, 32, levels, scale, neg4, index);
    return 1;
}

/* IQ1_S super-block (iq1_s.IQ1_S.fit), 50 bytes; importance required (fit_rows refuses NULL). */
static void fit_iq1_s(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ1_S);
    float wt[256], scale[8];
    uint16_t index[32];
    int negative[8];
    lattice_weights(x, imp, 0, 1, wt);
    for (int s = 0; s < 8; ++s) {
        const float *xb = x + 32 * s;
        scale[s] = 0.0f, negative[s] = 0;
        if (iq1_absmax(xb, 32) < 1e-12f || !iq1_s_sub_block(b, xb, wt + 32 * s, &scale[s], index + 4 * s, &negative[s])) {
            scale[s] = 0.0f, negative[s] = 0; /* GROUP_MAX_EPS_IQ1_S, or no split: skipped */
            for (int k = 0; k < 4; ++k) index[4 * s + k] = 0;
        }
    }
    float max_scale = 0.0f;
    for (int s = 0; s < 8; ++s) max_scale = max_scale > scale[s] ? max_scale : scale[s];
    const float d = max_scale / 15.0f, id = 1.0f / d;
    const int unset = max_scale == 0; /* d, the scales and the shifts stay 0 */
    uint8_t *out = block;
    put_u16(out, unset ? 0 : eq_float_to_half(d * 1.125f));
    for (int s = 0; s < 8; ++s) {
        const int ls = unset ? 0 : clamp_int(nearest_int(0.5f * (id * scale[s] - 1.0f)), 0, 7);
        uint32_t qh = (uint32_t)ls << 12 | (uint32_t)(negative[s] && !unset) << 15;
        for (int k = 0; k < 4; ++k) {
            out[2 + 4 * s + k] = (uint8_t)index[4 * s + k];
            qh |= (uint32_t)(index[4 * s + k] >> 8) << (3 * k);
        }
        put_u16(out + 34 + 2 * s, (uint16_t)qh);
    }
}

/* IQ1_M sub-block of 16 (IQ1_M._fit_chunk): returns 0 when no split was accepted, else the scale, the 2 indices and
 * each group's shift (negative[2]). */
static int iq1_m_sub_block(const eq_lattice_book *b, const float *x, const float *wt, float *scale_out, uint16_t *index,
                           int *negative) {
    int order[16], levels[16];
    float px[2][17], pw[2][17];
    stable_order(x, 16, order);
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0.0f;
    for (int j = 0; j < 16; ++j) { /* each half's prefix sums advance only on its own weights */
        const int mine = order[j] >= 8;
        const float wx = wt[order[j]] * x[order[j]], ws = wt[order[j]];
        px[mine][j + 1] = px[mine][j] + wx, pw[mine][j + 1] = pw[mine][j] + ws;
        px[!mine][j + 1] = px[!mine][j], pw[!mine][j + 1] = pw[!mine][j];
    }
    float v[2][3], c1[2], c2[2], tx[2][2], tw[2][2]; /* [shift: 0 +, 1 -] and [half][shift] */
    for (int s = 0; s < 2; ++s) {
        iq1_values(s, v[s]);
        c1[s] = v[s][0] * v[s][0] - v[s][1] * v[s][1];
        c2[s] = v[s][1] * v[s][1] - v[s][2] * v[s][2];
        for (int h = 0; h < 2; ++h) {
            tx[h][s] = px[h][16] * v[s][2];
            tw[h][s] = pw[h][16] * v[s][2] * v[s][2];
        }
    }
    float best = -FLT_MAX, scale = iq1_absmax(x, 16);
    int bi1 = -1, bi2 = -1, bk = -1;
    for (int i1 = 0; i1 <= 16; ++i1) {
        for (int i2 = i1; i2 <= 16; ++i2) {
            float qx[2][2], q2[2][2];
            for (int h = 0; h < 2; ++h) {
                const float sx = px[h][i1] + px[h][i2];
                for (int s = 0; s < 2; ++s) {
                    qx[h][s] = tx[h][s] - sx;
                    q2[h][s] = tw[h][s] + pw[h][i1] * c1[s] + pw[h][i2] * c2[s];
                }
            }
            for (int k = 0; k < 4; ++k) { /* ggml's k: the shifts of the halves, +/+, +/-, -/+, -/- */
                const int s0 = k >> 1, s1 = k & 1;
                const float sumqx = qx[0][s0] + qx[1][s1], sumq2 = q2[0][s0] + q2[1][s1];
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    bi1 = i1, bi2 = i2, bk = k;
                }
            }
        }
    }
    if (bk < 0) return 0;
    iq1_split_levels(order, 16, bi1, bi2, levels);
    if (scale < 0) { /* flip the levels and both shifts */
        for (int i = 0; i < 16; ++i) levels[i] = 2 - levels[i];
        scale = -scale;
        bk = 3 - bk;
    }
    negative[0] = bk >= 2, negative[1] = bk & 1;
    *scale_out = iq1_points(b, x, wt, 16, levels, scale, negative, index);
    return 1;
}

/* IQ1_M super-block (iq1_m.IQ1_M.fit), 56 bytes. */
static void fit_iq1_m(const float *x, const float *imp, void *block) {
    const eq_lattice_book *b = eq_lattice_book_of(EQ_IQ1_S);
    float wt[256], scale[16];
    uint16_t index[32];
    int negative[32], ls[16];
    lattice_weights(x, imp, 0, 1, wt);
    for (int s = 0; s < 16; ++s) {
        const float *xb = x + 16 * s;
        if (iq1_absmax(xb, 16) < 1e-7f || !iq1_m_sub_block(b, xb, wt + 16 * s, &scale[s], index + 2 * s, negative + 2 * s)) {
            scale[s] = 0.0f; /* GROUP_MAX_EPS_IQ1_M, or no split: skipped */
            index[2 * s] = index[2 * s + 1] = 0;
            negative[2 * s] = negative[2 * s + 1] = 0;
        }
    }
    float max_scale = 0.0f;
    for (int s = 0; s < 16; ++s) max_scale = max_scale > scale[s] ? max_scale : scale[s];
    float d = max_scale / 15.0f;
    const float id = 1.0f / d;
    for (int s = 0; s < 16; ++s) ls[s] = clamp_int(nearest_int(0.5f * (id * scale[s] - 1.0f)), 0, 7);
    /* the refit of d over the super-block: q = v * (2*ls + 1), sums in weight order */
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int g = 0; g < 32; ++g) {
        float v[3];
        iq1_values(negative[g], v);
        const float *odd = b->odd + index[g] * 8, m = 2.0f * (float)ls[g / 2] + 1.0f;
        for (int k = 0; k < 8; ++k) {
            const float q = v[((int)odd[k] - 1) >> 1] * m, wq = wt[8 * g + k] * q;
            sumqx += wq * x[8 * g + k];
            sumq2 += wq * q;
        }
    }
    if (sumq2 > 0) d = sumqx / sumq2;
    const int unset = max_scale == 0; /* d, the scales and the shift bits stay 0 */
    const uint16_t dh = unset ? 0 : eq_float_to_half(d * 1.1125f);
    uint8_t *out = block;
    for (int g = 0; g < 32; ++g) out[g] = (uint8_t)index[g];
    for (int s = 0; s < 16; ++s) {
        uint8_t qh = 0;
        for (int h = 0; h < 2; ++h)
            qh |= (uint8_t)((((index[2 * s + h] >> 8) & 7) | (negative[2 * s + h] && !unset) << 3) << (4 * h));
        out[32 + s] = qh;
    }
    for (int k = 0; k < 4; ++k) {
        uint32_t sc = (uint32_t)((dh >> (4 * k)) & 15) << 12;
        for (int m = 0; m < 4; ++m) sc |= (uint32_t)(unset ? 0 : ls[4 * k + m]) << (3 * m);
        put_u16(out + 48 + 2 * k, (uint16_t)sc);
    }
}

#endif

/* eq_lattice_book_of (lattice_books.h): the neighbour lists of lattice_search.codebook, computed in C from the
 * generated level vectors (iq_grids.h) the first time a fit asks for them. */

#include "lattice_books.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "iq_grids.h"
#include "kernels.h"

typedef struct {
    int type, size, dim, kmax, bits, nwant;
    const uint16_t *u;
    pthread_once_t once;
    eq_lattice_book book;
    int ok;
} book_slot;

/* (levels per coordinate, bits, nwant) as lattice_search.CODEBOOKS (ggml's init). */
static book_slot SLOTS[] = {
    {EQ_IQ2_XXS, 256, 8, 3, 2, 2, eq_iq2xxs_u, PTHREAD_ONCE_INIT, {0}, 0},
    {EQ_IQ2_XS, 512, 8, 3, 2, 2, eq_iq2xs_u, PTHREAD_ONCE_INIT, {0}, 0},
    {EQ_IQ2_S, 1024, 8, 3, 2, 1, eq_iq2s_u, PTHREAD_ONCE_INIT, {0}, 0},
    {EQ_IQ3_XXS, 256, 4, 8, 3, 2, eq_iq3xxs_u, PTHREAD_ONCE_INIT, {0}, 0},
    {EQ_IQ3_S, 512, 4, 8, 3, 3, eq_iq3s_u, PTHREAD_ONCE_INIT, {0}, 0},
    {EQ_IQ1_S, 2048, 8, 3, 2, 3, eq_iq1s_u, PTHREAD_ONCE_INIT, {0}, 0}, /* IQ1_M's too: the same grid */
};
#define NSLOTS ((int)(sizeof SLOTS / sizeof SLOTS[0]))
#define MAX_D2 784 /* the largest squared distance between level vectors: IQ3_*, 4 * 14^2 (IQ2_*, IQ1_S: 8 * 4^2) */

static void build(book_slot *s) {
    const int dim = s->dim, bits = s->bits, size = s->size, kmax = s->kmax;
    const int nu = 1 << (bits * dim), mask = (1 << bits) - 1;
    int16_t *kmap = malloc(sizeof *kmap * (size_t)nu);
    int32_t *start = calloc((size_t)nu, sizeof *start);
    uint16_t *count = calloc((size_t)nu, sizeof *count);
    float *odd = malloc(sizeof *odd * (size_t)size * (size_t)dim);
    /* int16 (every distance <= MAX_D2): the loops over p vectorize in SSE2, which has no 32-bit multiply */
    int16_t *d2 = malloc(sizeof *d2 * (size_t)size);
    int16_t *pod = malloc(sizeof *pod * (size_t)size * (size_t)dim); /* 2l + 1, coordinate-major */
    size_t cap = 1 << 16, used = 0;
    uint16_t *flat = malloc(sizeof *flat * cap);
    if (!kmap || !start || !count || !odd || !d2 || !pod || !flat) goto fail;
    for (int u = 0; u < nu; ++u) kmap[u] = -1;
    for (int p = 0; p < size; ++p) {
        kmap[s->u[p]] = (int16_t)p;
        for (int k = 0; k < dim; ++k) {
            pod[k * size + p] = (int16_t)(2 * ((s->u[p] >> (bits * k)) & mask) + 1);
            odd[p * dim + k] = (float)pod[k * size + p];
        }
    }
    /* every level vector the rounding can produce (each level in [0, kmax)) that is not a point */
    int total = 1;
    for (int k = 0; k < dim; ++k) total *= kmax;
    for (int e = 0; e < total; ++e) {
        int u = 0, rest = e, lev[8];
        for (int k = 0; k < dim; ++k, rest /= kmax) {
            lev[k] = rest % kmax;
            u |= lev[k] << (bits * k);
        }
        if (kmap[u] >= 0) continue;
        for (int p = 0; p < size; ++p) d2[p] = 0;
        for (int k = 0; k < dim; ++k) {
            const int16_t c = (int16_t)(2 * lev[k] + 1), *col = pod + k * size;
            for (int p = 0; p < size; ++p) d2[p] = (int16_t)(d2[p] + (c - col[p]) * (c - col[p]));
        }
        /* the nwant smallest distinct distances, then the points at each, in index order: (distance, index), by
         * counting (a distance is at most dim * (2 * kmax - 2)^2 <= MAX_D2) */
        int hist[MAX_D2 + 1] = {0};
        for (int p = 0; p < size; ++p) hist[d2[p]]++;
        int first[MAX_D2 + 1], taken = 0, n_keep = 0, cutoff = -1;
        for (int d = 0; d <= MAX_D2 && taken < s->nwant; ++d)
            if (hist[d]) {
                first[d] = n_keep;
                n_keep += hist[d];
                cutoff = d;
                ++taken;
            }
        while (used + (size_t)n_keep > cap) {
            uint16_t *grown = realloc(flat, sizeof *flat * (cap *= 2));
            if (!grown) goto fail;
            flat = grown;
        }
        start[u] = (int32_t)used;
        for (int p = 0; p < size; ++p)
            if (d2[p] <= cutoff && hist[d2[p]]) flat[used + first[d2[p]]++] = (uint16_t)p;
        used += (size_t)n_keep;
        count[u] = (uint16_t)n_keep;
    }
    free(d2), free(pod);
    d2 = pod = NULL;
    /* the padded coordinate-major copy of every list */
    int32_t *nb_start = calloc((size_t)nu, sizeof *nb_start);
    uint16_t *nb_padded = calloc((size_t)nu, sizeof *nb_padded);
    size_t floats = 0;
    if (!nb_start || !nb_padded) goto fail_nb;
    for (int u = 0; u < nu; ++u) {
        nb_start[u] = (int32_t)floats;
        nb_padded[u] = (uint16_t)((count[u] + EQ_NB_PAD - 1) / EQ_NB_PAD * EQ_NB_PAD);
        floats += (size_t)nb_padded[u] * (size_t)dim;
    }
    float *nb_odd = malloc(sizeof *nb_odd * (floats ? floats : 1));
    if (!nb_odd) goto fail_nb;
    for (int u = 0; u < nu; ++u)
        for (int k = 0; k < dim; ++k)
            for (int j = 0; j < nb_padded[u]; ++j)
                nb_odd[nb_start[u] + k * nb_padded[u] + j] = j < count[u] ? odd[flat[start[u] + j] * dim + k] : INFINITY;
    s->book = (eq_lattice_book){dim, kmax, bits, size, kmap, start, count, flat, odd, nb_start, nb_padded, nb_odd};
    s->ok = 1;
    return;
fail_nb:
    free(nb_start), free(nb_padded);
fail:
    free(kmap), free(start), free(count), free(odd), free(d2), free(pod), free(flat);
}

#define ONCE(i) \
    static void build_##i(void) { build(&SLOTS[i]); }
ONCE(0)
ONCE(1)
ONCE(2)
ONCE(3)
ONCE(4)
ONCE(5)
static void (*const BUILDERS[NSLOTS])(void) = {build_0, build_1, build_2, build_3, build_4, build_5};

const eq_lattice_book *eq_lattice_book_of(int type) {
    for (int i = 0; i < NSLOTS; ++i)
        if (SLOTS[i].type == type) {
            pthread_once(&SLOTS[i].once, BUILDERS[i]);
            return SLOTS[i].ok ? &SLOTS[i].book : NULL;
        }
    return NULL;
}

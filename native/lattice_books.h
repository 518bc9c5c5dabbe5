/* The lattice i-quants' codebooks as the fits search them (convert/codecs/lattice_search.py's `Codebook`): each
 * point's odd levels 2l+1, the point of every level vector u (kmap) and, for each u off the codebook, ggml's
 * neighbour list (iq2xs_init_impl / iq3xs_init_impl): the points at the nwant smallest distinct squared distances
 * from 2u+1, by (distance, index).  Derived from iq_grids.h (gguf-py's grids) at first use, once per process. */

#ifndef EQ_LATTICE_BOOKS_H
#define EQ_LATTICE_BOOKS_H

#include <stdint.h>

typedef struct {
    int dim, kmax, bits, size; /* coordinates per point, levels per coordinate, bits per level in u, points */
    const int16_t *kmap;       /* 1 << (bits * dim): the point of u, -1 off the codebook */
    const int32_t *start;      /* per u: its neighbours are flat[start[u] .. start[u] + count[u]) */
    const uint16_t *count;
    const uint16_t *flat;
    const float *odd; /* size * dim: 2l + 1 */
    /* the same neighbours' 2l + 1, coordinate-major per list, for searches over EQ_NB_PAD neighbours at a time: u's
     * coordinate k of neighbour j at nb_odd[nb_start[u] + k * nb_padded[u] + j], nb_padded[u] = count[u] rounded up
     * to EQ_NB_PAD, the padding +inf (a distance that is inf or NaN, never below a real one) */
    const int32_t *nb_start;
    const uint16_t *nb_padded;
    const float *nb_odd;
} eq_lattice_book;

#define EQ_NB_PAD 8 /* the widest vector of fit_lattice.h's searches (AVX: 8 float lanes) */

/* The book of `type` (EQ_IQ2_XXS, EQ_IQ2_XS, EQ_IQ2_S, EQ_IQ3_XXS, EQ_IQ3_S, EQ_IQ1_S: level l is the value
 * l - 1, and IQ1_M uses it too), built on first use (thread-safe);
 * NULL for other types or if memory ran out. */
const eq_lattice_book *eq_lattice_book_of(int type);

#endif

/* Checkpoint loading: bf16 -> float32 with the NaN/Inf count in the same pass. */

#ifndef EQ_WIDEN_H
#define EQ_WIDEN_H

#include <stdint.h>

/* out[i] = the float32 of bf16 in[i] (exact: bf16 is float32's upper half); returns how many are NaN or Inf.
 * `in` may also be the upper half of out's bytes, in == (const uint16_t *)out + n (widening in place). */
int64_t eq_bf16_to_f32(const uint16_t *in, float *out, int64_t n);

#endif

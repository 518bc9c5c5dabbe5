/* bf16 -> float32 (widen.h): a shift per value, and a count of all-ones exponents, in a loop the compiler
 * vectorizes.  Runs without the GIL (cffi), so the next tensor converts while the current one encodes.
 *
 * In place too: the bf16 values may be the upper half of out's own bytes (in == (uint16_t *)out + n), as when the
 * file is read straight into the float32 buffer.  Each chunk of input is copied aside before its outputs are
 * written; those end at byte 4(s + m) <= 2n + 2(s + m), where the inputs not yet read begin, so nothing unread is
 * overwritten. */

#include <string.h>

#include "widen.h"

int64_t eq_bf16_to_f32(const uint16_t *in, float *out, int64_t n) {
    enum { CHUNK = 4096 };
    uint16_t chunk[CHUNK];
    int64_t bad = 0;
    for (int64_t s = 0; s < n; s += CHUNK) {
        const int m = n - s < CHUNK ? (int)(n - s) : CHUNK;
        memcpy(chunk, in + s, (size_t)m * sizeof *chunk);
        for (int i = 0; i < m; ++i) {
            const uint32_t bits = (uint32_t)chunk[i] << 16;
            memcpy(out + s + i, &bits, 4);
            bad += (chunk[i] & 0x7f80u) == 0x7f80u;
        }
    }
    return bad;
}

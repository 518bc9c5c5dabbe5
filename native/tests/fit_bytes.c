/* Fit harness: the bytes eq_fit_rows writes (the fastest build this CPU runs), for tests that run it under
 * another architecture's emulator (tests/test_fit_conformance.py: AArch64's NEON build under qemu-user).
 *
 *   fit_bytes TYPE ROWS N WEIGHTS.f32 (IMPORTANCE.f32 | -) > BLOCKS.bin
 *
 * WEIGHTS: ROWS x N float32, IMPORTANCE: N float32 (native byte order); exit status 1 on any error. */

#include <stdio.h>
#include <stdlib.h>

#include "fit.h"
#include "kernels.h"

static void *read_all(const char *path, size_t bytes) {
    FILE *f = fopen(path, "rb");
    void *p = malloc(bytes ? bytes : 1);
    if (!f || !p || fread(p, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path);
        exit(1);
    }
    fclose(f);
    return p;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s TYPE ROWS N WEIGHTS.f32 IMPORTANCE.f32|-\n", argv[0]);
        return 1;
    }
    const int type = atoi(argv[1]);
    const long long rows = atoll(argv[2]), n = atoll(argv[3]);
    const int block = eq_block_size(type), size = eq_type_size(type);
    if (block <= 0 || n % block) return 1;
    const size_t out_bytes = (size_t)rows * (size_t)(n / block) * (size_t)size;
    float *x = read_all(argv[4], (size_t)(rows * n) * sizeof(float));
    float *imp = argv[5][0] == '-' ? NULL : read_all(argv[5], (size_t)n * sizeof(float));
    unsigned char *out = malloc(out_bytes ? out_bytes : 1);
    if (!out || eq_fit_rows(EQ_ISA_BEST, type, x, out, rows, n, imp) != 0) return 1;
    return fwrite(out, 1, out_bytes, stdout) == out_bytes ? 0 : 1;
}

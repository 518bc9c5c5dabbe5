"""cffi (API mode) builder for `edgequant.native._kernels`, the C kernels in this directory.

setup.py names it in `cffi_modules`, so `pip install` compiles the extension; setup.py's build_ext adds
SOURCE_FLAGS to their one source each (the AVX2 files alone get -mavx2 -mfma -mf16c, so the rest runs on any
x86-64).  Paths are relative to the repository root, where builds run.  gguf-py is needed at build time (pyproject's
build-system requires it): the IQ4 value table comes from it.
"""

import platform
from pathlib import Path

from cffi import FFI
from gguf.quants import IQ4_NL

HERE = Path("native")
SOURCES = [str(HERE / name) for name in ("dispatch.c", "scalar.c", "avx2.c", "neon.c", "fit.c", "fit_avx2.c", "widen.c")]
HEADERS = [str(HERE / name) for name in ("blocks.h", "dequant.h", "kernels.h", "fit.h", "fit_rows.h", "widen.h")]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
SOURCE_FLAGS = {str(HERE / name): ["-mavx2", "-mfma", "-mf16c"] for name in ("avx2.c", "fit_avx2.c")} if X86_64 else {}
# ggml's kvalues_iq4nl (the 16 int8 values an IQ4_NL/IQ4_XS index selects), handed to the C sources from gguf-py,
# where the numpy codecs (convert/codecs/iquant_nl.py) read it too, so no second copy is typed out in C.
IQ4NL_VALUES = tuple(int(v) for v in IQ4_NL.kvalues)
DEFINES = ["-DEQ_IQ4NL_VALUES=" + ",".join(map(str, IQ4NL_VALUES))]
# -ffp-contract=off: the kernels reproduce ggml's float rounding, so only the fusions they write may happen.
COMPILE_ARGS = ["-O3", "-std=gnu99", "-ffp-contract=off", "-pthread", *DEFINES]

# The public API of kernels.h, fit.h and widen.h (cffi cannot parse the header's preprocessor lines, so it is restated here).
CDEF = """
int eq_isa_available(int isa);
int eq_isa_best(void);
int eq_activation_type(int type);
int eq_block_size(int type);
int eq_type_size(int type);
int eq_dequantize_row(int isa, int type, const void *blocks, float *out, int64_t n);
int eq_quantize_row(int isa, int act_type, const float *x, void *blocks, int64_t n);
int eq_vec_dot(int isa, int type, int n, const void *weights, const void *activations, float *out);
int eq_dot_rows(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
                const void *activations, float *out);
int eq_matmul(int isa, int type, int n, int64_t rows, const void *weights, size_t row_stride,
              int64_t m, const float *x, float *y, int n_threads);
int eq_fit_supported(int type);
int eq_fit_rows(int isa, int type, const float *x, void *out, int64_t rows, int64_t n_per_row,
                const float *importance);
int64_t eq_bf16_to_f32(const uint16_t *in, float *out, int64_t n);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "edgequant.native._kernels",
    '#include "kernels.h"\n#include "fit.h"\n#include "widen.h"',
    sources=SOURCES,
    depends=HEADERS,
    include_dirs=[str(HERE)],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

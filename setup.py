"""Only what pyproject.toml cannot say: build the C kernels in native/ through cffi (`cffi_modules`).

On x86-64 build_ext compiles only native/avx2.c and native/fit_avx2.c with -mavx2 -mfma -mf16c
(native/build_native.py's SOURCE_FLAGS), so the rest (the scalar fallbacks and the dispatch) still runs on CPUs
without AVX2; it stops with a plain message when there is no C compiler.
"""

import runpy
import shutil

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, SetupError

SOURCE_FLAGS = runpy.run_path("native/build_native.py")["SOURCE_FLAGS"]

NO_COMPILER = (
    "edgequant needs a C compiler to build its native kernels (native/*.c), and {cc!r} was not found. Install one "
    "(Debian/Ubuntu: apt-get install build-essential; Fedora: dnf install gcc; macOS: xcode-select --install) or set "
    "CC to it, then install again."
)
COMPILE_FAILED = (
    "building edgequant's native kernels (native/*.c) failed: {error}. They need a C99 compiler with the x86 AVX2 "
    "or Arm NEON intrinsics (gcc >= 8 or clang >= 7)."
)


class BuildNative(build_ext):
    def build_extensions(self):
        driver = getattr(self.compiler, "compiler_so", None)
        if driver and shutil.which(driver[0]) is None:
            raise SetupError(NO_COMPILER.format(cc=driver[0]))
        try:
            super().build_extensions()
        except (CCompilerError, CompileError, ExecError, LinkError) as e:
            raise SetupError(COMPILE_FAILED.format(error=e)) from e

    def build_extension(self, ext):
        flagged = {src: flags for src, flags in SOURCE_FLAGS.items() if src in ext.sources}
        if flagged and self.compiler.compiler_type == "unix":
            for src, flags in flagged.items():
                ext.extra_objects = [*ext.extra_objects, *self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros, include_dirs=ext.include_dirs,
                    debug=self.debug, extra_postargs=[*ext.extra_compile_args, *flags], depends=ext.depends)]
            ext.sources = [src for src in ext.sources if src not in flagged]
        super().build_extension(ext)


setup(cmdclass={"build_ext": BuildNative}, cffi_modules=["native/build_native.py:ffibuilder"])

#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) from the llama.cpp sources vendored in the
# sdist of the installed llama-cpp-python, into .cache/llama-tools/bin: the references edgequant is measured against.
# Same CPU flags as the README's install line (no -march=native: AMX faults on some CPUs that advertise it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${LLAMA_TOOLS_DIR:-$root/.cache/llama-tools}
ver=$(python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
src=$dest/llama_cpp_python-$ver/vendor/llama.cpp
if [ ! -d "$src" ]; then
  mkdir -p "$dest/sdist"
  pip download --quiet --no-deps --no-binary :all: -d "$dest/sdist" "llama-cpp-python==$ver"
  tar xzf "$dest/sdist/llama_cpp_python-$ver.tar.gz" -C "$dest"
fi
cmake -S "$src" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON >/dev/null
cmake --build "$dest/build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity
mkdir -p "$dest/bin"
cp "$dest"/build/bin/llama-{quantize,imatrix,perplexity} "$dest/bin/"
echo "$dest/bin"

#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for scripts/gpu_bench_a_kld.sh on a lent GPU machine that has torch/transformers but
# none of our other dependencies and no network: pure-Python wheels, bench-a (xz, to fit the 64 MiB carry limit),
# the texts, and llama.cpp's sources trimmed to what llama-perplexity/llama-quantize/llama-imatrix need.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd); g=$root/.gpu; shared=$root/../shared
grep -qx ".gpu/" "$root/.git/info/exclude" 2>/dev/null || echo ".gpu/" >> "$root/.git/info/exclude"
mkdir -p "$g/wheels" "$g/bench-a"
pip download -q --no-deps -d "$g/wheels" gguf rich markdown-it-py mdurl
pip download -q --no-deps -d "$g/wheels-test" pytest pluggy iniconfig  # scripts/gpu_tests.sh
# cffi for the native extension (carried as native/_kernels.abi3.so, built here): the image's CPython 3.12
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d "$g/wheels" cffi pycparser
cp "$shared"/models/bench-a/{config.json,generation_config.json,tokenizer.json,tokenizer.model,tokenizer_config.json} "$g/bench-a/"
[ -f "$g/model.safetensors.xz" ] || xz -T2 -6 -c "$shared/models/bench-a/model.safetensors" > "$g/model.safetensors.xz"
cp "$shared/data/wikitext-2/wiki.train.first1MB.txt" "$shared/data/wikitext-2/wiki.test.raw" "$shared/data/corpus/heldout.txt" "$g/"
src=$(ls -d "$root"/.cache/llama-tools/llama_cpp_python-*/vendor/llama.cpp | tail -1)  # from scripts/build_llama_tools.sh
t=$(mktemp -d); mkdir -p "$t/llama.cpp/tools"
cp -r "$src"/{CMakeLists.txt,cmake,ggml,src,common,include,vendor,licenses} "$t/llama.cpp/"
cp -r "$src"/tools/{perplexity,quantize,imatrix} "$t/llama.cpp/tools/"
printf 'add_subdirectory(perplexity)\nadd_subdirectory(quantize)\nadd_subdirectory(imatrix)\n' > "$t/llama.cpp/tools/CMakeLists.txt"
(cd "$t/llama.cpp/ggml/src" && rm -rf ggml-sycl ggml-vulkan ggml-opencl ggml-hexagon ggml-metal ggml-et ggml-cann ggml-musa ggml-zdnn ggml-webgpu ggml-openvino ggml-virtgpu ggml-zendnn ggml-rpc ggml-blas ggml-hip)
tar cJf "$g/lt.tar.xz" -C "$t" llama.cpp && rm -rf "$t"
du -sh "$g"

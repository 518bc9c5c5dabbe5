#!/usr/bin/env bash
# The tests that need a CUDA device (skipped in CI), on a lent GPU machine that has torch/transformers/triton but none
# of our other dependencies and no network: edgequant and the wheels of scripts/prepare_gpu_carry.sh (plus pytest's,
# in .gpu/wheels-test) go into /tmp/pkg, then pytest runs the CUDA cases (-k) of the files that have them.
#   device run: bash scripts/gpu_tests.sh   (carry: .gpu native/_kernels.abi3.so)   -> $OUT/pytest.txt
# GPU_TESTS_K overrides the selection (default: every test whose id names cuda, and the reduced-precision
# calibration test); libggml byte checks skip there (no llama-cpp-python), after the comparison with the numpy spec.
set -u
R=$(pwd); P=/tmp/pkg; rm -rf $P && mkdir -p $P
cp -r edgequant $P/ && cp -r convert $P/edgequant/convert && cp -r runners $P/edgequant/runners && cp -r native $P/edgequant/native
(cd $P && for w in $R/.gpu/wheels/*.whl $R/.gpu/wheels-test/*.whl; do python3 -m zipfile -e $w .; done)
# from /tmp/pkg: `python -m pytest` puts the working directory first on sys.path, and the checkout's edgequant/ (without
# convert/ inside, which the package layout adds) must not shadow the assembled one
cd $P && PYTHONPATH=$P python3 -m pytest -q -p no:cacheprovider -rs --rootdir $R -k "${GPU_TESTS_K:-cuda or reduced_precision}" \
  $R/tests/test_fit_conformance.py $R/tests/test_gptq_solver.py $R/tests/test_layerwise.py $R/tests/test_triton_solver.py 2>&1 | tee ${OUT:-/tmp}/pytest.txt | tail -30

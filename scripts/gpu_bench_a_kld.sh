#!/usr/bin/env bash
# Run on the lent H200 from the repo root, with .gpu/ prepared by scripts/prepare_gpu_carry.sh and carried:
#   device run: bash scripts/gpu_bench_a_kld.sh   (carry: .gpu)   -> $OUT/results.tgz
# Builds llama.cpp tools with CUDA; GPTQ builds of bench-a (edgequant) and llama-quantize --imatrix builds (imatrix by
# llama-imatrix, as ../shared/anchors/METHOD.md), then KLD vs the F16 on wiki.test.raw and heldout.txt, all on the GPU.
# Knobs (environment): KLD_FTYPES (default the five of issue 5), KLD_TEXTS (wiki.test.raw heldout.txt),
# KLD_VARIANTS: GPTQ builds as "TAG=build options" separated by ';' (default "g=": the defaults), each built per ftype
# as TAG-FTYPE.gguf and evaluated next to the imatrix build i-FTYPE.gguf; KLD_CALIB: calibration options put before
# every variant's (default: wiki.train.first1MB.txt, 256 windows of 512; set it empty to compare calibrations, e.g.
# KLD_CALIB= KLD_VARIANTS='w=--calib \$G/wiki.train.first1MB.txt --calib-samples 256 --calib-seqlen 512;s=--calib self');
# a variant's options may say {ftype} for the ftype it is built for (e.g. 'ga=--target auto:{ftype}');
# KLD_SWEEP: more builds as "TAG=build options" separated by ';', each built once as TAG.gguf (no --target: for
# budgets, e.g. 'b4=--bpw 4'), with KLD_CALIB too, evaluated beside the others.
# KLD_JOBS: builds, and evaluations, run this many side by side (default 1, as the timings in BENCHMARKS.md were taken;
# bench-a leaves the H200 mostly idle, and 3 keeps a calibration table within the device's 10 minutes per command).
# llama.cpp's tools and the GGUFs are built once per lent machine (kept in /tmp/w while it stays warm), so a table
# too long for one command is finished by running the same command again at once. KLD_RETURN_GGUF=1: the first
# variant's and the imatrix Q4_K_M files come back in 15 MB parts.
set -u
FTYPES=${KLD_FTYPES:-Q4_K_M Q3_K_M Q2_K Q5_K_M Q6_K}; TEXTS=${KLD_TEXTS:-wiki.test.raw heldout.txt}
CALIB=${KLD_CALIB-'--calib $G/wiki.train.first1MB.txt --calib-samples 256 --calib-seqlen 512'}
IFS=';' read -ra VARIANTS <<< "${KLD_VARIANTS:-g=}"; TAGS=$(for v in "${VARIANTS[@]}"; do printf '%s ' "${v%%=*}"; done)
JOBS=${KLD_JOBS:-1}
R=$(pwd); G=$R/.gpu; W=/tmp/w; S=$W/res; mkdir -p $S /tmp/pkg /tmp/a
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg
trap 'cd $W && tar czf $OUT/results.tgz res; [ -n "${KLD_RETURN_GGUF:-}" ] && for f in i-Q4_K_M.gguf ${TAGS%% *}-Q4_K_M.gguf; do [ -f $W/$f ] && split -b 15M $W/$f $OUT/$f.part; done' EXIT
log() { echo "[$(date +%T)] $*" | tee -a $S/run.log; }
cp -r edgequant /tmp/pkg/; cp -r convert /tmp/pkg/edgequant/convert; cp -r runners /tmp/pkg/edgequant/runners
(cd /tmp/pkg && for w in $G/wheels/*.whl; do python3 -m zipfile -e $w .; done)
cp $G/bench-a/* /tmp/a/; python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$G/model.safetensors.xz'), open('/tmp/a/model.safetensors','wb'))"
[ -x $W/b/bin/llama-perplexity ] && echo 0 > $W/built || (cd $W && rm -f built && tar xJf $G/lt.tar.xz && cmake -S llama.cpp -B b -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release > cmake.log 2>&1 && cmake --build b -j 14 --target llama-perplexity llama-quantize llama-imatrix > make.log 2>&1; echo $? > built) &
TOOLS=$!
slot() { while [ $(jobs -rp | grep -vxc "$TOOLS") -ge $JOBS ]; do wait -n; done; }  # a free place for one more job
cd /tmp
[ -f $W/a-F16.gguf ] || python3 -m edgequant.cli build /tmp/a --target F16 -o $W/a-F16.gguf -q
build() {  # NAME OPTIONS: NAME.gguf built with OPTIONS (after $CALIB)
  local name=$1 o=$2; eval "local opts=($CALIB $o)"  # options may name the carried texts as \$G/...
  [ -f $W/$name.gguf ] && { log "kept $name.gguf (built by an earlier command on this machine)"; return; }
  python3 -m edgequant.cli build /tmp/a "${opts[@]}" --json -o $W/$name.gguf > $S/build-$name.json 2>>$S/run.log
  log "gptq built $name ($o): rc $?"
}
NAMES=
for v in "${VARIANTS[@]}"; do
  for t in $FTYPES; do
    o=${v#*=}; slot; build ${v%%=*}-$t "--target $t ${o//\{ftype\}/$t}" &
  done
done
IFS=';' read -ra SWEEP <<< "${KLD_SWEEP:-}"
for v in "${SWEEP[@]}"; do slot; build ${v%%=*} "${v#*=}" & NAMES="$NAMES ${v%%=*}"; done
while [ $(jobs -rp | grep -vxc "$TOOLS") -gt 0 ]; do wait -n; done
while [ ! -f $W/built ]; do sleep 5; done; log "tools built: $(cat $W/built)"; tail -3 $W/make.log >> $S/run.log
B=$W/b/bin
$B/llama-imatrix -m $W/a-F16.gguf -f $G/wiki.train.first1MB.txt -c 512 --chunks 256 -ngl 999 -o $W/imatrix.gguf > $S/imatrix.log 2>&1
for t in $FTYPES; do $B/llama-quantize --imatrix $W/imatrix.gguf $W/a-F16.gguf $W/i-$t.gguf $t 8 > /dev/null 2>&1; done
log "imatrix builds done"; ls -la $W/*.gguf >> $S/run.log
for text in $TEXTS; do
  [ -f $W/base-$text.kld ] || $B/llama-perplexity -m $W/a-F16.gguf -f $G/$text -c 512 --chunks 300 -ngl 999 --kl-divergence-base $W/base-$text.kld > $S/f16-$text.log 2>&1
  log "base $text: $(grep 'Final estimate' $S/f16-$text.log)"
  for f in $(for t in $FTYPES; do for k in $TAGS i; do echo $k-$t; done; done) $NAMES; do
    grep -q 'Mean    KLD' $S/kld-$f-$text.log 2>/dev/null && continue  # measured by an earlier command here
    slot; ( $B/llama-perplexity -m $W/$f.gguf -f $G/$text -c 512 --chunks 300 -ngl 999 --kl-divergence-base $W/base-$text.kld --kl-divergence > $S/kld-$f-$text.log 2>&1
      log "$f $text: $(grep -E 'Mean PPL\(Q\)|Mean    KLD|Same top p' $S/kld-$f-$text.log | tr -s ' ' | tr '\n' ' ')" ) &
  done
  wait
done

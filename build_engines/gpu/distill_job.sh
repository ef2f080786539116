#!/usr/bin/env bash
# Distil the PDN-S and PDN-M teachers on a lent GPU (H100: torch 2.11 CUDA, no internet, no pip registry).
#
# The lead runs, from the repository root on this machine (carry = the ImageNet samples + Lite0 weights):
#   run(command="bash build_engines/gpu/distill_job.sh", carry=[".carry"], timeout_s=600)
# after:
#   cp -r /work/shared/data/generic/imagenet_samples .carry/imagenet
#   cp <efficientnet-lite0 .pth> .carry/efficientnet-lite0.pth     (fp16 copy is fine: cast to fp32 on load)
#
# Options (defaults in brackets):
#   --data DIR             [.carry/imagenet]
#   --weights FILE         [.carry/efficientnet-lite0.pth]
#   --out DIR              [$OUT, else ./distill_out]   gets teacher_<s|m>.pth + .json + distill_<s|m>.log
#   --work DIR             [/tmp/edgead_distill]        target cache (~7 GB) and checkpoints (never under $OUT)
#   --sizes "s m"          [s m]                        PDN sizes, in this order
#   --time-budget-s N      [190]                        wall-clock budget per size; the step count is set from
#                                                       a timed warm-up inside edgead distill (--time-budget-s)
#   --batch-size B         [16]                         paper: 16
#   --image-size S         [256]                        PDN input; the backbone sees 2S
#   --device D             [cuda]                       cpu only to try the script out on a CPU machine
# Total GPU wall time with the defaults: ~2 x 190 s + ~20 s start-up, i.e. under 7 minutes.
set -uo pipefail

DATA=.carry/imagenet
WEIGHTS=.carry/efficientnet-lite0.pth
DEST=${OUT:-distill_out}
WORK=/tmp/edgead_distill
SIZES="s m"
BUDGET=190
BATCH=16
IMAGE=256
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --weights) WEIGHTS=$2; shift 2 ;;
    --out) DEST=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --time-budget-s) BUDGET=$2; shift 2 ;;
    --batch-size) BATCH=$2; shift 2 ;;
    --image-size) IMAGE=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) echo "distill_job.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$ROOT/sdk:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
mkdir -p "$DEST" "$WORK"

for f in "$DATA" "$WEIGHTS"; do
  [ -e "$f" ] || { echo "distill_job.sh: missing $f (carry .carry with the ImageNet folder and the Lite0 .pth)" >&2; exit 2; }
done

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)"
  "$PY" -c "import cv2; print('cv2', cv2.__version__)" 2>/dev/null || "$PY" -c "import PIL; print('Pillow', PIL.__version__, '(no cv2)')"
  echo "images: $(find "$DATA" -type f | wc -l) in $DATA"
} 2>&1 | tee "$DEST/env.txt"

status=0
for size in $SIZES; do
  echo "=== PDN-$size: budget ${BUDGET}s, batch $BATCH, image $IMAGE ==="
  "$PY" -m build_engines.efficientad.distill \
      --data "$DATA" --backbone efficientnet-lite0 --backbone-weights "$WEIGHTS" \
      --out "$WORK/teacher_$size.pth" --size "$size" --device "$DEVICE" \
      --image-size "$IMAGE" --batch-size "$BATCH" --steps 60000 --time-budget-s "$BUDGET" \
      --checkpoint-every 2000 --cache-dir "$WORK/cache_lite0_$IMAGE" --overwrite 2>&1 | tee "$DEST/distill_$size.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "PDN-$size failed with exit code $rc" | tee -a "$DEST/distill_$size.log"; status=1; continue; fi
  cp "$WORK/teacher_$size.pth" "$WORK/teacher_$size.json" "$DEST/"
  # the written file loads through the public loader and gives finite features
  "$PY" -c "
import sys, torch
from build_engines.efficientad.teacher import load_teacher
t = load_teacher('$size', '$DEST/teacher_$size.pth').to('$DEVICE')
y = t(torch.randn(2, 3, $IMAGE, $IMAGE, device='$DEVICE'))
print('load_teacher ok', tuple(y.shape), 'finite', bool(torch.isfinite(y).all()), 'std %.3f' % float(y.std()))
" 2>&1 | tee -a "$DEST/distill_$size.log"
done
ls -la "$DEST"
exit $status

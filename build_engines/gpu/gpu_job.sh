#!/usr/bin/env bash
# One call on a lent GPU for the kernels + pipeline work (issues: CUDA kernels, GPU validation):
#   1. kernels/postprocess/gpu_job.sh: build for the device, gpu tests, compute-sanitizer, kernel timings
#   2. build_engines/gpu/pipeline_bench.py: EfficientAD-S/M end-to-end timings + FP16-vs-FP32 on real runs
# Usage (repository root, on the GPU machine): bash build_engines/gpu/gpu_job.sh [RUN_DIR:TEST_DIR ...]
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/sdk:$PWD" EDGEAD_KERNELS_DIR="$PWD/build/lib"
bash kernels/postprocess/gpu_job.sh; krc=$?
python3 build_engines/gpu/pipeline_bench.py --out "$OUT" --real "$@" 2>&1 | tee "$OUT/pipeline_bench.log"; prc=${PIPESTATUS[0]}
echo "kernels job rc=$krc, pipeline bench rc=$prc"
[ "$krc" -eq 0 ] && [ "$prc" -eq 0 ]

#!/usr/bin/env bash
# Lent-GPU job for the post-processing kernels (build sm_90, GPU tests, compute-sanitizer, benchmark).
# Usage from the repository root:  bash kernels/postprocess/gpu_job.sh   (results under $OUT, default ./gpu_out)
# Also prepares `make test-gpu` there: a venv over the system site-packages (no registry needed).
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="$(command -v python3)"
python3 kernels/postprocess/gpu_validate.py --out "$OUT" --arch "${EDGEAD_CUDA_ARCHS:-90}"
rc=$?
# `make test-gpu` on this machine: reuse the system Python (torch, cupy, cuda-bindings, pytest) through a
# --system-site-packages venv, mark it installed so make does not try to pip install, and find edgead via PYTHONPATH.
if [ ! -x .venv/bin/python ]; then "$PY" -m venv --system-site-packages --without-pip .venv && touch .venv/.installed; fi
PYTHONPATH="$PWD/sdk:$PWD" EDGEAD_REQUIRE_KERNELS=1 timeout 300 make test-gpu > "$OUT/make_test_gpu.log" 2>&1
mrc=$?
echo "make test-gpu: rc=$mrc (log: $OUT/make_test_gpu.log)"; tail -n 3 "$OUT/make_test_gpu.log"
[ "$rc" -eq 0 ] && [ "$mrc" -eq 0 ]

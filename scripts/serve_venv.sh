#!/usr/bin/env bash
# Build the `edgead serve` environment: PyTriton (Triton Inference Server 2.51 + its Python backend) pins numpy<2,
# so the server gets a venv of its own; the rest of EdgeAD keeps numpy 2 in .venv.
# The venv is made from the *system* Python: with a pyenv-built interpreter the Triton Python backend stub links the
# system libpython and fails ('_thread.RLock' object has no attribute '_recursion_count').
# Usage: scripts/serve_venv.sh [VENV=.venv-serve] [PYTHON=/usr/bin/python3]
set -euo pipefail
VENV="${1:-.venv-serve}"
PY="${2:-/usr/bin/python3}"
skip() {
  echo "serve-venv: skipped: $1 (the Triton tests skip; EDGEAD_REQUIRE_SERVE=1 makes them fail)" >&2
  exit 0
}
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || skip "nvidia-pytriton has wheels for x86_64 and aarch64 only"
# sed reads all of ldd's output: `head -1` could close the pipe early, and with pipefail the SIGPIPE'd ldd
# turned a good "2.36" into "2.36\n0.0" (the serve environment was then skipped at random)
glibc="$(ldd --version 2>/dev/null | sed -nE '1s/.* ([0-9]+\.[0-9]+)$/\1/p')"
glibc="${glibc:-0.0}"
[ "$(printf '%s\n2.35\n' "$glibc" | sort -V | head -1)" = 2.35 ] || skip "glibc $glibc < 2.35 (Triton 2.51 needs 2.35+: Ubuntu 22.04, Debian 12 or newer)"
[ -x "$PY" ] || skip "no system Python at $PY (make serve-venv SERVE_PYTHON=/usr/bin/python3.X)"
"$PY" -c 'import sys, venv, ensurepip; assert (3, 8) <= sys.version_info[:2] <= (3, 12)' 2>/dev/null \
  || skip "$PY is not Python 3.8-3.12 with venv/ensurepip (apt install python3-venv)"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-serve.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c 'import pytriton, numpy, onnxruntime, cv2, edgead.serve; print("serve-venv: ready:", pytriton.__name__, "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__)'
touch "$VENV/.installed"

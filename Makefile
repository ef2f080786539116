# EdgeAD: two commands on a fresh machine.
#   make demo   - set up everything, then run the end-to-end demo on the embedded synthetic data
#   make test   - set up everything, build the kernels, lint, type-check and run the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := build
JOBS   ?= 2

.PHONY: all venv serve-venv kernels lint typecheck test test-gpu demo bench soak loadtest clean

all: test

$(STAMP): requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# GigE Vision (edgead[camera]) when the system libs are there (scripts/ci_camera_setup.sh installs them)
	if pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null; then $(PY) -m pip install -q "PyGObject<3.51"; fi
	touch $(STAMP)

venv: $(STAMP)

# `edgead serve` (Triton via PyTriton, which pins numpy<2) in a venv of its own from the system Python.
SERVE_VENV   := .venv-serve
SERVE_PYTHON ?= /usr/bin/python3
$(SERVE_VENV)/.installed: requirements-serve.txt setup.py scripts/serve_venv.sh
	bash scripts/serve_venv.sh $(SERVE_VENV) $(SERVE_PYTHON)

serve-venv: $(SERVE_VENV)/.installed

# CUDA library when nvcc is present (compiled for the architectures in CMakeLists.txt), host twin always.
kernels:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

lint: venv
	$(VENV)/bin/ruff check sdk build_engines tests samples scripts

# TensorRT cannot be installed here: its calls are checked against tensorrt-stubs (see scripts/trt_stubs.py).
typecheck: venv
	$(PY) scripts/trt_stubs.py $(BUILD)/typestubs
	MYPYPATH=$(BUILD)/typestubs $(VENV)/bin/mypy sdk/edgead build_engines/trt_build.py

test: venv serve-venv kernels lint typecheck
	$(PY) -m pytest -q -m "not gpu"

# On a machine with an NVIDIA GPU: the CUDA kernels against the NumPy reference.
test-gpu: venv kernels
	EDGEAD_REQUIRE_GPU=1 EDGEAD_REQUIRE_KERNELS=1 $(PY) -m pytest -q -m gpu

demo: venv
	$(VENV)/bin/edgead demo --out demo_out

bench: venv
	$(VENV)/bin/edgead bench demo_out/bundle --precision fp32,int8 --torch-baseline demo_out/run --json bench_out/bench.json

# Minutes, not in CI: the camera loop on the GigE simulator with periodic camera kills; memory and fds sampled.
soak: venv
	mkdir -p bench_out
	$(PY) scripts/soak.py --bundle demo_out/bundle --frames 3000 --fps 10 --kill-every 60 --json bench_out/soak.json

# Minutes, not in CI: 8 simulated cameras against `edgead serve` on the demo bundle, with and without dynamic batching.
loadtest: venv serve-venv
	mkdir -p bench_out
	$(PY) samples/loadtest.py --serve demo_out/bundle --cameras 8 --duration 60 --compare-batching --json bench_out/loadtest.json

clean:
	rm -rf $(BUILD) demo_out bench_out

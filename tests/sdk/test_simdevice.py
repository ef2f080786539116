"""The simulated device's doubles follow the real APIs: every fake CUDA runtime function has the signature of
the installed ``cuda.bindings.runtime``, and every method of the fake TensorRT classes exists in the
``tensorrt-stubs`` 10.13 with the same parameter names. A double that drifted from the API it stands for
would let a wrong call pass in CI."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import simdevice.cudart as fake_rt
import simdevice.tensorrt as fake_trt

REPO = Path(__file__).resolve().parents[2]


def test_fake_cuda_runtime_functions_have_the_real_signatures() -> None:
    from cuda.bindings import runtime as real  # pinned dev dependency (cuda-python)

    for name in fake_rt.API:
        ours = [p for p in inspect.signature(getattr(fake_rt.SimulatedRuntime, name)).parameters if p != "self"]
        theirs = list(inspect.signature(getattr(real, name)).parameters)
        assert ours == theirs, f"{name}: ours {ours}, cuda-bindings {theirs}"
    for enum_name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode"):
        real_enum, fake_enum = getattr(real, enum_name), getattr(fake_rt, enum_name)
        for member in fake_enum:
            assert int(getattr(real_enum, member.name)) == int(member), f"{enum_name}.{member.name}"
    assert int(real.cudaStreamNonBlocking) == fake_rt.cudaStreamNonBlocking


@pytest.fixture(scope="module")
def stub_classes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    """class -> method/property -> parameter names, from the patched tensorrt-stubs (scripts/trt_stubs.py)."""
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run([sys.executable, str(REPO / "scripts" / "trt_stubs.py"), str(out)], check=True, capture_output=True)
    tree = ast.parse((out / "tensorrt_bindings" / "tensorrt.pyi").read_text())
    classes: dict[str, dict[str, list[str]]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members: dict[str, list[str]] = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    args = [a.arg for a in item.args.args if a.arg != "self"]
                    members.setdefault(item.name, args)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[item.target.id] = []
            classes[node.name] = members
    return classes


FAKE_CLASSES = ["Builder", "INetworkDefinition", "IBuilderConfig", "IOptimizationProfile", "ITimingCache", "OnnxParser", "ITensor", "ILayer", "Runtime",
                "ICudaEngine", "IExecutionContext", "Logger", "ParserError"]


@pytest.mark.parametrize("cls", FAKE_CLASSES)
def test_fake_tensorrt_classes_are_subsets_of_the_stubs(stub_classes: dict[str, dict[str, list[str]]], cls: str) -> None:
    stub = stub_classes[cls]
    fake = getattr(fake_trt, cls)
    for name, member in vars(fake).items():
        if name.startswith("_") or name in ("Severity", "INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"):
            continue
        assert name in stub, f"{cls}.{name} is not in tensorrt-stubs 10.13"
        if inspect.isfunction(member):
            ours = [p for p in inspect.signature(member).parameters if p != "self"]
            assert ours == stub[name][: len(ours)], f"{cls}.{name}: ours {ours}, stubs {stub[name]}"


def test_the_enums_and_functions_the_backend_uses_exist_in_the_stubs(stub_classes: dict[str, dict[str, list[str]]]) -> None:
    for enum_name, members in (("DataType", ("FLOAT", "HALF", "INT8")), ("TensorIOMode", ("INPUT", "OUTPUT")), ("BuilderFlag", ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")),
                               ("MemoryPoolType", ("WORKSPACE",))):
        for m in members:
            assert m in stub_classes[enum_name], f"{enum_name}.{m}"
    assert importlib.util.find_spec("simdevice") is not None

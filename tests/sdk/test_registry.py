from __future__ import annotations

import pytest

from edgead.errors import ConfigError, EdgeADError, InternalError, MissingDependencyError
from edgead.registry import BACKENDS, check_choice, family_spec


def test_choices_are_case_insensitive_and_typos_get_suggestions() -> None:
    assert check_choice("backend", " TensorRT ", BACKENDS) == "tensorrt"
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        check_choice("backend", "onnxruntim", BACKENDS)
    with pytest.raises(ConfigError, match="one of auto, tensorrt, onnxruntime"):
        check_choice("backend", "zzz", BACKENDS)


def test_planned_families_are_reserved_but_refused() -> None:
    assert family_spec("efficientad").sizes == ("s", "m")
    assert family_spec("uniad", require_available=False).name == "uniad"
    assert family_spec("PatchCore").sizes == ("base",)
    with pytest.raises(ConfigError, match="planned"):
        family_spec("grad")


def test_error_hierarchy() -> None:
    err = MissingDependencyError("onnxruntime", "cpu", "ONNX Runtime backend")
    assert isinstance(err, EdgeADError) and isinstance(err, ImportError)
    assert "pip install 'edgead[cpu]'" in str(err)
    assert not issubclass(InternalError, EdgeADError)

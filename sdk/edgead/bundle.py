"""The bundle: the on-disk contract between the toolchain (``build_engines``) and the runtime.

A bundle is a directory (or a ``.tar`` of one) holding::

    manifest.json          schema version, family, input spec, variants, post-processing constants,
                           threshold, file hashes, engines, producer versions
    model_merged.onnx      ONNX with the post-processing in the graph (outputs anomaly_map, score)
    model_raw.onnx         ONNX with the three network outputs (teacher, student, autoencoder)
    *.engine               zero or more pure TensorRT plans (no bytes prepended)

Loading validates everything and refuses with a message that says how to fix it.
The full format reference is ``docs/bundle.md``.

>>> from edgead.bundle import load_bundle            # doctest: +SKIP
>>> bundle = load_bundle("demo_out/bundle")           # doctest: +SKIP
>>> bundle.manifest.input.image_size                  # doctest: +SKIP
256
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError, ConfigError, message
from .postprocess import EfficientADPost, QuantileAffine
from .registry import FAMILIES, PRECISIONS
from .tiling import Tiling

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "VARIANT_OUTPUTS",
    "InputSpec",
    "VariantSpec",
    "PostprocessSpec",
    "ClassSpec",
    "ThresholdSpec",
    "Producer",
    "FileEntry",
    "EngineEntry",
    "Manifest",
    "Platform",
    "Bundle",
    "write_bundle",
    "check_bundle_target",
    "allow_precision",
    "add_engine",
    "load_bundle",
    "sha256_file",
    "rebuild_command",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# variant -> the ONNX / engine output names, in order
VARIANT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "merged": ("anomaly_map", "score"),
    "merged_int8": ("anomaly_map", "score"),  # the merged graph with INT8 QDQ nodes (ONNX Runtime / TensorRT int8)
    "raw": ("teacher", "student", "autoencoder"),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_CC = re.compile(r"^\d+\.\d+$")
_TRT = re.compile(r"^\d+(\.\d+){0,3}$")
_FIX_REEXPORT = "re-export the bundle with 'edgead export RUN_DIR --out BUNDLE --overwrite'"


# ----------------------------------------------------------------------------- field checks
def _err(what: str, got: object, expected: str, fix: str = _FIX_REEXPORT) -> BundleError:
    return BundleError(message(f"bundle manifest: {what}", got, expected, fix))


def _obj(d: object, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _err(what, type(d).__name__, "a JSON object")
    return d


def _keys(d: Mapping[str, Any], what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise _err(what, f"missing key(s) {missing}", f"keys {list(required)}")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise _err(
            what,
            f"unknown key(s) {unknown}",
            f"only {list(required + optional)}",
            "re-export with the edgead version that reads this bundle, or upgrade edgead",
        )


def _str(v: object, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise _err(what, repr(v), "a non-empty string")
    return v


def _opt_str(v: object, what: str) -> str | None:
    return None if v is None else _str(v, what)


def _int(v: object, what: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(what, repr(v), f"an integer >= {minimum}")
    return v


def _float(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise _err(what, repr(v), "a finite number")
    return float(v)


def _triple(v: object, what: str, positive: bool = False) -> tuple[float, float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise _err(what, repr(v), "a list of 3 numbers (R, G, B)")
    out = tuple(_float(x, what) for x in v)
    if positive and any(x <= 0 for x in out):
        raise _err(what, repr(v), "3 numbers > 0")
    return (out[0], out[1], out[2])


def _file_name(v: object, what: str) -> str:
    """A plain file name at the bundle root: no directories, no absolute paths, no '..'."""
    if not isinstance(v, str) or not v:
        raise _err(what, repr(v), "a file name")
    if os.path.isabs(v) or "/" in v or "\\" in v or v in (".", "..") or not _NAME.match(v):
        raise BundleError(
            message(
                f"bundle file path {what}",
                repr(v),
                "a plain file name inside the bundle (no '/', no '..', not absolute)",
                "the bundle was tampered with or written by hand; " + _FIX_REEXPORT,
            )
        )
    return v


# ----------------------------------------------------------------------------- manifest parts
@dataclass(frozen=True)
class InputSpec:
    """What the model input expects: float32 NCHW (N,3,S,S), RGB, pixel/dtype_max, then (x-mean)/std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "rgb"
    pixel_scale: str = "dtype_max"  # uint8 -> /255, uint16 -> /65535; never guessed from the data
    name: str = "image"
    tiling: Tiling | None = None  # frames are cut into tiles of this layout (edgead.tiling); None: whole frame

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image_size": self.image_size,
            "color": self.color,
            "pixel_scale": self.pixel_scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "name": self.name,
        }
        if self.tiling is not None:
            d["tiling"] = self.tiling.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: object) -> InputSpec:
        d = _obj(d, "input")
        _keys(d, "input", ("image_size", "color", "pixel_scale", "mean", "std"), ("name", "tiling"))
        tiling = None
        if d.get("tiling") is not None:
            t = _obj(d["tiling"], "input.tiling")
            _keys(t, "input.tiling", ("tile", "overlap"))
            try:
                tiling = Tiling(_int(t["tile"], "input.tiling.tile", 1), _int(t["overlap"], "input.tiling.overlap"))
            except ConfigError as exc:
                raise _err("input.tiling", str(exc), "a valid tile layout") from exc
        size = _int(d["image_size"], "input.image_size", 1)
        if d["color"] != "rgb":
            raise _err("input.color", repr(d["color"]), "'rgb' (the only model input order this release supports)")
        if d["pixel_scale"] != "dtype_max":
            raise _err("input.pixel_scale", repr(d["pixel_scale"]), "'dtype_max' (uint8 /255, uint16 /65535)")
        return cls(
            size,
            _triple(d["mean"], "input.mean"),
            _triple(d["std"], "input.std", positive=True),
            "rgb",
            "dtype_max",
            _str(d.get("name", "image"), "input.name"),
            tiling,
        )


@dataclass(frozen=True)
class VariantSpec:
    """One ONNX graph of the model; its output names are fixed by the variant kind (VARIANT_OUTPUTS)."""

    file: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file}

    @classmethod
    def from_dict(cls, d: object, name: str) -> VariantSpec:
        d = _obj(d, f"variants.{name}")
        _keys(d, f"variants.{name}", ("file",), ("outputs",))
        if "outputs" in d and not (isinstance(d["outputs"], (list, tuple)) and list(d["outputs"]) == list(VARIANT_OUTPUTS[name])):
            raise _err(f"variants.{name}.outputs", d["outputs"], f"{list(VARIANT_OUTPUTS[name])}")
        return cls(_file_name(d["file"], f"variants.{name}.file"))


@dataclass(frozen=True)
class PostprocessSpec:
    """EfficientAD: quantile constants of both maps, the map padding and the merge weights (local, global).

    ``kind="feature_distance"`` (UniAD, GRAD): the graph outputs the raw feature-distance map and score; the
    normalisation is per product (``Manifest.classes``), so only the padding (0) is stored here.
    """

    qa_st: float
    qb_st: float
    qa_ae: float
    qb_ae: float
    pad: int
    weights: tuple[float, float] = (0.5, 0.5)
    kind: str = "efficientad"

    @property
    def post(self) -> EfficientADPost:
        return EfficientADPost(QuantileAffine(self.qa_st, self.qb_st), QuantileAffine(self.qa_ae, self.qb_ae), self.pad)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "feature_distance":
            return {"kind": self.kind, "pad": self.pad}
        return {"qa_st": self.qa_st, "qb_st": self.qb_st, "qa_ae": self.qa_ae, "qb_ae": self.qb_ae, "pad": self.pad, "weights": list(self.weights)}

    @classmethod
    def feature_distance(cls) -> PostprocessSpec:
        return cls(0.0, 1.0, 0.0, 1.0, 0, kind="feature_distance")  # the affine constants are unused: per product in classes

    @classmethod
    def from_dict(cls, d: object) -> PostprocessSpec:
        d = _obj(d, "postprocess")
        if d.get("kind") == "feature_distance":
            _keys(d, "postprocess", ("kind", "pad"))
            if _int(d["pad"], "postprocess.pad") != 0:
                raise _err("postprocess.pad", d["pad"], "0 (a feature-distance map covers the whole image)")
            return cls.feature_distance()
        _keys(d, "postprocess", ("qa_st", "qb_st", "qa_ae", "qb_ae", "pad"), ("weights",))
        w = d.get("weights", [0.5, 0.5])
        if not isinstance(w, (list, tuple)) or [_float(x, "postprocess.weights") for x in w] != [0.5, 0.5]:
            raise _err("postprocess.weights", repr(w), "[0.5, 0.5] (the EfficientAD merge this release implements)")
        qa_st, qb_st, qa_ae, qb_ae = (_float(d[k], f"postprocess.{k}") for k in ("qa_st", "qb_st", "qa_ae", "qb_ae"))
        spec = cls(qa_st, qb_st, qa_ae, qb_ae, _int(d["pad"], "postprocess.pad"))
        try:
            spec.post  # noqa: B018 - validates qb > qa
        except ConfigError as exc:
            raise _err("postprocess constants", str(exc), "qb > qa for both maps and a pad in range", "re-run calibration, then re-export") from exc
        return spec


@dataclass(frozen=True)
class ClassSpec:
    """Calibration of one product of a multi-product bundle: the affine of its raw maps (qa -> 0, qb -> 0.1)
    and its image threshold on the normalised score, all from that product's held-out good images."""

    qa: float
    qb: float
    threshold: float
    method: str

    @property
    def affine(self) -> QuantileAffine:
        return QuantileAffine(self.qa, self.qb)

    def to_dict(self) -> dict[str, Any]:
        return {"qa": self.qa, "qb": self.qb, "threshold": self.threshold, "method": self.method}

    @classmethod
    def from_dict(cls, d: object, name: str) -> ClassSpec:
        d = _obj(d, f"classes.{name}")
        _keys(d, f"classes.{name}", ("qa", "qb", "threshold", "method"))
        spec = cls(_float(d["qa"], f"classes.{name}.qa"), _float(d["qb"], f"classes.{name}.qb"), _float(d["threshold"], f"classes.{name}.threshold"),
                   _str(d["method"], f"classes.{name}.method"))
        if not spec.qb > spec.qa:
            raise _err(f"classes.{name}", f"qa={spec.qa}, qb={spec.qb}", "qb > qa", "re-run calibration, then re-export")
        return spec


@dataclass(frozen=True)
class ThresholdSpec:
    """Image-score decision threshold and how it was calibrated (free text, for the operator)."""

    value: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "method": self.method}

    @classmethod
    def from_dict(cls, d: object) -> ThresholdSpec:
        d = _obj(d, "threshold")
        _keys(d, "threshold", ("value", "method"))
        return cls(_float(d["value"], "threshold.value"), _str(d["method"], "threshold.method"))


@dataclass(frozen=True)
class Producer:
    """Versions of what produced the bundle (for support; not checked at load)."""

    edgead: str
    torch: str | None = None
    onnx: str | None = None
    onnxsim: str | None = None
    opset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"edgead": self.edgead, "torch": self.torch, "onnx": self.onnx, "onnxsim": self.onnxsim, "opset": self.opset}

    @classmethod
    def from_dict(cls, d: object) -> Producer:
        d = _obj(d, "producer")
        _keys(d, "producer", ("edgead",), ("torch", "onnx", "onnxsim", "opset"))
        opset = d.get("opset")
        return cls(
            _str(d["edgead"], "producer.edgead"),
            _opt_str(d.get("torch"), "producer.torch"),
            _opt_str(d.get("onnx"), "producer.onnx"),
            _opt_str(d.get("onnxsim"), "producer.onnxsim"),
            None if opset is None else _int(opset, "producer.opset", 1),
        )


@dataclass(frozen=True)
class FileEntry:
    """Hash and size of one bundle file (written by write_bundle / add_engine)."""

    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: object, name: str) -> FileEntry:
        d = _obj(d, f"files.{name}")
        _keys(d, f"files.{name}", ("sha256", "bytes"))
        sha = d["sha256"]
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise _err(f"files.{name}.sha256", repr(sha), "64 lower-case hex digits")
        return cls(sha, _int(d["bytes"], f"files.{name}.bytes"))


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT plan: which variant it compiles, its precision and the machine it is valid for."""

    file: str
    variant: str
    precision: str
    tensorrt_version: str
    compute_capability: str
    device_name: str
    max_batch: int
    built_at: str
    fp32_layers: int = 0  # layers held in FP32 by precision constraints (the map tail of an fp16/int8 merged engine)

    def __post_init__(self) -> None:
        # constructing one by hand (toolchain) goes through the same checks as reading one
        EngineEntry._check(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "variant": self.variant,
            "precision": self.precision,
            "tensorrt_version": self.tensorrt_version,
            "compute_capability": self.compute_capability,
            "device_name": self.device_name,
            "max_batch": self.max_batch,
            "built_at": self.built_at,
            "fp32_layers": self.fp32_layers,
        }

    @staticmethod
    def _check(d: dict[str, Any]) -> None:
        _file_name(d["file"], "engines[].file")
        if not str(d["file"]).endswith(".engine"):
            raise _err("engines[].file", repr(d["file"]), "a name ending in '.engine'")
        if d["variant"] not in VARIANT_OUTPUTS:
            raise _err("engines[].variant", repr(d["variant"]), f"one of {list(VARIANT_OUTPUTS)}")
        if d["precision"] not in PRECISIONS:
            raise _err("engines[].precision", repr(d["precision"]), f"one of {list(PRECISIONS)}")
        if not isinstance(d["tensorrt_version"], str) or not _TRT.match(d["tensorrt_version"]):
            raise _err("engines[].tensorrt_version", repr(d["tensorrt_version"]), "a version like '10.13.0'")
        if not isinstance(d["compute_capability"], str) or not _CC.match(d["compute_capability"]):
            raise _err("engines[].compute_capability", repr(d["compute_capability"]), "'major.minor' like '9.0'")
        _str(d["device_name"], "engines[].device_name")
        _int(d["max_batch"], "engines[].max_batch", 1)
        _str(d["built_at"], "engines[].built_at")
        _int(d.get("fp32_layers", 0), "engines[].fp32_layers")

    @classmethod
    def from_dict(cls, d: object) -> EngineEntry:
        d = _obj(d, "engines[]")
        keys = ("file", "variant", "precision", "tensorrt_version", "compute_capability", "device_name", "max_batch", "built_at")
        _keys(d, "engines[]", keys, ("fp32_layers",))
        return cls(**{k: d[k] for k in keys}, fp32_layers=d.get("fp32_layers", 0))


@dataclass(frozen=True)
class Platform:
    """The GPU + TensorRT a plan must match. ``Platform("9.0", "10.13.0", "NVIDIA H100")``."""

    compute_capability: str
    tensorrt_version: str
    device_name: str = ""


def _trt_key(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])


def engine_matches(engine: EngineEntry, platform: Platform) -> bool:
    """Same compute capability and same TensorRT major.minor.patch."""
    return engine.compute_capability == platform.compute_capability and _trt_key(engine.tensorrt_version) == _trt_key(platform.tensorrt_version)


def rebuild_command(bundle: str | Path, variant: str = "merged", precision: str = "fp16") -> str:
    """The exact command that compiles a plan for the current machine into ``bundle``."""
    return f"edgead build {bundle} --variant {variant} --precision {precision}"


@dataclass(frozen=True)
class Manifest:
    """The typed ``manifest.json`` (schema version 1); ``from_dict`` validates every field.

    >>> m = Manifest.from_dict(Manifest.example().to_dict())
    >>> m.family, m.input.image_size, sorted(m.variants)
    ('efficientad', 256, ['merged', 'raw'])
    """

    family: str
    size: str
    input: InputSpec
    variants: dict[str, VariantSpec]
    postprocess: PostprocessSpec
    threshold: ThresholdSpec
    producer: Producer
    files: dict[str, FileEntry] = field(default_factory=dict)
    engines: list[EngineEntry] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    # lower CPU precisions backend="auto" may use, each with the measured fidelity that allowed it (allow_precision)
    cpu_precisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # products of a multi-product bundle (UniAD), each with its own calibration; empty: one product (threshold above)
    classes: dict[str, ClassSpec] = field(default_factory=dict)

    @property
    def post(self) -> EfficientADPost:
        return self.postprocess.post

    @property
    def auto_cpu_precisions(self) -> tuple[str, ...]:
        """The lower CPU precisions ``backend="auto"`` may use: recorded, and for a bundle of several products
        recorded for every one of them (a precision faithful on one product says nothing of another)."""
        if not self.classes:
            return tuple(self.cpu_precisions)
        return tuple(p for p, ev in self.cpu_precisions.items() if set(self.classes) <= set(ev.get("products", {})))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "family": self.family,
            "size": self.size,
            "input": self.input.to_dict(),
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "postprocess": self.postprocess.to_dict(),
            "threshold": self.threshold.to_dict(),
            "files": {k: v.to_dict() for k, v in self.files.items()},
            "engines": [e.to_dict() for e in self.engines],
            "producer": self.producer.to_dict(),
            **({"cpu_precisions": self.cpu_precisions} if self.cpu_precisions else {}),
            **({"classes": {k: v.to_dict() for k, v in self.classes.items()}} if self.classes else {}),
        }

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        d = _obj(d, "manifest")
        version = d.get("schema_version")
        if type(version) is not int:  # true and 1.0 compare equal to 1 in Python: refuse them by type
            raise _err("schema_version", repr(version), f"the integer {SCHEMA_VERSION}")
        if version > SCHEMA_VERSION:
            raise BundleError(
                message("bundle schema_version", version, f"<= {SCHEMA_VERSION} (what this edgead reads)", "upgrade edgead: pip install --upgrade edgead")
            )
        if version != SCHEMA_VERSION:
            raise _err("schema_version", repr(version), f"{SCHEMA_VERSION}")
        _keys(d, "manifest", ("schema_version", "family", "size", "input", "variants", "postprocess", "threshold", "producer"), ("files", "engines", "cpu_precisions", "classes"))
        family = _str(d["family"], "family")
        if family not in FAMILIES:
            raise _err(
                "family", repr(family), f"one of {list(FAMILIES)}", "this bundle is not an EdgeAD bundle or needs a newer edgead: pip install --upgrade edgead"
            )
        spec = FAMILIES[family]
        if not spec.available:
            raise BundleError(
                message(
                    "bundle model family",
                    f"'{family}' (planned, not supported by this release)",
                    "efficientad",
                    "upgrade edgead (pip install --upgrade edgead) or export an efficientad bundle",
                )
            )
        size = _str(d["size"], "size")
        if size not in spec.sizes:
            raise _err("size", repr(size), f"one of {list(spec.sizes)} for {family}")
        variants_d = _obj(d["variants"], "variants")
        if not variants_d:
            raise _err("variants", "{}", "at least one of 'merged', 'raw'")
        variants: dict[str, VariantSpec] = {}
        for name, v in variants_d.items():
            if name not in VARIANT_OUTPUTS:
                raise _err("variants", repr(name), f"one of {list(VARIANT_OUTPUTS)}")
            variants[name] = VariantSpec.from_dict(v, name)
        files = {_file_name(k, "files"): FileEntry.from_dict(v, k) for k, v in _obj(d.get("files", {}), "files").items()}
        engines_raw = d.get("engines", [])
        if not isinstance(engines_raw, list):
            raise _err("engines", type(engines_raw).__name__, "a list")
        engines = [EngineEntry.from_dict(e) for e in engines_raw]
        cpu_precisions = _obj(d.get("cpu_precisions", {}), "cpu_precisions")
        for name, evidence in cpu_precisions.items():
            if name not in CPU_AUTO_PRECISIONS:
                raise _err("cpu_precisions", repr(name), f"one of {list(CPU_AUTO_PRECISIONS)}")
            _obj(evidence, f"cpu_precisions.{name}")
        classes = {_str(k, "classes"): ClassSpec.from_dict(v, k) for k, v in _obj(d.get("classes", {}), "classes").items()}
        postprocess = PostprocessSpec.from_dict(d["postprocess"])
        if (postprocess.kind == "feature_distance") != bool(classes):
            raise _err("classes", sorted(classes), "per-product calibration exactly for feature-distance bundles (UniAD)", _FIX_REEXPORT)
        m = cls(
            family,
            size,
            InputSpec.from_dict(d["input"]),
            variants,
            postprocess,
            ThresholdSpec.from_dict(d["threshold"]),
            Producer.from_dict(d["producer"]),
            files,
            engines,
            cpu_precisions=dict(cpu_precisions),
            classes=classes,
        )
        return m

    @staticmethod
    def example(image_size: int = 256) -> Manifest:
        """A valid manifest with placeholder constants (for docs and tests)."""
        return Manifest(
            family="efficientad",
            size="s",
            input=InputSpec(image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            variants={"merged": VariantSpec("model_merged.onnx"), "raw": VariantSpec("model_raw.onnx")},
            postprocess=PostprocessSpec(0.0, 1.0, 0.0, 1.0, 4),
            threshold=ThresholdSpec(0.5, "example"),
            producer=Producer("0.1.0"),
        )


# ----------------------------------------------------------------------------- files
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_bundle_target(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, a bundle destination that is a file, a non-empty folder (without
    ``overwrite``), a folder that is not a bundle, or a bundle holding engines / user files that an
    overwrite would delete. Returns the path.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BundleError(message("bundle output", f"'{out}' is a file", "a directory path", "choose another --out path"))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BundleError(
                message(
                    "bundle output", f"'{out}' exists and is not empty", "a new or empty directory", "pass overwrite=True (--overwrite) or choose another path"
                )
            )
        if not (out / MANIFEST).is_file():
            # overwrite replaces the whole directory: only ever do that to a previous bundle, never to user files
            raise BundleError(
                message(
                    "bundle output",
                    f"'{out}' is not empty and holds no {MANIFEST} (not a bundle)",
                    "a new or empty directory, or an existing bundle to replace",
                    "choose another --out path",
                )
            )
        would_lose = _not_replaceable(out)
        if would_lose:
            # engines (minutes to build on a Jetson, compiled from the previous model) and the user's own files
            raise BundleError(
                message(
                    "bundle output",
                    f"'{out}' holds files an overwrite would delete: {', '.join(would_lose[:10])}"
                    + (f" and {len(would_lose) - 10} more" if len(would_lose) > 10 else ""),
                    "a bundle holding only what export writes (manifest.json and its ONNX files)",
                    "move those files elsewhere (engines were compiled from the previous model: rebuild them with 'edgead build'), or choose another --out",
                )
            )
    return out


def write_bundle(out_dir: str | Path, manifest: Manifest, files: Mapping[str, str | Path], overwrite: bool = False) -> Path:
    """Write a bundle directory: copy ``files`` (bundle name -> source), hash them, write manifest.json.

    The bundle is assembled in a temporary sibling directory and renamed into place, so a reader
    never sees half a bundle. ``manifest.files`` is recomputed; ``manifest.engines`` must be empty
    (add plans with :func:`add_engine`).

    >>> write_bundle("out/bundle", manifest, {"model_merged.onnx": Path("m.onnx")})  # doctest: +SKIP
    PosixPath('out/bundle')
    """
    out = check_bundle_target(out_dir, overwrite)
    if manifest.engines:
        raise BundleError(
            message("write_bundle engines", f"{len(manifest.engines)} engine entries", "none", "write the bundle first, then call add_engine for each plan")
        )
    names = {_file_name(n, "files") for n in files}
    needed = {v.file for v in manifest.variants.values()}
    if needed - names:
        raise BundleError(
            message(
                "write_bundle files",
                sorted(names),
                f"a source for every variant file {sorted(needed)}",
                "pass files={'<name>.onnx': path, ...} for each variant",
            )
        )
    if MANIFEST in names:
        raise BundleError(message("write_bundle files", MANIFEST, "not 'manifest.json' (written by write_bundle)", "drop it from files"))
    for name, src in files.items():
        if not Path(src).is_file():
            raise BundleError(message(f"write_bundle source for '{name}'", str(src), "an existing file", "check the export step produced it"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries: dict[str, FileEntry] = {}
        for name, src in files.items():
            dst = tmp / name
            shutil.copyfile(src, dst)
            entries[name] = FileEntry(sha256_file(dst), dst.stat().st_size)
        final = dataclasses.replace(manifest, files=entries, engines=[])
        Manifest.from_dict(final.to_dict())  # the manifest we write must be one we can read
        _write_json_atomic(tmp / MANIFEST, final.to_dict())
        if out.exists():
            old = out.with_name(f".{out.name}.old.{uuid.uuid4().hex}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(e.bytes for e in entries.values())
    log.info("wrote bundle %s (%d files, %.1f MiB)", out, len(entries), total / 2**20)
    return out


LOCK_FILE = ".edgead.lock"
CPU_AUTO_PRECISIONS = ("bf16", "int8")


def allow_precision(bundle_dir: str | Path, precision: str, evidence: Mapping[str, Any], product: str | None = None) -> None:
    """Record in the manifest that ``backend="auto"`` may run this bundle at ``precision`` on a CPU, with the
    fidelity measured against FP32 (``build_engines.fidelity``). Under the bundle lock, atomically.

    A bundle of several products (``classes``) records the evidence per ``product`` (``{"products": {name: ...}}``);
    ``Manifest.auto_cpu_precisions`` allows the precision only once every product has passed."""
    if precision not in CPU_AUTO_PRECISIONS:
        raise ConfigError(message("precision to allow", repr(precision), f"one of {list(CPU_AUTO_PRECISIONS)}", "pass bf16 or int8"))
    root = Path(bundle_dir)
    with _exclusive(root):
        bundle = load_bundle(root)
        classes = bundle.manifest.classes
        if bool(classes) != (product is not None) or (product is not None and product not in classes):
            want = f"one of {', '.join(classes)} (evidence is per product in this bundle)" if classes else "no product (this bundle has one)"
            raise ConfigError(message("product of the evidence", repr(product), want, "measure each product's set with 'edgead fidelity --product NAME --record'"))
        data = bundle.manifest.to_dict()
        allowed = data.setdefault("cpu_precisions", {})
        if product is None:
            allowed[precision] = dict(evidence)
        else:
            allowed.setdefault(precision, {}).setdefault("products", {})[product] = dict(evidence)
        Manifest.from_dict(data)
        _write_json_atomic(root / MANIFEST, data)


def _not_replaceable(bundle_dir: Path) -> list[str]:
    """Entries of an existing bundle that an overwrite would delete and that export did not write: engines
    and anything the user put there (everything but manifest.json, the lock file and the ONNX files the
    old manifest lists)."""
    ours = {MANIFEST, LOCK_FILE}
    try:
        listed = json.loads((bundle_dir / MANIFEST).read_text()).get("files", {})
        ours |= {name for name in listed if isinstance(name, str) and name.endswith(".onnx")}
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(p.name for p in bundle_dir.iterdir() if p.name not in ours)


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``directory/.edgead.lock`` (released by the OS if the process dies)."""
    try:
        handle = open(directory / LOCK_FILE, "a+b")  # noqa: SIM115 (closed below, after unlocking)
    except OSError as exc:
        raise BundleError(
            message("bundle lock", f"{directory / LOCK_FILE}: {exc.strerror}", "a writable bundle directory", "check the directory's permissions")
        ) from exc
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then OSError
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing the handle releases the lock on both systems


def add_engine(bundle_dir: str | Path, engine_path: str | Path, meta: EngineEntry) -> None:
    """Add (or replace) one TensorRT plan in a bundle directory and update manifest.json atomically.

    Concurrent calls on one bundle (two ``edgead build`` runs) are serialised by a lock file, so
    each sees the other's engine entry and none is lost.

    >>> add_engine("bundle", "merged.engine", EngineEntry("merged_fp16_sm90_trt10.13.0.engine", "merged", "fp16",
    ...            "10.13.0", "9.0", "NVIDIA H100", 8, "2026-11-23T10:00:00Z"))  # doctest: +SKIP
    """
    src = Path(bundle_dir)
    if src.is_file() and src.name != MANIFEST and tarfile.is_tarfile(src):
        raise BundleError(message("add_engine bundle", str(bundle_dir), "a bundle directory", "extract the .tar first, add the engine, then re-archive"))
    root = src.parent if src.name == MANIFEST else src
    if not (root / MANIFEST).is_file():
        load_bundle(src)  # not a bundle directory: the loader's error says what is wrong
    with _exclusive(root):
        _add_engine_locked(load_bundle(src), engine_path, meta)  # loaded under the lock: another build may have added one


def _add_engine_locked(bundle: Bundle, engine_path: str | Path, meta: EngineEntry) -> None:
    root = bundle.root  # bundle_dir may also name the bundle's manifest.json
    if meta.variant not in bundle.manifest.variants:
        raise BundleError(
            message("engine variant", meta.variant, f"one of the bundle's variants {sorted(bundle.manifest.variants)}", "build from a variant the bundle has")
        )
    src = Path(engine_path)
    if not src.is_file():
        raise BundleError(message("engine file", str(src), "an existing TensorRT plan", "check the build step wrote it"))
    dst = root / _file_name(meta.file, "engine file")
    if src.resolve() != dst.resolve():
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    m = bundle.manifest
    files = dict(m.files)
    files[meta.file] = FileEntry(sha256_file(dst), dst.stat().st_size)
    engines = [e for e in m.engines if e.file != meta.file] + [meta]
    new = dataclasses.replace(m, files=files, engines=engines)
    _write_json_atomic(root / MANIFEST, new.to_dict())
    log.info(
        "added engine %s (%s %s, sm %s, TensorRT %s, %.1f MiB) to %s",
        meta.file,
        meta.variant,
        meta.precision,
        meta.compute_capability,
        meta.tensorrt_version,
        dst.stat().st_size / 2**20,
        root,
    )


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class Bundle:
    """A loaded, validated bundle. ``root`` is the directory the files live in."""

    root: Path
    manifest: Manifest
    archive: Path | None = None  # the .tar it was extracted from, if any
    source: Path | None = None  # what the user passed (for messages / rebuild commands)
    scratch: Path | None = None  # the temporary directory a .tar was extracted to (removed by release())

    def release(self) -> None:
        """Remove the temporary extraction of a ``.tar`` bundle (no-op for a directory bundle).

        ``Detector.close()`` calls this for bundles it loaded itself; otherwise it happens at exit.
        """
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def path(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise BundleError(message("bundle file", name, f"one of {sorted(self.manifest.files)}", "check the variant / engine name"))
        return self.root / name

    def onnx_path(self, variant: str) -> Path:
        if variant not in self.manifest.variants:
            raise BundleError(
                message(
                    "bundle variant",
                    repr(variant),
                    f"one of {sorted(self.manifest.variants)}",
                    "pass variant=None to let edgead pick, or re-export with that variant",
                )
            )
        return self.path(self.manifest.variants[variant].file)

    def engines_for(self, platform: Platform, variant: str | None = None) -> list[EngineEntry]:
        return [e for e in self.manifest.engines if engine_matches(e, platform) and (variant is None or e.variant == variant)]

    def check_engines(self, platform: Platform, variant: str | None = None, allow_onnx_fallback: bool = False) -> list[EngineEntry]:
        """Matching engines, or BundleError with the rebuild command (unless falling back is allowed)."""
        found = self.engines_for(platform, variant)
        if found:
            return found
        have = [
            f"{e.file} ({e.variant} {e.precision}, sm {e.compute_capability}, TensorRT {e.tensorrt_version}, {e.device_name})" for e in self.manifest.engines
        ]
        v = variant or (self.manifest.engines[0].variant if self.manifest.engines else "merged")
        precision = next((e.precision for e in self.manifest.engines if e.variant == v), "fp16")
        cmd = rebuild_command(self.source or self.root, v, precision)
        text = message(
            "TensorRT engine",
            "; ".join(have) if have else "no engine in the bundle",
            f"an engine for this GPU (sm {platform.compute_capability}, {platform.device_name or 'this device'}) and TensorRT {platform.tensorrt_version}",
            f"run '{cmd}' on this machine, or pass allow_onnx_fallback=True to run the ONNX model with ONNX Runtime instead",
        )
        if not allow_onnx_fallback:
            raise BundleError(text)
        log.warning("%s (allow_onnx_fallback=True: using the ONNX model)", text)
        return []


def _check_inside(root: Path, name: str) -> Path:
    p = root / name
    real_root = root.resolve()
    real = p.resolve()
    if real != real_root and real_root not in real.parents:
        raise BundleError(
            message(
                f"bundle file '{name}'",
                f"a link resolving to '{real}'",
                f"a file inside '{real_root}'",
                "replace the link with the real file or " + _FIX_REEXPORT,
            )
        )
    return p


def _extract_tar(tar_path: Path) -> tuple[Path, Path]:
    """Extract a bundle archive to a new temporary directory; return (that directory, the bundle root in it)."""
    dest = Path(tempfile.mkdtemp(prefix="edgead-bundle-"))
    atexit.register(shutil.rmtree, dest, True)
    try:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            top = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise BundleError(
                        message(
                            f"bundle archive member '{m.name}'",
                            "an absolute path, '..', or a link",
                            "plain files inside the archive",
                            "re-create the archive with 'tar -cf bundle.tar -C BUNDLE .'",
                        )
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706; members were checked above
                tar.extractall(dest, members=members)  # noqa: S202
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)  # no scratch folder survives a refused or unreadable archive
        if isinstance(exc, (tarfile.TarError, EOFError, OSError, zlib.error)):
            raise BundleError(
                message(
                    "bundle archive",
                    f"'{tar_path}' cannot be read ({type(exc).__name__}: {str(exc)[:120]})",
                    "a complete .tar of a bundle",
                    "copy the archive again (truncated or damaged?)",
                )
            ) from exc
        raise
    # accept both "manifest.json" at the top and a single top-level folder holding it
    if not (dest / MANIFEST).exists() and len(top) == 1:
        inner = dest / next(iter(top))
        if (inner / MANIFEST).exists():
            return dest, inner
    return dest, dest


def load_bundle(path: str | Path, *, platform: Platform | None = None, allow_onnx_fallback: bool = False) -> Bundle:
    """Load and validate a bundle (directory, its manifest.json, or a ``.tar`` archive).

    Every file listed in the manifest must exist inside the bundle and match its sha256.
    With ``platform`` the TensorRT engines are checked too (see :meth:`Bundle.check_engines`).

    >>> bundle = load_bundle("demo_out/bundle")  # doctest: +SKIP
    >>> bundle.onnx_path("merged").name          # doctest: +SKIP
    'model_merged.onnx'
    """
    src = Path(path)
    if not src.exists():
        raise BundleError(
            message(
                "bundle", f"'{src}' does not exist", "a bundle directory or .tar", "check the path, or create one with 'edgead export RUN_DIR --out BUNDLE'"
            )
        )
    if src.is_file() and src.name == MANIFEST:
        return _load_root(src.parent, src, platform, allow_onnx_fallback)
    if src.is_file() and tarfile.is_tarfile(src):
        scratch, root = _extract_tar(src)
        try:
            return _load_root(root, src, platform, allow_onnx_fallback, archive=src, scratch=scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)  # a refused archive leaves nothing behind
            raise
    if src.is_file():
        raise BundleError(message("bundle", f"'{src}' is a file", "a bundle directory, its manifest.json, or a .tar", "pass the bundle directory"))
    return _load_root(src, src, platform, allow_onnx_fallback)


def _load_root(
    root: Path, src: Path, platform: Platform | None, allow_onnx_fallback: bool, *, archive: Path | None = None, scratch: Path | None = None
) -> Bundle:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(
            message(
                "bundle", f"no {MANIFEST} in '{src}'", "a directory written by 'edgead export'", "point at the bundle directory (the one holding manifest.json)"
            )
        )
    _check_inside(root, MANIFEST)  # a manifest.json symlink must not point outside the bundle
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BundleError(
            message(
                f"bundle {MANIFEST}",
                f"unparsable JSON ({type(exc).__name__}: {str(exc)[:120]})",
                "valid JSON",
                "restore the bundle from its source or " + _FIX_REEXPORT,
            )
        ) from exc
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # a value of a type no field check foresaw
        raise BundleError(
            message(f"bundle {MANIFEST}", f"malformed ({type(exc).__name__}: {str(exc)[:120]})", "the manifest schema of docs/bundle.md", _FIX_REEXPORT)
        ) from exc
    listed = set(manifest.files)
    for variant, v in manifest.variants.items():
        if v.file not in listed:
            raise _err(f"variants.{variant}.file", repr(v.file), "a file listed in 'files' with its sha256")
    for e in manifest.engines:
        if e.file not in listed:
            raise _err("engines[].file", repr(e.file), "a file listed in 'files' with its sha256", "re-add the engine with 'edgead build'")
        if e.variant not in manifest.variants:
            raise _err(
                "engines[].variant", repr(e.variant), f"one of the bundle's variants {sorted(manifest.variants)}", "rebuild the engine with 'edgead build'"
            )
    for name, entry in manifest.files.items():
        p = root / name
        if p.is_symlink() or p.exists():
            _check_inside(root, name)
        if not p.is_file():
            raise BundleError(
                message(
                    f"bundle file '{name}'",
                    "missing",
                    f"a file in '{root}'",
                    "copy the complete bundle directory (all files listed in manifest.json) or " + _FIX_REEXPORT,
                )
            )
        size = p.stat().st_size
        digest = sha256_file(p)
        if size != entry.bytes or digest != entry.sha256:
            raise BundleError(
                message(
                    f"bundle file '{name}'",
                    f"sha256 {digest[:12]}... ({size} bytes)",
                    f"sha256 {entry.sha256[:12]}... ({entry.bytes} bytes) as in manifest.json: the file was altered or truncated",
                    "copy the bundle again from its source (do not edit files inside it) or " + _FIX_REEXPORT,
                )
            )
    bundle = Bundle(root, manifest, archive, src, scratch)
    if platform is not None and manifest.engines:
        bundle.check_engines(platform, allow_onnx_fallback=allow_onnx_fallback)
    return bundle

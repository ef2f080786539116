"""Bundle format: round trip, atomic writes, and one test per refusal (each checks the fix is in the message)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import tiny_bundle as tb

from edgead.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    EngineEntry,
    Manifest,
    Platform,
    add_engine,
    load_bundle,
    sha256_file,
    write_bundle,
)
from edgead.errors import BundleError, ConfigError, EdgeADError

H100 = Platform("9.0", "10.13.0.35", "NVIDIA H100 80GB HBM3")


def engine_meta(file: str = "merged_fp16_sm90_trt10.13.0.engine", **kw: Any) -> EngineEntry:
    base = dict(
        file=file,
        variant="merged",
        precision="fp16",
        tensorrt_version="10.13.0",
        compute_capability="9.0",
        device_name="NVIDIA H100 80GB HBM3",
        max_batch=8,
        built_at="2026-11-23T10:00:00Z",
    )
    base.update(kw)
    return EngineEntry(**base)  # type: ignore[arg-type]


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return tb.make_bundle(tmp_path / "bundle")


def edit_manifest(bundle: Path, fn: Any) -> None:
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def refused(path: Path, *fragments: str, **kw: Any) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path, **kw)
    text = str(info.value)
    assert "how to fix" in text
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"
    return text


# ------------------------------------------------------------------ success paths
def test_round_trip_and_hashes(bundle: Path) -> None:
    b = load_bundle(bundle)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION and m.family == "efficientad" and m.input.image_size == tb.IMAGE_SIZE
    assert sorted(m.files) == ["model_merged.onnx", "model_raw.onnx"]
    for name, entry in m.files.items():
        assert entry.sha256 == sha256_file(bundle / name)
        assert entry.bytes == (bundle / name).stat().st_size
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.post.pad == tb.PAD and m.post.st.qa == tb.Q["qa_st"]
    assert b.onnx_path("raw") == bundle / "model_raw.onnx"
    assert load_bundle(bundle / MANIFEST).manifest == m  # the manifest path works too


def test_write_is_atomic_and_refuses_non_empty(tmp_path: Path, bundle: Path) -> None:
    leftovers = [p.name for p in bundle.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    with pytest.raises(BundleError, match="overwrite=True"):
        tb.make_bundle(bundle)
    # overwrite replaces what export wrote (the old variants' ONNX files go, the new ones come)
    src = tmp_path / "bundle_src"
    write_bundle(bundle, tb.manifest(("raw",)), {"model_raw.onnx": src / "model_raw.onnx"}, overwrite=True)
    assert sorted(p.name for p in bundle.iterdir()) == [MANIFEST, "model_raw.onnx"]
    assert list(load_bundle(bundle).manifest.variants) == ["raw"]


@pytest.mark.parametrize("extra", ["notes.txt", "model_merged.a6000.fp16.engine", "calibration_images"])
def test_overwrite_refuses_to_delete_engines_and_user_files(tmp_path: Path, extra: str) -> None:
    bundle = tb.make_bundle(tmp_path / "b")
    target = bundle / extra
    if extra == "calibration_images":
        target.mkdir()
        (target / "0.png").write_bytes(b"x")
    else:
        target.write_bytes(b"precious")
    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(BundleError, match=f"would delete: {extra}"):
        write_bundle(bundle, tb.manifest(("raw",)), {"model_raw.onnx": tmp_path / "b_src" / "model_raw.onnx"}, overwrite=True)
    assert sorted(p.name for p in bundle.iterdir()) == before  # nothing touched


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(tmp_path: Path, bundle: Path) -> None:
    target = tmp_path / "my_documents"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(target, tb.manifest(("raw",)), {"model_raw.onnx": tmp_path / "bundle_src" / "model_raw.onnx"}, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me" and sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_write_refuses_missing_variant_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="pass files="):
        write_bundle(tmp_path / "b", tb.manifest(), {})
    assert not (tmp_path / "b").exists()


def test_add_engine_and_platform_checks(tmp_path: Path, bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    plan = tmp_path / "plan.engine"
    plan.write_bytes(b"\x00plan-bytes" * 10)
    add_engine(bundle, plan, engine_meta())
    b = load_bundle(bundle, platform=H100)
    assert [e.file for e in b.engines_for(H100)] == ["merged_fp16_sm90_trt10.13.0.engine"]
    assert b.manifest.files["merged_fp16_sm90_trt10.13.0.engine"].sha256 == sha256_file(plan)
    # replacing the same file name keeps one entry; the manifest.json path names the bundle too
    add_engine(bundle / MANIFEST, plan, engine_meta(max_batch=4))
    assert [e.max_batch for e in load_bundle(bundle).manifest.engines] == [4]

    other_gpu = Platform("8.7", "10.13.0", "Orin")
    text = refused(bundle, f"edgead build {bundle} --variant merged --precision fp16", "sm 8.7", platform=other_gpu)
    assert "allow_onnx_fallback=True" in text
    refused(bundle, "TensorRT 10.3.0", "edgead build", platform=Platform("9.0", "10.3.0", "H100"))
    with caplog.at_level(logging.WARNING, logger="edgead.bundle"):
        b = load_bundle(bundle, platform=other_gpu, allow_onnx_fallback=True)
    assert b.engines_for(other_gpu) == []
    assert any("allow_onnx_fallback=True" in r.getMessage() for r in caplog.records)


def test_concurrent_add_engine_loses_no_entry(tmp_path: Path, bundle: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    plans = []
    for i in range(6):
        plans.append(tmp_path / f"plan{i}.engine")
        plans[-1].write_bytes(bytes([i]) * 4096)
    with ThreadPoolExecutor(6) as pool:  # six `edgead build` runs finishing at once
        list(pool.map(lambda i: add_engine(bundle, plans[i], engine_meta(f"merged_fp16_sm90_trt10.13.0_{i}.engine")), range(6)))
    b = load_bundle(bundle)
    assert sorted(e.file for e in b.manifest.engines) == sorted(f"merged_fp16_sm90_trt10.13.0_{i}.engine" for i in range(6))
    assert all(b.manifest.files[e.file].sha256 == sha256_file(plans[int(e.file[-8])]) for e in b.manifest.engines)


def test_add_engine_refusals(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError, match="check the build step"):
        add_engine(bundle, tmp_path / "missing.engine", engine_meta())
    plan = tmp_path / "p.engine"
    plan.write_bytes(b"x")
    write_bundle(tmp_path / "only_raw", tb.manifest(("raw",)), {"model_raw.onnx": tmp_path / "bundle_src" / "model_raw.onnx"})
    with pytest.raises(BundleError, match="build from a variant the bundle has"):
        add_engine(tmp_path / "only_raw", plan, engine_meta())
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname=".")
    with pytest.raises(BundleError, match="extract the .tar first"):
        add_engine(archive, plan, engine_meta())
    with pytest.raises(BundleError, match="does not exist"):
        add_engine(tmp_path / "nowhere", plan, engine_meta())
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        add_engine(tmp_path / "empty", plan, engine_meta())
    assert list((tmp_path / "empty").iterdir()) == []  # refused before any lock file is written


def test_tar_archive(tmp_path: Path, bundle: Path) -> None:
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname="bundle")
    b = load_bundle(archive)
    assert b.archive == archive and b.manifest == load_bundle(bundle).manifest
    assert (b.root / "model_merged.onnx").is_file()
    assert b.scratch is not None and b.root.is_relative_to(b.scratch)
    b.release()
    assert not b.scratch.exists()
    load_bundle(bundle).release()  # a directory bundle: nothing to remove
    assert (bundle / MANIFEST).is_file()


def test_tar_extractions_are_removed(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead import Detector

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname=".")
    with Detector(archive, backend="onnxruntime", threads=1) as det:
        assert len(list(scratch_root.iterdir())) == 1 and det.bundle.root.parent == scratch_root
    assert list(scratch_root.iterdir()) == []  # close() removed the extraction
    (bundle / "model_merged.onnx").write_bytes(b"altered")
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.add(bundle, arcname="bundle")
    refused(bad, "sha256")
    assert list(scratch_root.iterdir()) == []  # a refused archive leaves nothing behind


def test_truncated_tar_is_a_bundle_error_and_leaves_no_scratch(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname="bundle")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # a copy cut short
    refused(archive, "cannot be read", "copy the archive again")
    assert list(scratch_root.iterdir()) == []


def test_failed_detector_on_a_tar_removes_its_extraction(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead import Detector

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle, arcname=".")
    for bad in ({"variant": "nope"}, {"precision": "fp64"}, {"threads": 0}, {"threshold": "x"}, {"backend": "tpu"}):
        with pytest.raises(ConfigError):
            Detector(archive, **bad)  # type: ignore[arg-type]
        assert list(scratch_root.iterdir()) == [], bad


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(family=["efficientad"]), "family"),
        (lambda d: d.update(size={"s": 1}), "size"),
        (lambda d: d["input"].update(name=["image"]), "input.name"),
        (lambda d: d.update(variants={"merged": {"file": ["model_merged.onnx"]}}), "variants"),
    ],
)
def test_wrong_json_types_are_bundle_errors(bundle: Path, mutate: Any, fragment: str) -> None:
    edit_manifest(bundle, mutate)
    refused(bundle, fragment)


def test_deeply_nested_manifest_is_a_bundle_error(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    refused(bundle, "manifest.json")


def test_manifest_symlink_outside_the_bundle_is_refused(tmp_path: Path, bundle: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text((bundle / MANIFEST).read_text())
    (bundle / MANIFEST).unlink()
    (bundle / MANIFEST).symlink_to(outside)
    refused(bundle, "a link resolving to")


def test_tar_with_escaping_member_is_refused(tmp_path: Path, bundle: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle / MANIFEST, arcname="../manifest.json")
    refused(archive, "re-create the archive")


# ------------------------------------------------------------------ refusals at load
def test_missing_path(tmp_path: Path) -> None:
    refused(tmp_path / "nope", "does not exist", "edgead export")


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no manifest.json", "holding manifest.json")


def test_unparsable_manifest(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("{not json")
    refused(bundle, "unparsable JSON", "edgead export")


def test_newer_schema_says_upgrade(bundle: Path) -> None:
    edit_manifest(bundle, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    refused(bundle, "upgrade edgead", "pip install --upgrade edgead")


@pytest.mark.parametrize("version", [0, "1", None, True, 1.0])
def test_invalid_schema(bundle: Path, version: object) -> None:
    edit_manifest(bundle, lambda d: d.update(schema_version=version))
    refused(bundle, "schema_version", "re-export")


def test_unknown_family(bundle: Path) -> None:
    edit_manifest(bundle, lambda d: d.update(family="fastflow"))
    refused(bundle, "'fastflow'", "upgrade")


def test_planned_family(bundle: Path) -> None:
    edit_manifest(bundle, lambda d: d.update(family="grad", size="base"))
    refused(bundle, "planned", "upgrade edgead")


def test_missing_file(bundle: Path) -> None:
    (bundle / "model_raw.onnx").unlink()
    refused(bundle, "'model_raw.onnx'", "missing", "copy the complete bundle")


def test_altered_file(bundle: Path) -> None:
    with open(bundle / "model_merged.onnx", "ab") as f:
        f.write(b"\x00")
    refused(bundle, "altered", "copy the bundle again")


def test_same_size_altered_file(bundle: Path) -> None:
    data = bytearray((bundle / "model_raw.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model_raw.onnx").write_bytes(bytes(data))
    refused(bundle, "altered")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/model.onnx", ".."])
def test_path_escaping_manifest_entry(bundle: Path, name: str) -> None:
    def evil(d: dict[str, Any]) -> None:
        d["variants"]["raw"]["file"] = name
        d["files"][name] = d["files"].pop("model_raw.onnx")

    edit_manifest(bundle, evil)
    refused(bundle, "plain file name inside the bundle", "tampered")


def test_symlink_outside_bundle(tmp_path: Path, bundle: Path) -> None:
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "model_raw.onnx", outside)
    os.symlink(outside, bundle / "model_raw.onnx")
    refused(bundle, "a link resolving to", "replace the link with the real file")


def test_engine_not_listed_in_files(bundle: Path) -> None:
    edit_manifest(bundle, lambda d: d["engines"].append(engine_meta().to_dict()))
    refused(bundle, "engines[].file", "edgead build")


# ------------------------------------------------------------------ field validation
def _good() -> dict[str, Any]:
    return tb.manifest().to_dict()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["input"].update(mean=[0.5, 0.5]), "input.mean"),
        (lambda d: d["input"].update(std=[0.2, 0.0, 0.2]), "input.std"),
        (lambda d: d["input"].update(color="bgr"), "input.color"),
        (lambda d: d["input"].update(pixel_scale="max"), "input.pixel_scale"),
        (lambda d: d["input"].update(image_size=0), "input.image_size"),
        (lambda d: d["postprocess"].update(qb_st=0.0), "qb > qa"),
        (lambda d: d["postprocess"].update(qa_ae=float("nan")), "postprocess.qa_ae"),
        (lambda d: d["postprocess"].update(weights=[0.3, 0.7]), "postprocess.weights"),
        (lambda d: d["postprocess"].update(weights=["half", 0.5]), "postprocess.weights"),
        (lambda d: d["variants"]["raw"].update(outputs=3), "variants.raw.outputs"),
        (lambda d: d["postprocess"].update(pad=-1), "postprocess.pad"),
        (lambda d: d["threshold"].update(value="high"), "threshold.value"),
        (lambda d: d.pop("threshold"), "missing key"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d.update(size="xl"), "size"),
        (lambda d: d.update(variants={}), "variants"),
        (lambda d: d["variants"].update(fancy={"file": "f.onnx"}), "'fancy'"),
        (lambda d: d["files"].update({"a.onnx": {"sha256": "xyz", "bytes": 1}}), "sha256"),
        (lambda d: d.update(engines=[{**engine_meta().to_dict(), "precision": "fp8"}]), "precision"),
        (lambda d: d.update(engines=[{**engine_meta().to_dict(), "compute_capability": "sm90"}]), "compute_capability"),
        (lambda d: d.update(engines=[{**engine_meta().to_dict(), "max_batch": 0}]), "max_batch"),
        (lambda d: d.update(engines=[{**engine_meta().to_dict(), "file": "plan.bin"}]), ".engine"),
        (lambda d: d["producer"].update(opset="17"), "producer.opset"),
    ],
)
def test_manifest_field_errors(mutate: Any, fragment: str) -> None:
    d = _good()
    mutate(d)
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(d)
    assert fragment in str(info.value) and "how to fix" in str(info.value)


def test_engine_entry_validates_on_construction() -> None:
    with pytest.raises(BundleError, match="tensorrt_version"):
        engine_meta(tensorrt_version="ten")
    assert isinstance(BundleError("x"), EdgeADError)


def test_manifest_example_is_valid() -> None:
    m = Manifest.example()
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert dataclasses.replace(m, size="m").size == "m"


@pytest.mark.parametrize(
    ("engine_trt", "machine_trt", "cc", "match"),
    [
        ("10.3.0", "10.3.0", "8.7", True),
        ("10.3.0.26", "10.3.0.30", "8.7", True),  # the build number (4th field) does not matter
        ("10.3.0", "10.3.1", "8.7", False),  # a patch release: plans are not portable across it
        ("10.3.0", "10.4.0", "8.7", False),
        ("10.3.0", "10.3.0", "8.6", False),  # another GPU generation
    ],
)
def test_engine_match_is_compute_capability_and_tensorrt_major_minor_patch(engine_trt: str, machine_trt: str, cc: str, match: bool) -> None:
    from edgead.bundle import engine_matches

    engine = EngineEntry("e.engine", "merged", "fp16", engine_trt, "8.7", "Orin", 16, "2026-11-30T00:00:00+00:00")
    assert engine_matches(engine, Platform(cc, machine_trt, "x")) is match


# ------------------------------------------------------------------ every refusal of bundle.py reached by a test
_ENGINE = {"file": "e.engine", "variant": "merged", "precision": "fp16", "tensorrt_version": "10.3.0", "compute_capability": "8.7",
           "device_name": "Orin", "max_batch": 16, "built_at": "2026-11-30T00:00:00+00:00"}


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda d: d.update(engines={"not": "a list"}), ("engines", "a list")),
        (lambda d: d.update(engines=[{**_ENGINE, "variant": "tiled"}]), ("engines[].variant", "'tiled'")),
        (lambda d: d.update(engines=[_ENGINE]), ("engines[].file", "'e.engine'", "edgead build")),
        (lambda d: d["variants"]["raw"].update(file="other.onnx"), ("variants.raw.file", "'other.onnx'")),
        (lambda d: d["files"]["model_raw.onnx"].update(sha256=["0" * 64]), ("files.model_raw.onnx.sha256", "64 lower-case hex")),
    ],
)
def test_manifest_consistency_refusals(bundle: Path, mutate: Any, fragments: tuple[str, ...]) -> None:
    edit_manifest(bundle, mutate)
    refused(bundle, *fragments)


def test_write_bundle_refusals(tmp_path: Path) -> None:
    src = tmp_path / "b_src"
    tb.make_bundle(tmp_path / "b")
    onnx_file = src / "model_raw.onnx"
    with_engine = dataclasses.replace(tb.manifest(("raw",)), engines=[EngineEntry(**_ENGINE)])
    with pytest.raises(BundleError, match="add_engine"):
        write_bundle(tmp_path / "n1", with_engine, {"model_raw.onnx": onnx_file})
    with pytest.raises(BundleError, match="not 'manifest.json'"):
        write_bundle(tmp_path / "n2", tb.manifest(("raw",)), {"model_raw.onnx": onnx_file, MANIFEST: onnx_file})
    with pytest.raises(BundleError, match="an existing file"):
        write_bundle(tmp_path / "n3", tb.manifest(("raw",)), {"model_raw.onnx": src / "gone.onnx"})
    assert not any((tmp_path / n).exists() for n in ("n1", "n2", "n3"))
    (tmp_path / "plain").write_text("x")
    refused(tmp_path / "plain", "is a file", "pass the bundle directory")
    b = load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="one of"):
        b.path("nothing.onnx")


def test_a_failed_overwrite_puts_the_previous_bundle_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tb.make_bundle(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    real = os.replace
    calls = []

    def flaky(a: Any, b: Any) -> None:
        calls.append((a, b))
        if len(calls) == 2:  # the new bundle cannot be moved into place (disk full, ...)
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        write_bundle(bundle, tb.manifest(("raw",)), {"model_raw.onnx": tmp_path / "b_src" / "model_raw.onnx"}, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b_src"]  # no temporary folder left


def test_an_unforeseen_value_type_is_still_a_bundle_error(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net behind the field checks: whatever a field check missed surfaces as BundleError, not TypeError."""

    def boom(d: object) -> Manifest:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(Manifest, "from_dict", staticmethod(boom))
    refused(bundle, "malformed (TypeError: unhashable type")

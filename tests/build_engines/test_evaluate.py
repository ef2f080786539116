"""Evaluation: JSON keys and ranges, scores and metrics against independent references, overlays, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from build_engines.efficientad.models import EfficientAD
from build_engines.efficientad.run import Calibration, save_calibration, save_model
from build_engines.evaluate import evaluate_run, format_table, main
from build_engines.synthetic import DEFECT_TYPES, generate
from edgead.datasets import open_dataset, read_image, read_mask
from edgead.errors import DataError
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", n_train=2, n_test_good=3, n_test_defect=1, size=96, seed=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = EfficientAD("s", 128).eval()
    with torch.no_grad():
        model.teacher_std.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("run")
    save_model(model, out)
    save_calibration(Calibration(0.5, 2.0, 0.001, 0.004, 0.06, "max of 3 validation-good image scores", 3), out)
    (out / "config.json").write_text(json.dumps({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "data": "x"}))
    return out


def _reference_maps(run_dir: Path, data: Path) -> tuple[list, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    blob = torch.load(run_dir / "model.pt", weights_only=True)
    model = EfficientAD("s", 128)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    cal = json.loads((run_dir / "calibration.json").read_text())
    samples = open_dataset(data).test
    scores, maps, masks = [], [], []
    for s in samples:
        img = read_image(s.path)
        x = torch.from_numpy(prepare(img, 128, color="gray" if img.ndim == 2 else "bgr")[None])
        with torch.no_grad():
            t, st, ae = (o.double() for o in model(x))
        local = ((t - st[:, :384]) ** 2).mean(1)[0].numpy()
        glob = ((ae - st[:, 384:]) ** 2).mean(1)[0].numpy()
        merged = 0.05 * (local - cal["qa_st"]) / (cal["qb_st"] - cal["qa_st"]) + 0.05 * (glob - cal["qa_ae"]) / (cal["qb_ae"] - cal["qa_ae"])
        padded = np.pad(merged, 4, mode="edge").astype(np.float32)
        scores.append(padded.max())
        maps.append(cv2.resize(padded, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR))
        masks.append(read_mask(s, img.shape))
    return samples, np.array(scores), maps, masks


def test_eval_result_keys_ranges_and_reference(run_dir: Path, data: Path, tmp_path: Path) -> None:
    result = evaluate_run(run_dir, data, device="cpu", batch_size=4, overlays=tmp_path / "ov", n_overlays=2)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_max_threshold", "accuracy", "counts", "per_defect", "threshold", "threshold_method", "overlays"):
        assert key in result, key
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "accuracy", "detection_rate", "false_positive_rate"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["counts"] == {"total": 3 + len(DEFECT_TYPES), "good": 3, "defect": len(DEFECT_TYPES)}
    assert set(result["per_defect"]) == set(DEFECT_TYPES) | {"good"}
    assert all(result["per_defect"][d]["n"] == 1 for d in DEFECT_TYPES)

    samples, ref_scores, ref_maps, masks = _reference_maps(run_dir, data)
    got = np.array([r["score"] for r in result["scores"]])
    np.testing.assert_allclose(got, ref_scores, rtol=1e-4, atol=1e-6)
    labels = np.array([s.label for s in samples])
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, ref_scores), abs=1e-9)
    pix_true = np.concatenate([m.ravel() for m in masks])
    pix_score = np.concatenate([m.ravel() for m in ref_maps])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(pix_true, pix_score), abs=2e-4)
    pred = ref_scores > result["threshold"]
    assert result["accuracy"] == pytest.approx(float((pred == (labels == 1)).mean()))
    crack = [i for i, s in enumerate(samples) if s.defect in ("good", "crack")]
    assert result["per_defect"]["crack"]["image_auroc"] == pytest.approx(roc_auc_score(labels[crack], ref_scores[crack]))
    # each type's share of the defective pixels, from the masks themselves
    area = dict.fromkeys(DEFECT_TYPES, 0)
    for s, m in zip(samples, masks, strict=True):
        if s.label == 1:
            area[s.defect] += int(m.sum())
    for d in DEFECT_TYPES:
        assert result["per_defect"][d]["pixel_share"] == pytest.approx(area[d] / sum(area.values()))

    files = [Path(p) for p in result["overlays"]]
    assert len(files) == 2 + 2 + 1 and all(p.is_file() for p in files)
    assert cv2.imread(str(files[0])).shape[:2] == (96, 96)
    assert any(p.name.startswith("good_top") for p in files)
    table = format_table(result)
    assert "crack" in table and "F1-max" in table


def test_eval_without_masks_reports_image_metrics_only(run_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for sub, value in (("good", 100), ("bad", 200)):
        (root / sub).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(root / sub / f"{i}.png"), np.full((64, 80, 3), value + i, np.uint8))
    ds = open_dataset(root)
    if not ds.test:
        pytest.skip("folder layout without held-out good images gives no test split")
    result = evaluate_run(run_dir, ds, device="cpu")
    assert result["pixel_auroc"] is None and result["aupro"] is None


def test_eval_errors(run_dir: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="without model.pt"):
        evaluate_run(tmp_path / "nothing", data)
    with pytest.raises(DataError):
        evaluate_run(run_dir, tmp_path / "no_data")


def test_eval_cli_writes_json(run_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    assert main([str(run_dir), "--data", str(data), "--json", str(out), "--device", "cpu", "--no-pixel-metrics"]) == 0
    result = json.loads(out.read_text())
    assert result["pixel_auroc"] is None and 0.0 <= result["image_auroc"] <= 1.0
    assert "per_defect" in result and "all" in capsys.readouterr().out


def test_operating_point_and_threshold_rules_count_false_rejects_and_escapes() -> None:
    from build_engines.evaluate import compare_threshold_rules, operating_point

    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.9, 0.2, 0.5, float("nan"), 2.0])
    op = operating_point(labels, scores, 0.4)
    assert (op["false_rejects"], op["good"], op["escapes"], op["defects"]) == (1, 3, 1, 4)  # NaN counts as NG
    assert op["false_reject_rate"] == pytest.approx(1 / 3) and op["escape_rate"] == pytest.approx(1 / 4)
    rules = compare_threshold_rules([0.1, 0.2, 0.3, 0.25], labels, scores, rules=("max", "sigma:0"))
    assert rules["max"]["threshold"] == pytest.approx(0.3) and rules["max"]["escapes"] == 1
    assert rules["sigma:0"]["threshold"] == pytest.approx(0.2125)


def test_eval_prints_the_operating_point(run_dir: Path, data: Path) -> None:
    result = evaluate_run(run_dir, data, device="cpu", batch_size=4)
    op = result["operating_point"]
    assert op["good"] == 3 and op["defects"] == len(DEFECT_TYPES)
    assert op["false_rejects"] == sum(s["score"] > result["threshold"] for s in result["scores"] if s["label"] == 0)
    text = format_table(result)
    assert f"false rejects {op['false_rejects']}/3 good" in text and f"escapes {op['escapes']}/{len(DEFECT_TYPES)} defects" in text

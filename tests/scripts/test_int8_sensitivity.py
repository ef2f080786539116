"""scripts/int8_sensitivity.py on a generated set: the rules it compares and the figures it reports."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from build_engines.export import export_bundle
from build_engines.synthetic import generate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "int8_sensitivity.py"
SIZE = 128


def _load_script() -> object:
    spec = importlib.util.spec_from_file_location("int8_sensitivity", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_reports_each_rule(tmp_path: Path, make_run: Callable[..., Path]) -> None:
    torch.set_num_threads(1)
    data = generate(tmp_path / "data", n_train=4, n_test_good=2, n_test_defect=2, size=SIZE, seed=0)
    run = make_run(tmp_path / "run", SIZE, quantiles=(0.0, 2.0, 0.0, 1.5), data=str(data))  # positive maps: distinct scores
    bundle = export_bundle(run, tmp_path / "bundle", variants=("merged",))
    mod = _load_script()
    out = tmp_path / "rows.json"
    assert mod.main([str(run), str(bundle), "--rules", "all,default", "--test-images", "4", "--calib-images", "2", "--threads", "1", "--json", str(out)]) == 0  # type: ignore[attr-defined]
    rows = json.loads(out.read_text())
    assert [r["rule"] for r in rows] == ["fp32", "all", "default"]
    assert rows[1]["float_convs"] == 0 and rows[2]["float_convs"] == 16
    for r in rows[1:]:
        assert r["ms_per_image"] > 0 and 0.5 < r["local_map_corr"] <= 1.0 and 0.5 < r["global_map_corr"] <= 1.0 and 0.0 < r["score_rank_corr"] <= 1.0
    with pytest.raises(SystemExit, match="unknown rule"):
        mod.main([str(run), str(bundle), "--rules", "everything"])  # type: ignore[attr-defined]

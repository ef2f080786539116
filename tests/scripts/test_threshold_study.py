"""scripts/threshold_study.py: rules from eval and time-to-accuracy reports, side by side per set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from build_engines.evaluate import compare_threshold_rules
from edgead.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "threshold_study.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("threshold_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rules_from_eval_and_curve_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    val = list(rng.normal(0, 1, 200))
    labels = np.array([0] * 100 + [1] * 100)
    scores = np.concatenate([rng.normal(0, 1, 100), rng.normal(3, 1, 100)])
    rules = compare_threshold_rules(val, labels, scores)
    (tmp_path / "a.json").write_text(json.dumps({"threshold_rules": rules}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [{"threshold_rules": {}}, {"threshold_rules": rules}]}))
    mod = _module()
    assert mod.main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}", "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads((tmp_path / "s.json").read_text())
    # a lower quantile rejects more goods and lets fewer defects escape than max
    assert out["summary"]["quantile:0.95"]["false_reject_rate_max"] > out["summary"]["max"]["false_reject_rate_max"]
    assert out["summary"]["quantile:0.95"]["escape_rate_mean"] < out["summary"]["max"]["escape_rate_mean"]
    assert "| `max` |" in capsys.readouterr().out


def test_a_report_without_rules_is_refused(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps({"image_auroc": 0.9}))
    with pytest.raises(ConfigError, match="threshold_rules"):
        _module().load_rules(tmp_path / "old.json")

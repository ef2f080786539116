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


def _rules(seed: int, shift: float) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 100 + [1] * 100)
    scores = np.concatenate([rng.normal(shift, 1, 100), rng.normal(3, 1, 100)])  # test goods shifted against validation
    return compare_threshold_rules(list(rng.normal(0, 1, 200)), labels, scores)


def test_rules_from_eval_and_curve_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _rules(0, 0.0), _rules(1, 1.0)
    (tmp_path / "a.json").write_text(json.dumps({"threshold_rules": a}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [{"threshold_rules": {}}, {"threshold_rules": b}]}))  # last row counts
    mod = _module()
    assert mod.main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}", "--json", str(tmp_path / "s.json")]) == 0
    out = json.loads((tmp_path / "s.json").read_text())
    for rule in ("max", "quantile:0.95", "sigma:3"):
        fr = [a[rule]["false_reject_rate"], b[rule]["false_reject_rate"]]
        assert out["summary"][rule]["false_reject_rate_max"] == pytest.approx(max(fr))
        assert out["summary"][rule]["false_reject_rate_mean"] == pytest.approx(sum(fr) / 2)
        assert out["summary"][rule]["escape_rate_mean"] == pytest.approx((a[rule]["escape_rate"] + b[rule]["escape_rate"]) / 2)
    assert b["quantile:0.95"]["false_reject_rate"] > a["quantile:0.95"]["false_reject_rate"]  # the shifted set rejects more
    printed = capsys.readouterr().out
    assert f"| `max` | {100 * a['max']['false_reject_rate']:.1f} % / {100 * a['max']['escape_rate']:.1f} % |" in printed


def test_bad_reports_are_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps({"image_auroc": 0.9}))
    mod = _module()
    with pytest.raises(ConfigError, match="threshold_rules"):
        mod.load_rules(tmp_path / "old.json")
    with pytest.raises(ConfigError, match="readable"):
        mod.load_rules(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        mod.main([f"a={tmp_path / 'old.json'}", f"a={tmp_path / 'old.json'}"])

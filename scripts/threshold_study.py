"""Threshold rules side by side: false-reject rate on test goods and escape rate on defects of every rule,
per data set, from the ``threshold_rules`` of ``edgead eval --json`` reports (or time-to-accuracy rows).

Each rule is fitted on the run's held-out validation-good scores only (never on test images); the table shows
how far each rule's false-reject rate on test goods varies from set to set (max and mean over the sets).

    python scripts/threshold_study.py mtile=runs/mt/eval.json bsdata=runs/bs/eval.json --json study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgead.errors import ConfigError, message


def load_rules(path: Path) -> dict[str, Any]:
    """The ``threshold_rules`` of an eval report, or of the last row of a time-to-accuracy report."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(message("report", f"{path}: {e}", "a readable edgead eval JSON", "pass NAME=PATH of an edgead eval --json output")) from None
    if isinstance(report, dict) and "rows" in report:
        report = report["rows"][-1]
    rules = report.get("threshold_rules") if isinstance(report, dict) else None
    if not rules:
        raise ConfigError(message("report", str(path), "an edgead eval JSON with threshold_rules", "re-run edgead eval --json with this version"))
    return dict(rules)


def study(reports: dict[str, Path]) -> dict[str, Any]:
    per_set = {name: load_rules(path) for name, path in reports.items()}
    rules = list(dict.fromkeys(rule for rules in per_set.values() for rule in rules))
    summary = {}
    for rule in rules:
        fr = [r["false_reject_rate"] for s in per_set.values() if (r := s.get(rule)) and r["false_reject_rate"] is not None]
        esc = [r["escape_rate"] for s in per_set.values() if (r := s.get(rule)) and r["escape_rate"] is not None]
        summary[rule] = {"false_reject_rate_max": max(fr, default=None), "false_reject_rate_mean": sum(fr) / len(fr) if fr else None,
                         "escape_rate_mean": sum(esc) / len(esc) if esc else None}
    return {"sets": {k: str(v) for k, v in reports.items()}, "per_set": per_set, "summary": summary}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def format_study(result: dict[str, Any]) -> str:
    sets = list(result["per_set"])
    lines = ["| rule | " + " | ".join(f"{s} FR / escapes" for s in sets) + " | max FR | mean escapes |", "|---" * (len(sets) + 3) + "|"]
    for rule, summ in result["summary"].items():
        cells = []
        for s in sets:
            r = result["per_set"][s].get(rule)
            cells.append("-" if r is None else f"{_pct(r['false_reject_rate'])} / {_pct(r['escape_rate'])}")
        lines.append(f"| `{rule}` | " + " | ".join(cells) + f" | {_pct(summ['false_reject_rate_max'])} | {_pct(summ['escape_rate_mean'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="NAME=PATH of an edgead eval JSON (or a time-to-accuracy JSON)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    reports = {}
    for item in a.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in reports:
            raise ConfigError(message("report", repr(item), "NAME=PATH with a NAME used once", "e.g. mtile=runs/mt/eval.json bsdata=runs/bs/eval.json"))
        reports[name] = Path(path)
    result = study(reports)
    print(format_study(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Threshold rules side by side: false-reject rate on test goods and escape rate on defects of every rule,
per data set, from the ``threshold_rules`` of ``edgead eval --json`` reports (or time-to-accuracy rows).

Each rule is fitted on the run's held-out validation-good scores only (never on test images); the table says
how predictable each rule's false-reject rate is across sets (its nominal rate vs what the test goods show).

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
    report = json.loads(Path(path).read_text())
    if isinstance(report, dict) and "rows" in report:
        report = report["rows"][-1]
    rules = report.get("threshold_rules") if isinstance(report, dict) else None
    if not rules:
        raise ConfigError(message("report", str(path), "an edgead eval JSON with threshold_rules", "re-run edgead eval --json with this version"))
    return dict(rules)


def study(reports: dict[str, Path]) -> dict[str, Any]:
    per_set = {name: load_rules(path) for name, path in reports.items()}
    rules = list(next(iter(per_set.values())))
    summary = {}
    for rule in rules:
        fr = [per_set[s][rule]["false_reject_rate"] for s in per_set if rule in per_set[s]]
        esc = [per_set[s][rule]["escape_rate"] for s in per_set if rule in per_set[s]]
        summary[rule] = {"false_reject_rate_max": max(fr), "false_reject_rate_mean": sum(fr) / len(fr), "escape_rate_mean": sum(esc) / len(esc)}
    return {"sets": {k: str(v) for k, v in reports.items()}, "per_set": per_set, "summary": summary}


def format_study(result: dict[str, Any]) -> str:
    sets = list(result["per_set"])
    lines = ["| rule | " + " | ".join(f"{s} FR / escapes" for s in sets) + " | max FR | mean escapes |", "|---" * (len(sets) + 3) + "|"]
    for rule, summ in result["summary"].items():
        cells = []
        for s in sets:
            r = result["per_set"][s].get(rule)
            cells.append("-" if r is None else f"{100 * r['false_reject_rate']:.1f} % / {100 * r['escape_rate']:.1f} %")
        lines.append(f"| `{rule}` | " + " | ".join(cells) + f" | {100 * summ['false_reject_rate_max']:.1f} % | {100 * summ['escape_rate_mean']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="NAME=PATH of an edgead eval JSON (or a time-to-accuracy JSON)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    reports = {}
    for item in a.reports:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: {item!r}: expected NAME=PATH, e.g. mtile=runs/mt/eval.json")
        reports[name] = Path(path)
    result = study(reports)
    print(format_study(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

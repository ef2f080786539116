"""Prepare the TensorRT 10 type stubs for mypy (TensorRT itself cannot be installed here).

The `tensorrt-stubs` wheel installs `tensorrt/__init__.pyi` into site-packages without a `py.typed`
marker, so mypy ignores it (PEP 561) and treats `tensorrt` as `Any`; its generated stubs also contain two
kinds of syntax errors (parameters named `in`, a parameter without default after defaulted ones).
This copies the stubs into OUT_DIR with those two mechanical fixes; `make typecheck` then runs mypy
with MYPYPATH=OUT_DIR so every TensorRT call in the code is checked against the real API.

    python scripts/trt_stubs.py build/typestubs
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sys
from pathlib import Path

FIXES = [
    (re.compile(r"\bin: "), "in_: "),  # `in` is a keyword
    (re.compile(r"(, channel_axis: int)\)"), r"\1 = ...)"),  # non-default after defaults in add_scale_nd
]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/trt_stubs.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        print("trt_stubs: 'tensorrt-stubs' is not installed; pip install --no-deps tensorrt-stubs==10.13.0.35.1", file=sys.stderr)
        return 1
    stubs = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".pyi")]
    if not stubs:
        print("trt_stubs: the tensorrt-stubs distribution holds no .pyi files", file=sys.stderr)
        return 1
    root = Path(str(dist.locate_file("")))
    shutil.rmtree(out, ignore_errors=True)
    for src in stubs:
        dst = out / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        for pattern, repl in FIXES:
            text = pattern.sub(repl, text)
        dst.write_text(text)
    print(f"trt_stubs: {len(stubs)} stub files -> {out} (tensorrt-stubs {dist.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

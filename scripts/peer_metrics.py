"""Score a peer's predictions (``scripts/peer_anomalib.py``'s .npz) with EdgeAD's own metrics and protocol:
maps resized bilinearly to each image's full resolution, image AUROC on the scores, pixel AUROC and AU-PRO
(FPR <= 0.3) against the set's masks, exactly as ``edgead eval`` scores an EdgeAD run.

    python scripts/peer_metrics.py runs/peer_bsdata.npz --data /work/shared/data/ad/bsdata_ballscrew --json runs/peer_bsdata.eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgead.datasets import open_dataset, read_image, read_mask
from edgead.errors import DataError, message
from edgead.metrics import aupro, image_auroc, pixel_auroc
from edgead.postprocess import resize_bilinear


def score_predictions(npz: Path, data: Path) -> dict[str, Any]:
    pred = np.load(npz)
    by_path = {Path(p).resolve(): i for i, p in enumerate(pred["paths"])}
    samples = open_dataset(data).test
    missing = [s.path for s in samples if s.path.resolve() not in by_path]
    if missing:
        raise DataError(message("peer predictions", f"{len(missing)} test images without a prediction (e.g. {missing[0]})", "one per test image", "re-run the peer on this data set"))
    labels, scores, maps, masks = [], [], [], []
    for s in samples:
        i = by_path[s.path.resolve()]
        frame = read_image(s.path)
        labels.append(s.label)
        scores.append(float(pred["scores"][i]))
        maps.append(resize_bilinear(pred["maps"][i][None].astype(np.float32), frame.shape[0], frame.shape[1])[0])
        masks.append(read_mask(s, frame.shape))
    y = np.array(labels)
    return {"image_auroc": image_auroc(y, np.array(scores)), "pixel_auroc": pixel_auroc(masks, maps), "aupro": float(aupro(masks, maps)), "test_images": len(samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = score_predictions(args.npz, args.data)
    meta = args.npz.with_suffix(".json")
    if meta.is_file():
        result["peer_run"] = json.loads(meta.read_text())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

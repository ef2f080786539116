"""Side-by-side measuring stick: anomalib's EfficientAd-S trained on one of our data sets, predictions dumped
for ``scripts/peer_metrics.py`` (which scores them with EdgeAD's own metrics at full image resolution).

Runs in anomalib's own virtual environment, never in EdgeAD's (anomalib is a peer, not a dependency)::

    python3 -m venv /work/anomalib_venv
    /work/anomalib_venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0
    /work/anomalib_venv/bin/python scripts/peer_anomalib.py --data /work/shared/data/ad/bsdata_ballscrew \\
        --teacher build_engines/weights/teacher_s.pth --imagenet /work/shared/data/generic/imagenet_samples \\
        --image-size 256 --steps 2000 --out runs/peer_bsdata.npz

What is made equal to EdgeAD's run: the teacher file (converted to anomalib's ``conv1..conv4`` fp32 layout and
put where anomalib loads its pretrained teacher), the image size, the number of steps, the penalty images, and
the quantiles, fitted on a split of train/good (``val_split_mode="from_train"``; anomalib's default fits them
on the test set). Everything else is anomalib's default (fp32, lr 1e-4, batch 1). Nothing is downloaded: the
teacher and the ImageFolder of penalty images are prepared locally first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def anomalib_teacher(src: Path, dst: Path) -> None:
    """Our Sequential-layout PDN-S teacher (0/3/6/8) -> anomalib's conv1..conv4, fp32."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    mapping = {"0": "conv1", "3": "conv2", "6": "conv3", "8": "conv4"}
    out = {f"{mapping[k.split('.')[0]]}.{k.split('.')[1]}": v.float() for k, v in state.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)


def image_folder(images: Path, root: Path) -> Path:
    """torchvision ImageFolder root with one class folder of symlinks to ``images``."""
    cls = root / "all"
    cls.mkdir(parents=True, exist_ok=True)
    for p in sorted(images.iterdir()):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not (cls / p.name).exists():
            os.symlink(p.resolve(), cls / p.name)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout set (read with anomalib's Folder datamodule: train/good, test/<defect>, ground_truth/<defect>)")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--imagenet", type=Path, required=True, help="folder of generic images for the penalty")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help=".npz with test paths, scores and maps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import EfficientAd
    from anomalib.utils.path import get_pretrained_weights_dir

    anomalib_teacher(args.teacher, get_pretrained_weights_dir() / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth")
    work = Path(tempfile.mkdtemp(prefix="peer_anomalib_"))
    imagenet = image_folder(args.imagenet, work / "imagenet")
    # anomalib's MVTecAD reads .png only; Folder takes the same MVTec layout with any image extension
    defects = sorted(d.name for d in (args.data / "test").iterdir() if d.is_dir() and d.name != "good")
    masks = [args.data / "ground_truth" / d for d in defects if (args.data / "ground_truth" / d).is_dir()]
    if 0 < len(masks) < len(defects):  # anomalib pairs masks with images by position: all or none
        raise SystemExit(f"error: {args.data}: masks for {len(masks)} of {len(defects)} defect types; add the missing ground_truth folders or remove them all")
    dm = Folder(
        name=args.data.name, root=args.data, normal_dir="train/good", normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects], mask_dir=masks if len(masks) == len(defects) else None,
        extensions=(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"), train_batch_size=1, eval_batch_size=8, num_workers=0,
        val_split_mode="from_train", val_split_ratio=0.1, seed=0,
    )
    size = (args.image_size, args.image_size)
    # raw scores and maps (its post-processor min-max normalises and clamps scores, which creates ties); metrics are ours
    model = EfficientAd(imagenet_dir=imagenet, model_size="small", pre_processor=EfficientAd.configure_pre_processor(size), post_processor=False, evaluator=False, visualizer=False)
    engine = Engine(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, default_root_dir=work, enable_progress_bar=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=dm.test_dataloader())
    predict_s = time.perf_counter() - t1
    paths, scores, maps = [], [], []
    for b in batches or []:
        paths += [str(x) for x in b.image_path]
        scores += b.pred_score.detach().float().reshape(-1).tolist()
        maps.append(b.anomaly_map.detach().float().reshape(len(b.image_path), *b.anomaly_map.shape[-2:]).numpy())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, paths=np.array(paths), scores=np.array(scores, np.float32), maps=np.concatenate(maps).astype(np.float16))
    meta = {"peer": "anomalib", "command": " ".join([sys.executable, *sys.argv]), "train_s": round(train_s, 1), "predict_s": round(predict_s, 1),
            "steps": args.steps, "image_size": args.image_size, "threads": args.threads, "torch": torch.__version__}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

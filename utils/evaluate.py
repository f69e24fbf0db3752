"""Validate a model's weights on a data.yaml split with the stock Ultralytics validator."""

import tempfile
from pathlib import Path

from ultralytics.models.yolo.detect import DetectionValidator

from utils.offline import no_downloads

# Ultralytics metric keys -> the short names used in Flower metrics, metrics.csv and the console.
KEYS = {
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "map50",
    "metrics/mAP50-95(B)": "map50_95",
}


def evaluate(model, data_yaml, hyp, split="val"):
    """Return precision, recall, map50, map50_95 and the image count of `model` on `split` of `data_yaml`.

    The validator fuses Conv+BN in place (BatchNorm folded into the convolutions): pass a model built for evaluation
    only, never one whose parameters are read afterwards.
    """
    no_downloads()
    keep = ("imgsz", "batch", "device", "workers")
    args = {k: hyp[k] for k in keep if k in hyp}
    args.update(data=str(data_yaml), split=split, plots=False, verbose=False, save_json=False, half=False)
    with tempfile.TemporaryDirectory(prefix="fedyolo-val-") as work:
        validator = DetectionValidator(save_dir=Path(work), args=args)
        stats = validator(model=model)
        images = len(validator.dataloader.dataset)
    return {**{short: float(stats[k]) for k, short in KEYS.items()}, "images": images}

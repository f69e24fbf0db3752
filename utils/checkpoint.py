"""Write an ordinary Ultralytics .pt checkpoint (loadable by YOLO(), yolo val/predict/export) from a model."""

from copy import deepcopy
from datetime import datetime

import torch
import ultralytics
from ultralytics.nn.tasks import guess_model_task

from utils.atomic import atomic_open


def write_checkpoint(model, out, train_args=None, meta=None):
    """Save `model` (float32, as given) with its class names as an Ultralytics checkpoint at `out`, atomically.

    Args:
        model (DetectionModel | SegmentationModel | ...): the model; not modified.
        out (str | Path): the .pt path.
        train_args (dict | None): Ultralytics arguments stored with it (task, imgsz, ...).
        meta (dict | None): where the weights came from, stored under the key `federated`.
    """
    ckpt = {
        "date": datetime.now().isoformat(),
        "version": ultralytics.__version__,
        "model": deepcopy(model).eval(),
        "train_args": {"task": guess_model_task(model), **(train_args or {})},
        "federated": meta or {},
    }
    with atomic_open(out) as f:
        torch.save(ckpt, f)
    return out

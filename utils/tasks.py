"""The Ultralytics tasks a federation can train, and what differs between them: one table, read everywhere else.

The task comes from the base model (Ultralytics' own `guess_model_task`); each task brings its own Ultralytics model
class, trainer and validator (the same ones `YOLO(...).train()` uses), the label format its clients' data must have,
and the validation metrics that go into metrics.csv. `metric` is the one that decides best.pt and the console's
"best" (a run's score).
"""

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """What one Ultralytics task needs from the federation (see module doc)."""

    name: str
    model: str  # class in ultralytics.nn.tasks
    module: str  # ultralytics.models.yolo.<module> holds the trainer and validator
    trainer: str
    validator: str
    metrics: dict = field(default_factory=dict)  # Ultralytics result key -> short name in metrics.csv
    metric: str = "map50_95"  # the short name that scores a round (best.pt)
    label: str = "mAP50-95"  # how the console and results.png name `metric`
    folders: bool = False  # the dataset is an ImageFolder-style folder (classify), not a data.yaml with label files

    def load(self, part):
        """Return this task's Ultralytics class for `part`: "model", "trainer" or "validator"."""
        module = "ultralytics.nn.tasks" if part == "model" else f"ultralytics.models.yolo.{self.module}"
        return getattr(importlib.import_module(module), getattr(self, part))

    def label_problem(self, values, kpt_shape=None):
        """Return why a label line of `values` numbers (class id included) does not fit this task, or None."""
        if self.name == "segment" and (values < 7 or values % 2 == 0):
            return f"{values} numbers; a segment label is a class id and a polygon of 3 or more x y points"
        if self.name == "obb" and values != 9:
            return f"{values} numbers; an oriented-box label is a class id and 4 corner points (9 numbers)"
        if self.name == "pose" and kpt_shape:
            want = 5 + kpt_shape[0] * kpt_shape[1]
            if values != want:
                return f"{values} numbers; with kpt_shape {list(kpt_shape)} a pose label has {want}"
        if self.name == "detect" and values < 5:
            return f"{values} numbers; a detection label is a class id and x y w h"
        return None


def _box(prefix, tag):
    """Return Ultralytics' box-style metric keys with result tag `tag` ('B', 'M', 'P') as `prefix` short names."""
    return {f"metrics/precision({tag})": f"{prefix}precision", f"metrics/recall({tag})": f"{prefix}recall",
            f"metrics/mAP50({tag})": f"{prefix}map50", f"metrics/mAP50-95({tag})": f"{prefix}map50_95"}


TASKS = {
    "detect": Task("detect", "DetectionModel", "detect", "DetectionTrainer", "DetectionValidator", _box("", "B")),
    "segment": Task("segment", "SegmentationModel", "segment", "SegmentationTrainer", "SegmentationValidator",
                    {**_box("", "B"), **_box("mask_", "M")}, "mask_map50_95", "mask mAP50-95"),
    "pose": Task("pose", "PoseModel", "pose", "PoseTrainer", "PoseValidator",
                 {**_box("", "B"), **_box("pose_", "P")}, "pose_map50_95", "pose mAP50-95"),
    "obb": Task("obb", "OBBModel", "obb", "OBBTrainer", "OBBValidator", _box("", "B")),
    "classify": Task("classify", "ClassificationModel", "classify", "ClassificationTrainer", "ClassificationValidator",
                     {"metrics/accuracy_top1": "top1", "metrics/accuracy_top5": "top5"}, "top1", "top-1 accuracy",
                     folders=True),
}


def get_task(name):
    """Return the Task called `name` (as Ultralytics names it: detect, segment, pose, obb, classify)."""
    if name not in TASKS:
        raise ValueError(f"task '{name}' is not one the federation trains ({', '.join(TASKS)})")
    return TASKS[name]

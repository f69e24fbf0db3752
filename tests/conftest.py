"""Shared fixtures: a tiny generated federation (a handful of images per client) and tiny training settings."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.demo import make_demo  # noqa: E402

TINY = {"imgsz": 32, "batch": 4, "device": "cpu", "workers": 0, "seed": 0, "optimizer": "AdamW", "lr0": 0.001}


@pytest.fixture(scope="session")
def tiny_fed(tmp_path_factory):
    """Three tiny demo clients (8 train, 4 val images each) and the test data.yaml."""
    return make_demo(tmp_path_factory.mktemp("demo"), seed=0, n_train=8, n_val=4)


@pytest.fixture(scope="session")
def tiny_model():
    """The yolov8n architecture for the demo classes, and its names."""
    from utils.demo import NAMES
    from utils.model import read_base

    return read_base("yolov8n.yaml")[0], NAMES

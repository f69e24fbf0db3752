"""One real Flower simulation end to end: 2 clients x 2 rounds through `python3 federated.py`."""

import json
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT
from utils.params import load_npz


def test_simulation_two_clients_two_rounds(tiny_fed, tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, tiny_fed[0][:2]),
           "--num-rounds", "2", "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu",
           "--save-dir", str(save)]

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "round 1/2" in log and "round 2/2" in log and "mAP50-95" in log
    assert "Traceback" not in log
    rounds = [load_npz(save / f"round{i}.npz") for i in (1, 2)]
    for arrays in rounds:
        assert len(arrays) == 355
        assert {a.dtype.name for a in arrays} == {"float32", "int64"}
        assert all(np.isfinite(a).all() for a in arrays)
    assert any(not np.array_equal(a, b) for a, b in zip(*rounds))  # round 2 moved the model
    config = json.loads((save / "config.json").read_text())
    assert config["names"] == ["circle", "square", "triangle", "cross"]
    assert config["settings"]["NUM_ROUNDS"] == 2
    assert not [p for p in save.iterdir() if p.name.endswith(".tmp")]

    r = subprocess.run([sys.executable, str(ROOT / "utils" / "export_federated.py"), "yolov8n.yaml",
                        str(save / "round2.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from ultralytics import YOLO

    assert YOLO(str(save / "round2.pt")).names[3] == "cross"

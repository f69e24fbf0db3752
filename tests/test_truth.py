"""Runs that tell the truth: a diverged model stops the run, DP noise that would destroy the model is named at start,
a run that learned nothing says so, and the small lines a user reads are right."""

import csv
import logging
import subprocess
import sys

import numpy as np
import pytest

import federated
from tests.conftest import ROOT
from utils.config import resolve
from utils.console import LOGGER
from utils.datasets import client_name
from utils.record import RoundRecord
from utils.resume import interrupted_line
from utils.tasks import get_task


@pytest.fixture
def lines():
    """The project's log lines while a test runs."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    LOGGER.addHandler(handler)
    yield seen
    LOGGER.removeHandler(handler)


def _record(tmp_path, rows=(), rounds=5):
    cfg = {**federated.DEFAULTS, "SAVE_DIR": str(tmp_path), "NUM_ROUNDS": rounds}
    task = get_task("detect")
    return RoundRecord(cfg, {"rows": list(rows), "offset": 0}, task.metric, task.label, task, "the DP noise")


def test_divergence_is_a_non_finite_or_tenfold_train_loss_or_non_finite_weights(tmp_path):
    weights = [np.ones(3, np.float32), np.array(5)]
    record = _record(tmp_path)
    assert record.check_divergence(1, weights, [0.05, 0.1, 0.01]) is None  # from scratch: no box matched yet
    assert record.check_divergence(2, weights, [1.5, 2.5, 0.5]) is None  # 27x that, as a model learns
    assert record.check_divergence(3, weights, [60.0, 39.0, 1.0]) is None  # 10x the floor of 10: no alarm
    stop = record.check_divergence(4, weights, [3.0e6, 2.0, 1.0])
    assert stop.startswith("round 4: the global model diverged (train loss 3e+06, above 1000: 10x the highest of "
                           "the earlier rounds' (100, counted as at least 10))"), stop
    assert "likely cause: the DP noise" in stop and f"rounds 1-3 are kept in {tmp_path}" in stop
    assert record.failure() == stop  # the run's verdict, and so its exit code 1

    assert "its train loss is nan" in _record(tmp_path).check_divergence(1, weights, [float("nan")])
    bad = [np.array([1.0, np.inf], np.float32), np.array(5)]
    assert "its weights hold NaN or Inf" in _record(tmp_path).check_divergence(2, bad, [1.0])
    resumed = _record(tmp_path, rows=[{"round": "1", "train_box_loss": "2.0", "train_cls_loss": "1.0"}])
    assert "above 100: 10x" in resumed.check_divergence(2, weights, [101.0])  # the floor: metrics.csv's 3 is less


def test_a_diverged_run_with_fixed_bn_from_scratch_names_fixed_bn_as_the_likely_cause():
    from utils.schedule import fixed_bn_cause

    cause = fixed_bn_cause({"FIXED_BN": 2, "BASE_MODEL": "yolov8n.yaml"})
    assert cause.startswith("fixed-bn 2 with a model trained from scratch")
    assert fixed_bn_cause({"FIXED_BN": 2, "BASE_MODEL": "runs/start/best.pt"}) is None  # what it is for
    assert fixed_bn_cause({"FIXED_BN": 0, "BASE_MODEL": "yolov8n.yaml"}) is None


def test_a_run_that_learned_nothing_says_so_and_one_that_learned_does_not(tmp_path, lines):
    record = _record(tmp_path)
    record.trained, record.best, record.best_round = 1, 0.0002, 1
    record.summary()
    assert any("scored mAP50-95 0.000 in every round: it learned nothing" in line for line in lines)
    lines.clear()
    record.best = 0.01
    record.summary()
    assert not any("learned nothing" in line for line in lines) and any(line.startswith("done:") for line in lines)


def test_names_and_the_interrupted_line_read_right(tmp_path):
    assert client_name("client0") == "client0" and client_name("dark") == "client dark" and client_name(3) == "client 3"
    cfg = {"SAVE_DIR": str(tmp_path), "NUM_ROUNDS": 4}
    (tmp_path / "round1.npz").write_bytes(b"")
    with (tmp_path / "metrics.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["round"], ["1"]])
    assert interrupted_line(cfg).startswith(f"interrupted: round 1 of 4 is complete in {tmp_path}; continue with: ")


def test_a_val_split_equal_to_the_train_split_is_named(tiny_fed, tmp_path, lines):
    src = tiny_fed[0][0]
    same = tmp_path / "same.yaml"
    same.write_text(src.read_text().replace("val: val", "val: train").replace("val: images/val", "val: images/train"))
    assert "val" in same.read_text()
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(same), str(tiny_fed[0][1])], "save-dir": str(tmp_path / "r")})
    federated.prepare(cfg)
    warned = [line for line in lines if "its val split is its train split" in line]
    assert len(warned) == 1 and str(same) in warned[0]


@pytest.mark.slow
def test_dp_noise_that_destroys_the_model_is_named_at_start_and_stops_the_run(tiny_fed, tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, tiny_fed[0][:2]), "--dp-clip", "100",
           "--num-rounds", "3", "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--evaluate",
           "false", "--save-dir", str(save)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    warning = next(line for line in log.splitlines() if "it will destroy the model" in line)
    assert "dp-noise 1 x dp-clip 100 / 2 clients gives noise of std 50" in warning and "a dp-clip of" in warning
    last = log.strip().splitlines()[-1]
    assert last.startswith("federated.py: round 2: the global model diverged (train loss ") and "10x the hig" in last
    assert "likely cause: the DP noise" in last and f"round 1 is kept in {save}" in last
    assert (save / "round1.npz").is_file() and not (save / "round2.npz").exists()
    assert "done:" not in log and "Traceback" not in log


@pytest.mark.slow
def test_a_clients_score_is_what_yolo_val_prints_for_the_same_weights(tmp_path):
    from ultralytics import YOLO

    from utils import evaluate as evaluate_module
    from utils.demo import make_demo

    clients, _ = make_demo(tmp_path / "demo", seed=0)  # the demo's dark client: 96 train, 24 val images
    YOLO("yolov8n.yaml").train(data=str(clients[0]), epochs=30, imgsz=64, batch=8, workers=0, device="cpu", seed=0,
                               project=str(tmp_path), name="t", plots=False, val=False, verbose=False)
    pt = tmp_path / "t" / "weights" / "last.pt"
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(c) for c in clients[:2]], "base-model": str(pt),
                                       "save-dir": str(tmp_path / "run"), "imgsz": 64, "device": "cpu"})
    run = federated.prepare(cfg)
    strategy = federated.make_strategy(cfg, run)

    _, n, mine = federated.YoloClient(partition_id=0).evaluate(run["initial"], strategy.round_config(1))

    copy = evaluate_module._LAST["copy"]
    _, _, again = federated.YoloClient(partition_id=0).evaluate(run["initial"], strategy.round_config(1))
    assert evaluate_module._LAST["copy"] is copy  # the same weights: the process's fused copy again, the same scores
    assert all(again[k] == mine[k] for k in ("precision", "recall", "map50", "map50_95"))

    theirs = YOLO(str(pt)).val(data=str(clients[0]), split="val", imgsz=64, device="cpu", plots=False, verbose=False)
    assert n == 24 and mine["map50_95"] > 0.002, (mine, theirs.box.map)  # a score that can disagree
    assert mine["map50_95"] == pytest.approx(theirs.box.map, abs=1e-4)
    assert mine["map50"] == pytest.approx(theirs.box.map50, abs=1e-4)


@pytest.mark.slow
def test_every_client_line_once_no_colour_and_the_summary_last(tiny_fed, tmp_path):
    names = []
    for i, src in enumerate(tiny_fed[0]):  # named as utils/partition.py names its clients
        (tmp_path / f"client{i}").mkdir()
        names.append(tmp_path / f"client{i}" / "data.yaml")
        names[-1].write_text(src.read_text())  # its path: stays the demo client's folder
    out = tmp_path / "log.txt"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, names), "--num-rounds", "2",
           "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(tmp_path / "run")]
    with out.open("w") as f:  # a file, not a terminal
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600)
    log = out.read_text()
    assert r.returncode == 0, log[-3000:]
    assert "\x1b[" not in log and "repeated" not in log and "client client" not in log
    for rnd in (1, 2):
        for i in range(3):
            assert sum(f"client{i}  round {rnd}/2  epoch 1/1" in line for line in log.splitlines()) == 1, log
    lines = log.strip().splitlines()
    done = next(i for i, line in enumerate(lines) if "done: 2 rounds in" in line)
    assert all("ClientAppActor" not in line and "client" not in line.split(":", 1)[-1][:20] for line in lines[done:])
    assert lines[-1].split(":", 1)[-1].strip().startswith("peak memory of the server process")

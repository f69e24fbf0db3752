"""Learning quality and wall time: centralized Ultralytics vs this federation vs the seed README's naive loop.

Usage:
    python3 bench/bench.py [--rounds 15] [--epochs 2] [--out bench/results.md]

All three start from the same base model, see the same number of image-epochs (every train image ROUNDS x EPOCHS
times) and are evaluated on one held-out test split of the demo federation (every style and class):
- centralized: `YOLO(base).train(data=<union of the clients' train splits>, epochs=ROUNDS*EPOCHS)` with the same
  batch (8) and nominal batch (8) as the clients, and once more with Ultralytics' defaults (16, 64) for reference;
- federated: `python3 federated.py` on the clients (per-round evaluation off, so only training is timed);
- naive: the seed's loop: per round and client `YOLO(global.pt).train(data, epochs=EPOCHS)`, weights read back from
  the YOLO object after train() (best.pt, fp16 EMA), every array averaged by train images.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ultralytics import YOLO  # noqa: E402

from utils.aggregate import weighted_average  # noqa: E402
from utils.datasets import check_dataset  # noqa: E402
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402
from utils.params import get_weights, save_npz  # noqa: E402


def test_map(weights, test_yaml, args):
    """Return mAP50-95 and mAP50 of a .pt on the test split."""
    args = {k: v for k, v in args.items() if k != "nbs"}
    project = str(Path(test_yaml).parent.parent.parent / "val")  # inside the bench's work folder
    m = YOLO(str(weights)).val(data=str(test_yaml), split="test", plots=False, verbose=False, project=project, **args)
    return float(m.box.map), float(m.box.map50)


def centralized(clients, test_yaml, epochs, base, work, args, name="central"):
    """Train plain Ultralytics on the union of the clients' train splits; return (test mAP, seconds)."""
    union = work / "union.yaml"
    checks = [check_dataset(c) for c in clients]
    trains, names = [c["yaml"]["train"] for c in checks], checks[0]["names"]
    union.write_text(json.dumps({"train": trains, "val": trains[0], "names": dict(enumerate(names))}))
    t = time.time()
    model = YOLO(base)
    model.train(data=str(union), epochs=epochs, val=False, plots=False, project=str(work), name=name,
                exist_ok=True, **args)
    seconds = time.time() - t
    return test_map(Path(model.trainer.last), test_yaml, args), seconds


def federated(clients, test_yaml, rounds, epochs, base, work, args, name="federated", extra=()):
    """Run federated.py on the clients (with `extra` flags); return (test mAP of the last round, seconds)."""
    save = work / name
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, clients), "--num-rounds", str(rounds),
           "--epochs", str(epochs), "--base-model", base, "--save-dir", str(save), "--exist-ok", "--evaluate", "false",
           "--imgsz", str(args["imgsz"]), "--batch", str(args["batch"]), "--nbs", str(args["nbs"]),
           "--device", args["device"], *extra]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - t
    pt = export(base, save / f"round{rounds}.npz")
    return test_map(pt, test_yaml, args), seconds


def naive(clients, test_yaml, rounds, epochs, base, work, args):
    """The seed README's loop; return (test mAP of the last round, seconds)."""
    checks = [check_dataset(c) for c in clients]
    sizes, names = [c["train_images"] for c in checks], checks[0]["names"]
    current, t = base, time.time()
    for r in range(1, rounds + 1):
        updates = []
        for i, c in enumerate(clients):
            model = YOLO(current)
            model.train(data=str(c), epochs=epochs, plots=False, project=str(work / "naive"), name=f"r{r}c{i}",
                        exist_ok=True, **args)
            updates.append(get_weights(model.model))  # what the seed reads back: best.pt, fp16 EMA
        npz = work / "naive" / f"round{r}.npz"  # every array averaged, as Flower's FedAvg does
        save_npz(npz, weighted_average(list(zip(updates, sizes)), updates[0]))
        current = str(export(base, npz, names=names))
    seconds = time.time() - t
    return test_map(current, test_yaml, args), seconds


def main():
    """Run the three trainings and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--base-model", default="yolov8n.yaml")
    p.add_argument("--work", default="runs/bench", help="scratch folder (data, runs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    p.add_argument("--skip-naive", action="store_true")
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clients, test_yaml = make_demo(work / "demo")
    args = {"imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "device": "cpu"}  # federated.py's defaults, for all
    total = a.rounds * a.epochs
    rows = {"centralized": centralized(clients, test_yaml, total, a.base_model, work, args),
            "federated": federated(clients, test_yaml, a.rounds, a.epochs, a.base_model, work, args)}
    default = {**args, "batch": 16, "nbs": 64}
    rows["centralized, Ultralytics' default batch 16 / nbs 64"] = centralized(
        clients, test_yaml, total, a.base_model, work, default, name="central-defaults")
    if not a.skip_naive:
        rows["naive"] = naive(clients, test_yaml, a.rounds, a.epochs, a.base_model, work, args)
    c_map = rows["centralized"][0][0] or float("nan")
    lines = [
        f"# Benchmark: {len(clients)} non-IID demo clients, {a.rounds} rounds x {a.epochs} epochs = {total} epochs, "
        f"base {a.base_model}, imgsz 64, CPU",
        "",
        f"Command: `python3 bench/bench.py --rounds {a.rounds} --epochs {a.epochs}`, {time.strftime('%Y-%m-%d')}",
        "",
        "Ratios are to the first row (centralized at the clients' batch settings). Wall times include Ray start-up.",
        "",
        "| run | test mAP50-95 | test mAP50 | / centralized | wall s | wall / centralized |",
        "|---|---|---|---|---|---|",
    ]
    for name, ((m, m50), s) in rows.items():
        wall = s / rows["centralized"][1]
        lines.append(f"| {name} | {m:.4f} | {m50:.4f} | {m / c_map:.2f}x | {s:.0f} | {wall:.2f}x |")
    if "naive" in rows:
        ratio = rows["federated"][0][0] / max(rows["naive"][0][0], 1e-9)
        lines += ["", f"federated / naive (mAP50-95): {ratio:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

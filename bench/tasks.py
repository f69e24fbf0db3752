"""Every task, and partial sharing: federated (FedAvg, the demo federation of each task) vs centralized Ultralytics on
the union of the same images, at equal image-epochs, scored with the task's metric on the task demo's held-out split.

Usage:
    python3 bench/tasks.py                                     # every task and SHARE row -> bench/tasks.md
    python3 bench/tasks.py --tasks segment --rounds 10 --epochs 2 --out /tmp/t.md

Rows: per task, `centralized` and `fedavg`; for detect, also SHARE=backbone and backbone+neck, with the bytes per
client per round and, per client, the score of its personalized model (SAVE_DIR/clients/<name>.pt) and of the
global model on its own val split. Results are cached in WORK/tasks.json by (task, run, rounds x epochs).
"""

import argparse
import csv
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

import yaml  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from utils.datasets import check_dataset  # noqa: E402
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402

BASES = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
         "obb": "yolov8n-obb.yaml", "classify": "yolov8n-cls.yaml"}
SHARES = ("backbone", "backbone+neck")
ARGS = {"imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "device": "cpu"}


def score(weights, data, task, split="test"):
    """Return the task's score of a .pt on a split: mAP50-95 (mask, pose for segment, pose), top-1 for classify."""
    args = {k: v for k, v in ARGS.items() if k != "nbs"}
    m = YOLO(str(weights)).val(data=str(data), split=split, plots=False, verbose=False, **args,
                               project=str(Path(weights).parent / "val"))
    return float({"segment": lambda: m.seg.map, "pose": lambda: m.pose.map, "classify": lambda: m.top1}.get(
        task, lambda: m.box.map)())


def union(clients, task, work):
    """Return the union of the clients' train and val splits as one dataset (a data.yaml; classify: a folder)."""
    if task == "classify":
        out = work / f"union-{task}"
        for i, c in enumerate(clients):
            for split in ("train", "val"):
                for f in Path(c, split).glob("*/*.png"):
                    link = out / split / f.parent.name / f"{i}_{f.name}"
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.is_symlink():
                        link.symlink_to(f)
        return out
    checks = [check_dataset(c, task) for c in clients]
    data = {"path": str(work), "train": [c["yaml"]["train"] for c in checks], "val": [c["yaml"]["val"] for c in checks],
            "names": checks[0]["yaml"]["names"], **{k: checks[0]["yaml"][k] for k in ("kpt_shape", "flip_idx")
                                                     if k in checks[0]["yaml"]}}
    out = work / f"union-{task}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def centralized(clients, test, task, epochs, work):
    """Plain Ultralytics on the union, batch 8 / nbs 8 like the clients; a result dict."""
    t = time.time()
    model = YOLO(BASES[task])
    model.train(data=str(union(clients, task, work)), epochs=epochs, val=False, plots=False, project=str(work),
                name=f"central-{task}", exist_ok=True, seed=0, **ARGS)
    return {"score": score(Path(model.trainer.last), test, task), "seconds": time.time() - t}


def federated(clients, test, task, rounds, epochs, work, share="all"):
    """federated.py on the task's demo clients; a result dict (with per-client scores under SHARE)."""
    save = work / "runs" / f"{task}-{share}"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--base-model", BASES[task], "--datasets", *map(str, clients),
           "--num-rounds", str(rounds), "--epochs", str(epochs), "--save-dir", str(save), "--exist-ok",
           "--evaluate", "false", "--share", share, *[x for k, v in ARGS.items() for x in (f"--{k}", str(v))]]
    t = time.time()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{task} {share} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    seconds = time.time() - t
    with (save / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    pt = export(BASES[task], save / f"round{rounds}.npz")
    out = {"score": score(pt, test, task), "seconds": seconds,
           "mb": (float(last["bytes_down"]) + float(last["bytes_up"])) / 1e6}
    if share != "all":  # each client's own model vs the global one, on its own val split
        out["clients"] = {Path(c).parent.name: {"personal": score(save / "clients" / f"{Path(c).parent.name}.pt", c,
                                                                  task, "val"),
                                                "global": score(pt, c, task, "val")} for c in clients}
    return out


def table(results):
    """Return the markdown report of every cached cell, one section per budget (rounds x epochs)."""
    lines = ["# Tasks and partial sharing: federated vs centralized at equal image-epochs, imgsz 64, 2-core CPU", "",
             "Command: `python3 bench/tasks.py --rounds R --epochs E [--tasks ...]`; one run per cell, seed 0 (cached "
             "in runs/bench/tasks.json).", "",
             "Score: the task's metric on the task demo's held-out test split (detect, obb: mAP50-95; segment: mask "
             "mAP50-95; pose: pose mAP50-95; classify: top-1). Federated: FedAvg over the 3 demo clients of the task, "
             "default settings; centralized: Ultralytics on the union of their images, batch 8, nbs 8, R x E epochs. "
             "MB: sent to plus received from one client in the last round."]
    for key in sorted({k.split("|")[2] for k in results}, key=lambda k: [int(x) for x in k.split("x")]):
        lines += ["", f"## {key.replace('x', ' rounds x ')} local epochs", "",
                  "| task | run | score | / centralized | wall s | MB / client / round | date |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in results.items():
            task, run, kk = k.split("|")
            if kk != key:
                continue
            c = results.get(f"{task}|centralized|{key}")
            ratio = f"{v['score'] / c['score']:.2f}x" if c and c["score"] else "-"
            lines.append(f"| {task} | {run} | {v['score']:.4f} | {ratio} | {v['seconds']:.0f} | "
                         f"{v.get('mb', 0):.1f} | {v.get('date', '')} |")
        shares = [(k, v) for k, v in results.items() if "clients" in v and k.endswith(key)]
        if shares:
            lines += ["", "Partial sharing: each client's own model (clients/<name>.pt) vs the global model (round "
                      "npz), on the client's own val split:", "",
                      "| task | run | client | personalized | global |", "|---|---|---|---|---|"]
            for k, v in shares:
                task, run, _ = k.split("|")
                lines += [f"| {task} | {run} | {c} | {s['personal']:.4f} | {s['global']:.4f} |"
                          for c, s in v["clients"].items()]
    return "\n".join(lines) + "\n"


def main():
    """Run the missing cells and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="*", default=list(BASES), choices=list(BASES))
    p.add_argument("--shares", nargs="*", default=list(SHARES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--out", default=str(ROOT / "bench" / "tasks.md"))
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "tasks.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{a.rounds}x{a.epochs}"

    def cell(task, run, fn):
        if f"{task}|{run}|{key}" in results:
            return
        print(f"measuring {task} / {run} ...", flush=True)
        results[f"{task}|{run}|{key}"] = {**fn(), "date": time.strftime("%Y-%m-%d")}
        cache.write_text(json.dumps(results, indent=1))
        print(f"  {results[f'{task}|{run}|{key}']}", flush=True)

    for task in a.tasks:
        clients, test = make_demo(work / ("demo" if task == "detect" else f"demo-{task}"), task=task)
        cell(task, "centralized", lambda: centralized(clients, test, task, a.rounds * a.epochs, work))
        cell(task, "fedavg", lambda: federated(clients, test, task, a.rounds, a.epochs, work))
        for share in a.shares if task == "detect" else ():
            cell(task, f"share {share}", lambda: federated(clients, test, task, a.rounds, a.epochs, work, share))
    text = table(results)
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

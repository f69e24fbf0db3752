"""Learning quality, wall time and traffic: centralized Ultralytics vs each federated strategy vs the naive loop.

Usage:
    python3 bench/bench.py                                   # the whole table -> bench/results.md
    python3 bench/bench.py --settings non-iid-3 --runs fedavg fedprox   # some cells (others come from the cache)

Every run starts from the same base model, sees the same image-epochs (every train image ROUNDS x EPOCHS times) and
is scored on one held-out test split of the demo data (every style and class). Settings (the same train images,
split several ways):
- non-iid-3: the demo federation (3 clients: dark / light / noisy backgrounds, different class mixes and sizes);
- iid-3, iid-8: the union of the demo clients' images dealt out at random (utils/partition.py --mode iid);
- non-iid-8, non-iid-16: each demo client split at random into 3, 3 and 2 (6, 5 and 5) clients (the style skew stays,
  the clients shrink);
- partial-3: iid-3's clients, but each labels only its own classes (PARTIAL): the others are in its images, unlabelled;
- one-1: the dark client alone (one client is plain Ultralytics: compared with its own `centralized` row, Ultralytics
  on that client's images with the same batch, nbs and epochs);
- iid-1: the union as one client: centralized training cut into ROUNDS rounds (what the round boundaries alone cost:
  a fresh optimizer and trainer each round, no averaging).
Budgets: `--budget image-epochs` (the default: every client trains EPOCHS per round, so the federation sees every
image ROUNDS x EPOCHS times, as centralized does) or `--budget deployment` (each of K clients trains K x EPOCHS per
round on its share: what parallel sites do in the wall time of one centralized run; rows marked so).
Runs: `centralized` (`YOLO(base).train` on the union, batch 8 / nbs 8 like the clients; the same for every setting,
so trained once), `naive` (a plain loop of `YOLO.train()` per round and an average; non-iid-3 only), one row per
strategy with its defaults, and the variants in VARIANTS. Federated runs have per-round evaluation off, so their
wall time is training (and Ray start-up). Results are cached in WORK/results.json by (setting, run, rounds, epochs):
delete it (or --fresh) to measure again.
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

from utils.aggregate import weighted_average  # noqa: E402
from utils.datasets import check_dataset  # noqa: E402
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402
from utils.params import get_weights, save_npz  # noqa: E402
from utils.strategies import STRATEGIES  # noqa: E402

SETTINGS = ("non-iid-3", "iid-3", "non-iid-8", "iid-8", "partial-3", "non-iid-16", "iid-16", "one-1", "iid-1")
SPLITS = {"non-iid-8": (3, 3, 2), "non-iid-16": (6, 5, 5)}  # each demo client split IID into this many
PARTIAL = [["circle", "square"], ["triangle"], ["cross"]]  # partial-3: the classes each client labels
VARIANTS = {  # name: federated.py flags (run on non-iid-3 unless --settings says otherwise)
    "fedavg fp16 up": ["--fp16", "up"],
    "fedavg fp16 both": ["--fp16", "both"],
    "fedavg fedbn": ["--fedbn"],
    "fedavg pooled-bn-var": ["--pooled-bn-var"],
    "fedavg keep-optimizer": ["--keep-optimizer"],
    "fedavg no partial-label mask": ["--partial-labels", "false"],
    "fedavg dp clip 100 no noise": ["--dp-clip", "100", "--dp-noise", "0"],  # bench/privacy.md: clipping's cost
    "fedavg dp clip 100 noise 0.01": ["--dp-clip", "100", "--dp-noise", "0.01"],
    "fedavg secagg": ["--secagg"],  # bench/privacy.md: SecAgg+'s cost in mAP, seconds and bytes
    "fedavg secagg dp clip 100 no noise": ["--secagg", "--dp-clip", "100", "--dp-noise", "0"],
}
# The settings the tables' cells were measured with: pooled BatchNorm variance, BatchNorm recalibration and the kept
# optimizer state became federated.py's defaults on 2026-12-02, the federation's moments on 2026-12-08, and a cached
# cell keeps its meaning only with them off; a row turns them on by name (rcko in results.md, rc-ko in learning.md)
PLAIN = ["--pooled-bn-var", "false", "--bn-recalibrate", "false", "--keep-optimizer", "false",
         "--avg-momentum", "false"]
ARGS = {"imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "device": "cpu"}  # federated.py's defaults, for all


def test_map(weights, test_yaml):
    """Return mAP50-95 and mAP50 of a .pt on the test split."""
    args = {k: v for k, v in ARGS.items() if k != "nbs"}
    project = str(Path(test_yaml).parent.parent.parent / "val")  # inside the bench's work folder
    m = YOLO(str(weights)).val(data=str(test_yaml), split="test", plots=False, verbose=False, project=project, **args)
    return float(m.box.map), float(m.box.map50)


def union_yaml(clients, work):
    """Write a data.yaml whose train and val splits are the union of the clients' splits; return its path."""
    checks = [check_dataset(c) for c in clients]
    union = work / "union.yaml"
    names = dict(enumerate(checks[0]["names"]))
    root = str(Path(clients[0]).parent.parent)  # the demo folder; every split below is absolute anyway
    union.write_text(yaml.safe_dump({"path": root, "train": [c["yaml"]["train"] for c in checks],
                                     "val": [c["yaml"]["val"] for c in checks], "names": names}))
    return union


def setting_clients(name, demo, work):
    """Return the client data.yaml files of a setting (partitions are written under work/partitions)."""
    if name == "non-iid-3":
        return demo
    if name == "one-1":
        return demo[:1]
    from utils.partition import partition

    if name == "partial-3":
        return [partial_client(c, keep, work / "partitions" / name / f"client{i}")
                for i, (c, keep) in enumerate(zip(setting_clients("iid-3", demo, work), PARTIAL))]
    out = work / "partitions" / name
    if name.startswith("iid"):
        return partition(union_yaml(demo, work), int(name.split("-")[1]), mode="iid", seed=0, out=out, verbose=False)
    return [y for i, (c, k) in enumerate(zip(demo, SPLITS[name]))
            for y in partition(c, k, mode="iid", seed=0, out=out / str(i), verbose=False)]


def partial_client(client, keep, out):
    """Write a copy of a client's labels holding only the classes `keep` (renumbered); images are linked."""
    from utils.datasets import image_files

    check = check_dataset(client)
    names = check["names"]
    for split in ("train", "val"):
        for i, image in enumerate(image_files([check["yaml"][split]])):
            link = out / split / "images" / f"{i:05d}{Path(image).suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(image)
            label = Path(image).parent.parent.parent / "labels" / Path(image).parent.name / f"{Path(image).stem}.txt"
            lines = [line.split() for line in label.read_text().splitlines() if line.strip()]
            kept = [" ".join([str(keep.index(names[int(x[0])]))] + x[1:]) for x in lines if names[int(x[0])] in keep]
            dst = out / split / "labels" / f"{i:05d}.txt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text("\n".join(kept) + "\n" if kept else "")
    out_yaml = out / "data.yaml"
    out_yaml.write_text(yaml.safe_dump({"path": str(out), "train": "train/images", "val": "val/images",
                                        "names": dict(enumerate(keep))}))
    return out_yaml


def _other_image(rng, probs, style):
    """Return one image of the `--pretrained` setting's data and its label lines: a gradient or striped background
    and 1-3 shapes (circle, square, ring) in separate columns, so they never overlap (`probs` is not used)."""
    import cv2
    import numpy as np

    from utils.demo import IMG, _color, _draw

    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, IMG)[:, None] if style == "gradient" else (np.arange(IMG) // 8 % 2).astype(float)[:, None]
    img = np.ascontiguousarray(((1 - t) * a + t * b)[None].repeat(IMG, 0).astype(np.uint8))
    lines = []
    for k in range(int(rng.integers(1, 4))):
        r = int(rng.integers(6, 12))
        cx, cy = (k * 21 + 11, int(rng.integers(r + 1, IMG - r - 1)))
        cls, color = int(rng.integers(0, 3)), _color(rng, img.mean())
        if cls == 2:
            cv2.circle(img, (cx, cy), r, color, 2, cv2.LINE_AA)
        else:
            _draw(img, cls, cx, cy, r, color)
        lines.append(f"{cls} {cx / IMG:.6f} {cy / IMG:.6f} {2 * r / IMG:.6f} {2 * r / IMG:.6f}")
    return img, lines


def other_data(out, n_train=240, n_val=48, seed=7):
    """Write the pretraining data of the `--pretrained` setting (skipped when there): other backgrounds (gradients,
    stripes) and classes that partly differ from the demo's (circle, square and a ring; no triangle, no cross)."""
    import numpy as np

    from utils.demo import _write_split

    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        _write_split(out, split, n, rng, None, ("stripes", "gradient"), image=_other_image)
    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out), "train": "images/train", "val": "images/val",
                                                   "names": dict(enumerate(["circle", "square", "ring"]))}))
    return out / "data.yaml"


def pretrained_base(work, epochs=30):
    """Return the `--pretrained` base: yolov8n trained on other_data (batch 8, nbs 8; trained once, then cached)."""
    import shutil

    pt = work / "other.pt"
    if not pt.is_file():
        model = YOLO("yolov8n.yaml")
        model.train(data=str(other_data(work / "other")), epochs=epochs, val=False, plots=False, project=str(work),
                    name="other", exist_ok=True, seed=0, **ARGS)
        shutil.copy(model.trainer.last, pt)
    return str(pt)


def centralized(clients, test_yaml, epochs, base, work, seed=0):
    """Train plain Ultralytics on the union of the clients' train splits; return a result dict."""
    union = clients[0] if len(clients) == 1 else union_yaml(clients, work)
    t = time.time()
    model = YOLO(base)
    model.train(data=str(union), epochs=epochs, val=False, plots=False, project=str(work),
                name=f"central{len(clients)}-{seed}",
                exist_ok=True, seed=seed, **ARGS)
    seconds = time.time() - t
    import torch

    gpu = torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() and ARGS["device"] != "cpu" else None
    m, m50 = test_map(Path(model.trainer.last), test_yaml)
    return {"map": m, "map50": m50, "seconds": seconds, "bytes": 0, "gpu_mem_mb": gpu}


def run_federated(clients, rounds, epochs, base, save, flags=()):
    """Run federated.py on the clients into `save` with the bench's ARGS and `flags`; return its wall seconds."""
    if {"--num-rounds", "--epochs"} & set(flags):  # a run's score is read from round{rounds}.npz: say rounds here
        raise ValueError(f"{save.name}: give rounds and epochs as arguments, not as flags ({' '.join(flags)})")
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, clients), "--num-rounds", str(rounds),
           "--epochs", str(epochs), "--base-model", base, "--save-dir", str(save), "--exist-ok",
           *[x for k, v in ARGS.items() for x in (f"--{k}", str(v))], *flags]
    t = time.time()
    r = subprocess.run(cmd, cwd=save.parent.parent, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{save.name} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return time.time() - t


def federated(clients, test_yaml, rounds, epochs, base, work, name, extra=()):
    """Run federated.py on the clients (with `extra` flags); return a result dict with its round profile."""
    save = work / "runs" / name
    seconds = run_federated(clients, rounds, epochs, base, save, ["--evaluate", "false", *PLAIN, *extra])
    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    if any(int(row["updates"]) < int(row.get("sampled") or len(clients)) for row in rows):  # FRACTION_FIT: a sample
        raise RuntimeError(f"{name}: a round had fewer updates than clients asked; see {save / 'metrics.csv'}")
    parts = [k for k in rows[0] if k.startswith(("time_", "train_time_")) and k != "time_s"]
    mean = {k: sum(float(x[k]) for x in rows if x[k] != "") / len(rows) for k in parts}  # per round (EVAL_EVERY)
    m, m50 = test_map(export(base, save / f"round{rounds}.npz"), test_yaml)
    gpu = [float(x["train_gpu_mem"]) for x in rows if x.get("train_gpu_mem")]  # peak MB per client (CUDA only)
    return {"map": m, "map50": m50, "seconds": seconds, "rounds_s": float(rows[-1]["time_s"]),
            "gpu_mem_mb": max(gpu, default=None),
            "bytes": sum(float(rows[-1][k]) for k in ("bytes_down", "bytes_up")), "profile": mean}


def naive(clients, test_yaml, rounds, epochs, base, work):
    """A plain loop: `YOLO(npz weights).train(data, epochs)` per client per round, then the average; a result dict."""
    checks = [check_dataset(c) for c in clients]
    sizes, names = [c["train_images"] for c in checks], checks[0]["names"]
    current, t = base, time.time()
    for r in range(1, rounds + 1):
        updates = []
        for i, c in enumerate(clients):
            model = YOLO(current)
            model.train(data=str(c), epochs=epochs, plots=False, project=str(work / "naive"), name=f"r{r}c{i}",
                        exist_ok=True, **ARGS)
            updates.append(get_weights(model.model))  # what a plain loop reads back: best.pt, fp16 EMA
        npz = work / "naive" / f"round{r}.npz"  # every array averaged, as Flower's FedAvg does
        save_npz(npz, weighted_average(list(zip(updates, sizes)), updates[0]))
        current = str(export(base, npz, names=names))
    seconds = time.time() - t
    m, m50 = test_map(current, test_yaml)
    size = Path(current).stat().st_size
    return {"map": m, "map50": m50, "seconds": seconds, "bytes": 2 * size}


def machine(device):
    """Return the words for where the runs trained: the GPU's name, or the CPU's core count."""
    if device != "cpu":
        import torch

        return torch.cuda.get_device_name(int(str(device).split(",")[0].removeprefix("cuda:") or 0))
    return f"{os.cpu_count()}-core CPU"


def table(results, rounds, epochs, base, where):
    """Return the markdown report of the cached results for these rounds and epochs (trained on `where`)."""
    key = f"{rounds}x{epochs}"
    central = results.get(f"all|centralized|{key}")
    lines = [
        f"# Benchmark: {rounds} rounds x {epochs} local epochs = {rounds * epochs} epochs, base {base}, imgsz 64, "
        f"{where}",
        "",
        f"Command: `python3 bench/bench.py --rounds {rounds} --epochs {epochs}`; each cell one run "
        f"(cells are cached in runs/bench/results.json; dates in the last column).",
        "",
        "mAP50-95 on the demo's held-out test split. Ratios are to centralized Ultralytics on the union of the same "
        "images (one-1: on that client's images; batch 8, nbs 8, same epochs). Wall: the whole command, Ray "
        "start-up included; rounds: the federated rounds alone. Bytes: weights sent to plus received from one "
        "client in one round. This machine is "
        "shared and its speed drifts: only wall ratios of cells measured back to back (same date and session, e.g. "
        "centralized and non-iid-3 fedavg) are comparable; mAP is deterministic for a given cell.",
        "",
        "| setting | run | mAP50-95 | mAP50 | / centralized | wall s | wall / centralized | rounds s | "
        "MB / client / round | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ("all", *SETTINGS)
    cells = sorted(results.items(), key=lambda kv: (order.index(kv[0].split("|")[0]), "tuning" in kv[0]))
    for k, v in cells:
        setting, run, kk = k.split("|")[:3]
        if kk != key or len(k.split("|")) > 3:  # other seeds: in the seed section
            continue
        ref = results.get(f"{setting}|centralized|{key}", central)  # one-1: Ultralytics on that client
        ratio = f"{v['map'] / ref['map']:.2f}x" if ref else "-"
        wall = f"{v['seconds'] / ref['seconds']:.2f}x" if ref else "-"
        rounds_s = f"{v['rounds_s']:.0f}" if "rounds_s" in v else "-"
        mb = f"{v['bytes'] / 1e6:.1f}" if v["bytes"] else "-"
        lines.append(f"| {setting} | {run} | {v['map']:.4f} | {v['map50']:.4f} | {ratio} | {v['seconds']:.0f} | {wall} "
                     f"| {rounds_s} | {mb} | {v.get('date', '')} |")
    seeds = {}  # (setting, run) -> {seed: mAP} for the cells measured with more than one seed
    for k, v in results.items():
        parts = k.split("|")
        if parts[2] == key:
            seeds.setdefault(tuple(parts[:2]), {})[parts[3] if len(parts) > 3 else "seed0"] = v["map"]
    seeds = {k: v for k, v in seeds.items() if len(v) > 1}
    if seeds:
        lines += ["", "## Seeds: the same cells with other seeds (initial weights, augmentation)", "",
                  "| setting | run | mAP50-95 per seed | mean | spread (max - min) | / mean centralized |",
                  "|---|---|---|---|---|---|"]
        for (setting, run), v in sorted(seeds.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
            c_seeds = seeds.get((setting if (setting, "centralized") in seeds else "all", "centralized"), {})
            c_mean = sum(c_seeds.values()) / len(c_seeds) if c_seeds else None
            mean, spread = sum(v.values()) / len(v), max(v.values()) - min(v.values())
            per = ", ".join(f"{m:.3f}" for _, m in sorted(v.items()))
            lines.append(f"| {setting} | {run} | {per} | {mean:.4f} | {spread:.3f} | "
                         f"{f'{mean / c_mean:.2f}x' if c_mean else '-'} |")
    prof = results.get(f"non-iid-3|fedavg|{key}", {}).get("profile")
    if prof:
        lines += ["", "## Where a round's time goes (non-iid-3, fedavg; mean over rounds, seconds)", "",
                  "| part | s |", "|---|---|"]
        names = {"train_time_setup": "client: trainer set-up (dataset scan, dataloaders), per client",
                 "train_time_train": "client: the round's epochs, per client",
                 "time_aggregate": "server: checks + aggregation", "time_save": "server: round npz write",
                 "time_round": "round, wall (clients in parallel as the run planned them)"}
        lines += [f"| {names.get(k, k)} | {v:.2f} |" for k, v in prof.items()]
    return "\n".join(lines) + "\n"


def plan(setting, run, variants, explicit):
    """Return the federated.py flags of a run in a setting, or None when the table does not have that cell.

    Strategies run in every setting but partial-3; variants on non-iid-3 (or where --runs names them); the partial-
    label rows (fedavg with and without the mask) on partial-3 only.
    """
    if setting == "partial-3":
        return [] if run == "fedavg" else variants[run] if "partial" in run else None
    if run in STRATEGIES:
        return ["--strategy", run]
    if run in variants and "partial" not in run and (setting == "non-iid-3" or explicit):
        return variants[run]
    return None


def main():
    """Run the missing cells and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--base-model", default="yolov8n.yaml")
    p.add_argument("--pretrained", action="store_true",
                   help="base: yolov8n trained 30 epochs on other data (other backgrounds; circle, square, ring), "
                        "cached as WORK/other.pt; WORK defaults to runs/bench-pretrained")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--runs", nargs="*", default=None, help="runs to measure (default: all)")
    p.add_argument("--extra", nargs="*", default=[], help="NAME=FLAGS: an extra run, e.g. 'mu1=--proximal-mu 1'")
    p.add_argument("--work", default="runs/bench", help="scratch folder (data, runs, results.json)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    p.add_argument("--fresh", action="store_true", help="measure again even when a cell is cached")
    p.add_argument("--budget", default="image-epochs", choices=("image-epochs", "deployment"),
                   help="deployment: each of K clients trains K x EPOCHS per round (see above)")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs (init, augmentation); the table shows 0")
    p.add_argument("--device", default="cpu", help="device of every run: cpu, or a GPU (0) for bench/gpu_check.sh")
    a = p.parse_args()
    ARGS["device"] = a.device
    work = Path("runs/bench-pretrained" if a.pretrained and a.work == "runs/bench" else a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.pretrained:
        a.base_model = pretrained_base(work)
    cache = work / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    demo, test_yaml = make_demo(work / "demo")
    key, total = f"{a.rounds}x{a.epochs}" + (f"|seed{a.seed}" if a.seed else ""), a.rounds * a.epochs
    variants = {**VARIANTS, **{e.split("=", 1)[0]: e.split("=", 1)[1].split() for e in a.extra}}
    runs = a.runs or ["centralized", "naive", *STRATEGIES, *variants]

    def cell(setting, run, fn):
        k = f"{setting}|{run}|{key}"
        if k in results and not a.fresh:
            return
        print(f"measuring {setting} / {run} ...", flush=True)
        results[k] = {**fn(), "date": time.strftime("%Y-%m-%d")}
        cache.write_text(json.dumps(results, indent=1))
        print(f"  mAP50-95 {results[k]['map']:.4f}, {results[k]['seconds']:.0f} s", flush=True)

    if "centralized" in runs and set(a.settings) - {"one-1"}:
        cell("all", "centralized", lambda: centralized(demo, test_yaml, total, a.base_model, work, a.seed))
    for setting in a.settings:
        clients = setting_clients(setting, demo, work)
        if "centralized" in runs and setting == "one-1":
            cell(setting, "centralized", lambda: centralized(clients, test_yaml, total, a.base_model, work, a.seed))
        epochs = a.epochs * (len(clients) if a.budget == "deployment" else 1)
        if "naive" in runs and setting == "non-iid-3":
            cell(setting, "naive", lambda: naive(clients, test_yaml, a.rounds, a.epochs, a.base_model, work))
        for run in runs:
            flags = plan(setting, run, variants, explicit=a.runs is not None)
            if flags is None:
                continue
            run = run + (" (equal deployment time)" if a.budget == "deployment" else "")
            name = f"{setting}-{run}".replace(" ", "-").replace("(", "").replace(")", "") + (
                f"-seed{a.seed}" if a.seed else "")
            flags = [*flags, "--seed", str(a.seed)]
            cell(setting, run, lambda: federated(clients, test_yaml, a.rounds, epochs, a.base_model, work, name,
                                                 flags))
    text = table(results, a.rounds, a.epochs, a.base_model, machine(a.device))
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

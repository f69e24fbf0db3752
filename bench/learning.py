"""What federating buys, from a trusted trained start: federated vs centralized vs each site alone, over seeds.

The start: yolov8n trained START_EPOCHS epochs by plain Ultralytics (seed 0, deterministic, CPU, no dataloader
workers) on a second demo generated with another seed: the same classes, backgrounds and generator, none of the
same images. Every run below starts from it (WORK/start.pt); `--check-start` trains it a second time and compares
the two bit for bit, so the reference repeats.

For each seed: centralized Ultralytics on the union of the demo clients (ROUNDS x EPOCHS epochs), and plain fedavg
(bench.PLAIN: the defaults before 2026-12-02) on each setting of bench/bench.py (non-iid-3: the demo's 3 clients;
non-iid-8 and non-iid-16: each demo client split at random into 3/3/2 and 6/5/5), at equal image-epochs. Every
round's global model is scored on the demo's held-out test split, giving the first round that reaches 0.95x of
centralized's final score. With `--local` (seed 0): each client trained alone from the start for the same epochs,
scored on the test split and on its own val split against the federated model there.

With `--converge P` instead: each at convergence, federated with PATIENCE P rounds and at most 4x the rounds (its
best.pt), centralized with Ultralytics' `patience` of 2P epochs and the same epoch cap (its best.pt).

With `--scratch` every run starts from a random init (`yolov8n.yaml`, seeded by the run's seed) instead of the start:
the same tables from scratch, in WORK runs/learning-scratch and bench/learning-scratch.md unless --work and --out say
otherwise.

Usage:
    .venv/bin/python bench/learning.py [--seeds 0 1 2] [--settings non-iid-3 non-iid-8 non-iid-16] [--local]
        [--variant NAME=FLAGS] [--check-start] [--converge P] [--no-fedavg] [--table-only] [--scratch]
        [--work runs/learning] [--out bench/learning.md]

Cells are cached in WORK/learning.json (delete it to measure again).
"""

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ultralytics import YOLO  # noqa: E402

from bench import ARGS, PLAIN, centralized, federated, run_federated, setting_clients, test_map, union_yaml  # noqa: E402
from utils.datasets import unique_label  # noqa: E402
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402
from utils.personalize import SUFFIX  # noqa: E402

START_EPOCHS = 30


def weights_hash(pt):
    """Return the sha256 of a checkpoint's weights (the file itself also holds a date)."""
    import torch

    ckpt = torch.load(pt, map_location="cpu", weights_only=False)
    h = hashlib.sha256()
    for k, v in (ckpt.get("ema") or ckpt["model"]).float().state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()[:16]


def train_start(work, name):
    """Train the start once under WORK/name; return its last.pt."""
    data = make_demo(work / "start-data", seed=101)[0]
    union = union_yaml(data, work / "start-data")
    model = YOLO("yolov8n.yaml")
    model.train(data=str(union), epochs=START_EPOCHS, val=False, plots=False, project=str(work), name=name,
                exist_ok=True, seed=0, deterministic=True, **ARGS)
    return Path(model.trainer.last)


def versions():
    """What the start's bytes depend on: its hash repeats under the same packages on the same kind of CPU (torch and
    Ultralytics are pinned by requirements.txt; numpy, OpenCV and Pillow, which draw and augment the images, are
    not; torch's CPU kernels round differently on another processor: 2026-12-03, the same packages trained another
    start on another machine)."""
    from importlib.metadata import version

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    packages = ", ".join(f"{p} {version(p)}" for p in ("torch", "ultralytics", "numpy", "opencv-python", "pillow"))
    return f"{packages}; CPU {cpu} ({torch.backends.cpu.get_cpu_capability()})"


def val_map(pt, data_yaml):
    """Return mAP50-95 of a .pt on the val split of `data_yaml`."""
    args = {k: v for k, v in ARGS.items() if k != "nbs"}
    m = YOLO(str(pt)).val(data=str(data_yaml), split="val", plots=False, verbose=False,
                          project=str(Path(pt).parent / "val"), **args)
    return float(m.box.map)


def local(client, test_yaml, epochs, base, work, name, seed):
    """Train Ultralytics on one client alone; return (its last.pt, test mAP50-95)."""
    model = YOLO(base)
    model.train(data=str(client), epochs=epochs, val=False, plots=False, project=str(work / "local"), name=name,
                exist_ok=True, seed=seed, **ARGS)
    return Path(model.trainer.last), test_map(Path(model.trainer.last), test_yaml)[0]


def converge_federated(clients, test_yaml, cap, epochs, base, work, name, patience, flags):
    """Run federated.py with PATIENCE and a NUM_ROUNDS cap; return its best.pt's test mAP50-95 and the rounds run."""
    save = work / "runs" / name
    run_federated(clients, cap, epochs, base, save, ["--patience", str(patience), *PLAIN, *flags])
    with (save / "metrics.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("map50_95")]
    best = max(rows, key=lambda row: float(row["map50_95"]))
    return {"map": test_map(save / "best.pt", test_yaml)[0], "rounds": len(rows), "best_round": int(best["round"])}


def converge_centralized(clients, test_yaml, cap, base, work, seed, patience):
    """Train plain Ultralytics on the union with `patience` (validating every epoch) and an epoch cap; return its
    best.pt's test mAP50-95 and the epochs it ran."""
    model = YOLO(base)
    model.train(data=str(union_yaml(clients, work)), epochs=cap, patience=patience, plots=False, project=str(work),
                name=f"converge{patience}-central-{seed}", exist_ok=True, seed=seed, **ARGS)
    return {"map": test_map(Path(model.trainer.best), test_yaml)[0], "epochs": model.trainer.epoch + 1}


def main():
    """Run the missing cells and write the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["non-iid-3", "non-iid-8", "non-iid-16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--local", action="store_true", help="also each client alone (seed 0)")
    p.add_argument("--variant", action="append", default=[], help="NAME=FLAGS: federated.py flags of another row")
    p.add_argument("--check-start", action="store_true", help="train the start twice and compare")
    p.add_argument("--converge", type=int, default=0, metavar="P",
                   help="at convergence instead: PATIENCE P rounds (centralized 2P epochs), capped at 4x the rounds")
    p.add_argument("--no-fedavg", action="store_true", help="measure the variants only, not the plain fedavg row")
    p.add_argument("--table-only", action="store_true", help="write the tables from the cached cells, measure nothing")
    p.add_argument("--scratch", action="store_true", help="every run from a random init instead of the start")
    p.add_argument("--work", default=None, help="scratch folder (default runs/learning, runs/learning-scratch)")
    p.add_argument("--out", default=None, help="the tables (default bench/learning.md, bench/learning-scratch.md)")
    a = p.parse_args()
    suffix = "-scratch" if a.scratch else ""
    a.work = a.work or f"runs/learning{suffix}"
    a.out = a.out or str(ROOT / "bench" / f"learning{suffix}.md")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "learning.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}

    def cell(key, fn):
        if key not in res:
            print(f"measuring {key} ...", flush=True)
            t = time.time()
            res[key] = fn()
            print(f"  {res[key]}  ({time.time() - t:.0f} s)", flush=True)
            # merge with the file as it is now: another process on the same folder may have added cells since
            res.update({**(json.loads(cache.read_text()) if cache.is_file() else {}), key: res[key]})
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, cache)
        return res[key]

    if a.table_only:
        return write(res, a)
    demo, test_yaml = make_demo(work / "demo")
    start = "yolov8n.yaml" if a.scratch else work / "start.pt"
    if not a.scratch and not start.is_file():
        shutil.copy(train_start(work, "start"), start)
    if not a.scratch:
        cell("start", lambda: {"hash": weights_hash(start), "map": test_map(start, test_yaml)[0],
                               "versions": versions()})
    if a.check_start and not a.scratch:
        cell("start again", lambda: {"hash": weights_hash(train_start(work, "start-again"))})
    total = a.rounds * a.epochs
    if a.converge:
        cap = 4 * a.rounds
        for seed in a.seeds:
            cell(f"converge{a.converge}|centralized|{seed}", lambda: converge_centralized(
                demo, test_yaml, cap * a.epochs, str(start), work, seed, a.converge * a.epochs))
            for setting in a.settings:
                clients = setting_clients(setting, demo, work)
                for run, flags in [*([] if a.no_fedavg else [("fedavg", "")]), *(v.split("=", 1) for v in a.variant)]:
                    cell(f"converge{a.converge}|{run}|{setting}|{seed}", lambda: converge_federated(
                        clients, test_yaml, cap, a.epochs, str(start), work,
                        f"converge{a.converge}-{setting}-s{seed}-{run}", a.converge,
                        ["--seed", str(seed), *flags.split()]))
        return write(res, a)
    for seed in a.seeds:
        cell(f"centralized|{seed}", lambda: centralized(demo, test_yaml, total, str(start), work, seed)["map"])
        for setting in a.settings:
            clients = setting_clients(setting, demo, work)
            name = f"{setting}-s{seed}"

            def fed(name, flags):
                out = federated(clients, test_yaml, a.rounds, a.epochs, str(start), work, name,
                                ["--seed", str(seed), *flags])
                per_round = [test_map(export(str(start), work / "runs" / name / f"round{r}.npz"), test_yaml)[0]
                             for r in range(1, a.rounds + 1)]
                return {"map": out["map"], "rounds": per_round, "seconds": out["seconds"]}
            if not a.no_fedavg:
                cell(f"fedavg|{setting}|{seed}", lambda: fed(name, []))
            for v in a.variant:
                run, flags = v.split("=", 1)
                cell(f"{run}|{setting}|{seed}", lambda: fed(f"{name}-{run}", flags.split()))
            if a.local and seed == a.seeds[0]:
                def alone():
                    rows = []
                    for i, c in enumerate(clients):
                        pt, m = local(c, test_yaml, total, str(start), work, f"{name}-c{i}", seed)
                        rows.append({"test": m, "own_local": val_map(pt, c)})
                    return rows
                cell(f"local|{setting}|{seed}", alone)
                for run in [*([] if a.no_fedavg else ["fedavg"]), *(v.split("=", 1)[0] for v in a.variant)]:
                    folder = work / "runs" / (name if run == "fedavg" else f"{name}-{run}")
                    pt = export(str(start), folder / f"round{a.rounds}.npz")  # each run's global model, own val
                    cell(f"own|{run}|{setting}|{seed}", lambda: [val_map(pt, c) for c in clients])
                    tuned = [folder / "clients" / f"{unique_label(c, clients)}{SUFFIX}" for c in clients]
                    if all(p.is_file() for p in tuned):  # --personalize: each client's fine-tuned model, own val
                        cell(f"tuned|{run}|{setting}|{seed}", lambda: [val_map(p, c) for p, c in zip(tuned, clients)])
    write(res, a)


def write(res, a):
    """Write the tables from the cache."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    st = res.get("start")
    again = res.get("start again")
    cen = {s: res[f"centralized|{s}"] for s in a.seeds if f"centralized|{s}" in res}
    start = "from scratch" if a.scratch else "from a trusted trained start"
    lines = [
        f"# What federating buys, {start} ({a.rounds} rounds x {a.epochs} epochs, 2-core CPU)",
        "",
        f"Command: `.venv/bin/python bench/learning.py --seeds {' '.join(map(str, a.seeds))} --settings "
        f"{' '.join(a.settings)}{' --local' if a.local else ''}{' --check-start' if a.check_start else ''}"
        f"{' --scratch' if a.scratch else ''}`, "
        f"{time.strftime('%Y-%m-%d')}. mAP50-95 on the demo's held-out test split; imgsz 64, batch 8, nbs 8.",
        "",
        "The start: a random init (`yolov8n.yaml`, seeded by each run's seed)." if st is None else
        f"The start: yolov8n trained {START_EPOCHS} epochs by plain Ultralytics (seed 0, deterministic) on a second "
        "demo (seed 101: the same classes and backgrounds, other images). Test mAP50-95 "
        f"{st['map']:.4f}; weights sha256 {st['hash']}"
        + (f"; trained again: {again['hash']} ({'identical' if again['hash'] == st['hash'] else 'DIFFERENT'})."
           if again else ".") + (f" Packages: {st['versions']}." if "versions" in st else ""),
        "",
        "## Equal image-epochs: federated against centralized on the same images",
        "",
        f"Centralized, seeds {', '.join(map(str, cen))}: {', '.join(f'{v:.4f}' for v in cen.values())} "
        f"(mean {mean(list(cen.values())):.4f}).",
        "",
        "Rows: `fedavg` plain FedAvg (federated.py's defaults with `" + " ".join(PLAIN) + "`, the defaults before "
        "2026-12-02; `rc-ko` has the defaults since); "
        + "; ".join(f"`{v.split('=', 1)[0]}` fedavg plus `{v.split('=', 1)[1]}`" for v in a.variant)
        + ("." if a.variant else "fedavg only."),
        "",
        "| setting | run | per seed | mean | / centralized (same seed, mean) | rounds to 0.95x of centralized |",
        "|---|---|---|---|---|---|",
    ]
    rows = ["fedavg", *(v.split("=", 1)[0] for v in a.variant)]
    for setting, run in [(s, r) for s in a.settings for r in rows]:
        runs = {s: res[f"{run}|{setting}|{s}"] for s in a.seeds if f"{run}|{setting}|{s}" in res}
        if not runs:
            continue
        ratios = [runs[s]["map"] / cen[s] for s in runs if s in cen]
        reach = []
        for s, r in runs.items():
            hit = [i + 1 for i, m in enumerate(r["rounds"]) if s in cen and m >= 0.95 * cen[s]]
            reach.append(str(hit[0]) if hit else f"not in {a.rounds}")
        lines.append(f"| {setting} | {run} | {', '.join(format(r['map'], '.4f') for r in runs.values())} | "
                     f"{mean([r['map'] for r in runs.values()]):.4f} | {mean(ratios):.2f}x | {', '.join(reach)} |")
    patiences = sorted({int(k.split("|")[0][8:]) for k in res if k.startswith("converge") and "|centralized|" in k})
    for pat in patiences:
        conv_cen = {s: res[f"converge{pat}|centralized|{s}"] for s in a.seeds
                    if f"converge{pat}|centralized|{s}" in res}
        lines += [
            "",
            f"## At convergence: PATIENCE {pat} rounds, at most {4 * a.rounds} rounds x {a.epochs} epochs",
            "",
            f"Centralized with Ultralytics' `patience` {2 * pat} epochs, at most {4 * a.rounds * a.epochs} epochs, "
            "validating every epoch; its best.pt: "
            + ", ".join(f"seed {s} {c['map']:.4f} ({c['epochs']} epochs)" for s, c in conv_cen.items())
            + ". Federated: best.pt (the best round by the clients' val splits). Both scored on the test split.",
            "",
            "| setting | run | per seed (rounds run, best round) | mean | / centralized at convergence |",
            "|---|---|---|---|---|",
        ]
        for setting, run in [(s, r) for s in a.settings for r in rows]:
            key = f"converge{pat}|{run}|{setting}|"
            runs = {s: res[key + str(s)] for s in a.seeds if key + str(s) in res}
            if runs:
                ratio = mean([r["map"] / conv_cen[s]["map"] for s, r in runs.items() if s in conv_cen])
                lines.append(f"| {setting} | {run} | " + ", ".join(
                    f"{r['map']:.4f} ({r['rounds']}, {r['best_round']})" for r in runs.values())
                    + f" | {mean([r['map'] for r in runs.values()]):.4f} | {ratio:.2f}x |")
    loc = {s: res[f"local|{s}|{a.seeds[0]}"] for s in a.settings if f"local|{s}|{a.seeds[0]}" in res}
    if loc:
        lines += [
            "",
            f"## Each site alone (seed {a.seeds[0]}): the same start and epochs on its own images",
            "",
            "Test: the held-out test split (every style and class). Own val: each client's own val split, where a "
            "site that joins compares what it gets with the model it could have trained alone: the global model, "
            "and with `--personalize E` its fine-tuned one (the final model trained E more epochs on its own "
            "images). A site loses by joining where alone scores higher.",
            "",
            "| setting | run | federated, test | alone, test (mean / best) | own val: global - alone (min / mean) | "
            "sites that lose | own val: fine-tuned - alone (min / mean) | sites that lose, fine-tuned |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (setting, rows), run in [(item, r) for item in loc.items() for r in ["fedavg", *(
                v.split("=", 1)[0] for v in a.variant)]]:
            key = f"{run}|{setting}|{a.seeds[0]}"
            own = res.get(f"own|{key}") or ([r["own_fed"] for r in rows] if run == "fedavg" and "own_fed" in rows[0]
                                              else None)  # cells before 2026-12-03 kept fedavg's in the local cell
            if own is None or key not in res:
                continue
            cols = []
            for scores in (own, res.get(f"tuned|{key}")):
                diff = [o - r["own_local"] for o, r in zip(scores or [], rows)]
                cols += [f"{min(diff):+.4f} / {mean(diff):+.4f}", f"{sum(d < 0 for d in diff)} of {len(rows)}"] \
                    if diff else ["", ""]
            lines.append(f"| {setting} | {run} | {res[key]['map']:.4f} | {mean([r['test'] for r in rows]):.4f} / "
                         f"{max(r['test'] for r in rows):.4f} | " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

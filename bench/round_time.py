"""Where a round's time goes at 3, 8, 16 and 64 clients: the demo's images split IID into N clients, federated at
equal image-epochs against centralized Ultralytics on the same images, with each round's time taken apart from the
timestamps the run writes to metrics.csv.

Per client (means over clients and rounds): preparation (dataset check, its view, model build, weights in), the
trainer's set-up (dataset scan, dataloaders), the epochs, the BatchNorm pass (BN_RECALIBRATE), the optimizer state
read and written (KEEP_OPTIMIZER), weights out; validation's preparation and the validation itself. On the server:
sampling and sending, the wait for the updates, closing the aggregate, the round file, the wait for the
evaluations. "Clients / 2 cores": the clients' own work of a round divided by the cores it ran on;
what a round's wall time has beyond that and the server's parts is Flower's and Ray's (messages, scheduling, actor
calls) plus the cores idling when the last clients of a round run alone.

Usage:
    .venv/bin/python bench/round_time.py [--clients 3 8 16 64] [--rounds 5] [--epochs 2] [--out bench/round_time.md]
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ARGS, centralized, union_yaml  # noqa: E402  (bench/bench.py, beside this script)
from utils.demo import make_demo  # noqa: E402
from utils.partition import partition  # noqa: E402

CLIENT = [("train_time_prepare", "prepare"), ("train_time_setup", "trainer set-up"), ("train_time_train", "epochs"),
          ("train_time_recalibrate", "BatchNorm pass"), ("train_time_state", "optimizer state"),
          ("train_time_upload", "weights out"),
          ("val_time_prepare", "val prepare"), ("val_time", "validation")]
SERVER = [("time_configure", "sample + send"), ("time_fit", "wait for updates"), ("time_aggregate", "aggregate"),
          ("time_save", "round file"), ("time_evaluate", "wait for evaluations")]


def federated(clients, rounds, epochs, save, extra=()):
    """Run federated.py on `clients`; return (wall seconds, metrics rows)."""
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, clients), "--num-rounds", str(rounds),
           "--epochs", str(epochs), "--save-dir", str(save), "--exist-ok",
           *[x for k, v in ARGS.items() for x in (f"--{k}", str(v))], *extra]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=save.parent)
    if r.returncode:
        sys.exit((r.stdout + r.stderr)[-3000:])
    return time.time() - t, list(csv.DictReader((save / "metrics.csv").open()))


def mean(rows, key):
    """Mean of a metrics.csv column over the rounds that have it (0 when none)."""
    values = [float(x[key]) for x in rows if x.get(key) not in (None, "")]
    return sum(values) / len(values) if values else 0.0


def main():
    """Run centralized and the federations; write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[3, 8, 16, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--extra", default="", help="more federated.py flags, e.g. '--eval-every 5'")
    p.add_argument("--work", default="runs/profile")
    p.add_argument("--out", default=str(ROOT / "bench" / "round_time.md"))
    a = p.parse_args()
    extra = a.extra.split()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo, test_yaml = make_demo(work / "demo", seed=0)
    union = union_yaml(demo, work)
    cores = os.cpu_count()
    base = "yolov8n.yaml"
    central = centralized([union], test_yaml, a.rounds * a.epochs, base, work)
    results = {}
    for n in a.clients:
        clients = partition(union, n, mode="iid", seed=0, out=work / "partitions" / str(n), verbose=False)
        results[n] = federated(clients, a.rounds, a.epochs, work / f"run{n}", extra)
    lines = [
        f"# Where a round's time goes: 3 to {max(a.clients)} clients, {a.rounds} rounds x {a.epochs} epochs, "
        f"{cores}-core CPU",
        "",
        f"Command: `.venv/bin/python bench/round_time.py --clients {' '.join(map(str, a.clients))} --rounds {a.rounds} "
        f"--epochs {a.epochs}{' --extra ' + repr(a.extra) if a.extra else ''}`, {time.strftime('%Y-%m-%d')}. The "
        "demo's 216 train images split IID into N clients (utils/partition.py), imgsz 64, batch 8, "
        f"{'from ' + extra[extra.index('--base-model') + 1] if '--base-model' in extra[:-1] else 'from scratch'},",
        "evaluation every round unless --extra says otherwise. Centralized: Ultralytics on the union, "
        f"{a.rounds * a.epochs} epochs, {central['seconds']:.0f} s (in-process: no Python start-up).",
        "",
        "| clients | wall s | rounds s | rounds / centralized | round s | later rounds / centralized | " +
        " | ".join(n for _, n in CLIENT) +
        " | clients / cores | " + " | ".join(n for _, n in SERVER) + " | the rest |",
        "|---" * (7 + len(CLIENT) + len(SERVER) + 1) + "|",
    ]
    for n, (wall, rows) in results.items():
        rounds_s = float(rows[-1]["time_s"])
        round_s = mean(rows, "time_round")
        later = mean(rows[1:], "time_round") / (central["seconds"] / a.rounds)  # Ray and the first messages past
        parts = {k: mean(rows, k) for k, _ in CLIENT + SERVER}
        evaluated = sum(1 for x in rows if x.get("time_evaluate")) / len(rows)  # EVAL_EVERY: not every round
        work_s = (sum(parts[k] for k, _ in CLIENT[:6]) + evaluated * sum(parts[k] for k, _ in CLIENT[6:])) * n / cores
        server_s = sum(parts[k] for k in ("time_configure", "time_aggregate", "time_save"))
        rest = round_s - work_s - server_s
        lines.append(f"| {n} | {wall:.0f} | {rounds_s:.0f} | {rounds_s / central['seconds']:.2f}x | {round_s:.2f} | "
                     f"{later:.2f}x | "
                     + " | ".join(f"{parts[k]:.2f}" for k, _ in CLIENT) + f" | {work_s:.2f} | "
                     + " | ".join(f"{parts[k]:.2f}" for k, _ in SERVER) + f" | {rest:.2f} |")
    lines += [
        "",
        "Rounds s: from the strategy's start to the last round's end, Ray's start and the workers' first imports",
        "(round 1) included; later rounds / centralized: the mean round from round 2 on against centralized's time",
        "for the same epochs (its whole run / rounds).",
        "Client columns: seconds per client per round (means). Server columns: seconds per round. The rest: the",
        "round's wall time less the clients' work spread over the cores and the server's own parts, i.e. Flower's",
        "and Ray's messaging and scheduling, and cores idle while a round's last clients finish.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

"""A round deadline with one slow site: 3 demo clients, one of them about 10x slower (30x the images: a client's
round is mostly fixed set-up at this size), ROUND_TIMEOUT set, against the same run without the slow client, from
the same trained start at equal rounds.

Checks what the deadline promises: each round's wait for updates ends within ROUND_TIMEOUT + 10%, the fast
clients' work is kept (their updates averaged every round), and the global model still learns (test mAP50-95 of
the last round against the run without the slow client).

Usage:
    .venv/bin/python bench/deadline.py [--rounds 10] [--epochs 2] [--timeout 0] [--out bench/deadline.md]
    (--timeout 0: three times the fast clients' median round, measured in the run without the slow client)
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ARGS, pretrained_base, test_map  # noqa: E402  (bench/bench.py, beside this script)
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402


def run(clients, test_yaml, rounds, epochs, base, save, extra=()):
    """Run federated.py; return (metrics rows, test mAP50-95 of the last round, wall seconds)."""
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, clients), "--num-rounds", str(rounds),
           "--epochs", str(epochs), "--base-model", base, "--save-dir", str(save), "--exist-ok", "--evaluate", "false",
           *[x for k, v in ARGS.items() for x in (f"--{k}", str(v))], *extra]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=save.parent)
    if r.returncode:
        sys.exit((r.stdout + r.stderr)[-3000:])
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    return rows, test_map(export(base, save / f"round{rounds}.npz"), test_yaml)[0], time.time() - t


def main():
    """Run both federations and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=0.0)
    p.add_argument("--work", default="runs/deadline")
    p.add_argument("--out", default=str(ROOT / "bench" / "deadline.md"))
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (dark, light, noisy), test_yaml = make_demo(work / "demo", seed=0)
    slow = make_demo(work / "big", seed=1, n_train=2160, n_val=24)[0][1]  # light's kind, 30x its 72 images
    base = str(pretrained_base(work))
    fast_rows, fast_map, fast_s = run([dark, noisy], test_yaml, a.rounds, a.epochs, base, work / "fast")
    timeout = a.timeout or round(3 * sorted(float(x["time_fit"]) for x in fast_rows)[len(fast_rows) // 2])
    scale = json.loads((work / "fast" / "config.json").read_text())["lr_scale"]  # the same schedule: see below
    rows, mp, seconds = run([dark, noisy, slow], test_yaml, a.rounds, a.epochs, base, work / "slow",
                            ("--round-timeout", f"{timeout:g}", "--lr-scale", str(scale)))
    fits, fast_fits = [float(x["time_fit"]) for x in rows], [float(x["time_fit"]) for x in fast_rows]
    lines = [
        "# A round deadline with one slow site",
        "",
        f"Command: `.venv/bin/python bench/deadline.py --rounds {a.rounds} --epochs {a.epochs}`, "
        f"{time.strftime('%Y-%m-%d')}, 2-core CPU. Demo clients dark (96 images) and noisy (48); the slow site has",
        "2160 images of light's kind (30x light's 72; its round takes about 10x a fast client's). Trained start",
        f"(bench.py's), {a.rounds} rounds x {a.epochs} epoch(s), imgsz {ARGS['imgsz']}; round-timeout {timeout:.0f} s",
        f"(3x the fast clients' median wait for updates). Both runs at --lr-scale {scale} (the scale the fast clients",
        "derive): the derived scale counts every client's images, a client that is always late included, so in a",
        "federation where one site is always late, set --lr-scale to what the sites that make the deadline derive.",
        "",
        "| run | test mAP50-95 | wall s | updates per round | late per round | wait for updates per round, s |",
        "|---|---|---|---|---|---|",
        f"| dark + noisy | {fast_map:.3f} | {fast_s:.0f} | {' '.join(x['updates'] for x in fast_rows)} | - | "
        f"{' '.join(f'{f:.0f}' for f in fast_fits)} |",
        f"| dark + noisy + slow, round-timeout {timeout:.0f} | {mp:.3f} | {seconds:.0f} | "
        f"{' '.join(x['updates'] for x in rows)} | {' '.join(x['late'] for x in rows)} | "
        f"{' '.join(f'{f:.0f}' for f in fits)} |",
        "",
        f"With the slow site and the deadline: the longest wait for updates was {max(fits):.1f} s against a "
        f"deadline of {timeout:.0f} s ({max(fits) / timeout:.2f}x); test mAP50-95 {mp / max(fast_map, 1e-9):.2f}x "
        "that of the run without the slow site.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

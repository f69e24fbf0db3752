"""Load: a federation of many tiny clients in simulation; the server process's peak memory and the wall time.

Usage:
    python3 bench/load.py [--clients 20] [--rounds 1] [--out bench/load.md]
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.demo import CLIENTS, make_demo  # noqa: E402


def clients(work, n):
    """Return n tiny demo client data.yaml files (4 train, 2 val images each), made with different seeds."""
    out = []
    for seed in range(-(-n // len(CLIENTS))):
        out += make_demo(work / f"set{seed}", seed=seed, n_train=4, n_val=2)[0]
    return out[:n]


def run(work, n, rounds):
    """Run federated.py with n tiny clients; return (seconds, server peak RSS in MB, npz size in MB)."""
    data = clients(work, n)
    save = work / f"run{n}"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, data), "--num-rounds", str(rounds),
           "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(save), "--exist-ok"]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    seconds = time.time() - t
    log = r.stdout + r.stderr
    if r.returncode:
        sys.exit(log[-3000:])
    peak = float(re.search(r"peak memory of the server process: (\d+) MB", log).group(1))
    return seconds, peak, (save / "round1.npz").stat().st_size / 2**20


def main():
    """Run a 3-client baseline and the large federation; write the numbers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--work", default="runs/load")
    p.add_argument("--out", default=str(ROOT / "bench" / "load.md"))
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = {n: run(work, n, a.rounds) for n in (3, a.clients)}
    (_, p3, model_mb), (_, pn, _) = rows[3], rows[a.clients]
    per_client = (pn - p3) / max(a.clients - 3, 1) / model_mb
    lines = [
        f"# Load: simulated clients on tiny data (4 images each, imgsz 32), {a.rounds} round(s), CPU",
        "",
        f"Command: `python3 bench/load.py --clients {a.clients} --rounds {a.rounds}`, {time.strftime('%Y-%m-%d')}",
        "",
        "| clients | wall s | server peak RSS MB |",
        "|---|---|---|",
        *(f"| {n} | {s:.0f} | {peak:.0f} |" for n, (s, peak, _) in rows.items()),
        "",
        f"One model is {model_mb:.1f} MB (npz). Each client beyond 3 adds {per_client:.1f} model copies to the",
        "server process's peak: Flower keeps every client's serialized update of the round, and the strategy adds",
        "them one at a time into a single float64 running sum. The rest is torch, Ultralytics, Flower and the Ray",
        "driver; the clients themselves run in Ray workers.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

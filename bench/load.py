"""Load: a federation of many tiny clients in simulation, with client sampling; the server's peak memory and time.

Runs a federation of BASE clients that all train every round, then one of CLIENTS clients of which FRACTION train
each round (by default 50 clients against 1,000 at 5%: the same 50 updates a round), and writes per run: the wall
time, each round's wall time, the server's own time per round (sampling and sending, aggregation, saving) and the
server process's peak memory.

Usage:
    .venv/bin/python bench/load.py [--clients 1000] [--fraction 0.05] [--base 50] [--rounds 2] [--out bench/load.md]
"""

import argparse
import csv
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


def run(work, n, fraction, rounds):
    """Run federated.py with n tiny clients, `fraction` of them a round; return its numbers."""
    data = clients(work, n)
    save = work / f"run{n}"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, data), "--num-rounds", str(rounds),
           "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(save), "--exist-ok",
           "--fraction-fit", str(fraction), "--fraction-evaluate", str(fraction)]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    seconds = time.time() - t
    log = r.stdout + r.stderr
    if r.returncode:
        sys.exit(log[-3000:])
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    server = [sum(float(x[k] or 0) for k in ("time_configure", "time_aggregate", "time_save")) for x in rows]
    return {"clients": n, "fraction": fraction, "sampled": rows[-1]["sampled"], "wall": seconds,
            "rounds": [float(x["time_round"]) for x in rows], "server": server,
            "peak": float(re.search(r"peak memory of the server process: (\d+) MB", log).group(1)),
            "model_mb": (save / f"round{rounds}.npz").stat().st_size / 2**20}


def main():
    """Run the two federations; write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--base", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="runs/load")
    p.add_argument("--out", default=str(ROOT / "bench" / "load.md"))
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = [run(work, a.base, 1.0, a.rounds), run(work, a.clients, a.fraction, a.rounds)]
    base, big = rows
    lines = [
        f"# Load: many simulated clients on tiny data (4 images each, imgsz 32), {a.rounds} rounds, 2-core CPU",
        "",
        f"Command: `.venv/bin/python bench/load.py --clients {a.clients} --fraction {a.fraction} --base {a.base} "
        f"--rounds {a.rounds}`, {time.strftime('%Y-%m-%d')}",
        "",
        "| clients | fraction-fit | trained a round | wall s | round wall s | server s a round | server peak RSS MB |",
        "|---|---|---|---|---|---|---|",
        *(f"| {x['clients']} | {x['fraction']:g} | {x['sampled']} | {x['wall']:.0f} | "
          f"{' / '.join(f'{s:.0f}' for s in x['rounds'])} | {' / '.join(f'{s:.2f}' for s in x['server'])} | "
          f"{x['peak']:.0f} |" for x in rows),
        "",
        f"The server's peak with {a.clients} clients is {big['peak'] / base['peak']:.2f}x that with {a.base}: each",
        "update is added to one running sum as it arrives, so the server holds neither the federation's nor the",
        "round's updates. Server s a round: the server's own work at the round's edges (the sample and the",
        "messages, then closing the aggregate and writing the round file); the first round includes asking every",
        "client once who it is. Checking and adding each update as it arrives happens while the others train.",
        f"The rest of a round is the clients training and validating on 2 cores. One model is {base['model_mb']:.1f}",
        "MB (npz).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()

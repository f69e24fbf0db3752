"""Does a strong start survive? One client, one round, one epoch from a converged model: how much test mAP is kept.

Usage:
    python3 bench/strong_start.py                                    # the defaults (3 seeds), the rule before, others
    python3 bench/strong_start.py "" "--optimizer RAdam --lr0 0.00125"   # chosen client flags ("" = the defaults)

The converged model is plain Ultralytics trained EPOCHS epochs on the union of the demo clients (batch 8, nbs 8,
imgsz 64; cached in WORK/conv.pt). Each run is `federated.py --datasets <the demo's dark client> --base-model
conv.pt --num-rounds 1 --epochs 1` with the given flags; the round's npz is exported and scored on the demo's
held-out test split, like the converged model itself. Writes WORK/strong_start.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ultralytics import YOLO  # noqa: E402

from bench import ARGS, test_map, union_yaml  # noqa: E402
from utils.demo import make_demo  # noqa: E402
from utils.export_federated import export  # noqa: E402

RUNS = ["", "--seed 1", "--seed 2", "--warmup-epochs 0", "--warmup-epochs 0 --lr-scale 1",
        "--warmup-epochs 0 --optimizer AdamW --lr0 0.0002", "--warmup-epochs 0 --optimizer RAdam --lr0 0.00125"]


def converged(demo, work, epochs):
    """Return the converged model .pt (trained once, then cached)."""
    pt = work / "conv.pt"
    if not pt.is_file():
        model = YOLO("yolov8n.yaml")
        model.train(data=str(union_yaml(demo, work)), epochs=epochs, val=False, plots=False, project=str(work),
                    name="conv", exist_ok=True, **ARGS)
        shutil.copy(model.trainer.last, pt)
    return pt


def one_round(client, base, flags, save):
    """Run one federated round of one epoch on one client from `base`; return the round's npz."""
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", str(client), "--base-model", str(base),
           "--num-rounds", "1", "--epochs", "1", "--evaluate", "false", "--save-dir", str(save), "--exist-ok",
           *[x for k, v in ARGS.items() for x in (f"--{k}", str(v))], *flags.split()]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=save.parent)
    if r.returncode:
        raise RuntimeError(f"{flags or 'defaults'} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return save / "round1.npz"


def main():
    """Measure each run and write the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", default=RUNS, help='client flags per run ("" = the defaults)')
    p.add_argument("--epochs", type=int, default=40, help="epochs that train the converged model")
    p.add_argument("--work", default="runs/strong_start", help="scratch folder (data, model, runs, results.json)")
    a = p.parse_args()
    work = Path(a.work).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    demo, test_yaml = make_demo(work / "demo")
    base = converged(demo, work, a.epochs)
    cache = work / "results.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    results["base"] = results.get("base") or test_map(base, test_yaml)[0]
    print(f"converged model: test mAP50-95 {results['base']:.4f}", flush=True)
    for flags in a.runs:
        t = time.time()
        npz = one_round(demo[0], base, flags, work / "runs" / (flags.replace(" ", "_").replace("-", "") or "defaults"))
        results[flags or "defaults"] = test_map(export(base, npz), test_yaml)[0]
        kept = results[flags or "defaults"]
        print(f"{flags or 'defaults':35s} {kept:.4f} ({kept / results['base']:.2f}x)  {time.time() - t:.0f} s")
        cache.write_text(json.dumps(results, indent=1))
    lines = [f"# Strong start: one client (dark), one round, one epoch from a model at test mAP50-95 "
             f"{results['base']:.4f}", "", "| client flags | test mAP50-95 | kept |", "|---|---|---|"]
    lines += [f"| `{k}` | {v:.4f} | {v / results['base']:.2f}x |" for k, v in results.items() if k != "base"]
    (work / "strong_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

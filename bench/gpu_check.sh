#!/usr/bin/env bash
# GPU check: the demo and a 3-client run on a GPU with every round's updates valid, then federated vs centralized
# wall time and test mAP at equal image-epochs on the same GPU, and peak GPU memory per client.
#
# Usage: bash bench/gpu_check.sh            (PY=/path/to/python to pick the interpreter; default .venv/bin/python)
# Writes runs/gpu/ (logs, runs, results.json) and prints a summary; exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_OUT:-runs/gpu}
mkdir -p "$OUT"
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch: nothing to check"
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PYEOF

rounds_ok() {  # every round of metrics.csv $1 has $2 valid updates
  $PY - "$1" "$2" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
bad = [r["round"] for r in rows if int(r["updates"]) != int(sys.argv[2])]
assert rows and not bad, f"{sys.argv[1]}: rounds {bad} lack valid updates"
mem = [float(r["train_gpu_mem"]) for r in rows if r.get("train_gpu_mem")]
assert mem, f"{sys.argv[1]}: no client reported GPU memory: the clients did not train on the GPU"
print(f"  {len(rows)} rounds, {sys.argv[2]} valid updates each; peak GPU memory per client {max(mem):.0f} MB")
PYEOF
}

echo "== 1. the demo, no flags (DEVICE \"\" must pick the GPU)"
t=$(date +%s)
$PY federated.py --save-dir "$OUT/demo" --exist-ok 2>&1 | tee "$OUT/demo.log" | grep -E "at a time|round |done|failed"
grep -q "at a time on cuda:0" "$OUT/demo.log" || { echo "FAIL: the demo did not plan its clients on the GPU"; exit 1; }
rounds_ok "$OUT/demo/metrics.csv" 3
echo "  demo wall time $(( $(date +%s) - t )) s"

echo "== 2. export + yolo val of the exported model on the GPU"
$PY utils/export_federated.py yolov8n.yaml "$OUT/demo/round15.npz" -o "$OUT/demo/round15.pt"
$PY -c "from ultralytics import YOLO; m = YOLO('$OUT/demo/round15.pt').val(data='datasets/demo/test/data.yaml', \
split='test', imgsz=64, device=0, plots=False, project='$OUT/val', verbose=False); print(f'  yolo val on GPU: \
mAP50-95 {m.box.map:.3f}')"

echo "== 3. federated (3 clients sharing the GPU) vs centralized, equal image-epochs (15 x 2 = 30 epochs)"
$PY bench/bench.py --settings non-iid-3 --runs centralized fedavg --device 0 --work "$OUT/bench" \
    --out "$OUT/results.md" --fresh 2>&1 | tee "$OUT/bench.log" | grep -E "measuring|mAP50-95"
rounds_ok "$OUT/bench/runs/non-iid-3-fedavg/metrics.csv" 3
$PY - "$OUT/bench/results.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
c = next(v for k, v in r.items() if k.startswith("all|centralized|"))
f = next(v for k, v in r.items() if k.startswith("non-iid-3|fedavg|"))
print(f"  centralized: mAP50-95 {c['map']:.4f}, {c['seconds']:.0f} s, GPU memory {c.get('gpu_mem_mb') or 0:.0f} MB")
print(f"  federated:   mAP50-95 {f['map']:.4f}, {f['seconds']:.0f} s, GPU memory per client "
      f"{f.get('gpu_mem_mb') or 0:.0f} MB")
print(f"  ratios: mAP {f['map'] / max(c['map'], 1e-9):.2f}x, wall time {f['seconds'] / c['seconds']:.2f}x "
      "(target <= 1.2x)")
PYEOF
echo "GPU check passed"

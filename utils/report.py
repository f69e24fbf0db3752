"""What a run leaves a person to read: SAVE_DIR/metrics.csv (one row per round) and results.png."""

import csv
import io
from pathlib import Path

import numpy as np

from utils.atomic import atomic_open

FIXED = ["round", "time_s", "updates", "train_box_loss", "train_cls_loss", "train_dfl_loss",
         "precision", "recall", "map50", "map50_95"]


def read_rows(path):
    """Return the rows of a metrics.csv as dicts (empty if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    """Write rows (dicts) as metrics.csv atomically; columns: FIXED (those a row has: a classify run has no box loss or
    mAP), then any others in first-seen order."""
    columns = [k for k in FIXED if k in ("round", "time_s", "updates") or any(k in row for row in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _fmt(row.get(k, "")) for k in columns})
    with atomic_open(path) as f:
        f.write(buf.getvalue().encode())


def _fmt(v):
    """Format a number compactly for the CSV."""
    return f"{v:.6g}" if isinstance(v, float) else v


MAX_CLIENT_LINES = 10  # more clients than the colours of matplotlib's cycle: bands, not lines (64 lines: 0.4-0.6 s)


def _spread(rows, keys):
    """Return (rounds, [lowest, 25th percentile, 75th percentile, highest]) of the values under `keys` in each row that
    has any; None if none has."""
    pts = [(int(r["round"]), [float(r[k]) for k in keys if r.get(k) not in (None, "")]) for r in rows]
    pts = [(x, np.percentile(v, [0, 25, 75, 100])) for x, v in pts if v]
    return ([x for x, _ in pts], np.array([q for _, q in pts]).T) if pts else None


def plot(path, rows, metric="map50_95", label="mAP50-95"):
    """Draw the task's score `metric` (global and per client, or for more than MAX_CLIENT_LINES clients their range;
    `label` names it) and the train losses against round into results.png, atomically."""
    import matplotlib  # here: the Agg backend is chosen before pyplot is imported, and only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(int(r["round"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    clients = [k for k in (rows[-1] if rows else {}) if k.startswith(f"{metric}_")]
    if len(clients) <= MAX_CLIENT_LINES:
        for key in clients:
            ax1.plot(*series(key), marker=".", lw=1, alpha=0.7, label=key.removeprefix(f"{metric}_"))
    elif spread := _spread(rows, clients):  # many clients: the range of their scores as bands
        (x, (low, q1, q3, high)), n = spread, len(clients)
        ax1.fill_between(x, low, high, color="tab:blue", alpha=0.12, label=f"{n} clients: lowest to highest")
        ax1.fill_between(x, q1, q3, color="tab:blue", alpha=0.35, label=f"{n} clients: middle half")
    if series(metric)[0]:
        ax1.plot(*series(metric), marker="o", lw=2.5, color="black", label="global (weighted)")
    if series(f"server_{metric}")[0]:
        ax1.plot(*series(f"server_{metric}"), marker="s", lw=2, ls="--", color="gray", label="server data")
    ax1.set(title=f"global model {label} on val splits", xlabel="round", ylabel=label)
    ax1.grid(alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:  # nothing evaluated (EVALUATE off): an empty panel, no legend
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "not evaluated (--evaluate false)", ha="center", va="center", transform=ax1.transAxes)
    losses = [k for k in (rows[-1] if rows else {}) if k.startswith("train_") and k.endswith("loss")]
    for key in losses:  # the task's own: box, cls, dfl (+ seg, pose, kobj, angle); classify: loss
        ax2.plot(*series(key), marker=".", label=key.removeprefix("train_"))
    ax2.set(title="train loss (weighted over clients)", xlabel="round", ylabel="loss")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)

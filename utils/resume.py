"""A run's saved state in SAVE_DIR: config.json, which rounds are complete, and how a stopped run continues.

A round is complete once its metrics.csv row is written, which happens after its round{N}.npz. `--resume` continues
the run from its last complete round with the settings saved in config.json; a setting given on the command line
that differs from the saved run is refused, except those in RESUME_MAY_CHANGE.
"""

import json
import os
import shlex
import sys
from pathlib import Path

import flwr
import torch
import ultralytics

from utils.atomic import atomic_write_text, remove_stale_temps
from utils.momentum import FILE as MOMENTUM_FILE
from utils.privacy import epsilon
from utils.report import read_rows
from utils.strategies import STATE_FILE

# Resuming takes the saved run's settings, except these, which belong to this machine or this start (they keep
# their value from the command line or their default).
RESUME_LOCAL = {"RESUME", "EXIST_OK", "SAVE_DIR", "DEVICE", "WORKERS", "CLIENT_RESOURCES", "VERBOSE"}
# Given on the command line, these may differ from the saved run (NUM_ROUNDS: the run is extended or shortened).
RESUME_MAY_CHANGE = RESUME_LOCAL | {"NUM_ROUNDS", "KEEP_ROUNDS", "EVALUATE", "SERVER_DATA", "PATIENCE", "ROUND_TIMEOUT",
                                     "FRACTION_EVALUATE", "EVAL_EVERY", "EVAL_IN_FIT"}


def complete_rounds(save_dir):
    """Return (the last complete round in save_dir, 0 if none; the metrics rows).

    A round is complete once its metrics row is written, which happens after its npz; rows run 1..N without gaps.
    Older round files may be gone (KEEP_ROUNDS): only the last complete round's npz must exist.
    """
    rows = read_rows(Path(save_dir) / "metrics.csv") if (Path(save_dir) / "metrics.csv").is_file() else []
    have, done = {int(x["round"]) for x in rows}, 0
    while done + 1 in have:
        done += 1
    while done and not (Path(save_dir) / f"round{done}.npz").is_file():
        done -= 1
    return done, [x for x in rows if int(x["round"]) <= done]


def read_saved(cfg, given):
    """Return the saved config.json of the run in SAVE_DIR and fill cfg with its settings (RESUME).

    Settings the user gave (`given`: their names) keep their value; one that differs from the saved run is refused
    unless it is in RESUME_MAY_CHANGE. ValueError with one sentence.
    """
    save_dir = Path(cfg["SAVE_DIR"])
    try:
        saved = json.loads((save_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot resume: {save_dir / 'config.json'} is missing or unreadable ({e})") from None
    was = saved["settings"]
    changed = [k for k in given if k not in RESUME_MAY_CHANGE and k in was and cfg[k] != was[k]]
    if changed:
        diffs = "; ".join(f"{k.lower().replace('_', '-')} was {was[k]!r}, now {cfg[k]!r}" for k in changed)
        raise ValueError(f"cannot resume the run in {save_dir} with other settings: {diffs}")
    for k, v in was.items():  # DATASETS too: the demo datasets the run generated
        if k in cfg and k not in given and k not in RESUME_LOCAL:
            cfg[k] = v
    return saved


def resume_point(cfg):
    """Return (last complete round, its rows) of the run in SAVE_DIR; refuse when there is nothing left to do."""
    save_dir = cfg["SAVE_DIR"]
    done, rows = complete_rounds(save_dir)
    if done == 0:
        raise ValueError(f"nothing to resume in {save_dir}: no complete round yet (start it again without --resume)")
    if done >= cfg["NUM_ROUNDS"]:
        raise ValueError(f"the run in {save_dir} already finished all {cfg['NUM_ROUNDS']} rounds; to train it "
                         f"further, resume with a larger --num-rounds")
    return done, rows


def write_config(cfg, spec):
    """Save the run's settings, classes and library versions as SAVE_DIR/config.json (read by export and resume)."""
    info = {"settings": cfg, "names": spec["names"], "hyp": spec["hyp"], "lr_scale": spec["lr_scale"],
            "datasets": spec["datasets"],
            "task": spec["task"], **({"kpt_shape": spec["model"]["kpt_shape"]} if "kpt_shape" in spec["model"] else {}),
            "versions": {"flwr": flwr.__version__, "ultralytics": ultralytics.__version__, "torch": torch.__version__}}
    if cfg["DP_CLIP"]:  # the privacy the whole run spends (per round: metrics.csv dp_epsilon)
        info["privacy"] = {"epsilon": epsilon(cfg["DP_NOISE"], cfg["NUM_ROUNDS"], cfg["DP_DELTA"]),
                           "delta": cfg["DP_DELTA"], "rounds": cfg["NUM_ROUNDS"], "accountant": "dp-accounting RDP"}
    atomic_write_text(Path(cfg["SAVE_DIR"]) / "config.json", json.dumps(info, indent=2, default=str))


ROOT = Path(__file__).resolve().parent.parent  # the project folder


def command(script, *args):
    """Return the command line that runs this project's `script` (its path in the project) with `args`, as it runs
    from the current folder: this process's Python, paths relative when the run was started with a relative path."""
    relative = not os.path.isabs(sys.argv[0])
    python, path = (sys.executable, ROOT / script) if not relative else (os.path.relpath(sys.executable),
                                                                         os.path.relpath(ROOT / script))
    return " ".join(shlex.quote(str(x)) for x in (python, path, *args))


def resume_command(save_dir):
    """Return the command line that continues the run in save_dir."""
    return command("federated.py", "--resume", "--save-dir", save_dir)


def interrupted_line(cfg):
    """Return what a stopped run says: which rounds are complete and how to continue."""
    save_dir = Path(cfg["SAVE_DIR"])
    done, _ = complete_rounds(save_dir)
    if not done:
        return f"interrupted before any round was complete; nothing in {save_dir} to resume: start the run again"
    rounds = f"rounds 1-{done} of {cfg['NUM_ROUNDS']} are" if done > 1 else f"round 1 of {cfg['NUM_ROUNDS']} is"
    return f"interrupted: {rounds} complete in {save_dir}; continue with: {resume_command(save_dir)}"


def start_save_dir(cfg, run):
    """Start SAVE_DIR: config.json written (on resume too: the settings it continues with, NUM_ROUNDS may have
    grown), a killed writer's temp files removed, and for a fresh run an overwritten run's metrics.csv, server state
    (momentum.npz, server_state.npz) and clients' optimizer states (`.optimizer`, earlier `.optimizer.npz`), which it
    must never continue from."""
    save_dir = Path(cfg["SAVE_DIR"])
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(save_dir)
    write_config(cfg, run["spec"])
    if not run["offset"]:
        for name in ("metrics.csv", MOMENTUM_FILE, STATE_FILE):
            (save_dir / name).unlink(missing_ok=True)
        for f in (save_dir / "clients").glob("*.optimizer*"):
            f.unlink()

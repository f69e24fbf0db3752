"""Rebuild an ordinary Ultralytics .pt from the base model a run started from and one of its round npz files.

Usage:
    .venv/bin/python utils/export_federated.py [BASE] NPZ [-o OUT.pt] [--names a b c]

BASE is the .pt or .yaml the run started from; without it, the run's config.json beside NPZ names it (its
BASE_MODEL). The class names come from --names, else from that config.json, else from BASE itself. The output loads
with YOLO(OUT) and works with `yolo val`, `yolo predict` and `yolo export`; its weights are the npz's, in float32.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.checkpoint import write_checkpoint  # noqa: E402 (after the path above)
from utils.model import build_model, read_base  # noqa: E402
from utils.params import load_npz, set_weights  # noqa: E402


def run_config(npz):
    """Return the run's config.json beside `npz` as a dict, or None if there is none."""
    cfg = Path(npz).parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        info = json.loads(cfg.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return info
    except ValueError as e:
        raise ValueError(f"{cfg} is not a federated.py config.json: {e}") from None


def run_names(npz):
    """Return (names, train settings) from the run's config.json beside `npz`, or (None, {}) if there is none."""
    info = run_config(npz)
    if info is None:
        return None, {}
    try:
        return list(info["names"]), dict(info.get("hyp", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{Path(npz).parent / 'config.json'} is not a federated.py config.json: {e}") from None


def run_base(npz):
    """Return the base model the run started from (BASE_MODEL in the config.json beside `npz`); ValueError if none."""
    info = run_config(npz)
    settings = info.get("settings") if info else None
    base = settings.get("BASE_MODEL") if isinstance(settings, dict) else None
    if not base:
        cfg = Path(npz).parent / "config.json"
        where = f"there is no {cfg}" if info is None else f"{cfg} has no settings.BASE_MODEL"
        raise ValueError(f"no BASE given and {where}: give BASE, the .pt or .yaml the run started from")
    return str(base)


def export(base, npz, out=None, names=None):
    """Write the Ultralytics checkpoint for round file `npz` of a run that started from `base`; return its path.

    Args:
        base (str | Path | None): the .pt or .yaml the run started from; None: BASE_MODEL of the config.json beside npz.
        npz (str | Path): a round file.
        out (str | Path | None): the .pt to write; None: the npz path with .pt.
        names (list[str] | None): class names; None: the config.json's, else the base model's.

    Returns:
        (Path): the written checkpoint.

    Raises:
        ValueError: one sentence naming the file and the first entry that does not fit; no output is written.
    """
    npz = Path(npz)
    if not npz.is_file():
        raise ValueError(f"{npz} does not exist")
    base = base or run_base(npz)
    arrays = load_npz(npz)
    run_cls, hyp = run_names(npz)
    arch, base_model = read_base(base)
    kpt_shape = (run_config(npz) or {}).get("kpt_shape")
    if kpt_shape:  # a pose run: its datasets' keypoints, not the base model's
        arch["kpt_shape"] = kpt_shape
    if names is None:
        names = run_cls or (list(base_model.names.values()) if base_model is not None else None)
    if names is None:
        names = [f"class{i}" for i in range(arch.get("nc", 80))]
    model = build_model(arch, names)
    set_weights(model, arrays, source=str(npz))
    out = Path(out) if out else npz.with_suffix(".pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    train_args = {"model": str(base), **{k: hyp[k] for k in ("imgsz", "batch") if k in hyp}}
    return write_checkpoint(model, out, train_args, {"npz": str(npz.resolve()), "base": str(base)})


def get_args_parser():
    """Return the exporter's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", help="the .pt or .yaml the run started from (default: BASE_MODEL in the "
                   "run's config.json beside the npz)")
    p.add_argument("npz", help="a round file, e.g. runs/federated/round10.npz")
    p.add_argument("-o", "--out", help="output .pt (default: the npz path with .pt)")
    p.add_argument("--names", nargs="+", help="class names (default: the run's config.json beside the npz)")
    return p


def main(argv=None):
    """Export from the command line; exit non-zero with one sentence on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        out = export(args.base, args.npz, args.out, args.names)
    except ValueError as e:
        sys.exit(f"export_federated.py: {e}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()

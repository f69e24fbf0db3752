"""The run's starting state, built on the server before any round: every input checked (settings, base model,
datasets, resume), the federation's classes, the model and its first global weights, and the `spec` every client
receives. Anything off stops here with one sentence (ValueError), before Ray or any client starts.
"""

import math
from logging import WARNING
from pathlib import Path

from utils import momentum, personalize, privacy, secure
from utils.classes import federation_names
from utils.console import log
from utils.datasets import check_dataset, check_federation, client_labels
from utils.demo import demo_datasets
from utils.model import build_model, model_task, read_base
from utils.params import get_weights, load_npz, set_weights
from utils.resume import read_saved, resume_point
from utils.schedule import check_schedule, resolve_hyp
from utils.share import check_client_models, check_share, shared_entries
from utils.strategies import check_strategy


def read_inputs(cfg, given):
    """Check the settings, base model(s) and datasets (generating the demo when none are given); on RESUME fill cfg
    from the saved run. Return (architecture, base weights or None, task, clients' own models, dataset checks, saved
    config.json or None); ValueError with one sentence if anything is off. `given`: the settings the user set."""
    cfg["STRATEGY"], cfg["FP16"] = cfg["STRATEGY"].lower(), cfg["FP16"].lower()
    momentum.defaults_off(cfg, given)  # on by default where nothing is in their way; set by the user: checked below
    problem = check_schedule(cfg) or personalize.check(cfg) or momentum.check(cfg) or \
        (cfg["FP16"] not in ("off", "up", "both") and f"fp16 must be off, up or both (got {cfg['FP16']!r})")
    if cfg["PATIENCE"] and not (cfg["EVALUATE"] or cfg["SERVER_DATA"]) or cfg["PATIENCE"] < 0:
        problem = problem or (f"patience {cfg['PATIENCE']} needs a global score every round (keep evaluate on, or "
                              "give server-data) and must be 0 or more")
    for key in ("FRACTION_FIT", "FRACTION_EVALUATE"):
        if not 0 < cfg[key] <= 1:
            problem = problem or f"{key.lower().replace('_', '-')} must be in (0, 1] (got {cfg[key]})"
    if cfg["EVAL_IN_FIT"] and cfg["SECAGG"]:
        problem = problem or ("eval-in-fit sends each client's scores with its update, which SecAgg+'s messages do "
                              "not carry; turn one of them off")
    if cfg["EVAL_EVERY"] < 1:
        problem = problem or f"eval-every must be 1 or more rounds (got {cfg['EVAL_EVERY']})"
    if cfg["ROUND_TIMEOUT"] < 0:
        problem = problem or f"round-timeout must be 0 (no deadline) or more seconds (got {cfg['ROUND_TIMEOUT']})"
    if problem:
        raise ValueError(problem)
    save_dir = Path(cfg["SAVE_DIR"])
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"save-dir {save_dir} exists and is not a folder")
    saved = read_saved(cfg, given) if cfg["RESUME"] else None
    arch, base = read_base(cfg["BASE_MODEL"])
    task = model_task(arch).name  # the base model's task is the run's (utils/tasks.py)
    own = [read_base(m) for m in cfg["CLIENT_MODELS"]]  # mixed tasks: each client's own model
    tasks = [model_task(a).name for a, _ in own] or task
    if not cfg["DATASETS"] and not cfg["NAMES"]:
        cfg["DATASETS"] = demo_datasets(cfg["DEMO_DIR"], cfg["SEED"], tasks if own else [task] * 3)
    if own and len(own) != len(cfg["DATASETS"]):
        raise ValueError(f"client-models names {len(own)} models for {len(cfg['DATASETS'])} datasets: give one per "
                         "dataset, in the same order")
    checks = check_federation(cfg["DATASETS"], tasks) if cfg["DATASETS"] else []  # none: the SuperNodes have them
    for file, check in zip(cfg["DATASETS"], checks):
        if check["yaml"]["val"] == check["yaml"]["train"]:
            log(WARNING, "dataset %s: its val split is its train split, so its scores are measured on training "
                "images (give it a val split of its own)", file)
    if task == "pose" and checks and "kpt_shape" in checks[0]["yaml"]:  # the datasets' keypoints shape the head
        arch["kpt_shape"] = checks[0]["yaml"]["kpt_shape"]
    clients = cfg["MIN_CLIENTS"] or len(cfg["DATASETS"])
    if cfg["SECAGG"] and "POOLED_BN_VAR" not in given:  # on by default where the server sees each client's BatchNorm
        cfg["POOLED_BN_VAR"] = False  # means; SecAgg+ hides them (asked for by name, it is refused below)
    sampled = min(clients, max(math.ceil(round(cfg["FRACTION_FIT"] * clients, 9)), cfg["MIN_UPDATES"]))
    problem = check_strategy(cfg, sampled) or privacy.check_privacy(cfg, clients) or secure.check_secagg(cfg, sampled)
    if problem:
        raise ValueError(problem)
    return arch, base, task, own, checks, saved


def prepare(cfg, defaults, given=None):
    """Check every input and build the run's starting state; raise ValueError with one sentence if anything is off.

    `given` names the settings the user set (command line); None: those that differ from `defaults`. On resume,
    the others are taken from the saved run's config.json.

    Returns:
        (dict): `initial` global arrays, `spec` (what every client receives), `trainable` (which state_dict entries
            are parameters, not buffers), `offset` (rounds already done), `rows` (their metrics), the server's
            `model` (for checkpoints; never used for inference), `train_args`, `server_check` and `train_images`
            (each known dataset's train image count, the most a client on it may claim) and `labels` (their names
            in metrics.csv).
    """
    given = {k for k in cfg if cfg[k] != defaults.get(k)} if given is None else set(given)  # before resume fills cfg
    arch, base, task, own, checks, saved = read_inputs(cfg, given)
    names = federation_names(checks, cfg["DATASETS"], cfg["NAMES"])
    if not checks and cfg["MIN_CLIENTS"] < 1:
        raise ValueError("without datasets on the server (a deployment), set min-clients to the number of SuperNodes")
    server_check = check_dataset(cfg["SERVER_DATA"], task) if cfg["SERVER_DATA"] else None
    if server_check and not set(server_check["names"]) <= set(names):
        raise ValueError(f"server-data {cfg['SERVER_DATA']} has classes {server_check['names']}, not all among {names}")
    model, save_dir = build_model(arch, names, weights=base, seed=cfg["SEED"]), Path(cfg["SAVE_DIR"])
    offset, rows, initial = 0, [], get_weights(model)
    if saved is not None:
        offset, rows = resume_point(cfg)
        initial = load_npz(save_dir / f"round{offset}.npz")
        set_weights(model, initial, source=str(save_dir / f"round{offset}.npz"))
    elif sorted(save_dir.glob("round*.npz")) and not cfg["EXIST_OK"]:
        raise ValueError(f"save-dir {save_dir} already holds round files from an earlier run; continue it with "
                         "--resume, choose another --save-dir, or pass --exist-ok to overwrite them")
    sizes = [c["train_images"] for c in checks]  # none in a deployment
    hyp, scale, min_steps = resolve_hyp(cfg, len(names), sizes, cfg["MIN_CLIENTS"] or len(cfg["DATASETS"]),
                                        trained=base is not None, saved=saved)
    momentum.defaults_off(cfg, given, hyp["optimizer"])  # OPTIMIZER=auto may have picked MuSGD (a long run)
    keys = list(model.state_dict())
    problem = check_share(cfg, arch, keys) or check_client_models(cfg, arch, model.state_dict(), own, names)
    if problem:
        raise ValueError(problem)
    spec = {"model": arch, "task": task, "names": names, "hyp": hyp, "lr_scale": scale,
            "datasets": [str(Path(d).resolve()) for d in cfg["DATASETS"]],
            "work": str((save_dir / "work").resolve()), "fedbn": cfg["FEDBN"], "partial_labels": cfg["PARTIAL_LABELS"],
            "keep_optimizer": cfg["KEEP_OPTIMIZER"], "min_steps": min_steps, "bn_recalibrate": cfg["BN_RECALIBRATE"],
            "fused_adam": cfg["FUSED_ADAM"], "fixed_bn": cfg["FIXED_BN"], "avg_momentum": cfg["AVG_MOMENTUM"],
            "avg_second_moment": cfg["AVG_SECOND_MOMENT"],
            "personalize": personalize.resolve(cfg, len(names)),
            "share": cfg["SHARE"], "clients_dir": str((save_dir / "clients").resolve()),
            "client_models": [str(Path(m).resolve()) if Path(m).is_file() else m for m in cfg["CLIENT_MODELS"]]}
    params = {k for k, _ in model.named_parameters()}
    return {"initial": initial, "spec": spec, "trainable": [k in params for k in keys], "shared": shared_entries(
            keys, arch, cfg["SHARE"]), "offset": offset, "rows": rows, "model": model, "server_check": server_check,
            "bn_pairs": [(i, keys.index(k[:-4] + "var")) for i, k in enumerate(keys) if k.endswith(".running_mean")],
            "train_images": {str(Path(d).resolve()): c["train_images"] for d, c in zip(cfg["DATASETS"], checks)},
            "labels": client_labels(cfg["DATASETS"]),
            "train_args": {"model": cfg["BASE_MODEL"], "imgsz": cfg["IMGSZ"], "batch": cfg["BATCH"]}}

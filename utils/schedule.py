"""The run's one training schedule: the trainer arguments every client gets, resolved once on the server.

The rounds form one training run of NUM_ROUNDS x EPOCHS epochs: each client continues the same warmup, learning-rate
schedule and augmentation settings from the epoch the round starts at (utils/train.py). What is resolved here, once
for the whole run, so that every client trains with the same values: the optimizer and its learning rate (OPTIMIZER
auto, with the learning-rate scale derived from the clients' image counts), the warmup, and MIN_STEPS.
"""

import math
from logging import INFO, WARNING

from utils.console import log
from utils.train import client_batch

TRAIN_KEYS = ("IMGSZ", "BATCH", "NBS", "DEVICE", "WORKERS", "OPTIMIZER", "LR0", "COS_LR", "WARMUP_EPOCHS",
              "CLOSE_MOSAIC", "AMP", "SEED")  # settings passed to the Ultralytics trainer as lower-case arguments
SCHEDULE_KEYS = ("optimizer", "lr0", "momentum", "warmup_bias_lr", "warmup_epochs")  # kept by a resumed run


def check_schedule(cfg):
    """Return None if the schedule's settings make sense, else one sentence naming the setting at fault."""
    if cfg["NUM_ROUNDS"] < 1 or cfg["EPOCHS"] < 1:
        return f"num-rounds ({cfg['NUM_ROUNDS']}) and epochs ({cfg['EPOCHS']}) must be at least 1"
    if cfg["LR_SCALE"] < 0 or cfg["WARMUP_EPOCHS"] < 0:
        return (f"lr-scale ({cfg['LR_SCALE']}) and warmup-epochs ({cfg['WARMUP_EPOCHS']}) must be 0 or more "
                "(lr-scale 0: derived from the clients)")
    if min_steps(cfg["MIN_STEPS"], trained=False) is None:
        return f"min-steps ({cfg['MIN_STEPS']}) must be auto or a whole number, 0 or more (0: off)"
    if cfg["FIXED_BN"] < 0:
        return f"fixed-bn ({cfg['FIXED_BN']}) must be 0 or more (0: off; R: from round R on)"
    if cfg["LR_SCALE_MAX"] <= 0:
        return f"lr-scale-max ({cfg['LR_SCALE_MAX']}) must be above 0"
    return None


def resolve_warmup(cfg, trained, scale=1.0):
    """Return the warmup of the whole run in epochs (counted in each client's own iterations from the run's start).

    A random init warms up as Ultralytics does: WARMUP_EPOCHS, capped to leave the run's last epoch at full rate.
    A trained start (a `.pt` base) is never capped, however short the run, and with OPTIMIZER=auto it takes the
    run's learning-rate `scale` (at least 1) times as long, so the learning rate climbs as fast as Ultralytics' own
    rate would over its warmup (reaching that rate at WARMUP_EPOCHS) and the federation's larger rate only later.
    A fresh Adam's first steps move every weight by about the learning rate whatever its gradient, which knocks a
    converged model down (one round of one epoch at full rate: test mAP50-95 0.55 -> 0.0004, docs/training-schedule.md).
    """
    total = cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    if not trained:
        return float(min(cfg["WARMUP_EPOCHS"], max(total - 1, 0)))
    return float(cfg["WARMUP_EPOCHS"] * (max(scale, 1.0) if cfg["OPTIMIZER"].lower() == "auto" else 1.0))


def min_steps(value, trained):
    """Return MIN_STEPS `value` as a number of steps (auto: 3 from a trained start, 6 from a random init), or None if
    it is neither auto nor a whole number.

    Measured (bench/learning.md, "MIN_STEPS from a trained start"), 3 seeds: from a trained start, 3 (clients of
    24-32 images at batch 8 instead of 4, of 12-16 images at batch 4 instead of 2) learned more than 6 in every seed
    at 8 and 16 clients (0.77x and 0.71x of centralized against 0.75x and 0.66x), in less time (a quarter less at 8
    clients); 0 (batch 8 for all) less than 3 at 16 clients. From scratch 3 learned less than 6 (seed 0;
    bench/round_time.md).
    """
    text = str(value).strip().lower()
    if text == "auto":
        return 3 if trained else 6
    return int(text) if text.isdigit() else None


def resolve_min_steps(cfg, clients, trained):
    """Return MIN_STEPS as the clients apply it: 0 for one client (plain Ultralytics: its BATCH), else `min_steps`."""
    return 0 if clients <= 1 else min_steps(cfg["MIN_STEPS"], trained)


def resolve_lr_scale(cfg, sizes, clients):
    """Return the run's learning-rate scale: LR_SCALE, or with LR_SCALE 0 the one derived from the federation.

    FedAvg's round moves the model by the image-weighted mean of the clients' walks; a client takes one optimizer
    step per max(batch, nbs) of its own images (its batch after MIN_STEPS), a centralized epoch one per
    max(BATCH, NBS) of all of them. The derived scale is the ratio of the two step counts per epoch, so that the
    averaged walk is as long as the centralized one: 1 for one client (plain Ultralytics), K for K clients of equal
    size at the same batch, less where small clients already take more, smaller steps. Without the image counts
    (a deployment: the datasets are on the SuperNodes) it is `clients`, the count of equal clients it assumes.
    Either is capped at LR_SCALE_MAX: past about 4x Ultralytics' own rate a fresh AdamW's steps get too large for
    the model, however many clients share the work (measured: 6x at 3 clients and 7.8x at 8 clients learned less
    than 3x and 3.9x).
    """
    if cfg["LR_SCALE"]:
        return float(cfg["LR_SCALE"])
    scale = float(clients)
    if sizes:
        total = sum(sizes)
        steps = [n / max(client_batch(cfg["BATCH"], cfg["NBS"], n, cfg["MIN_STEPS"]).values()) for n in sizes]
        scale = total / max(cfg["BATCH"], cfg["NBS"]) / sum(n / total * s for n, s in zip(sizes, steps))
    return round(min(scale, cfg["LR_SCALE_MAX"]), 2)


def resolve_optimizer(cfg, nc, train_images, scale=1.0):
    """Resolve OPTIMIZER=auto once for the whole run, with Ultralytics' own rule, so every client uses the same one.

    Ultralytics picks MuSGD (lr 0.01) past 10,000 iterations, else AdamW with lr0 = 0.002 * 5 / (4 + nc), both with
    momentum 0.9 and no bias warmup; here the iterations count every client's images over the whole run (in a
    deployment the server does not know them and takes AdamW), and the learning rate is multiplied by `scale`
    (resolve_lr_scale).

    Returns:
        (dict): optimizer, lr0 and, for auto, the momentum and warmup_bias_lr that go with it.
    """
    if cfg["OPTIMIZER"].lower() != "auto":
        return {"optimizer": cfg["OPTIMIZER"], "lr0": cfg["LR0"]}
    iterations = math.ceil(train_images / max(cfg["BATCH"], cfg["NBS"])) * cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    name, lr0 = ("MuSGD", 0.01) if iterations > 10000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6))
    return {"optimizer": name, "lr0": round(lr0 * scale, 8), "momentum": 0.9, "warmup_bias_lr": 0.0}


def resolve_hyp(cfg, nc, sizes, clients, trained, saved=None):
    """Return (the trainer arguments every client gets, the learning-rate scale, MIN_STEPS as the clients apply it).

    Args:
        cfg (dict): the run's settings.
        nc (int): the federation's class count.
        sizes (list[int]): each dataset's train image count (none in a deployment).
        clients (int): clients per round.
        trained (bool): the run starts from trained weights (a `.pt` base).
        saved (dict | None): a resumed run's config.json: the optimizer and warmup the run started with stay, even
            if a longer run would pick others.
    """
    hyp = {k.lower(): cfg[k] for k in TRAIN_KEYS}  # DEVICE: resolved by each client where it runs (utils/devices.py)
    min_steps = resolve_min_steps(cfg, clients, trained)
    scale = resolve_lr_scale({**cfg, "MIN_STEPS": min_steps}, sizes, clients)
    hyp.update(resolve_optimizer(cfg, nc, sum(sizes), scale))
    hyp["warmup_epochs"] = resolve_warmup(cfg, trained=trained, scale=scale)
    if saved is not None:
        hyp.update({k: v for k, v in saved.get("hyp", {}).items() if k in SCHEDULE_KEYS})
        scale = saved.get("lr_scale", scale)
    return hyp, scale, min_steps


def fixed_bn_cause(cfg):
    """Return FIXED_BN from a model built from a .yaml as the likely cause of a diverged model, or None.

    Measured (bench/learning.md, "Fixed BatchNorm statistics"): from scratch at 16 clients, `--fixed-bn 2` diverged
    in round 2 in seeds 0, 1 and 2, `--fixed-bn 1` in seed 0: the statistics of a model still forming, a round old,
    normalize the next round's activations badly enough that the loss explodes."""
    if not cfg["FIXED_BN"] or not cfg["BASE_MODEL"].lower().endswith((".yaml", ".yml")):
        return None
    return (f"fixed-bn {cfg['FIXED_BN']} with a model trained from scratch (BatchNorm statistics of a model still "
            "forming); use it with a trained .pt base model, or turn it off")


def describe(cfg, run):
    """Log the resolved optimizer and the warmup of a fresh run (a resumed run said it when it started)."""
    if run["offset"]:
        return
    hyp, total = run["spec"]["hyp"], cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    if cfg["OPTIMIZER"].lower() == "auto":
        clients = cfg["MIN_CLIENTS"] or len(run["spec"]["datasets"])
        how = ("lr-scale" if cfg["LR_SCALE"] else "derived from the clients' image counts" if run["train_images"]
               else f"assumed for {clients} equal clients")
        log(INFO, "optimizer %s, lr0 %g: Ultralytics' own rate x %g (%s)", hyp["optimizer"], hyp["lr0"],
            run["spec"]["lr_scale"], how)
    warm, base = hyp["warmup_epochs"], cfg["BASE_MODEL"].lower()
    if base.endswith(".pt") and warm >= total:
        log(INFO, "a trained start: the learning rate ramps up over %g epochs, longer than this %d-epoch run, so "
            "the model is fine-tuned gently (docs/training-schedule.md)", warm, total)
    elif total > 1 and warm > total / 2 and base.endswith(".yaml"):
        log(WARNING, "warmup-epochs %g covers %g of the run's %d epochs: the learning rate ramps up for most of the "
            "run and a model learns little; run more rounds or epochs, or lower --warmup-epochs", cfg["WARMUP_EPOCHS"],
            warm, total)
    if fixed_bn_cause(cfg):
        log(WARNING, "fixed-bn %d from scratch: clients will normalize by the BatchNorm statistics of a model still "
            "forming; from scratch every measured run diverged in round 2 (bench/learning.md); fixed-bn is for a "
            "trained .pt base model", cfg["FIXED_BN"])

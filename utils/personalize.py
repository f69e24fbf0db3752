"""PERSONALIZE: after the last round, each client fine-tunes the final global model on its own train split and keeps
it as its own model, scored beside the global one on its own val split.

Why: a site whose images are unlike the others' (another camera, light, class mix) can score higher on its own val
split with a model trained on its data alone than with the global model, which serves every site's kind of images.
A few epochs of plain fine-tuning from the global model (FedAvg then local fine-tuning: Yu et al. 2020, "Salvaging
federated learning by local adaptation"; Cheng et al. 2021, "Fine-tuning is fine in federated learning") gives it
both: the federation's start and its own images. Measured in bench/learning.md ("Each site alone").

The fine-tuning is what `yolo train model=<the final .pt> data=<the site's data.yaml> epochs=PERSONALIZE` would do:
Ultralytics' own optimizer choice and learning rate (OPTIMIZER=auto: AdamW at 0.002 x 5 / (4 + classes), without the
federation's learning-rate scale; else OPTIMIZER and LR0 as given), a fresh optimizer, WARMUP_EPOCHS of warmup capped
to leave the last epoch at full rate, the client's BATCH, mosaic closed for the last CLOSE_MOSAIC epochs. It runs in
the last round's evaluation (every client is asked, whatever FRACTION_EVALUATE says), after the client has scored
the global model; after an early stop (PATIENCE), in one more evaluation of the best round's model (best.pt).
"""

import time

from utils.checkpoint import write_checkpoint
from utils.evaluate import evaluate
from utils.schedule import resolve_optimizer
from utils.train import train_round

SUFFIX = ".finetuned.pt"  # SAVE_DIR/clients/<client>.finetuned.pt (a SuperNode: in its save-dir)


def check(cfg):
    """Return None if PERSONALIZE makes sense with the other settings, else one sentence naming it."""
    if cfg["PERSONALIZE"] < 0:
        return f"personalize ({cfg['PERSONALIZE']}) must be 0 (off) or more epochs"
    if cfg["PERSONALIZE"] and not cfg["EVALUATE"]:
        return ("personalize needs evaluate on: each client fine-tunes the final global model in the last round's "
                "evaluation and scores both on its own val split")
    return None


def resolve(cfg, nc):
    """Return what every client needs to fine-tune (epochs and its trainer arguments over the run's), or None."""
    epochs = cfg["PERSONALIZE"]
    if not epochs:
        return None
    hyp = resolve_optimizer({**cfg, "NUM_ROUNDS": 1, "EPOCHS": epochs}, nc, 0)  # Ultralytics' own pick, unscaled
    return {"epochs": epochs, "hyp": {**hyp, "warmup_epochs": float(min(cfg["WARMUP_EPOCHS"], epochs - 1))}}


def fine_tune(model, data_yaml, spec, classes, path, label, metric, start_round):
    """Fine-tune `model` (the global weights of `start_round`, trained in place) on the client's train split, write
    it to `path` (None: not written) and return its score on the val split: `personal_score` (the task's `metric`)
    and the time.

    The caller has already scored the global model; partial labels (`classes`) are honoured as in a round.
    """
    t0, ft = time.time(), spec["personalize"]
    hyp = {**spec["hyp"], **ft["hyp"]}  # the client's BATCH: MIN_STEPS is a federation's setting
    train_round(model, data_yaml, 0, ft["epochs"], ft["epochs"], hyp, classes=classes, label=f"{label}, fine-tuning",
                fused=spec.get("fused_adam", False), return_state=False)
    score = evaluate(model, data_yaml, hyp)[metric]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"finetuned_epochs": ft["epochs"], "finetuned_from_round": start_round, metric: score}
        write_checkpoint(model, path, {"imgsz": hyp["imgsz"]}, meta)
    return {"personal_score": score, "personal_time": time.time() - t0}


def summary(row, metric, label, epochs, folder, start="final model"):
    """Return the closing line on the fine-tuned models from the last round's metrics `row`, or None without them."""
    pairs = [(float(row[f"{metric}_{k[15:]}"]), float(v)) for k, v in row.items()
             if k.startswith("personal_score_") and f"{metric}_{k[15:]}" in row]
    if not pairs:
        return None
    better = sum(p >= g for g, p in pairs)
    return (f"  fine-tuned   each client's {start} after {epochs} more epochs on its own images: {folder}/"
            f"<client>{SUFFIX}; own val {label} {sum(g for g, _ in pairs) / len(pairs):.3f} (global) -> "
            f"{sum(p for _, p in pairs) / len(pairs):.3f} (fine-tuned), mean of {len(pairs)}; at least as high "
            f"for {better} of {len(pairs)}")

"""Validate a model's weights on a dataset split with the task's stock Ultralytics validator: a client's scores, and
the server's own (SERVER_DATA)."""

import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch
from ultralytics.nn.tasks import guess_model_task

from utils.classes import client_view, view_folder
from utils.datasets import client_label
from utils.devices import client_device
from utils.model import build_model
from utils.offline import no_downloads
from utils.params import set_weights
from utils.tasks import get_task

_LAST = {}  # this process's last validated model: its weights, names and the validator's (fused) copy of it


def validator_copy(model):
    """Return the copy of `model` the validator runs: a deep copy with Conv+BN fused, as Ultralytics' own
    `get_model` and AutoBackend make it, or the one this process made last time if `model` holds the same weights
    and names again: every client of a simulated round validates the same global model, and the copy and its fusion
    were two thirds of a validation's time (bench/round_time.md). Scores are unchanged (tests/test_train.py): the
    fused copy is the same, and the validator's later steps on it (device, float, eval) leave it as it is."""
    sd = model.state_dict()
    last = _LAST.get("weights")
    if last is not None and _LAST["type"] is type(model) and _LAST["names"] == getattr(model, "names", None) and \
            len(last) == len(sd) and all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                                         for a, b in zip(last, sd.values())):
        return _LAST["copy"]
    _LAST.clear()
    with torch.inference_mode(False):  # normal tensors, as Ultralytics' get_model makes them: the validator's
        copy = deepcopy(model).fuse(verbose=False)  # AutoBackend copies a model holding inference tensors once more
    _LAST.update(type=type(model), names=deepcopy(getattr(model, "names", None)),
                 weights=[t.detach().clone() for t in sd.values()], copy=copy)
    return copy


def evaluate(model, data_yaml, hyp, split="val"):
    """Return the task's metrics (utils/tasks.py: detect precision, recall, map50, map50_95; segment and pose those of
    the boxes and mask_/pose_ ones; classify top1, top5) and the image count of `model` on `split` of `data_yaml`.

    The scores are the ones `yolo val model=<the round's .pt> data=<data_yaml> split=<split> imgsz=<imgsz>` prints
    (the same validator and settings, rectangular batches included). The validator fuses Conv+BN (BatchNorm folded
    into the convolutions) in a copy of its own: `model` is left as it was (tests/test_train.py).
    """
    no_downloads()
    task = get_task(guess_model_task(model))
    keep = ("imgsz", "batch", "device", "workers")
    args = {k: hyp[k] for k in keep if k in hyp}
    args.update(data=str(data_yaml), split=split, plots=False, verbose=False, save_json=False, half=False,
                task=task.name, rect=True)  # rect as `yolo val` and Ultralytics' own validation: the same scores
    with tempfile.TemporaryDirectory(prefix="fedyolo-val-") as work:
        validator = task.load("validator")(save_dir=Path(work), args=args)
        validator.get_model = lambda m, trainer=None, **kwargs: validator_copy(m)
        stats = validator(model=model)
        images = len(validator.dataloader.dataset)
    return {**{short: float(stats[k]) for k, short in task.metrics.items()}, "images": images}


def client_scores(model, data_yaml, spec, dataset, task, t0=None):
    """Return a client's metrics of `model` on its val split (`evaluate`), with its name and dataset, and the seconds
    it took (`val_time`; `val_time_prepare` from t0, the message's arrival). Mixed tasks (each client its own model
    task): `score` is the client's own `task`'s metric, the run's score."""
    t1 = time.time()
    m = evaluate(model, data_yaml, spec["hyp"])
    m.update(val_time_prepare=t1 - (t0 or t1), val_time=time.time() - t1, client=client_label(dataset),
             dataset=str(Path(dataset).resolve()))
    if spec.get("client_models"):
        m["score"] = m[task.metric]
    return m


def evaluate_on_server(run, arrays):
    """Return the metrics of the global `arrays` on the val split of the server's own dataset (SERVER_DATA, checked
    as `run["server_check"]`), seen through a view with the federation's class ids like a client's."""
    spec = run["spec"]
    hyp = {**spec["hyp"], "device": client_device(spec["hyp"]["device"])}
    model = build_model(spec["model"], spec["names"])
    set_weights(model, arrays)
    view = client_view(run["server_check"], spec["names"], view_folder(spec["work"], "server", spec["names"]))
    return evaluate(model, view, hyp)

"""Build the federation's model (any Ultralytics task) from a base .pt or .yaml, adapted to the federation's classes."""

import json
import threading
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
from ultralytics.nn.tasks import guess_model_task, load_checkpoint, yaml_model_load

from utils.tasks import get_task


def read_base(base):
    """Read a base model file without downloading anything.

    Args:
        base (str | Path): an Ultralytics model `.pt` checkpoint or an architecture `.yaml` of any task (detect,
            segment, pose, obb, classify; a bare name such as `yolov8n-seg.yaml` resolves to the copy that ships
            with Ultralytics).

    Returns:
        (tuple[dict, torch.nn.Module | None]): the architecture dict and, for a `.pt`, its fp32 model.
    """
    base = str(base)
    suffix = Path(base).suffix.lower()
    if suffix == ".pt":
        if not Path(base).is_file():
            raise ValueError(f"base model {base} does not exist (a .pt must be a local file; nothing is downloaded)")
        try:
            model, _ = load_checkpoint(base)
        except Exception as e:
            raise ValueError(f"base model {base} cannot be loaded as an Ultralytics checkpoint: {e}") from None
        cfg = deepcopy(model.yaml)
    elif suffix in {".yaml", ".yml"}:
        try:
            cfg = yaml_model_load(base)  # local file, else the Ultralytics bundled cfg/models copy
        except Exception as e:
            raise ValueError(f"base model {base} is not a readable model .yaml: {e}") from None
        model = None
    else:
        raise ValueError(f"base model {base} must be a .pt checkpoint or a model .yaml")
    task = guess_model_task(model if model is not None else cfg)
    try:
        get_task(task)
    except ValueError as e:
        raise ValueError(f"base model {base}: {e}") from None
    cfg.pop("yaml_file", None)  # the architecture alone; it travels to clients, so no local path in it
    return cfg, model


@lru_cache(maxsize=4)
def _read_base_at(base, mtime):
    """read_base, once per file version (`mtime`) in this process."""
    return read_base(base)


def read_base_cached(base):
    """Return read_base(base) (a copy of its architecture dict), read once per process while the file is unchanged.

    A client of a mixed-task federation trains its own base model and Flower builds a new client object for every
    message, so without this every fit and evaluate would load the .pt again.
    """
    mtime = Path(base).stat().st_mtime_ns if Path(base).is_file() else None
    cfg, model = _read_base_at(str(base), mtime)
    return deepcopy(cfg), model


def bn_entries(model):
    """Return the state_dict indices of the BatchNorm weights, biases and statistics (FedBN keeps them local)."""
    bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return [i for i, k in enumerate(model.state_dict()) if k.rsplit(".", 1)[0] in bn]


def model_task(cfg):
    """Return the Task (utils/tasks.py) of an architecture dict."""
    return get_task(guess_model_task(cfg))


def build_model(cfg, names, weights=None, seed=0):
    """Return the task's Ultralytics model (DetectionModel, SegmentationModel, ...) for `names` from architecture `cfg`.

    A pose architecture takes its keypoint shape from `cfg["kpt_shape"]` (the federation's datasets set it).

    With `weights` (a base model) every entry whose shape fits is copied, as `YOLO(pt).train(data=...)` does
    for a checkpoint trained on other classes; the rest (the class outputs then) get a seeded random init.
    """
    torch.manual_seed(seed)
    cfg = {**deepcopy(cfg), "nc": len(names)}
    model = model_task(cfg).load("model")(cfg, nc=len(names), verbose=False)
    if weights is not None:
        model.load(weights, verbose=False)
    model.names = dict(enumerate(names))
    return model


_TRAINING = {}  # thread -> (architecture and names, the model it last trained for them, ...) (see training_model)


def training_model(cfg, names, seed=0):
    """Return a model of architecture `cfg` for `names` whose every state_dict entry the caller is about to set: the
    one this process built for them before (a simulated client's process serves many clients and rounds), reset to
    how `build_model` returns one, else a new one. Building yolov8n takes about 0.09 s of a tiny client's 0.8 s
    round; the weights it then trains are bit-identical (bench/history.md). Evaluation uses it too: the validator fuses
    Conv+BN into a copy of its own."""
    thread, key = threading.get_ident(), (json.dumps(cfg, sort_keys=True, default=str), tuple(names))
    if _TRAINING.get(thread, (None,))[0] != key:  # one kept model per thread (each trains one model at a time)
        model = build_model(cfg, names, seed=seed)
        _TRAINING[thread] = key, model, set(model.__dict__), [p.requires_grad for p in model.parameters()]  # as built
        return model
    _, model, attributes, grads = _TRAINING[thread]
    torch.manual_seed(seed)  # the global generator as build_model leaves it
    for name in set(model.__dict__) - attributes:  # what training added: its loss, the partial-label mask, args
        del model.__dict__[name]
    for p, grad in zip(model.parameters(), grads):
        p.requires_grad_(grad)
        p.grad = None
    return model.train()


def own_model(spec, base_model=None, partition_id=None, deployed=False):
    """Return (architecture, base weights or None, task name) of the model a client trains: the run's (spec), or in
    a federation of mixed tasks its own base model (a SuperNode's node config `base-model`, else in a simulation
    CLIENT_MODELS[partition id])."""
    own = base_model or (spec["client_models"][partition_id] if spec.get("client_models") and not deployed else None)
    if not own:
        return spec["model"], None, spec.get("task", "detect")  # a spec made before tasks came: detection
    arch, weights = read_base_cached(own)
    return arch, weights, model_task(arch).name

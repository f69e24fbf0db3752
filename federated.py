"""Federated training of an Ultralytics YOLO model with Flower: one client per dataset, weights only exchanged.

Usage:
    python3 federated.py                                   # the embedded demo federation (generated, offline)
    python3 federated.py --base-model yolov8n-seg.yaml     # the demo for a task: -seg, -pose, -obb, -cls models
    python3 federated.py --datasets a/data.yaml b/data.yaml --base-model yolov8n.pt --num-rounds 10 --epochs 2
    python3 federated.py --help                            # every setting with its default
"""

import os

os.environ.setdefault("YOLO_VERBOSE", "false")  # Ultralytics' per-batch output; set YOLO_VERBOSE=true to see it
os.environ.setdefault("YOLO_OFFLINE", "1")  # no Ultralytics network checks or analytics events

# -----------------------------------------------------------------------------------------------------------------
# Settings: each one is also a command line flag (NUM_ROUNDS -> --num-rounds) and a Flower run-config key (num-rounds)
NUM_ROUNDS = 15  # (int) federated rounds
EPOCHS = 2  # (int) local epochs each client trains per round; the whole run is NUM_ROUNDS x EPOCHS epochs
SAVE_DIR = "runs/federated"  # (str) folder for round{N}.npz, metrics.csv, results.png, last.pt, best.pt, config.json
EXIST_OK = False  # (bool) allow a fresh run into a SAVE_DIR that already holds round files (they are overwritten)
RESUME = False  # (bool) continue the run in SAVE_DIR from its last complete round, with its saved settings
KEEP_ROUNDS = 0  # (int) round{N}.npz files kept: 0 all; N the last N plus the best round's
BASE_MODEL = "yolov8n.yaml"  # (str) model .yaml (random init) or .pt (its weights); its task (detect, segment, pose,
#                               obb, classify) is the run's; adapted to the datasets' classes
DATASETS = []  # (list[str]) one data.yaml per client (classify: a folder); empty (and no NAMES): the demo federation
CLIENT_MODELS = []  # (list[str]) mixed tasks: one base model per client (e.g. yolov8n.yaml yolov8n-seg.yaml); the
#                     clients share SHARE's parts and keep their own head (README "Mixed tasks"); empty: BASE_MODEL
DEMO_DIR = "datasets/demo"  # (str) where the demo federation is generated (other tasks than detect: DEMO_DIR-<task>)
NAMES = []  # (list[str]) the federation's classes; empty: the union of the datasets' names (needed in a deployment)
PARTIAL_LABELS = True  # (bool) a client's classification loss covers only the classes its data.yaml names
FEDBN = False  # (bool) FedBN: BatchNorm weights and statistics stay local to each client (README "BatchNorm")
SHARE = "all"  # (str) model parts the clients average: all, or backbone, neck, head joined by + (backbone+neck);
#                the others stay with each client, never sent (README "Partial sharing")
KEEP_OPTIMIZER = False  # (bool) each client keeps its optimizer state (Adam moments) from round to round
MIN_CLIENTS = 0  # (int) clients each round waits for; 0: one per entry of DATASETS
MIN_UPDATES = 1  # (int) valid client updates a round needs; with fewer the round is skipped, the global model kept
STRATEGY = "fedavg"  # (str) fedavg, fedprox, fedavgm, fedadam, fedyogi, fedmedian, fedtrimmedavg or krum (README)
SERVER_LR = 1.0  # (float) server learning rate: trainable weights move SERVER_LR x the aggregated client update
PROXIMAL_MU = 0.01  # (float) fedprox: weight mu of the proximal term mu/2 ||w - w_global||^2 in the client loss
SERVER_MOMENTUM = 0.5  # (float) fedavgm: server momentum, v = m v + (1 - m) update (README "Strategies")
ADAPTIVE_LR = 0.01  # (float) fedadam, fedyogi: server learning rate of the Adam/Yogi step
ADAPTIVE_BETA1 = 0.9  # (float) fedadam, fedyogi: first-moment decay
ADAPTIVE_BETA2 = 0.99  # (float) fedadam, fedyogi: second-moment decay
ADAPTIVE_TAU = 0.001  # (float) fedadam, fedyogi: adaptivity (added to the root of the second moment)
TRIM_BETA = 0.2  # (float) fedtrimmedavg: fraction of updates cut at each end of every coordinate
KRUM_F = 0  # (int) krum: number of malicious clients to tolerate (needs more than 2 x KRUM_F + 2 clients)
POOLED_BN_VAR = False  # (bool) BatchNorm running_var of the global model: variance of the pooled client data
FP16 = "off"  # (str) send float weights as float16: off, up (client -> server) or both; integer buffers stay exact
DP_CLIP = 0.0  # (float) differential privacy: clip each client's change to this L2 norm; 0: off (README "Privacy")
DP_NOISE = 1.0  # (float) DP noise multiplier: Gaussian noise of std DP_NOISE x DP_CLIP / clients on the mean change
DP_DELTA = 1e-5  # (float) DP delta at which the privacy spent (epsilon) is reported
DP_ADAPTIVE = False  # (bool) DP: the clip follows a quantile of the clients' change norms, starting at DP_CLIP
DP_QUANTILE = 0.5  # (float) adaptive DP: the fraction of clients whose change the clip should leave unclipped
SECAGG = False  # (bool) secure aggregation (Flower's SecAgg+): the server sees only the sum of the round's changes
SECAGG_SHARES = 3  # (int) SecAgg+: clients holding a share of each client's mask secrets (itself included)
SECAGG_THRESHOLD = 2  # (int) SecAgg+: shares that rebuild a dropped client's masks (fewer left: round skipped)
SECAGG_CLIP = 8.0  # (float) SecAgg+: entries of each weighted change are clipped to +-this before quantization
SECAGG_QUANT = 4194304  # (int) SecAgg+: quantization levels over [-secagg-clip, secagg-clip] (2**22)
CLIENT_RESOURCES = {"num_cpus": 1}  # (dict) Ray resources per simulated client; num_gpus derived from DEVICE unless set
EVALUATE = True  # (bool) evaluate the new global model on every client's val split after each round
SERVER_DATA = ""  # (str) optional data.yaml the server owns: the global model is also validated on its val split
# Training (Ultralytics train arguments, the same on every client)
IMGSZ = 64  # (int) train and val image size
BATCH = 8  # (int) batch size per client
NBS = 8  # (int) nominal batch size: one optimizer step per NBS images (NBS / BATCH batches accumulated)
MIN_STEPS = 6  # (int) with 2+ clients, a small client halves BATCH and NBS (down to 2) until an epoch makes this
#                many optimizer steps
DEVICE = ""  # (str) GPUs the simulated clients share: "" all (none: cpu), "cpu", "0", "0,1" (README "GPUs")
WORKERS = 0  # (int) dataloader worker processes per client
OPTIMIZER = "auto"  # (str) SGD, AdamW, ... or auto (resolved once on the server for the whole run)
LR0 = 0.01  # (float) initial learning rate (ignored when OPTIMIZER is auto)
LR_SCALE = 0.0  # (float) multiplies the learning rate OPTIMIZER=auto picks; 0: derived from the clients' image
#                counts (README "Learning rate and the number of clients")
LR_SCALE_MAX = 4.0  # (float) the derived learning-rate scale is at most this (a set LR_SCALE is used as given)
COS_LR = False  # (bool) cosine instead of linear learning-rate decay over the whole run
WARMUP_EPOCHS = 3.0  # (float) warmup epochs at the start of the whole run (not of every round)
CLOSE_MOSAIC = 10  # (int) turn mosaic off for the last CLOSE_MOSAIC epochs of the whole run
AMP = True  # (bool) mixed precision on CUDA
SEED = 0  # (int) seed for the initial weights, the demo data and each round's augmentation
VERBOSE = False  # (bool) also print Flower's and Ray's own log (client tracebacks included)
# -----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if k.isupper()}  # only the settings are upper case up to here

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from logging import ERROR, INFO, WARNING  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import ServerApp, ServerConfig  # noqa: E402
from flwr.server.compat import start_grid  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

from utils import secure  # noqa: E402
from utils.aggregate import check_update, failure_reason, first_line  # noqa: E402
from utils.atomic import atomic_write_text, remove_stale_temps  # noqa: E402
from utils.checkpoint import write_checkpoint  # noqa: E402
from utils.classes import annotated, class_map, client_view, union_names  # noqa: E402
from utils.config import explicit_settings, get_args_parser, resolve, setting_help  # noqa: E402
from utils.console import log  # noqa: E402
from utils.console import setup as setup_console  # noqa: E402
from utils.datasets import check_dataset, check_federation, client_label, client_labels  # noqa: E402
from utils.devices import client_device, count_gpus, plan_simulation, restrict_visible  # noqa: E402
from utils.interrupt import on_interrupt, start_ray  # noqa: E402
from utils.params import (  # noqa: E402
    decode_update,
    encode_update,
    entry_mismatch,
    get_weights,
    load_npz,
    save_npz,
    set_weights,
    to_half,
)
from utils.privacy import (  # noqa: E402
    adaptive_noise,
    add_noise,
    check_privacy,
    clip_change,
    epsilon,
    next_clip,
    private_mean,
)
from utils.report import plot, read_rows, write_rows  # noqa: E402
from utils.share import check_fit, check_share, expand, own_entries, shared_entries  # noqa: E402
from utils.strategies import Aggregator, check_strategy  # noqa: E402
from utils.tasks import get_task  # noqa: E402

TRAIN_KEYS = ("IMGSZ", "BATCH", "NBS", "DEVICE", "WORKERS", "OPTIMIZER", "LR0", "COS_LR", "WARMUP_EPOCHS",
              "CLOSE_MOSAIC", "AMP", "SEED")  # settings passed to the Ultralytics trainer as lower-case arguments


def resolve_warmup(cfg, trained, scale=1.0):
    """Return the warmup of the whole run in epochs (counted in each client's own iterations from the run's start).

    A random init warms up as Ultralytics does: WARMUP_EPOCHS, capped to leave the run's last epoch at full rate.
    A trained start (a `.pt` base) is never capped, however short the run, and with OPTIMIZER=auto it takes the
    run's learning-rate `scale` (at least 1) times as long, so the learning rate climbs as fast as Ultralytics' own
    rate would over its warmup (reaching that rate at WARMUP_EPOCHS) and the federation's larger rate only later.
    A fresh Adam's first steps move every weight by about the learning rate whatever its gradient, which knocks a
    converged model down (one round of one epoch at full rate: test mAP50-95 0.55 -> 0.0004, README "Fine-tuning
    from a trained model").
    """
    total = cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    if not trained:
        return float(min(cfg["WARMUP_EPOCHS"], max(total - 1, 0)))
    return float(cfg["WARMUP_EPOCHS"] * (max(scale, 1.0) if cfg["OPTIMIZER"].lower() == "auto" else 1.0))


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
    from utils.train import client_batch

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


def view_folder(root, dataset, names):
    """Return the work folder of a client's dataset view: one per dataset and class list, under `root`."""
    import hashlib

    key = hashlib.sha1(json.dumps([str(Path(dataset).resolve()), names]).encode()).hexdigest()[:10]
    return Path(root) / f"{client_label(dataset)}-{key}"


def bn_entries(model):
    """Return the state_dict indices of the BatchNorm weights, biases and statistics (FedBN keeps them local)."""
    import torch

    bn = {name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return [i for i, k in enumerate(model.state_dict()) if k.rsplit(".", 1)[0] in bn]


class YoloClient(NumPyClient):
    """One data owner: trains and validates the global weights it is sent on its own data.yaml.

    Its dataset is seen through a view in a work folder (utils/classes.py): labels mapped to the federation's class
    ids, Ultralytics' label cache kept there between rounds, the owner's files never written.
    """

    def __init__(self, dataset=None, partition_id=None, work_dir=None, state=None, device=None, save_dir=None,
                 base_model=None):
        """Keep the node's dataset (deployment) or partition id (simulation), work folder, state and device."""
        self.dataset, self.partition_id, self.work_dir, self.state = dataset, partition_id, work_dir, state
        self.device = device  # node config `device` of a SuperNode; None: the run's DEVICE
        self.save_dir = save_dir  # node config `save-dir` of a SuperNode: its personalized model (SHARE)
        self.base_model = base_model  # node config `base-model` of a SuperNode in a federation of mixed tasks

    def _name(self, config):
        """Return how the server's log names this client: its dataset's label, else its partition id."""
        try:
            dataset = self.dataset or json.loads(config["spec"])["datasets"][self.partition_id]
            return f"client {client_label(dataset)}"
        except (KeyError, IndexError, TypeError, ValueError):
            return f"client {self.partition_id}"

    def _own_model(self, spec):
        """Return (architecture, base weights or None, task name) of the model this client trains: the run's, or in a
        federation of mixed tasks its own base model (node config `base-model`, else CLIENT_MODELS[partition-id])."""
        from utils.model import model_task, read_base_cached

        own = self.base_model or (spec["client_models"][self.partition_id] if spec.get("client_models")
                                  and self.dataset is None else None)
        if not own:
            return spec["model"], None, spec.get("task", "detect")  # a spec made before tasks came: detection
        arch, weights = read_base_cached(own)
        return arch, weights, model_task(arch).name

    def _prepare(self, parameters, config):
        """Return (spec, dataset, its view's data.yaml, a model holding `parameters`, the classes it annotates)."""
        import tempfile

        from utils.model import build_model

        spec = json.loads(config["spec"])
        spec["hyp"]["device"] = client_device(self.device or spec["hyp"]["device"])  # resolved where it trains
        if self.dataset is None and self.partition_id is None:
            raise ValueError("this SuperNode has no dataset: start it with --node-config 'dataset=\"/path/data.yaml\"'")
        dataset = self.dataset or spec["datasets"][self.partition_id]
        arch, weights, task = self._own_model(spec)
        self.task = get_task(task)
        check, names = check_dataset(dataset, task), spec["names"]
        self.train_images = check["train_images"]
        try:
            class_map(check["names"], names)
        except ValueError as e:
            raise ValueError(f"dataset {dataset}: {e}") from None
        kpt = check["yaml"].get("kpt_shape")
        if kpt and arch is not spec["model"]:
            arch["kpt_shape"] = kpt  # its own pose head (mixed tasks): its own keypoints
        elif kpt and kpt != arch.get("kpt_shape"):
            raise ValueError(f"dataset {dataset} has kpt_shape {kpt}, the federation's model {arch.get('kpt_shape')}")
        root = self.work_dir or (spec["work"] if self.dataset is None else Path(tempfile.gettempdir()) / "fedyolo")
        data_yaml = client_view(check, names, view_folder(root, dataset, names))
        model = build_model(arch, names, weights=weights, seed=spec["hyp"]["seed"])
        self.shared = shared_entries(list(model.state_dict()), arch, spec.get("share", "all"))
        if self.shared is not None:  # partial sharing: the shared parts sent, this client's own parts kept here
            parameters = self._own_parts(model, parameters, dataset, spec, config)
        self.local_bn = spec["fedbn"] and self.state is not None and "fedbn" in self.state
        if self.local_bn:  # this client's own BatchNorm, kept from its last round
            parameters = list(parameters)
            for i, a in zip(bn_entries(model), self.state["fedbn"].to_numpy_ndarrays()):
                parameters[i] = a
        set_weights(model, parameters, source="the global parameters")
        classes = annotated(check, names)
        partial = spec["partial_labels"] and len(classes) < len(names)
        return spec, dataset, data_yaml, model, classes if partial else None

    def _personal_file(self, dataset, spec, suffix=".pt"):
        """Return where this client writes its own files (None: a SuperNode without save-dir): its personalized
        model under SHARE (`.pt`), its optimizer state under KEEP_OPTIMIZER (`.optimizer.npz`)."""
        folder = self.save_dir or (spec["clients_dir"] if self.dataset is None else None)
        return Path(folder) / f"{client_label(dataset)}{suffix}" if folder else None

    def _kept_optimizer(self, dataset, spec, config):
        """Return (keys, arrays) of this client's optimizer state at the end of its last round, or None (a fresh
        optimizer): from its file (see _keep_optimizer), else from its Context state."""
        path = self._personal_file(dataset, spec, ".optimizer.npz")
        if int(config.get("start-epoch", 0)) > 0 and path is not None and path.is_file():
            keys, *arrays = load_npz(path)
            return [str(k) for k in keys], arrays
        if "optimizer" in self.state:
            return self.state["optimizer-keys"]["keys"].split(","), self.state["optimizer"].to_numpy_ndarrays()
        return None

    def _keep_optimizer(self, keys, arrays, dataset, spec):
        """Keep this round's optimizer state for the next round: in the client's file where it has a folder (the
        simulation's SAVE_DIR/clients, a SuperNode's save-dir), so that the state costs no memory between rounds and
        a resumed run continues with it (a fresh run removes the files it finds, see make_strategy); else in its
        Context state, in memory."""
        path = self._personal_file(dataset, spec, ".optimizer.npz")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npz(path, [np.array(keys), *arrays])
            return
        from flwr.common import ArrayRecord, ConfigRecord

        self.state["optimizer"] = ArrayRecord(numpy_ndarrays=arrays)
        self.state["optimizer-keys"] = ConfigRecord({"keys": ",".join(keys)})

    def _own_parts(self, model, parameters, dataset, spec, config):
        """Return the full weights of this client under SHARE: the shared entries as sent, the others its own.

        Its own parts come from its Context state (kept from its last round), else, when the run is resumed, its
        personalized model file, else what the server sent in its first round (everything), else its model's starting
        weights: its own base model's under CLIENT_MODELS (mixed tasks: the server never sends them), the seeded
        initial weights of the architecture for a client that joins after round 1 with no state of its own.
        """
        n, idx = len(model.state_dict()), self.shared
        full = list(parameters) if len(parameters) == n else expand(parameters, idx, get_weights(model))
        own = own_entries(n, idx)
        local = self.state["share"].to_numpy_ndarrays() if self.state is not None and "share" in self.state else None
        path = self._personal_file(dataset, spec)
        if local is None and int(config.get("start-epoch", 0)) > 0 and path is not None and path.is_file():
            import torch

            saved = list(torch.load(path, weights_only=False)["model"].float().state_dict().values())
            local = [saved[i].detach().cpu().numpy() for i in own] if len(saved) == n else None
        for i, a in zip(own, local or []):
            full[i] = a
        return full

    def fit(self, parameters, config):
        """Train the sent weights for this round's epochs of the run; return fp32 weights, train images, losses.

        An error is raised again as one line naming this client, which the server's round line shows.
        """
        try:
            return self._fit(parameters, config)
        except Exception as e:
            raise RuntimeError(f"{self._name(config)}: {first_line(e)}") from e

    def _fit(self, parameters, config):
        """Train the sent weights (see fit)."""
        from utils.train import client_batch, train_round

        spec, dataset, data_yaml, model, classes = self._prepare(parameters, config)
        hyp = {**spec["hyp"], "seed": spec["hyp"]["seed"] + int(config["server-round"])}
        if spec.get("min_steps"):  # the server always sends nbs with min_steps; 64 is Ultralytics' own default
            hyp.update(client_batch(hyp["batch"], hyp.get("nbs", 64), self.train_images, spec["min_steps"]))
        keep = spec["keep_optimizer"] and self.state is not None
        saved = self._kept_optimizer(dataset, spec, config) if keep else None
        out = train_round(model, data_yaml, config["start-epoch"], config["epochs"], config["total-epochs"], hyp,
                          proximal_mu=float(config["proximal-mu"]), classes=classes, optimizer_state=saved,
                          label=client_label(dataset), return_state=keep)
        keys, arrays = out.pop("optimizer_state")
        if keep and keys:
            self._keep_optimizer(keys, arrays, dataset, spec)
        weights = get_weights(model)
        if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
            raise RuntimeError("local training produced NaN/Inf weights; the update is withheld")
        if self.shared is not None:  # partial sharing: keep its own parts, send the shared ones
            from flwr.common import ArrayRecord

            own = own_entries(len(weights), self.shared)
            self.state["share"] = ArrayRecord(numpy_ndarrays=[weights[i] for i in own])
            path = self._personal_file(dataset, spec)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_checkpoint(model, path, {"imgsz": hyp["imgsz"]}, {"round": int(config["server-round"]),
                                                                        "share": spec["share"]})
            if len(parameters) == len(weights):  # round 1 sent everything: its change is taken on the shared part
                parameters = [parameters[i] for i in self.shared]
            weights = [weights[i] for i in self.shared]
        if spec["fedbn"] and self.state is not None:
            from flwr.common import ArrayRecord

            self.state["fedbn"] = ArrayRecord(numpy_ndarrays=[weights[i] for i in bn_entries(model)])
            out["local_bn"] = int(self.local_bn)  # 1 from round 2 on: its BatchNorm came from its own state
        if config["fp16"] in ("up", "both"):  # the change since the received weights, as float16
            weights = encode_update(weights, parameters)
        if config.get("secagg") and config.get("dp-clip"):  # DP under SecAgg+: each client clips its own change
            weights, norm = clip_change(weights, parameters, config["dp-clip"])  # and weighs the same in the mean
            out["dp_clipped"], out["train_images"] = int(norm > config["dp-clip"]), 1
        if config.get("secagg"):  # the change since the received weights, for SecAgg+ (utils/secure.py)
            trainable = {k for k, _ in model.named_parameters()}
            weights = secure.encode(weights, parameters, [k in trainable for k in model.state_dict()])
            out["secagg_clipped"] = secure.clipped_entries(weights, out["train_images"], config["secagg-weight"],
                                                           config["secagg-clip"])
        n, out["dataset"] = out.pop("train_images"), str(Path(dataset).resolve())
        return weights, n, out

    def evaluate(self, parameters, config):
        """Validate the sent weights (with FEDBN: its own BatchNorm) on its val split; loss is 1 - the task's score
        (detect, obb: mAP50-95; segment: mask mAP50-95; pose: pose mAP50-95; classify: top-1 accuracy).

        The mAP counts the classes present in its val labels only: classes the client does not annotate never count.
        """
        from utils.evaluate import evaluate

        try:
            spec, dataset, data_yaml, model, _ = self._prepare(parameters, config)
            m = evaluate(model, data_yaml, spec["hyp"])
        except Exception as e:
            raise RuntimeError(f"{self._name(config)}: {first_line(e)}") from e
        n, m["client"], m["dataset"] = m.pop("images"), client_label(dataset), str(Path(dataset).resolve())
        if spec.get("client_models"):  # mixed tasks: each client's own task metric is the run's score
            m["score"] = m[self.task.metric]
        return 1.0 - m[self.task.metric], n, m


def client_fn(context: Context):
    """Return the client of one node: its dataset from node config `dataset`, else DATASETS[partition-id].

    Node config `work-dir` sets where the node keeps its dataset views (default: SAVE_DIR/work in simulation, the
    system temp folder on a SuperNode); `device` the device a SuperNode trains on (default: its first GPU, else cpu);
    `save-dir` where a SuperNode writes its personalized model under SHARE (simulation: SAVE_DIR/clients);
    `base-model` the node's own model in a federation of mixed tasks (simulation: CLIENT_MODELS[partition-id]).
    """
    nc = context.node_config
    return YoloClient(dataset=nc.get("dataset"), partition_id=nc.get("partition-id"), work_dir=nc.get("work-dir"),
                      state=context.state, device=nc.get("device"), save_dir=nc.get("save-dir"),
                      base_model=nc.get("base-model")).to_client()


class SaveFedAvg(FedAvg):
    """FedAvg weighted by train images that checks every update and keeps every round in SAVE_DIR.

    After each round: round{N}.npz (global weights), then once the round's evaluation is in, a metrics.csv row,
    results.png, last.pt and, when the global score (the task's: mAP50-95, mask mAP50-95, ...) improved, best.pt.
    Flower numbers rounds from 1 in every process; `run.offset` (rounds finished before a resume) turns that into the
    run's round number.
    """

    def __init__(self, cfg, run, **kwargs):
        """Keep the run's settings and state (see `prepare`)."""
        self.cfg, self.run, self.spec_json = cfg, run, json.dumps(run["spec"])
        self.current, self.rows, self.pending = run["initial"], run["rows"], {}
        self.shared = run.get("shared")  # SHARE: the indices of the entries that travel; None: all
        self.aggregator = Aggregator(cfg, run["trainable"], run["bn_pairs"])
        self.writer, self.writing = ThreadPoolExecutor(max_workers=1), None
        self.save_dir, self.t0 = Path(cfg["SAVE_DIR"]), time.time()
        self.t_last, self.task = self.t0, get_task(run["spec"].get("task", "detect"))
        self.mixed = bool(run["spec"].get("client_models"))  # clients of several tasks, each with its own head
        self.metric, self.label = ("score", "score") if self.mixed else (self.task.metric, self.task.label)
        scored = [(float(x[self.metric]), int(x["round"])) for x in self.rows if x.get(self.metric)]
        self.best, self.best_round = max(scored, default=(None, None))
        self.trained, self.untrained, self.failed, self.first_error = 0, 0, [], None  # rounds with / without updates
        self.masked_bytes = secure.masked_bytes(self.current) if cfg["SECAGG"] else None  # SecAgg+'s upload per client
        self.secagg_weight = secure.max_weight(run["train_images"], unweighted=cfg["DP_CLIP"] > 0)
        clips = [float(x["dp_clip"]) for x in self.rows if x.get("dp_clip")]  # adaptive: resume with the last clip
        self.dp_clip = clips[-1] if cfg["DP_ADAPTIVE"] and clips else cfg["DP_CLIP"]
        self.count_std, self.dp_noise = 0.0, cfg["DP_NOISE"]
        if cfg["DP_ADAPTIVE"]:  # part of the privacy budget goes to the count of clipped clients
            clients = cfg["MIN_CLIENTS"] or len(run["spec"]["datasets"])
            self.count_std, self.dp_noise = adaptive_noise(cfg["DP_NOISE"], clients)
        super().__init__(initial_parameters=ndarrays_to_parameters(self.current), **kwargs)

    def _round(self, server_round):
        """Return the run's round number of Flower's `server_round`."""
        return server_round + self.run["offset"]

    def round_config(self, server_round):
        """Return what every client needs this round to continue the one training schedule."""
        r, e = self._round(server_round), self.cfg["EPOCHS"]
        mu = self.cfg["PROXIMAL_MU"] if self.cfg["STRATEGY"] == "fedprox" else 0.0
        return {"server-round": r, "start-epoch": (r - 1) * e, "epochs": e, "total-epochs": self.cfg["NUM_ROUNDS"] * e,
                "spec": self.spec_json, "proximal-mu": mu, "fp16": self.cfg["FP16"], "secagg": self.cfg["SECAGG"],
                "secagg-clip": self.cfg["SECAGG_CLIP"], "secagg-weight": self.secagg_weight,
                "dp-clip": self.dp_clip if self.cfg["SECAGG"] else 0.0}  # DP without SecAgg+: on the server

    def _sent(self, everything=False):
        """Return the global arrays that travel to clients: all, or under SHARE the shared entries only."""
        return self.current if self.shared is None or everything else [self.current[i] for i in self.shared]

    def configure_fit(self, server_round, parameters, client_manager):
        """Send the global weights (float16 with FP16=both; under SHARE the shared parts, all of them in the first
        round, which gives each client its starting point) and this round's schedule to the sampled clients."""
        if self.writing is not None and self.writing.done():
            self.wait_for_files()  # a failed write (disk full) stops the run here
        sent = self._sent(everything=server_round == 1 and not self.mixed)  # mixed: heads start from their own
        params = ndarrays_to_parameters(to_half(sent) if self.cfg["FP16"] == "both" else sent)
        self.pending["bytes_down"] = sum(len(t) for t in params.tensors)
        return [(c, type(ins)(params, self.round_config(server_round)))
                for c, ins in super().configure_fit(server_round, parameters, client_manager)]

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Send the new global weights (under SHARE: the shared parts) for validation on each client's val split."""
        params = ndarrays_to_parameters(self._sent())
        return [(c, type(ins)(params, self.round_config(server_round)))
                for c, ins in super().configure_evaluate(server_round, parameters, client_manager)]

    def aggregate_fit(self, server_round, results, failures):
        """Average the valid updates weighted by train images (with DP_CLIP: clipped, unweighted, noised; with
        SECAGG: take the secure mean), save round{N}.npz, return the new global weights."""
        r = self._round(server_round)
        reasons = sorted({failure_reason(f) for f in failures})  # SecAgg+'s workflow lists a failed reply twice
        for reason in reasons:
            log(WARNING, "round %d: a client failed: %s", r, reason)
        t0, agg, counted, sizes, private = time.time(), self.aggregator, [], [], []
        agg.begin()  # mean-based strategies keep one running sum, never every update
        dp = {}
        if self.cfg["SECAGG"]:
            counted, sizes, dp = self._add_secure_mean(r, results, reasons)
            results = []  # every result carries the same securely averaged change, no client's own
        sent = self._sent()  # what a client's update must fit (under SHARE: the shared entries)
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            problem = check_update(arrays, sent, res.num_examples, res.metrics)
            if problem:
                name = self.run.get("labels", {}).get(res.metrics.get("dataset"), proxy.cid)
                reasons.append(f"client {name}: update rejected: {problem}")
                log(WARNING, "round %d: update of client %s rejected: %s", r, name, problem)
                continue
            sizes.append(sum(len(t) for t in res.parameters.tensors))
            if self.cfg["FP16"] in ("up", "both"):  # the change is added to the float32 global model, not to the
                arrays = decode_update(arrays, sent)  # float16 copy sent: rounding never accumulates
            if self.shared is not None:  # the entries it keeps count as the global ones (restored below)
                arrays = expand(arrays, self.shared, self.current)
            n, known = res.num_examples, self.run["train_images"].get(res.metrics.get("dataset"))
            if known is not None and n > known:  # simulation: the server knows every dataset's size
                log(WARNING, "round %d: client %s reported %d train images, its dataset has %d; counted as %d",
                    r, proxy.cid, n, known, known)
                n = known
            if self.cfg["DP_CLIP"]:
                private.append(arrays)  # differential privacy: clipped and averaged unweighted below
            else:
                agg.add(arrays, n)
            counted.append((n, {k: v for k, v in res.metrics.items() if k != "dataset"}))
        self.pending = {"round": r, "updates": len(counted), "bytes_down": self.pending.get("bytes_down"),
                        "bytes_up": round(sum(sizes) / len(sizes)) if sizes else None}
        self.failed = reasons
        self.first_error = self.first_error or (reasons[0] if reasons else None)
        new, metrics = self.current, {}
        if len(counted) < max(self.cfg["MIN_UPDATES"], 1):  # the round's file then repeats the kept global model
            log(WARNING, "round %d skipped: %d valid client update(s), min-updates is %d; the global model is kept",
                r, len(counted), self.cfg["MIN_UPDATES"])
            self.untrained += 1
        else:
            self.trained, self.untrained = self.trained + 1, 0
            if private:  # the noised mean of the clipped changes is the one update the server step sees
                mean, dp = private_mean(private, self.current, self.dp_clip, self.dp_noise,
                                        [j for _, j in self.run["bn_pairs"]])
                agg.add(mean, 1)
            if dp:
                self.pending.update(dp, dp_clip=self.dp_clip, dp_epsilon=epsilon(self.cfg["DP_NOISE"], r,
                                                                                self.cfg["DP_DELTA"]))
                if self.cfg["DP_ADAPTIVE"]:  # the next round's clip, from the noised count of unclipped clients
                    self.dp_clip = next_clip(self.dp_clip, len(counted) - dp["dp_clipped"], len(counted),
                                             self.count_std, self.cfg["DP_QUANTILE"])
            new = agg.result(self.current)
            if self.shared is not None:  # the unshared entries stay exactly as the run started
                new = expand([new[i] for i in self.shared], self.shared, self.current)
            keys = sorted(set.intersection(*(set(m) for _, m in counted)))
            metrics = {k: sum(float(m[k]) * n for n, m in counted) / sum(n for n, _ in counted) for k in keys}
        t1 = time.time()
        try:
            save_npz(self.save_dir / f"round{r}.npz", new)
        except OSError as e:
            log(ERROR, "round %d: could not save %s (%s); the earlier round files are intact; stopping",
                r, self.save_dir / f"round{r}.npz", e)
            raise
        self.current = new
        self.pending.update({f"train_{k}": v for k, v in metrics.items()})
        self.pending.update(time_aggregate=round(t1 - t0, 3), time_save=round(time.time() - t1, 3))
        if not self.cfg["EVALUATE"]:
            self._finish_round()
        return ndarrays_to_parameters(self.current), metrics

    def skip_round(self, server_round, failures):
        """Close a round no client update reached (SecAgg+ halted): the global model is kept, the round file written."""
        self.aggregate_fit(server_round, [], failures)

    def _add_secure_mean(self, r, results, reasons):
        """SecAgg+: add the round's securely averaged change to the aggregator; return (counted, sizes, DP metrics).

        Flower's workflow hands every client's result with the same parameters, the weighted mean of the encoded
        changes (utils/secure.py); each result's own image count and metrics are the client's. With DP_CLIP the
        clients clipped their changes and weigh 1 each: the noise goes on the mean here, as without SecAgg+.
        """
        if not results:
            return [], [], {}
        mean = parameters_to_ndarrays(results[0][1].parameters)
        problem = entry_mismatch(mean, [(c.shape, "f") for c in self.current]) if len(mean) == len(self.current) \
            else f"it holds {len(mean)} arrays, the global model has {len(self.current)}"
        problem = problem or next((f"entry {i} holds NaN or Inf values" for i, a in enumerate(mean)
                                   if not np.isfinite(a).all()), None)
        if problem:
            reasons.append(f"the secure sum was rejected: {problem}")
            log(WARNING, "round %d: the secure sum of %d clients was rejected: %s", r, len(results), problem)
            return [], [], {}
        new, dp = secure.decode(mean, self.current, self.run["trainable"]), {}
        if self.cfg["DP_CLIP"]:
            std = self.dp_noise * self.dp_clip / len(results)
            new = add_noise(new, std, [j for _, j in self.run["bn_pairs"]])
            dp = {"dp_clipped": sum(int(res.metrics.get("dp_clipped", 0)) for _, res in results), "dp_noise_std": std}
        self.aggregator.add(new, 1)
        for proxy, res in results:
            if res.metrics.get("secagg_clipped"):
                log(WARNING, "round %d: client %s clipped %d entries of its change at +-%g before secure aggregation;"
                    " raise secagg-clip", r, self.run["labels"].get(res.metrics.get("dataset"), proxy.cid),
                    res.metrics["secagg_clipped"], self.cfg["SECAGG_CLIP"])
        counted = [(res.num_examples, {k: v for k, v in res.metrics.items() if k != "dataset"}) for _, res in results]
        return counted, [self.masked_bytes] * len(results), dp

    def evaluate(self, server_round, parameters):
        """Validate the new global model on SERVER_DATA's val split, when set (server-side evaluation)."""
        if not self.cfg["SERVER_DATA"] or server_round == 0:
            return None
        from utils.evaluate import evaluate
        from utils.model import build_model

        names, hyp = self.run["spec"]["names"], dict(self.run["spec"]["hyp"])
        hyp["device"] = client_device(hyp["device"])
        model = build_model(self.run["spec"]["model"], names)
        set_weights(model, parameters_to_ndarrays(parameters))
        view = client_view(self.run["server_check"], names, view_folder(self.run["spec"]["work"], "server", names))
        m = evaluate(model, view, hyp)
        self.pending.update({f"server_{k}": v for k, v in m.items() if k != "images"})
        return 1.0 - m[self.task.metric], m

    def aggregate_evaluate(self, server_round, results, failures):
        """Average the clients' validation metrics of the new global model weighted by their val images; the task's
        score per client too (`map50_95_<client>`, segment `mask_map50_95_<client>`, ...)."""
        for f in failures:
            log(WARNING, "round %d: a client failed to evaluate: %r", self._round(server_round),
                f if isinstance(f, BaseException) else f[1])
        total = sum(res.num_examples for _, res in results)
        metrics = {}
        if total:
            keys, order = {k for _, res in results for k in res.metrics if k not in ("client", "dataset")}, \
                list(self.task.metrics.values())  # the task's own order first (precision, recall, map50, map50_95)
            for k in sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k)):
                have = [(float(res.metrics[k]), res.num_examples) for _, res in results if k in res.metrics]
                metrics[k] = sum(v * n for v, n in have) / sum(n for _, n in have)  # mixed: over the clients of a task
            per_client = {}
            for _, res in results:  # named by the server's label for the dataset, else the client's own
                m = res.metrics
                per_client[self.run["labels"].get(m.get("dataset"), m.get("client", "client"))] = float(m[self.metric])
            metrics.update({f"{self.metric}_{k}": v for k, v in sorted(per_client.items())})
        self.pending.update(metrics)
        self._finish_round()
        return (1.0 - metrics[self.metric] if metrics else None), metrics

    def _write_files(self, weights, r, score, improved, rows):
        """Write last.pt, best.pt (when improved) and results.png of round r."""
        model = self.run["model"]
        set_weights(model, weights)
        write_checkpoint(model, self.save_dir / "last.pt", self.run["train_args"], {"round": r})
        if improved:
            write_checkpoint(model, self.save_dir / "best.pt", self.run["train_args"], {"round": r, self.metric: score})
        plot(self.save_dir / "results.png", rows, self.metric, self.label)

    def wait_for_files(self):
        """Wait until the last round's last.pt, best.pt and results.png are written; raise what writing raised."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def _finish_round(self):
        """Write the round's metrics row; then last.pt, best.pt and results.png (while the next round trains)."""
        row, r = self.pending, self.pending.get("round")
        if r is None:
            return
        now = time.time()
        row["time_s"], row["time_round"], self.t_last = round(now - self.t0, 1), round(now - self.t_last, 2), now
        self.rows = [x for x in self.rows if int(x["round"]) != r] + [row]
        write_rows(self.save_dir / "metrics.csv", self.rows)  # with round{r}.npz: the round is complete (resume)
        score = row.get(self.metric, row.get(f"server_{self.metric}"))
        improved = score is None or self.best is None or score > self.best
        if improved:
            self.best, self.best_round = score, r
        self.wait_for_files()  # one writer at a time: the previous round's files are done
        args = (self.current, r, score, improved, list(self.rows))
        if r >= self.cfg["NUM_ROUNDS"]:
            self._write_files(*args)  # the last round: done before the run ends
        else:  # a checkpoint and a plot take ~0.5 s of server time: overlap them with the next round's training
            self.writing = self.writer.submit(self._write_files, *args)
        self.pending = {}
        n, elapsed, done = self.cfg["NUM_ROUNDS"], time.time() - self.t0, r - self.run["offset"]
        line = f"round {r}/{n}  {elapsed:.0f}s elapsed, ~{elapsed / done * (n - r):.0f}s left"
        losses = [v for k, v in row.items() if k.startswith("train_") and k.endswith("_loss")]
        line += f"  train loss {sum(losses):.3f}" if losses else f"  skipped ({row['updates']} valid updates)"
        if self.failed:
            line += f"  {len(self.failed)} failed: " + "; ".join(self.failed)
        if self.metric in row:
            first = f"mAP50 {row['map50']:.3f}  " if self.metric == "map50_95" else ""
            line += f"  val {first}{self.label} {row[self.metric]:.3f} (best {self.best:.3f})"
        if f"server_{self.task.metric}" in row:
            line += f"  server {self.task.label} {row[f'server_{self.task.metric}']:.3f}"
        log(INFO, "%s", line)
        self.prune(r)
        if r >= n:
            self.summary()

    def prune(self, r):
        """Remove round files older than the last KEEP_ROUNDS, keeping the best round's."""
        if self.cfg["KEEP_ROUNDS"] < 1:
            return
        for i in range(1, r - self.cfg["KEEP_ROUNDS"] + 1):
            if i != self.best_round:
                (self.save_dir / f"round{i}.npz").unlink(missing_ok=True)

    def summary(self):
        """Log where the run's outputs are (or why it failed): the run's last lines, under flwr run too."""
        if self.failure():
            log(ERROR, "%s", self.failure())
            return
        d = self.save_dir
        log(INFO, "done: %d rounds in %s", self.cfg["NUM_ROUNDS"], d)
        log(INFO, "  best model  %s (best global %s %s, round %s)", d / "best.pt", self.label,
            f"{self.best:.3f}" if self.best is not None else "not measured", self.best_round)
        log(INFO, "  last model  %s;  round files %s;  metrics %s;  plot %s", d / "last.pt", d / "round*.npz",
            d / "metrics.csv", d / "results.png")
        log(INFO, "  export a round: python3 utils/export_federated.py %s", d / f"round{self.cfg['NUM_ROUNDS']}.npz")

    def failure(self):
        """Return one sentence when the run trained nothing or its last rounds got no valid update, else None."""
        last = min(STALL_ROUNDS, self.cfg["NUM_ROUNDS"] - self.run["offset"])
        if self.trained and self.untrained < last:
            return None
        what = "no round got a valid client update" if not self.trained else \
            f"the last {self.untrained} rounds got no valid client update"
        return f"the run failed: {what} (first client error: {self.first_error or 'none reported'})"


STALL_ROUNDS = 2  # a run whose last rounds (this many, or all) got no valid update ends with an error


# Resuming takes the saved run's settings, except these, which belong to this machine or this start (they keep
# their value from the command line or their default). A setting given on the command line that differs from the
# saved run is refused, except these, NUM_ROUNDS (the run is extended or shortened; README "Resume"), EVALUATE and
# SERVER_DATA.
RESUME_LOCAL = {"RESUME", "EXIST_OK", "SAVE_DIR", "DEVICE", "WORKERS", "CLIENT_RESOURCES", "VERBOSE"}
RESUME_MAY_CHANGE = RESUME_LOCAL | {"NUM_ROUNDS", "KEEP_ROUNDS", "EVALUATE", "SERVER_DATA"}


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


def _take_saved(cfg, was, given, save_dir):
    """Fill cfg with the saved run's settings where the user gave none; refuse a given one that differs."""
    changed = [k for k in given if k not in RESUME_MAY_CHANGE and k in was and cfg[k] != was[k]]
    if changed:
        diffs = "; ".join(f"{k.lower().replace('_', '-')} was {was[k]!r}, now {cfg[k]!r}" for k in changed)
        raise ValueError(f"cannot resume the run in {save_dir} with other settings: {diffs}")
    for k, v in was.items():
        if k in cfg and k not in given and k not in RESUME_LOCAL:
            cfg[k] = v


def _resume_point(cfg, save_dir):
    """Return (last complete round, its rows) of the run in save_dir; refuse when there is nothing left to do."""
    done, rows = complete_rounds(save_dir)
    if done == 0:
        raise ValueError(f"nothing to resume in {save_dir}: no complete round yet (start it again without --resume)")
    if done >= cfg["NUM_ROUNDS"]:
        raise ValueError(f"the run in {save_dir} already finished all {cfg['NUM_ROUNDS']} rounds; to train it "
                         f"further, resume with a larger --num-rounds")
    return done, rows


def prepare(cfg, given=None):
    """Check every input and build the run's starting state; raise ValueError with one sentence if anything is off.

    `given` names the settings the user set (command line); None: those that differ from the defaults. On resume,
    the others are taken from the saved run's config.json.

    Returns:
        (dict): `initial` global arrays, `spec` (what every client receives), `trainable` (which state_dict entries
            are parameters, not buffers), `offset` (rounds already done), `rows` (their metrics), the server's
            `model` (for checkpoints; never used for inference), `train_args`, `server_check` and `train_images`
            (each known dataset's train image count, the most a client on it may claim) and `labels` (their names
            in metrics.csv).
    """
    from utils.model import build_model, model_task, read_base

    if cfg["NUM_ROUNDS"] < 1 or cfg["EPOCHS"] < 1:
        raise ValueError(f"num-rounds ({cfg['NUM_ROUNDS']}) and epochs ({cfg['EPOCHS']}) must be at least 1")
    if cfg["LR_SCALE"] < 0 or cfg["WARMUP_EPOCHS"] < 0 or cfg["MIN_STEPS"] < 0:
        raise ValueError(f"lr-scale ({cfg['LR_SCALE']}), warmup-epochs ({cfg['WARMUP_EPOCHS']}) and min-steps "
                         f"({cfg['MIN_STEPS']}) must be 0 or more (lr-scale 0: derived from the clients)")
    if cfg["LR_SCALE_MAX"] <= 0:
        raise ValueError(f"lr-scale-max ({cfg['LR_SCALE_MAX']}) must be above 0")
    cfg["STRATEGY"], cfg["FP16"] = cfg["STRATEGY"].lower(), cfg["FP16"].lower()
    if cfg["FP16"] not in ("off", "up", "both"):
        raise ValueError(f"fp16 must be off, up or both (got {cfg['FP16']!r})")
    save_dir = Path(cfg["SAVE_DIR"])
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"save-dir {save_dir} exists and is not a folder")
    saved = None
    if cfg["RESUME"]:
        try:
            saved = json.loads((save_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot resume: {save_dir / 'config.json'} is missing or unreadable ({e})") from None
        given = {k for k in cfg if cfg[k] != DEFAULTS.get(k)} if given is None else set(given)
        _take_saved(cfg, saved["settings"], given, save_dir)  # DATASETS too: the demo datasets the run generated
    arch, base = read_base(cfg["BASE_MODEL"])
    task = model_task(arch).name  # the base model's task is the run's (utils/tasks.py)
    own = [read_base(m) for m in cfg["CLIENT_MODELS"]]  # mixed tasks: each client's own model
    tasks = [model_task(a).name for a, _ in own] or task
    if not cfg["DATASETS"] and not cfg["NAMES"]:
        cfg["DATASETS"] = demo_datasets(cfg, tasks if own else [task] * 3)
    if own and len(own) != len(cfg["DATASETS"]):
        raise ValueError(f"client-models names {len(own)} models for {len(cfg['DATASETS'])} datasets: give one per "
                         "dataset, in the same order")
    checks = check_federation(cfg["DATASETS"], tasks) if cfg["DATASETS"] else []  # none: the SuperNodes have them
    if task == "pose" and checks and "kpt_shape" in checks[0]["yaml"]:  # the datasets' keypoints shape the head
        arch["kpt_shape"] = checks[0]["yaml"]["kpt_shape"]
    clients = cfg["MIN_CLIENTS"] or len(cfg["DATASETS"])
    problem = check_strategy(cfg, clients) or check_privacy(cfg, clients) or secure.check_secagg(cfg, clients)
    if problem:
        raise ValueError(problem)
    names, notes = union_names(checks, cfg["DATASETS"]) if checks else (cfg["NAMES"], [])
    for note in notes:
        log(WARNING, "%s", note)
    if cfg["NAMES"]:  # the user's list and order; it must hold every dataset's classes
        missing = [n for n in names if n not in cfg["NAMES"]]
        if missing:
            raise ValueError(f"names {cfg['NAMES']} lack the classes {missing} of the datasets")
        names = cfg["NAMES"]
    if not checks and cfg["MIN_CLIENTS"] < 1:
        raise ValueError("without datasets on the server (a deployment), set min-clients to the number of SuperNodes")
    server_check = check_dataset(cfg["SERVER_DATA"], task) if cfg["SERVER_DATA"] else None
    if server_check and not set(server_check["names"]) <= set(names):
        raise ValueError(f"server-data {cfg['SERVER_DATA']} has classes {server_check['names']}, not all among {names}")
    model = build_model(arch, names, weights=base, seed=cfg["SEED"])
    offset, rows, initial = 0, [], get_weights(model)
    if saved is not None:
        offset, rows = _resume_point(cfg, save_dir)
        initial = load_npz(save_dir / f"round{offset}.npz")
        set_weights(model, initial, source=str(save_dir / f"round{offset}.npz"))
    elif sorted(save_dir.glob("round*.npz")) and not cfg["EXIST_OK"]:
        raise ValueError(
            f"save-dir {save_dir} already holds round files from an earlier run; continue it with --resume, "
            "choose another --save-dir, or pass --exist-ok to overwrite them"
        )
    hyp = {k.lower(): cfg[k] for k in TRAIN_KEYS}
    hyp["device"] = cfg["DEVICE"]  # resolved by each client where it runs (utils/devices.py); main() plans simulation
    sizes = [c["train_images"] for c in checks]  # none in a deployment
    min_steps = cfg["MIN_STEPS"] if clients > 1 else 0  # one client is plain Ultralytics: its BATCH, scale 1
    scale = resolve_lr_scale({**cfg, "MIN_STEPS": min_steps}, sizes, clients)
    hyp.update(resolve_optimizer(cfg, len(names), sum(sizes), scale))
    hyp["warmup_epochs"] = resolve_warmup(cfg, trained=base is not None, scale=scale)
    if saved is not None:  # the optimizer and warmup the run started with, even if a longer run would pick others
        hyp.update({k: v for k, v in saved.get("hyp", {}).items() if k in ("optimizer", "lr0", "momentum",
                                                                          "warmup_bias_lr", "warmup_epochs")})
        scale = saved.get("lr_scale", scale)
    spec = {"model": arch, "task": task, "names": names, "hyp": hyp, "lr_scale": scale,
            "datasets": [str(Path(d).resolve()) for d in cfg["DATASETS"]],
            "work": str((save_dir / "work").resolve()), "fedbn": cfg["FEDBN"], "partial_labels": cfg["PARTIAL_LABELS"],
            "keep_optimizer": cfg["KEEP_OPTIMIZER"], "min_steps": min_steps,
            "share": cfg["SHARE"], "clients_dir": str((save_dir / "clients").resolve()),
            "client_models": [str(Path(m).resolve()) if Path(m).is_file() else m for m in cfg["CLIENT_MODELS"]]}
    params, keys = {k for k, _ in model.named_parameters()}, list(model.state_dict())
    problem = check_share(cfg, arch, keys)
    for m, (a, _) in zip(cfg["CLIENT_MODELS"], own):  # mixed tasks: the shared parts must be the same everywhere
        problem = problem or check_fit(arch, model.state_dict(), a, build_model(a, names).state_dict(), cfg["SHARE"],
                                       cfg["BASE_MODEL"], m)
    if problem:
        raise ValueError(problem)
    bn_pairs = [(i, keys.index(k[:-4] + "var")) for i, k in enumerate(keys) if k.endswith(".running_mean")]
    return {"initial": initial, "spec": spec, "trainable": [k in params for k in keys], "bn_pairs": bn_pairs,
            "shared": shared_entries(keys, arch, cfg["SHARE"]),
            "offset": offset, "rows": rows, "model": model, "server_check": server_check,
            "train_images": {str(Path(d).resolve()): c["train_images"] for d, c in zip(cfg["DATASETS"], checks)},
            "labels": client_labels(cfg["DATASETS"]),
            "train_args": {"model": cfg["BASE_MODEL"], "imgsz": cfg["IMGSZ"], "batch": cfg["BATCH"]}}


def demo_datasets(cfg, tasks):
    """Generate the demo federation (3 clients) for one task per client; return their datasets."""
    from utils.demo import make_demo

    if len(tasks) > 3:
        raise ValueError(f"the demo federation has 3 clients, client-models names {len(tasks)}: give datasets too")
    folder = {t: cfg["DEMO_DIR"] if t == "detect" else f"{cfg['DEMO_DIR']}-{t}" for t in tasks}
    return [str(make_demo(folder[t], seed=cfg["SEED"], task=t)[0][i]) for i, t in enumerate(tasks)]


def write_config(cfg, spec):
    """Save the run's settings, classes and library versions as SAVE_DIR/config.json (read by export and resume)."""
    import flwr
    import torch
    import ultralytics

    info = {"settings": cfg, "names": spec["names"], "hyp": spec["hyp"], "lr_scale": spec["lr_scale"],
            "datasets": spec["datasets"],
            "task": spec["task"], **({"kpt_shape": spec["model"]["kpt_shape"]} if "kpt_shape" in spec["model"] else {}),
            "versions": {"flwr": flwr.__version__, "ultralytics": ultralytics.__version__, "torch": torch.__version__}}
    if cfg["DP_CLIP"]:  # the privacy the whole run spends (per round: metrics.csv dp_epsilon)
        info["privacy"] = {"epsilon": epsilon(cfg["DP_NOISE"], cfg["NUM_ROUNDS"], cfg["DP_DELTA"]),
                           "delta": cfg["DP_DELTA"], "rounds": cfg["NUM_ROUNDS"], "accountant": "dp-accounting RDP"}
    atomic_write_text(Path(cfg["SAVE_DIR"]) / "config.json", json.dumps(info, indent=2, default=str))


def make_strategy(cfg, run):
    """Start SAVE_DIR (config.json; old metrics of an overwritten run removed) and return the run's strategy."""
    save_dir = Path(cfg["SAVE_DIR"])
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(save_dir)
    write_config(cfg, run["spec"])  # on resume too: the settings it continues with (NUM_ROUNDS may have grown)
    if not run["offset"]:
        (save_dir / "metrics.csv").unlink(missing_ok=True)
        for f in (save_dir / "clients").glob("*.optimizer.npz"):  # an overwritten run's: never continued from
            f.unlink()
    n = cfg["MIN_CLIENTS"] or len(run["spec"]["datasets"])
    if cfg["DP_CLIP"]:
        log(INFO, "differential privacy: each client's change clipped to norm %g, noise std %g / clients; %d rounds "
            "spend epsilon %.3g at delta %g", cfg["DP_CLIP"], cfg["DP_NOISE"] * cfg["DP_CLIP"], cfg["NUM_ROUNDS"],
            epsilon(cfg["DP_NOISE"], cfg["NUM_ROUNDS"], cfg["DP_DELTA"]), cfg["DP_DELTA"])
        if cfg["DP_ADAPTIVE"]:
            log(INFO, "adaptive clipping: the clip starts at %g and follows the %g quantile of the clients' change "
                "norms (metrics.csv dp_clip)", cfg["DP_CLIP"], cfg["DP_QUANTILE"])
    hyp = run["spec"]["hyp"]
    if cfg["OPTIMIZER"].lower() == "auto" and not run["offset"]:
        how = ("lr-scale" if cfg["LR_SCALE"] else "derived from the clients' image counts" if run["train_images"]
               else f"assumed for {n} equal clients")
        log(INFO, "optimizer %s, lr0 %g: Ultralytics' own rate x %g (%s)", hyp["optimizer"], hyp["lr0"],
            run["spec"]["lr_scale"], how)
    if cfg["SECAGG"]:
        log(INFO, "secure aggregation (SecAgg+): the server sees only the sum of each round's changes; each "
            "client's secrets shared with %d clients, %d rebuild a dropped one", cfg["SECAGG_SHARES"],
            cfg["SECAGG_THRESHOLD"])
    return SaveFedAvg(
        cfg, run,
        fraction_fit=1.0, fraction_evaluate=1.0 if cfg["EVALUATE"] else 0.0,
        min_fit_clients=n, min_evaluate_clients=n if cfg["EVALUATE"] else 0, min_available_clients=n,
    )


def serve(grid, context, cfg, strategy, rounds):
    """Run the rounds: Flower's own round loop, or with SECAGG its SecAgg+ workflow (utils/secure.py)."""
    if not cfg["SECAGG"]:
        start_grid(grid=grid, strategy=strategy, config=rounds)
        return
    from flwr.server import LegacyContext

    legacy = LegacyContext(context=context, config=rounds, strategy=strategy)
    secure.workflow(cfg, strategy.secagg_weight, strategy.skip_round)(grid, legacy)


def server_main(grid, context: Context):
    """ServerApp entry for `flwr run`: the constants above, overridden by the run config."""
    cfg = resolve(DEFAULTS, dict(context.run_config))
    run = prepare(cfg)
    serve(grid, context, cfg, make_strategy(cfg, run), ServerConfig(num_rounds=cfg["NUM_ROUNDS"] - run["offset"]))


client_app = ClientApp(client_fn=client_fn, mods=[secure.when_asked])  # the mod acts only in SecAgg+ rounds
server_app = ServerApp()
server_app.main()(server_main)


def warn_short_warmup(cfg, run):
    """Warn when warmup takes most of a short run from a random init (a trained start is damped on purpose)."""
    total = cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    warm = run["spec"]["hyp"]["warmup_epochs"]
    if run["offset"] == 0 and cfg["BASE_MODEL"].lower().endswith(".pt") and warm >= total:
        log(INFO, "a trained start: the learning rate ramps up over %g epochs, longer than this %d-epoch run, so "
            "the model is fine-tuned gently (README \"Fine-tuning from a trained model\")", warm, total)
    elif run["offset"] == 0 and total > 1 and warm > total / 2 and cfg["BASE_MODEL"].lower().endswith(".yaml"):
        log(WARNING, "warmup-epochs %g covers %g of the run's %d epochs: the learning rate ramps up for most of the "
            "run and a model learns little; run more rounds or epochs, or lower --warmup-epochs", cfg["WARMUP_EPOCHS"],
            warm, total)


def resume_command(save_dir):
    """Return the command line that continues the run in save_dir."""
    import shlex

    python = os.path.relpath(sys.executable) if not os.path.isabs(sys.argv[0]) else sys.executable
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "federated.py"
    return f"{shlex.quote(python)} {shlex.quote(script)} --resume --save-dir {shlex.quote(str(save_dir))}"


def interrupted_line(cfg):
    """Return what a stopped run says: which rounds are complete and how to continue."""
    save_dir = Path(cfg["SAVE_DIR"])
    done, _ = complete_rounds(save_dir)
    if not done:
        return f"interrupted before any round was complete; nothing in {save_dir} to resume: start the run again"
    return (f"interrupted: rounds 1-{done} of {cfg['NUM_ROUNDS']} are complete in {save_dir}; "
            f"continue with: {resume_command(save_dir)}")


def main(argv=None):
    """Run the federation in Flower's simulation engine (Ray), one simulated client per dataset."""
    parser = get_args_parser(DEFAULTS, __doc__.splitlines()[0], setting_help(__file__))
    args = parser.parse_args(argv)
    setup_console(args.VERBOSE)
    try:
        cfg = resolve(DEFAULTS, vars(args))
        run = prepare(cfg, given=explicit_settings(parser, argv))  # every check before Ray starts
    except ValueError as e:
        sys.exit(f"federated.py: {e}")
    from flwr.simulation import run_simulation

    n, save_dir = len(run["spec"]["datasets"]), Path(cfg["SAVE_DIR"])
    if not n:
        sys.exit("federated.py: a simulation needs DATASETS (or neither DATASETS nor NAMES, for the demo)")
    n_gpus, n_cpus = count_gpus(), os.cpu_count()
    try:  # which device the clients train on and the Ray resources that let them see it, before Ray starts
        plan = plan_simulation(cfg["DEVICE"], cfg["CLIENT_RESOURCES"], n, n_gpus, n_cpus)
    except ValueError as e:
        sys.exit(f"federated.py: {e}")
    restrict_visible(plan["gpus"], n_gpus)
    run["spec"]["hyp"]["device"] = plan["device"]
    log(INFO, "%d clients: %s", n, ", ".join(run["spec"]["datasets"]))
    log(INFO, "%s", plan["line"])
    if run["offset"]:
        log(INFO, "resuming %s after round %d of %d", save_dir, run["offset"], cfg["NUM_ROUNDS"])
    warn_short_warmup(cfg, run)
    strategy = make_strategy(cfg, run)
    rounds = ServerConfig(num_rounds=cfg["NUM_ROUNDS"] - run["offset"])
    root = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)  # Ray workers
    start_ray(num_cpus=n_cpus, num_gpus=len(plan["gpus"]), logging_level="WARNING", log_to_driver=True)
    on_interrupt(lambda: interrupted_line(cfg))  # Ctrl-C: Ray ended, the resume command printed, exit 130
    app = ServerApp()
    app.main()(lambda grid, context: serve(grid, context, cfg, strategy, rounds))
    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": plan["resources"]},  # on the Ray started above
    )
    try:
        strategy.wait_for_files()  # a run cut short may still be writing its last round's checkpoints
    except OSError as e:
        log(ERROR, "could not write last.pt, best.pt or results.png: %s", e)
    last = save_dir / f"round{cfg['NUM_ROUNDS']}.npz"
    if not last.exists():
        sys.exit(f"federated.py: the run ended without {last}; see the log above (continue it with --resume)")
    if strategy.failure():
        sys.exit(f"federated.py: {strategy.failure()}")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the server (driver) process, not Ray's workers
    log(INFO, "  peak memory of the server process: %.0f MB", peak)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before Ray started (checks, demo data); from then on utils/interrupt.py handles it
        print("\ninterrupted before the first round started; nothing was trained", file=sys.stderr)
        sys.exit(130)

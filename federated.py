"""Federated training of an Ultralytics YOLO model with Flower: one client per dataset, weights only exchanged.

Usage:
    .venv/bin/python federated.py                                # the embedded demo federation (generated, offline)
    .venv/bin/python federated.py --base-model yolov8n-seg.yaml  # the demo for a task: -seg, -pose, -obb, -cls models
    .venv/bin/python federated.py --datasets a/data.yaml b/data.yaml --base-model best.pt --num-rounds 10 --epochs 2
    .venv/bin/python federated.py --help                         # every setting with its default, grouped as below
"""

import os

os.environ.setdefault("YOLO_VERBOSE", "false")  # Ultralytics' per-batch output; set YOLO_VERBOSE=true to see it
os.environ.setdefault("YOLO_OFFLINE", "1")  # no Ultralytics network checks or analytics events
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no Flower usage events (read when flwr is first imported)

# Settings: each one is also a command line flag (NUM_ROUNDS -> --num-rounds) and a Flower run-config key (num-rounds).
# The everyday ones come first; docs/settings.md has them all.
# --- Run ---------------------------------------------------------------------------------------------------------
NUM_ROUNDS = 15  # (int) federated rounds
EPOCHS = 2  # (int) local epochs each client trains per round; the whole run is NUM_ROUNDS x EPOCHS epochs
SAVE_DIR = "runs/federated"  # (str) folder for round{N}.npz, metrics.csv, results.png, last.pt, best.pt, config.json
RESUME = False  # (bool) continue the run in SAVE_DIR from its last complete round, with its saved settings
PATIENCE = 0  # (int) stop when the global score has not improved for this many rounds (best.pt is the result); 0: off
PERSONALIZE = 0  # (int) after the last round, each client fine-tunes the final model this many epochs on its own
#                  images and keeps it (SAVE_DIR/clients/<client>.finetuned.pt), scored on its val split; 0: off
SEED = 0  # (int) seed for the initial weights, the demo data and each round's augmentation
# --- Data and model ----------------------------------------------------------------------------------------------
BASE_MODEL = "yolov8n.yaml"  # (str) model .yaml (random init) or .pt (its weights); its task (detect, segment, pose,
#                               obb, classify) is the run's; adapted to the datasets' classes
DATASETS = []  # (list[str]) one data.yaml per client (classify: a folder); empty (and no NAMES): the demo federation
NAMES = []  # (list[str]) the federation's classes; empty: the union of the datasets' names (needed in a deployment)
# --- Federation --------------------------------------------------------------------------------------------------
MIN_CLIENTS = 0  # (int) clients the run waits for before round 1; 0: one per entry of DATASETS (a simulation), the
#                   SuperNodes connected when the run starts (a deployment)
FRACTION_FIT = 1.0  # (float) fraction of the clients that train each round: a seeded sample (the same after a
#                     resume) of at least MIN_UPDATES; with DP_CLIP each client takes part with this probability
FRACTION_EVALUATE = 1.0  # (float) fraction of the clients that validate each round's global model (seeded sample)
ROUND_TIMEOUT = 0.0  # (float) seconds a round waits for its clients' replies; a late one is dropped and named on the
#                      round line; 0: wait for every client
CLIENT_RESOURCES = {"num_cpus": 1}  # (dict) Ray resources per simulated client; num_gpus derived from DEVICE unless set
EVALUATE = True  # (bool) evaluate the new global model on every client's val split after each round
EVAL_EVERY = 1  # (int) with EVALUATE (and SERVER_DATA): evaluate after every this many rounds and after the last
EVAL_IN_FIT = False  # (bool) clients validate the model a fit message brings before they train it and send the
#                      scores with their update: one message per client and round, not two (the last round's model:
#                      an evaluate message); a round's row and line come once the next round's updates are in
# --- Training (Ultralytics train arguments, the same on every client) --------------------------------------------
IMGSZ = 64  # (int) train and val image size
BATCH = 8  # (int) batch size per client
DEVICE = ""  # (str) GPUs the simulated clients share: "" all (none: cpu), "cpu", "0", "0,1" (docs/deployment.md)
# --- Strategy (docs/strategies.md) -------------------------------------------------------------------------------
STRATEGY = "fedavg"  # (str) fedavg, fedprox, fednova, fedavgm, fedadam, fedyogi, fedmedian, fedtrimmedavg or krum
SERVER_LR = 1.0  # (float) server learning rate: trainable weights move SERVER_LR x the aggregated client update
FEDEXP_MAX = 0.0  # (float) fedavg, fedprox: 0 off; else the server learning rate is set each round from how much the
#                 clients' changes disagree (FedExP), between 1 and FEDEXP_MAX (docs/strategies.md)
PROXIMAL_MU = 0.01  # (float) fedprox: weight mu of the proximal term mu/2 ||w - w_global||^2 in the client loss
SERVER_MOMENTUM = 0.5  # (float) fedavgm: server momentum, v = m v + (1 - m) update
ADAPTIVE_LR = 0.01  # (float) fedadam, fedyogi: server learning rate of the Adam/Yogi step
ADAPTIVE_BETA1 = 0.9  # (float) fedadam, fedyogi: first-moment decay
ADAPTIVE_BETA2 = 0.99  # (float) fedadam, fedyogi: second-moment decay
ADAPTIVE_TAU = 0.001  # (float) fedadam, fedyogi: adaptivity (added to the root of the second moment)
TRIM_BETA = 0.2  # (float) fedtrimmedavg: fraction of updates cut at each end of every coordinate
KRUM_F = 0  # (int) krum: number of malicious clients to tolerate (needs more than 2 x KRUM_F + 2 clients)
MIN_UPDATES = 1  # (int) valid client updates a round needs; with fewer the round is skipped, the global model kept
FEDBN = False  # (bool) FedBN: BatchNorm weights and statistics stay local to each client
POOLED_BN_VAR = True  # (bool) BatchNorm running_var of the global model: variance of the pooled client data (not
#                       with SECAGG, which hides each client's BatchNorm means: there the mean variance)
BN_RECALIBRATE = True  # (bool) each client sets its BatchNorm statistics from one more pass over its train images
#                         under the weights it trained (utils/train.py), so the average holds current statistics
FIXED_BN = 0  # (int) from this round on, clients train with BatchNorm normalizing by the statistics they were sent,
#               not each batch's own (FixBN; they still move by BN_RECALIBRATE); 0: off
SHARE = "all"  # (str) model parts the clients average: all, or backbone, neck, head joined by + (backbone+neck);
#                the others stay with each client, never sent
CLIENT_MODELS = []  # (list[str]) mixed tasks: one base model per client (e.g. yolov8n.yaml yolov8n-seg.yaml); the
#                     clients share SHARE's parts and keep their own head (docs/tasks.md); empty: BASE_MODEL
PARTIAL_LABELS = True  # (bool) a client's classification loss covers only the classes its data.yaml names
# --- Privacy (docs/privacy.md) -----------------------------------------------------------------------------------
DP_CLIP = 0.0  # (float) differential privacy: clip each client's change to this L2 norm; 0: off
DP_NOISE = 1.0  # (float) DP noise multiplier: Gaussian noise of std DP_NOISE x DP_CLIP / clients on the mean change
DP_DELTA = 1e-5  # (float) DP delta at which the privacy spent (epsilon) is reported
DP_ADAPTIVE = False  # (bool) DP: the clip follows a quantile of the clients' change norms, starting at DP_CLIP
DP_QUANTILE = 0.5  # (float) adaptive DP: the fraction of clients whose change the clip should leave unclipped
SECAGG = False  # (bool) secure aggregation (Flower's SecAgg+): the server sees only the sum of the round's changes
SECAGG_SHARES = 3  # (int) SecAgg+: clients holding a share of each client's mask secrets (itself included)
SECAGG_THRESHOLD = 2  # (int) SecAgg+: shares that rebuild a dropped client's masks (fewer left: round skipped)
SECAGG_CLIP = 8.0  # (float) SecAgg+: entries of each weighted change are clipped to +-this before quantization
SECAGG_QUANT = 4194304  # (int) SecAgg+: quantization levels over [-secagg-clip, secagg-clip] (2**22)
# --- Communication -----------------------------------------------------------------------------------------------
FP16 = "off"  # (str) send float weights as float16: off, up (client -> server) or both; integer buffers stay exact
# --- Advanced training (docs/training-schedule.md) ---------------------------------------------------------------
NBS = 8  # (int) nominal batch size: one optimizer step per NBS images (NBS / BATCH batches accumulated)
MIN_STEPS = "auto"  # (str) with 2+ clients, a small client halves BATCH and NBS (down to 2) until an epoch makes
#                this many optimizer steps; auto: 6 from a .yaml (random init), 3 from a trained .pt; 0: off
WORKERS = 0  # (int) dataloader worker processes per client
OPTIMIZER = "auto"  # (str) SGD, AdamW, ... or auto (resolved once on the server for the whole run)
LR0 = 0.01  # (float) initial learning rate (ignored when OPTIMIZER is auto)
LR_SCALE = 0.0  # (float) multiplies the learning rate OPTIMIZER=auto picks; 0: derived from the clients' image
#                counts
LR_SCALE_MAX = 4.0  # (float) the derived learning-rate scale is at most this (a set LR_SCALE is used as given)
COS_LR = False  # (bool) cosine instead of linear learning-rate decay over the whole run
WARMUP_EPOCHS = 3.0  # (float) warmup epochs at the start of the whole run (not of every round)
CLOSE_MOSAIC = 10  # (int) turn mosaic off for the last CLOSE_MOSAIC epochs of the whole run
AMP = True  # (bool) mixed precision on CUDA
KEEP_OPTIMIZER = True  # (bool) each client keeps its optimizer state (Adam moments) from round to round (a
#                         file of about twice the model's size per client; docs/training-schedule.md)
AVG_MOMENTUM = True  # (bool) every client starts a round from the clients' mean momentum of the last round instead
#                      of its own (half a copy of the weights more in each message, bfloat16); unless set, off by
#                      itself beside what it does not fit: no keep-optimizer, secagg, dp-clip, fedbn, share, a
#                      robust strategy, SGD
AVG_SECOND_MOMENT = 4  # (int) with AVG_MOMENTUM and Adam: clients also start from the second moment of a gradient
#                        averaged over this many clients' batches (larger steps where batches disagree); 0: off
FUSED_ADAM = True  # (bool) Adam and AdamW take torch's fused step on a CPU too (Ultralytics' own choice on CUDA): 4x
#                     faster steps, the same arithmetic to float rounding; False: Ultralytics' CPU steps bit for bit
# --- Advanced run ------------------------------------------------------------------------------------------------
EXIST_OK = False  # (bool) allow a fresh run into a SAVE_DIR that already holds round files (they are overwritten)
KEEP_ROUNDS = 0  # (int) round{N}.npz files kept: 0 all; N the last N plus the best round's
DEMO_DIR = "datasets/demo"  # (str) where the demo federation is generated (other tasks than detect: DEMO_DIR-<task>)
SERVER_DATA = ""  # (str) optional data.yaml the server owns: the global model is also validated on its val split
VERBOSE = False  # (bool) also print Flower's and Ray's own log (client tracebacks included)
# -----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if k.isupper()}  # only the settings are upper case up to here

import json
import sys
import time
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp
from flwr.server.strategy import FedAvg

from utils import momentum, personalize, privacy, secure, simulation, start
from utils.aggregate import Arriving, RoundUpdates, first_line, train_metrics, weighted_metrics
from utils.client_prep import prepare_message
from utils.config import explicit_settings, get_args_parser, resolve, setting_help
from utils.console import log
from utils.console import setup as setup_console
from utils.datasets import node_name
from utils.evaluate import client_scores, evaluate_on_server
from utils.model import model_task, read_base_cached
from utils.nodes import Nodes, discover, node_properties, on_time, stop_at, wait_for_nodes
from utils.params import ArraysClient, get_weights, to_half
from utils.plan import EvalPlan
from utils.record import RoundRecord
from utils.resume import start_save_dir
from utils.schedule import describe as describe_schedule
from utils.schedule import fixed_bn_cause
from utils.share import expand
from utils.strategies import Aggregator
from utils.tasks import get_task
from utils.train import client_batch, train_round
from utils.upload import encode_upload


class YoloClient(NumPyClient):
    """One data owner: trains and validates the global weights it is sent on its own data.yaml.

    Its dataset is seen through a view in a work folder (utils/classes.py): labels mapped to the federation's class
    ids, Ultralytics' label cache kept there between rounds, the owner's files never written. What it keeps between
    rounds (FEDBN, SHARE, KEEP_OPTIMIZER) is in utils/client_state.py.
    """

    def __init__(self, dataset=None, partition_id=None, work_dir=None, state=None, device=None, save_dir=None,
                 base_model=None):
        """Keep the node's dataset (deployment) or partition id (simulation), work folder, state and device."""
        self.dataset, self.partition_id, self.work_dir, self.state = dataset, partition_id, work_dir, state
        self.device = device  # node config `device` of a SuperNode; None: the run's DEVICE
        self.save_dir = save_dir  # node config `save-dir` of a SuperNode: its personalized model (SHARE)
        self.base_model = base_model  # node config `base-model` of a SuperNode in a federation of mixed tasks

    def get_properties(self, config):
        """Say who this node is (utils/nodes.py `node_properties`)."""
        return node_properties(self.dataset, self.partition_id, self.base_model, config)

    def fit(self, parameters, config):
        """Train the sent weights for this round's epochs of the run; return fp32 weights, train images, losses.

        An error is raised again as one line naming this client, which the server's round line shows.
        """
        try:
            return self._fit(parameters, config)
        except Exception as e:
            raise RuntimeError(f"{node_name(self.dataset, self.partition_id, config)}: {first_line(e)}") from e

    def _fit(self, parameters, config):
        """Train the sent weights (see fit); with EVAL_IN_FIT first validate them, the scores sent as `eval_*`."""
        t0 = time.time()
        spec, dataset, data_yaml, model, classes = prepare_message(self, parameters, config)
        t_prepared = time.time()
        scores = client_scores(model, data_yaml, spec, dataset, self.task) if config.get("validate") else {}
        scores = {f"eval_{k}": v for k, v in scores.items() if k != "dataset"}  # EVAL_IN_FIT: the model it was sent
        hyp = {**spec["hyp"], "seed": spec["hyp"]["seed"] + int(config["server-round"])}
        if spec.get("min_steps"):  # the server always sends nbs with min_steps; 64 is Ultralytics' own default
            hyp.update(client_batch(hyp["batch"], hyp.get("nbs", 64), self.train_images, spec["min_steps"]))
        keep = spec["keep_optimizer"] and self.state is not None
        beta1 = hyp.get("momentum", 0.937)
        state = momentum.receive(self.kept.optimizer(), config.get("momentum"), beta1, self.label,
                                 config.get("momentum_sq")) if keep else None
        out = train_round(model, data_yaml, config["start-epoch"], config["epochs"], config["total-epochs"], hyp,
                          callbacks=stop_at(config["deadline"]) if "deadline" in config else None,
                          proximal_mu=float(config["proximal-mu"]), classes=classes,
                          recalibrate=spec.get("bn_recalibrate", False), fused=spec.get("fused_adam", False),
                          fixed_bn=0 < spec.get("fixed_bn", 0) <= int(config["server-round"]),
                          optimizer_state=state, label=self.label, return_state=keep)
        keys, arrays = out.pop("optimizer_state")
        if keep and keys:
            self.kept.keep_optimizer(keys, arrays)
            if spec.get("avg_momentum"):  # AVG_MOMENTUM (and AVG_SECOND_MOMENT): averaged by the server
                out.update(momentum.encode(keys, arrays, beta1, spec.get("avg_second_moment", 0)))
        t_trained, weights = time.time(), get_weights(model)
        if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
            raise RuntimeError("local training produced NaN/Inf weights; the update is withheld")
        weights, parameters = self.kept.outgoing(model, weights, parameters, self.shared, spec, hyp["imgsz"],
                                                 int(config["server-round"]))  # SHARE's and FEDBN's own parts kept
        if spec["fedbn"] and self.state is not None:
            out["local_bn"] = int(self.local_bn)  # 1 from round 2 on: its BatchNorm came from its own state
        trainable = {k for k, _ in model.named_parameters()}
        weights = encode_upload(weights, parameters, config, [k in trainable for k in model.state_dict()], out)
        n, out["dataset"] = out.pop("train_images"), str(Path(dataset).resolve())
        out.update(time_prepare=t_prepared - t0, time_upload=time.time() - t_trained,  # metrics.csv: train_time_*
                   time_state=self.kept.seconds, **scores)
        return weights, n, out

    def evaluate(self, parameters, config):
        """Validate the sent weights (with FEDBN: its own BatchNorm) on its val split; loss is 1 - the task's score
        (detect, obb: mAP50-95; segment: mask mAP50-95; pose: pose mAP50-95; classify: top-1 accuracy).

        The mAP counts the classes present in its val labels only: classes the client does not annotate never count.
        """
        try:
            t0 = time.time()
            spec, dataset, data_yaml, model, classes = prepare_message(self, parameters, config)
            m = client_scores(model, data_yaml, spec, dataset, self.task, t0)
            if config.get("personalize"):  # the last (or best) round's model: fine-tune it on its own images, keep it
                m.update(personalize.fine_tune(model, data_yaml, spec, classes, self.kept.file(personalize.SUFFIX),
                                               self.label, self.task.metric, config["personalize"]))
        except Exception as e:
            raise RuntimeError(f"{node_name(self.dataset, self.partition_id, config)}: {first_line(e)}") from e
        return 1.0 - m[self.task.metric], m.pop("images"), m


def client_fn(context: Context):
    """Return the client of one node: its dataset from node config `dataset`, else DATASETS[partition-id].

    Node config `work-dir` sets where the node keeps its dataset views (default: SAVE_DIR/work in simulation, the
    system temp folder on a SuperNode); `device` the device a SuperNode trains on (default: its first GPU, else cpu);
    `save-dir` where a SuperNode writes its personalized model under SHARE (simulation: SAVE_DIR/clients);
    `base-model` the node's own model in a federation of mixed tasks (simulation: CLIENT_MODELS[partition-id]).
    """
    nc = context.node_config
    client = YoloClient(dataset=nc.get("dataset"), partition_id=nc.get("partition-id"), work_dir=nc.get("work-dir"),
                        state=context.state, device=nc.get("device"), save_dir=nc.get("save-dir"),
                        base_model=nc.get("base-model"))
    return ArraysClient(client)  # utils/params.py: what NumPyClient.to_client() returns, its weights (de)coded faster


class SaveFedAvg(FedAvg):
    """FedAvg weighted by train images that checks every update and keeps every round in SAVE_DIR.

    After each round: round{N}.npz (global weights), then once the round's evaluation is in, the round's record
    (utils/record.py): a metrics.csv row, results.png, last.pt and, when the global score improved, best.pt. Flower
    numbers rounds from 1 in every process; `run.offset` (rounds finished before a resume) turns that into the run's.
    """

    def __init__(self, cfg, run, **kwargs):
        """Keep the run's settings and state (see `prepare`)."""
        self.cfg, self.run, self.spec_json, self.current = cfg, run, json.dumps(run["spec"]), run["initial"]
        self.shared = run.get("shared")  # SHARE: the indices of the entries that travel; None: all
        self.aggregator = Aggregator(cfg, run["trainable"], run["bn_pairs"], run["offset"])
        self.task, self.mixed = get_task(run["spec"].get("task", "detect")), bool(run["spec"].get("client_models"))
        self.metric, label = ("score", "score") if self.mixed else (self.task.metric, self.task.label)
        clients = cfg["MIN_CLIENTS"] or len(run["spec"]["datasets"])
        cause = privacy.noise_cause(cfg, clients) or fixed_bn_cause(cfg) or \
            "a learning rate too large for this model; lower --lr-scale"
        self.record = RoundRecord(cfg, run, self.metric, label, self.task, cause)
        self.plan = EvalPlan(cfg, run["offset"], self.record)  # which rounds end with an evaluation, and how
        self.secagg_weight = secure.max_weight(run["train_images"], unweighted=cfg["DP_CLIP"] > 0)
        bn_var = [j for _, j in run["bn_pairs"]]
        self.dp = privacy.ServerDP(cfg, clients, run["rows"], bn_var) if cfg["DP_CLIP"] else None
        self.nodes = Nodes(run["spec"]["datasets"], run.get("labels", {}), run.get("nodes"),  # who each node is
                           cfg["ROUND_TIMEOUT"] or None)
        self.sent = {}  # the cids this round's fit and evaluate messages went to
        self.masked_bytes = secure.masked_bytes(self.current) if cfg["SECAGG"] else None  # SecAgg+'s upload per client
        self.open = None  # the round's updates as they arrive (RoundUpdates)
        super().__init__(initial_parameters=ndarrays_to_parameters(self.current), **kwargs)

    def round_config(self, server_round):
        """Return what every client needs in Flower's round `server_round` to continue the one training schedule."""
        r, e = server_round + self.run["offset"], self.cfg["EPOCHS"]
        mu = self.cfg["PROXIMAL_MU"] if self.cfg["STRATEGY"] == "fedprox" else 0.0
        return {"server-round": r, "start-epoch": (r - 1) * e, "epochs": e, "total-epochs": self.cfg["NUM_ROUNDS"] * e,
                "spec": self.spec_json, "proximal-mu": mu, "fp16": self.cfg["FP16"], "secagg": self.cfg["SECAGG"],
                "secagg-clip": self.cfg["SECAGG_CLIP"], "secagg-weight": self.secagg_weight,
                "dp-clip": self.dp.clip if self.dp and self.cfg["SECAGG"] else 0.0}  # DP without SecAgg+: server

    def _sent(self, everything=False, arrays=None):
        """Return the global arrays (`arrays`, default the current ones) that travel to clients: all, or under SHARE
        the shared entries only."""
        arrays = self.current if arrays is None else arrays
        return arrays if self.shared is None or everything else [arrays[i] for i in self.shared]

    def configure_fit(self, server_round, parameters, client_manager):
        """Send the global weights (float16 with FP16=both; under SHARE the shared parts, all of them in the first
        round, which gives each client its starting point) and this round's schedule to the sampled clients; after
        an early stop (PATIENCE) nothing, which ends the round at once."""
        self.record.check_writing()  # a failed write (disk full) stops the run here
        if self.record.stopped_early:
            return []
        if self.plan.in_fit(server_round - 1):  # its row waits for the scores this round's clients send first
            self.record.hold()
        t0 = time.time()
        sent = self._sent(everything=server_round == 1 and not self.mixed)  # mixed: heads start from their own
        params = ndarrays_to_parameters(to_half(sent) if self.cfg["FP16"] == "both" else sent)
        clients = self._choose(server_round, client_manager, "fit")
        extra = self.aggregator.momentum.config() if self.aggregator.momentum else {}  # AVG_MOMENTUM: the clients' mean
        self.record.note(bytes_down=sum(len(t) for t in params.tensors) + sum(map(len, extra.values())),
                         sampled=len(clients),
                         time_configure=round(time.time() - t0, 3))
        self._open(server_round + self.run["offset"])
        if not self.cfg["SECAGG"]:  # each reply is aggregated as it arrives (SecAgg+'s workflow sums them itself)
            clients = [Arriving(c, self.open.arrive) for c in clients]
        validate = {"validate": True} if self.record.held else {}  # EVAL_IN_FIT: the last round's model, scored first
        return [(c, FitIns(params, {**self.round_config(server_round), **validate, **extra})) for c in clients]

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Send the new global weights (under SHARE: the shared parts) for validation on each client's val split;
        after an early stop (PATIENCE) with PERSONALIZE, once more the best round's, for every client to fine-tune."""
        tune, stopped = self.plan.personalizes(server_round), self.record.stopped_early
        if not self.plan.asks(server_round):
            return []
        params, self.t_evaluate = ndarrays_to_parameters(self._sent(arrays=self.record.best_arrays() if stopped
                                                                    else None)), time.time()
        r = self.record.best_round if stopped else server_round + self.run["offset"]  # the round fine-tuned from
        config = {**self.round_config(server_round), **({"personalize": r} if tune else {})}
        return [(c, EvaluateIns(params, config)) for c in self._choose(server_round, client_manager, "evaluate")]

    def _choose(self, server_round, client_manager, stage):
        """Return the clients of this round's `stage` (fit, evaluate): FRACTION_FIT / FRACTION_EVALUATE of the
        connected ones, a sample seeded by the run's round (utils/nodes.py), and remember whom it asked."""
        wait_for_nodes(client_manager, self.min_available_clients)
        fraction = self.cfg["FRACTION_FIT" if stage == "fit" else "FRACTION_EVALUATE"]
        fraction = 1.0 if stage == "evaluate" and self.plan.personalizes(server_round) else fraction  # every client
        clients = self.nodes.choose(client_manager, fraction, max(self.cfg["MIN_UPDATES"], 1), self.cfg["SEED"],
                                    server_round + self.run["offset"], stage, poisson=bool(self.cfg["DP_CLIP"]))
        self.sent[stage] = [c.cid for c in clients]
        return clients

    def _open(self, r):
        """Start round r's updates (once): each reply is checked and added to the running aggregate as it arrives
        (utils/aggregate.py RoundUpdates); robust strategies keep the round's updates (they need them all)."""
        if self.open is None or self.open.r != r:
            self.aggregator.begin(self.current)
            private = self.dp.start(self.current) if self.dp and not self.cfg["SECAGG"] else None  # DP: one sum
            self.open = RoundUpdates(r, self.current, self._sent(), self.shared, self.cfg["FP16"], self.run,
                                     self.aggregator, private)

    def aggregate_fit(self, server_round, results, failures):
        """Average the valid updates weighted by train images (with DP_CLIP: clipped, unweighted, noised; with
        SECAGG: take the secure mean), save round{N}.npz, return the new global weights."""
        if self.record.stopped_early:  # SecAgg+'s workflow reports the round it did not start as halted
            return None, {}
        r, t0 = server_round + self.run["offset"], time.time()
        late, reasons = self.nodes.missed(r, "fit", self.sent.get("fit", []), results, failures)  # ROUND_TIMEOUT's
        self._open(r)
        if not self.cfg["SECAGG"]:
            self.open.take(results)  # the replies not streamed to it as they arrived
        if self.record.held:  # EVAL_IN_FIT: the last round's scores came with these updates; that round closes first
            self._scored(self.open.evaluations, in_fit=True)
            if self.record.stopped_early:  # PATIENCE stopped the run at that round: these updates are not used
                self.open = None
                return None, {}
        if self.cfg["SECAGG"]:
            valid, dp = secure.secure_updates(r, results, self.current, self.run, self.cfg, self.dp, reasons,
                                              self.aggregator, self.masked_bytes)
        else:
            valid, dp = self.open.valid, {}
            reasons += self.open.reasons
        sizes = [size for _, _, size in valid]
        self.record.begin(r, len(valid), round(sum(sizes) / len(sizes)) if sizes else None, reasons, late)
        new, metrics, enough = self.current, {}, len(valid) >= max(self.cfg["MIN_UPDATES"], 1)
        self.record.trained_round(enough)
        if enough:
            if self.open.private:  # the noised mean of the clipped changes is the one update
                mean, dp = self.dp.mean(self.open.private)
                self.aggregator.add(mean, 1)
            if dp:
                self.record.note(**self.dp.account(r, dp, len(valid)))
            new = self.aggregator.result(self.current)
            self.record.note(**self.aggregator.fedexp)  # FEDEXP_MAX: the round's server step
            if self.shared is not None:  # the unshared entries stay exactly as the run started
                new = expand([new[i] for i in self.shared], self.shared, self.current)
            metrics = train_metrics(valid)
            self.record.stop_if_diverged(r, new, metrics)  # RunStopped: this round's file is not written
        else:  # the round's file then repeats the kept global model
            log(WARNING, "round %d skipped: %d valid client update(s), min-updates is %d; the global model is kept",
                r, len(valid), self.cfg["MIN_UPDATES"])
        t1 = time.time()
        self.record.save_round(r, new)  # round{r}.npz
        self.aggregator.save_round(r)  # the server optimizer's state and AVG_MOMENTUM's mean, for a resume
        self.current = new
        self.record.note(**{f"train_{k}": v for k, v in metrics.items()})
        self.record.note(time_fit=round(t0 - self.open.t_open, 2), time_aggregate=round(t1 - t0, 3),
                         time_save=round(time.time() - t1, 3))
        self.open = None
        if not self.plan.waits(server_round):  # no evaluation to wait for
            self.record.finish(self.current)
        return ndarrays_to_parameters(self.current), metrics

    def evaluate(self, server_round, parameters):
        """Validate the new global model on SERVER_DATA's val split, when set (server-side evaluation)."""
        if not self.cfg["SERVER_DATA"] or server_round == 0 or self.record.stopped_early or \
                not self.plan.scheduled(server_round):
            return None
        m = evaluate_on_server(self.run, parameters_to_ndarrays(parameters))
        self.record.note(**{f"server_{k}": v for k, v in m.items() if k != "images"})
        return 1.0 - m[self.task.metric], m

    def aggregate_evaluate(self, server_round, results, failures):
        """Average the clients' validation metrics of the new global model weighted by their val images; the task's
        score per client too (`map50_95_<client>`, segment `mask_map50_95_<client>`, ...)."""
        self.nodes.missed(server_round + self.run["offset"], "evaluate", self.sent.get("evaluate", []), results,
                          failures)
        stopped = self.record.stopped_early  # then the fine-tuning after the stop: its scores join the best round's row
        metrics = self._scored(results, personal=stopped)
        return (1.0 - metrics[self.metric] if metrics and not stopped else None), metrics

    def _scored(self, results, in_fit=False, personal=False):
        """Close the round whose model the clients validated (`results`: Flower's [(proxy, EvaluateRes)]): its
        scores averaged weighted by val images into its row (utils/record.py `finish`); return them. `in_fit`:
        the clients sent them with the next round's updates (EVAL_IN_FIT), and that round's row waits meanwhile;
        `personal`: PERSONALIZE's scores after an early stop, written into the best round's row."""
        metrics = weighted_metrics(results, list(self.task.metrics.values()), self.metric, self.run["labels"])
        seconds = 0.0 if in_fit else round(time.time() - getattr(self, "t_evaluate", time.time()), 2)
        if personal:
            self.record.add_personal(metrics)
        else:
            (self.record.finish_held if in_fit else self.record.finish)(self.current, **metrics, time_evaluate=seconds)
        return metrics

    def wait_for_files(self):
        """Wait until the last round's last.pt, best.pt and results.png are written; raise what writing raised."""
        self.record.wait_for_files()

    def failure(self):
        """Return one sentence when the run trained nothing or its last rounds got no valid update, else None."""
        return self.record.failure()


def prepare(cfg, given=None):
    """Check every input and build the run's starting state (utils/start.py); ValueError with one sentence.

    `given` names the settings the user set (command line); None: those that differ from the defaults.
    """
    return start.prepare(cfg, DEFAULTS, given)


def make_strategy(cfg, run):
    """Start SAVE_DIR (config.json; old metrics of an overwritten run removed) and return the run's strategy."""
    start_save_dir(cfg, run)
    n = cfg["MIN_CLIENTS"] or len(run["spec"]["datasets"])
    if cfg["DP_CLIP"]:
        privacy.describe(cfg, run["initial"], run["trainable"], n)
    describe_schedule(cfg, run)
    if cfg["SECAGG"]:
        secure.describe(cfg)
    return SaveFedAvg(cfg, run, fraction_fit=1.0, fraction_evaluate=1.0 if cfg["EVALUATE"] else 0.0,
                      min_fit_clients=n, min_evaluate_clients=n if cfg["EVALUATE"] else 0, min_available_clients=n)


def server_main(grid, context: Context):
    """ServerApp entry for `flwr run`: the constants above, overridden by the run config."""
    cfg = resolve(DEFAULTS, dict(context.run_config))
    known = None
    if not cfg["DATASETS"]:  # a deployment: the SuperNodes say what they hold (names, how many nodes)
        task = model_task(read_base_cached(cfg["BASE_MODEL"])[0]).name
        cfg["NAMES"], cfg["MIN_CLIENTS"], known = discover(grid, cfg, task)
    run = prepare(cfg)
    run["nodes"] = known  # the strategy names and samples them by what they said
    secure.serve(grid, context, cfg, make_strategy(cfg, run))


client_app = ClientApp(client_fn=client_fn, mods=[on_time, secure.when_asked])  # utils/nodes.py, utils/secure.py
server_app = ServerApp()
server_app.main()(server_main)


def main(argv=None):
    """Run the federation in Flower's simulation engine (Ray), one simulated client per dataset."""
    parser = get_args_parser(DEFAULTS, __doc__.splitlines()[0], *setting_help(__file__))
    args = parser.parse_args(argv)
    setup_console(args.VERBOSE)
    try:
        cfg = resolve(DEFAULTS, vars(args))
        run = prepare(cfg, given=explicit_settings(parser, argv))  # every check before Ray starts
        devices = simulation.plan(cfg, run)  # which device the clients train on, before Ray starts
    except ValueError as e:
        sys.exit(f"federated.py: {e}")
    # Ray sends the client app with every message: a script's own objects travel by value (the whole client class,
    # 20 ms of the server's time a message), an importable module's by name
    app = client_app if __name__ != "__main__" else __import__("federated").client_app
    failure = simulation.simulate(cfg, run, devices, make_strategy(cfg, run), app, secure.serve)
    if failure:
        sys.exit(f"federated.py: {failure}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before Ray started (checks, demo data); from then on utils/interrupt.py handles it
        print("\ninterrupted before the first round started; nothing was trained", file=sys.stderr)
        sys.exit(130)

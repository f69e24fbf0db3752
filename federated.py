"""Federated training of an Ultralytics YOLO detector with Flower: one client per dataset, weights only exchanged.

Usage:
    python3 federated.py                                   # the embedded demo federation (generated, offline)
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
SAVE_DIR = "runs/federated"  # (str) folder for round{N}.npz (global weights after round N) and config.json
EXIST_OK = False  # (bool) allow a SAVE_DIR that already holds round files (they are overwritten)
BASE_MODEL = "yolov8n.yaml"  # (str) model .yaml (random init) or .pt (its weights; adapted to the datasets' classes)
DATASETS = []  # (list[str]) one Ultralytics data.yaml per client; empty: generate the demo federation in DEMO_DIR
DEMO_DIR = "datasets/demo"  # (str) where the demo federation is generated when DATASETS is empty
STRATEGY = "fedavg"  # (str) aggregation strategy: fedavg (weighted by train images)
SERVER_LR = 1.0  # (float) server learning rate: trainable weights move SERVER_LR x the averaged client update
CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}  # (dict) Ray resources per simulated client (num_cpus, num_gpus)
EVALUATE = True  # (bool) evaluate the new global model on every client's val split after each round
# Training (Ultralytics train arguments, the same on every client)
IMGSZ = 64  # (int) train and val image size
BATCH = 8  # (int) batch size per client
NBS = 8  # (int) nominal batch size: one optimizer step per NBS images (NBS / BATCH batches accumulated)
DEVICE = ""  # (str) "" picks cuda:0 when present, else cpu; or "cpu", "0", "cuda:1"
WORKERS = 0  # (int) dataloader worker processes per client
OPTIMIZER = "auto"  # (str) SGD, AdamW, ... or auto (resolved once on the server for the whole run)
LR0 = 0.01  # (float) initial learning rate (ignored when OPTIMIZER is auto)
COS_LR = False  # (bool) cosine instead of linear learning-rate decay over the whole run
WARMUP_EPOCHS = 3.0  # (float) warmup epochs at the start of the whole run (not of every round)
CLOSE_MOSAIC = 10  # (int) turn mosaic off for the last CLOSE_MOSAIC epochs of the whole run
AMP = True  # (bool) mixed precision on CUDA
SEED = 0  # (int) seed for the initial weights, the demo data and each round's augmentation
# -----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if k.isupper()}  # only the settings are upper case up to here

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from logging import INFO, WARNING  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, log, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

from utils.aggregate import check_update, server_step, weighted_average  # noqa: E402
from utils.config import get_args_parser, resolve  # noqa: E402
from utils.datasets import check_dataset, check_federation, write_resolved  # noqa: E402
from utils.params import get_weights, save_npz, set_weights  # noqa: E402

TRAIN_KEYS = ("IMGSZ", "BATCH", "NBS", "DEVICE", "WORKERS", "OPTIMIZER", "LR0", "COS_LR", "WARMUP_EPOCHS", "CLOSE_MOSAIC",
              "AMP", "SEED")  # settings passed to the Ultralytics trainer as lower-case arguments


def pick_device(device):
    """Return `device`, or cuda:0 / cpu when it is empty."""
    if device:
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def resolve_optimizer(cfg, nc, train_images):
    """Resolve OPTIMIZER=auto once for the whole run, with Ultralytics' own rule, so every client uses the same one.

    Ultralytics picks MuSGD (lr 0.01) past 10,000 iterations, else AdamW with lr0 = 0.002 * 5 / (4 + nc), both with
    momentum 0.9 and no bias warmup; here the iterations count every client's images over the whole run.

    Returns:
        (dict): optimizer, lr0 and, for auto, the momentum and warmup_bias_lr that go with it.
    """
    if cfg["OPTIMIZER"].lower() != "auto":
        return {"optimizer": cfg["OPTIMIZER"], "lr0": cfg["LR0"]}
    iterations = math.ceil(train_images / max(cfg["BATCH"], cfg["NBS"])) * cfg["NUM_ROUNDS"] * cfg["EPOCHS"]
    name, lr0 = ("MuSGD", 0.01) if iterations > 10000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6))
    return {"optimizer": name, "lr0": lr0, "momentum": 0.9, "warmup_bias_lr": 0.0}


class YoloClient(NumPyClient):
    """One data owner: trains and validates the global weights it is sent on its own data.yaml."""

    def __init__(self, dataset=None, partition_id=None):
        """Keep the node's dataset (deployment) or its partition id (simulation: DATASETS[partition_id])."""
        self.dataset, self.partition_id = dataset, partition_id

    def _prepare(self, parameters, config, work):
        """Return (spec, checked dataset, resolved data.yaml, model holding exactly `parameters`)."""
        from utils.model import build_model

        spec = json.loads(config["spec"])
        dataset = self.dataset or spec["datasets"][self.partition_id]
        check = check_dataset(dataset)
        if check["names"] != spec["names"]:
            raise ValueError(f"dataset {dataset} has classes {check['names']}, the federation has {spec['names']}")
        model = build_model(spec["model"], spec["names"])
        set_weights(model, parameters, source="the global parameters")
        return spec, check, write_resolved(check, work), model

    def fit(self, parameters, config):
        """Train the sent weights for this round's epochs of the run; return fp32 weights, train images, losses."""
        import tempfile

        from utils.train import train_round

        with tempfile.TemporaryDirectory(prefix="fedyolo-client-") as work:
            spec, _, data_yaml, model = self._prepare(parameters, config, work)
            hyp = {**spec["hyp"], "seed": spec["hyp"]["seed"] + int(config["server-round"])}
            out = train_round(model, data_yaml, config["start-epoch"], config["epochs"], config["total-epochs"], hyp)
        weights = get_weights(model)
        if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
            raise RuntimeError("local training produced NaN/Inf weights; the update is withheld")
        n = out.pop("train_images")
        return weights, n, out

    def evaluate(self, parameters, config):
        """Validate the sent weights on this client's val split; loss is 1 - mAP50-95."""
        import tempfile

        from utils.evaluate import evaluate

        with tempfile.TemporaryDirectory(prefix="fedyolo-client-") as work:
            spec, _, data_yaml, model = self._prepare(parameters, config, work)
            m = evaluate(model, data_yaml, spec["hyp"])
        n = m.pop("images")
        return 1.0 - m["map50_95"], n, m


def client_fn(context: Context):
    """Return the client of one node: its dataset from node config `dataset`, else DATASETS[partition-id]."""
    nc = context.node_config
    return YoloClient(dataset=nc.get("dataset"), partition_id=nc.get("partition-id")).to_client()


class SaveFedAvg(FedAvg):
    """FedAvg weighted by train images that checks every update and saves SAVE_DIR/round{N}.npz after each round."""

    def __init__(self, cfg, initial, spec, trainable, **kwargs):
        """Keep the run's settings, the initial global arrays, the spec every client receives, the trainable mask."""
        self.cfg, self.spec, self.current, self.trainable = cfg, json.dumps(spec), initial, trainable
        self.save_dir, self.t0, self.best = Path(cfg["SAVE_DIR"]), time.time(), None
        self.train_metrics = {}
        super().__init__(initial_parameters=ndarrays_to_parameters(initial), **kwargs)

    def _config(self, server_round):
        """Return what every client needs this round to continue the one training schedule."""
        e = self.cfg["EPOCHS"]
        return {"server-round": server_round, "start-epoch": (server_round - 1) * e, "epochs": e,
                "total-epochs": self.cfg["NUM_ROUNDS"] * e, "spec": self.spec}

    def configure_fit(self, server_round, parameters, client_manager):
        """Send the global weights and this round's schedule to the sampled clients."""
        return [(c, type(ins)(ins.parameters, self._config(server_round)))
                for c, ins in super().configure_fit(server_round, parameters, client_manager)]

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Send the new global weights for validation on each client's val split."""
        return [(c, type(ins)(ins.parameters, self._config(server_round)))
                for c, ins in super().configure_evaluate(server_round, parameters, client_manager)]

    def aggregate_fit(self, server_round, results, failures):
        """Average the valid updates weighted by train images, save round{N}.npz, return the new global weights."""
        for f in failures:
            log(WARNING, "round %d: a client failed: %r", server_round, f if isinstance(f, BaseException) else f[1])
        updates = []
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            problem = check_update(arrays, self.current, res.num_examples)
            if problem:
                log(WARNING, "round %d: update of client %s rejected: %s", server_round, proxy.cid, problem)
                continue
            updates.append((arrays, res.num_examples, res.metrics))
        if not updates:
            log(WARNING, "round %d: no valid client update; the global model is unchanged", server_round)
            return None, {}
        avg = weighted_average([(a, n) for a, n, _ in updates], self.current)
        self.current = server_step(self.current, avg, self.trainable, self.cfg["SERVER_LR"])
        save_npz(self.save_dir / f"round{server_round}.npz", self.current)
        total = sum(n for _, n, _ in updates)
        keys = set.intersection(*(set(m) for _, _, m in updates))
        metrics = {k: sum(float(m[k]) * n for _, n, m in updates) / total for k in sorted(keys)}
        self.train_metrics[server_round] = metrics
        if not self.cfg["EVALUATE"]:
            self._report(server_round, {})
        return ndarrays_to_parameters(self.current), metrics

    def aggregate_evaluate(self, server_round, results, failures):
        """Average the clients' validation metrics of the new global model weighted by their val images."""
        for f in failures:
            log(WARNING, "round %d: a client failed to evaluate: %r", server_round,
                f if isinstance(f, BaseException) else f[1])
        total = sum(r.num_examples for _, r in results)
        metrics = {}
        if total:
            for k in ("precision", "recall", "map50", "map50_95"):
                metrics[k] = sum(float(r.metrics[k]) * r.num_examples for _, r in results) / total
        self._report(server_round, metrics)
        return (1.0 - metrics["map50_95"] if metrics else None), metrics

    def _report(self, server_round, val):
        """Log one line for the round: time, weighted train loss, global validation metrics."""
        n, elapsed = self.cfg["NUM_ROUNDS"], time.time() - self.t0
        train = self.train_metrics.get(server_round, {})
        loss = sum(v for k, v in train.items() if k.endswith("_loss"))
        line = f"round {server_round}/{n}  {elapsed:.0f}s elapsed, ~{elapsed / server_round * (n - server_round):.0f}s left"
        line += f"  train loss {loss:.3f}" if train else "  no train update"
        if val:
            self.best = max(self.best or 0.0, val["map50_95"])
            line += f"  val mAP50 {val['map50']:.3f}  mAP50-95 {val['map50_95']:.3f} (best {self.best:.3f})"
        log(INFO, "%s", line)


def prepare(cfg):
    """Check every input and build the initial global model; raise ValueError with one sentence if anything is off.

    Returns:
        (tuple[list[np.ndarray], dict, list[bool]]): the initial global arrays, the spec every client receives and
            which state_dict entries are trainable parameters (not buffers).
    """
    from utils.model import build_model, read_base

    if cfg["NUM_ROUNDS"] < 1 or cfg["EPOCHS"] < 1:
        raise ValueError(f"num-rounds ({cfg['NUM_ROUNDS']}) and epochs ({cfg['EPOCHS']}) must be at least 1")
    if cfg["STRATEGY"].lower() != "fedavg":
        raise ValueError(f"strategy {cfg['STRATEGY']!r} is not available; use fedavg")
    if not cfg["DATASETS"]:
        from utils.demo import make_demo

        cfg["DATASETS"] = [str(p) for p in make_demo(cfg["DEMO_DIR"], seed=cfg["SEED"])[0]]
    checks = check_federation(cfg["DATASETS"])
    names = checks[0]["names"]
    arch, base = read_base(cfg["BASE_MODEL"])
    model = build_model(arch, names, weights=base, seed=cfg["SEED"])
    save_dir = Path(cfg["SAVE_DIR"])
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"save-dir {save_dir} exists and is not a folder")
    old = sorted(save_dir.glob("round*.npz"))
    if old and not cfg["EXIST_OK"]:
        raise ValueError(
            f"save-dir {save_dir} already holds {len(old)} round file(s) from an earlier run; choose another "
            "--save-dir or pass --exist-ok to overwrite them"
        )
    hyp = {k.lower(): cfg[k] for k in TRAIN_KEYS}
    hyp["device"] = pick_device(cfg["DEVICE"])
    hyp.update(resolve_optimizer(cfg, len(names), sum(c["train_images"] for c in checks)))
    spec = {"model": arch, "names": names, "hyp": hyp, "datasets": [str(Path(d).resolve()) for d in cfg["DATASETS"]]}
    params = {k for k, _ in model.named_parameters()}
    return get_weights(model), spec, [k in params for k in model.state_dict()]


def write_config(cfg, spec):
    """Save the run's settings, classes and library versions as SAVE_DIR/config.json (read by the exporter)."""
    import flwr
    import torch
    import ultralytics

    from utils.atomic import atomic_write_text

    save_dir = Path(cfg["SAVE_DIR"])
    save_dir.mkdir(parents=True, exist_ok=True)
    info = {"settings": cfg, "names": spec["names"], "hyp": spec["hyp"],
            "versions": {"flwr": flwr.__version__, "ultralytics": ultralytics.__version__, "torch": torch.__version__}}
    atomic_write_text(save_dir / "config.json", json.dumps(info, indent=2, default=str))


def make_strategy(cfg, initial, spec, trainable):
    """Write config.json and return the strategy of a run; every client takes part in every round."""
    write_config(cfg, spec)
    n = len(spec["datasets"])
    return SaveFedAvg(
        cfg, initial, spec, trainable,
        fraction_fit=1.0, fraction_evaluate=1.0 if cfg["EVALUATE"] else 0.0,
        min_fit_clients=n, min_evaluate_clients=n if cfg["EVALUATE"] else 0, min_available_clients=n,
    )


def server_fn(context: Context):
    """ServerApp entry for `flwr run`: the constants above, overridden by the run config."""
    cfg = resolve(DEFAULTS, dict(context.run_config))
    strategy = make_strategy(cfg, *prepare(cfg))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg["NUM_ROUNDS"]))


client_app = ClientApp(client_fn=client_fn)
server_app = ServerApp(server_fn=server_fn)


def main(argv=None):
    """Run the federation in Flower's simulation engine (Ray), one simulated client per dataset."""
    args = get_args_parser(DEFAULTS, __doc__.splitlines()[0]).parse_args(argv)
    try:
        cfg = resolve(DEFAULTS, vars(args))
        initial, spec, trainable = prepare(cfg)  # every check before Ray starts
    except ValueError as e:
        sys.exit(f"federated.py: {e}")
    from flwr.simulation import run_simulation

    n = len(spec["datasets"])
    log(INFO, "%d clients: %s", n, ", ".join(spec["datasets"]))
    strategy = make_strategy(cfg, initial, spec, trainable)
    root = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)  # Ray workers
    rounds = ServerConfig(num_rounds=cfg["NUM_ROUNDS"])
    run_simulation(
        server_app=ServerApp(server_fn=lambda _: ServerAppComponents(strategy=strategy, config=rounds)),
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": cfg["CLIENT_RESOURCES"], "init_args": {"num_cpus": os.cpu_count()}},
    )
    last = Path(cfg["SAVE_DIR"]) / f"round{cfg['NUM_ROUNDS']}.npz"
    if not last.exists():
        sys.exit(f"federated.py: the run ended without {last}; see the log above")
    log(INFO, "done: global weights in %s; export with: python3 utils/export_federated.py %s %s",
        last, cfg["BASE_MODEL"], last)


if __name__ == "__main__":
    main()

"""Shared fixtures: a tiny generated federation (a handful of images per client) and tiny training settings."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_VERBOSE", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.demo import make_demo  # noqa: E402

TINY = {"imgsz": 32, "batch": 4, "device": "cpu", "workers": 0, "seed": 0, "optimizer": "AdamW", "lr0": 0.001}


@pytest.fixture(scope="session")
def tiny_fed(tmp_path_factory):
    """Three tiny demo clients (8 train, 4 val images each) and the test data.yaml."""
    return make_demo(tmp_path_factory.mktemp("demo"), seed=0, n_train=8, n_val=4)


@pytest.fixture(scope="session")
def tiny_model():
    """The yolov8n architecture for the demo classes, and its names."""
    from utils.demo import NAMES
    from utils.model import read_base

    return read_base("yolov8n.yaml")[0], NAMES



def export_cli(*argv):
    """utils/export_federated.py's command line run by its main() in this process (tests/test_export.py keeps one run
    of the script itself): return (exit status, the last line it printed on failure)."""
    from utils.export_federated import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:  # sys.exit(message): printed as the last line, exit status 1
        return (1, e.code) if isinstance(e.code, str) else (e.code, "")
    return 0, ""

# -- A real federation in this process -------------------------------------------------------------------------------
# What Flower's server loop does with the strategy (flwr.server.Server.fit), without Ray or SuperNodes: the strategy's
# fit instructions go to real YoloClients through Flower's own NumPyClient adapter, their results to aggregate_fit,
# then the evaluate instructions and aggregate_evaluate; every file of the run is written as in a simulation. Clients
# are called one after the other (2 cores); each keeps its node state across rounds, as a simulated node's Context.

FED = {"num-rounds": 2, "epochs": 1, "imgsz": 32, "batch": 4, "device": "cpu"}  # tests/test_simulation.py's runs


def _in_process_client(cid, client):
    from flwr.common import DisconnectRes
    from flwr.server.client_proxy import ClientProxy

    class InProcessClient(ClientProxy):
        """The server's handle on a client, answered in this process by Flower's Client wrapper of `client`."""

        def __init__(self):
            super().__init__(cid)
            self.client = client.to_client()

        def fit(self, ins, timeout=None, group_id=None):
            return self.client.fit(ins)

        def evaluate(self, ins, timeout=None, group_id=None):
            return self.client.evaluate(ins)

        def get_properties(self, ins, timeout=None, group_id=None):
            return self.client.get_properties(ins)

        def get_parameters(self, ins, timeout=None, group_id=None):
            return self.client.get_parameters(ins)

        def reconnect(self, ins, timeout=None, group_id=None):
            return DisconnectRes(reason="")

    return InProcessClient()


def _ask(instructions, method, server_round):
    """Send each client its instruction; return (results, failures) as Flower's server collects them."""
    results, failures = [], []
    for proxy, ins in sorted(instructions, key=lambda pair: pair[0].cid):
        try:
            results.append((proxy, getattr(proxy, method)(ins, None, server_round)))
        except Exception as e:  # a client that raises is a failure of the round, as under Ray
            failures.append(e)
    return results, failures


def run_in_process(settings, given=None):
    """Run the federation that `settings` (run-config names) describe, one simulated node per dataset; return a
    namespace with the settings (`cfg`), `run` (federated.prepare), `strategy`, `save` (SAVE_DIR), the project's and
    Flower's log lines (`log`) and each round's fit results (`fits`: {round: [(client id, FitRes)]})."""
    import logging
    from types import SimpleNamespace

    from flwr.common import RecordDict
    from flwr.server.client_manager import SimpleClientManager

    import federated
    from utils.config import resolve

    cfg, lines = resolve(federated.DEFAULTS, settings), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")  # the project logs through its child flwr.fedyolo
    logger.addHandler(handler)
    fits = {}
    try:
        run = federated.prepare(cfg, given)
        strategy = federated.make_strategy(cfg, run)
        manager = SimpleClientManager()
        for i in range(len(run["spec"]["datasets"])):
            manager.register(_in_process_client(str(i), federated.YoloClient(partition_id=i, state=RecordDict())))
        parameters = strategy.initialize_parameters(manager)
        strategy.evaluate(0, parameters)
        for r in range(1, cfg["NUM_ROUNDS"] - run["offset"] + 1):
            results, failures = _ask(strategy.configure_fit(r, parameters, manager), "fit", r)
            fits[r] = [(proxy.cid, res) for proxy, res in results]
            new, _ = strategy.aggregate_fit(r, results, failures)
            parameters = parameters if new is None else new
            strategy.evaluate(r, parameters)
            instructions = strategy.configure_evaluate(r, parameters, manager)
            if instructions:  # none with EVALUATE false
                strategy.aggregate_evaluate(r, *_ask(instructions, "evaluate", r))
        strategy.wait_for_files()
    finally:
        logger.removeHandler(handler)
    return SimpleNamespace(cfg=cfg, run=run, strategy=strategy, save=Path(cfg["SAVE_DIR"]), log="\n".join(lines),
                           fits=fits)


@pytest.fixture(scope="session")
def fed_run(tiny_fed, tmp_path_factory):
    """Two tiny demo clients, two rounds of one epoch, trained and evaluated in this process (read-only for tests)."""
    save = tmp_path_factory.mktemp("fed") / "run"
    return run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED})


@pytest.fixture()
def refused(monkeypatch):
    """Call federated.main(argv) in this process for a run refused before Ray starts; return (exit status, the last
    line a user sees on stderr): what `python3 federated.py ARGS` would give, without starting a process."""
    import contextlib
    import io

    from flwr.common.logger import console_handler

    import federated

    for var in ("FEDYOLO_QUIET", "RAY_COLOR_PREFIX"):  # main() sets them for its Ray workers: restored afterwards
        was = os.environ.get(var)
        monkeypatch.setenv(var, was or "")  # recorded: undone after the test
        if was is None:
            monkeypatch.delenv(var)

    def call(*argv):
        err = io.StringIO()
        # Flower's console handler keeps the stderr of the moment flwr was imported (under pytest, a capture that may
        # be closed by now): it writes to this call's stderr while main() runs
        old = console_handler.setStream(err)
        try:
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
                federated.main([str(a) for a in argv])
        finally:
            console_handler.setStream(old)
        code, lines = e.value.code, err.getvalue().strip().splitlines()
        if isinstance(code, str):  # sys.exit(message): Python prints it as the last line and exits with 1
            return 1, code
        return code, lines[-1] if lines else ""

    return call


def check_round_files(save, names):
    """Assert what a finished 2-round run of the tiny federation left in `save`: whole round files (round 2 moved
    the model), config.json, no temp file. Return the two rounds' arrays."""
    import json

    import numpy as np

    from utils.params import load_npz

    rounds = [load_npz(save / f"round{i}.npz") for i in (1, 2)]
    for arrays in rounds:
        assert len(arrays) == 355
        assert {a.dtype.name for a in arrays} == {"float32", "int64"}
        assert all(np.isfinite(a).all() for a in arrays)
    assert any(not np.array_equal(a, b) for a, b in zip(*rounds))  # round 2 moved the model
    config = json.loads((save / "config.json").read_text())
    assert config["names"] == names and config["settings"]["NUM_ROUNDS"] == 2
    assert not [p for p in save.iterdir() if p.name.endswith(".tmp")]
    return rounds


def check_metrics(save):
    """Assert the metrics.csv rows and results.png of a 2-round run of the tiny federation's dark and light clients
    (8 train, 4 val images each, batch 4). Return the rows."""
    import csv

    import numpy as np

    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["round"] for row in rows] == ["1", "2"]
    for row in rows:
        for key in ("time_s", "train_box_loss", "train_cls_loss", "train_dfl_loss", "train_lr", "precision",
                    "recall", "map50", "map50_95", "map50_95_dark", "map50_95_light"):
            assert row[key] != "" and np.isfinite(float(row[key])), key
        # the global mAP is the val-image-weighted mean of the clients' (4 val images each here)
        assert float(row["map50_95"]) == pytest.approx((float(row["map50_95_dark"]) + float(row["map50_95_light"])) / 2,
                                                       abs=1e-5)
        assert float(row["train_batch"]) == 2  # 8 images at batch 4 make 2 steps: halved for MIN_STEPS 6
        assert int(row["updates"]) == 2
    assert (save / "results.png").read_bytes()[:4] == b"\x89PNG"
    return rows

"""The Flower client's per-node state across rounds: FedBN's local BatchNorm and the kept optimizer state."""

import json

import numpy as np
from flwr.common import RecordDict

import federated
from utils.config import resolve


def _client_and_config(tiny_fed, tmp_path, **settings):
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "r"),
                                       "imgsz": 32, "batch": 4, "nbs": 4, "device": "cpu", **settings})
    run = federated.prepare(cfg)

    def config(r):
        return {"server-round": r, "start-epoch": r - 1, "epochs": 1, "total-epochs": 3, "proximal-mu": 0.0,
                "fp16": "off", "spec": json.dumps(run["spec"])}

    client = federated.YoloClient(partition_id=0, state=RecordDict())  # one node: its state outlives the rounds
    return client, config, run


def test_fedbn_client_trains_from_its_own_batchnorm(tiny_fed, tmp_path):
    client, config, run = _client_and_config(tiny_fed, tmp_path, fedbn=True)
    mine, _, metrics = client.fit(run["initial"], config(1))
    bn = federated.bn_entries(run["model"])
    assert "local_bn" in metrics and metrics["local_bn"] == 0 and len(bn) == 57 * 5  # yolov8n: 57 BatchNorm layers
    other = [a + 0.5 if a.dtype.kind == "f" else a for a in run["initial"]]  # a new global model, other BN included

    _, _, _, model, _ = client._prepare(other, config(2))

    got = federated.get_weights(model)
    assert all(np.array_equal(got[i], mine[i]) for i in bn)  # BatchNorm: this client's own, from round 1
    conv = next(i for i in range(len(got)) if i not in bn and got[i].dtype.kind == "f")
    assert np.array_equal(got[conv], other[conv])  # everything else: the global weights as sent
    _, _, metrics = client.fit(other, config(2))
    assert metrics["local_bn"] == 1


def test_kept_optimizer_state_reaches_the_next_round(tiny_fed, tmp_path):
    client, config, run = _client_and_config(tiny_fed, tmp_path, keep_optimizer=True)
    weights, _, first = client.fit(run["initial"], config(1))
    assert first["optimizer_kept"] == 0 and "optimizer" in client.state
    _, _, second = client.fit(weights, config(2))
    assert second["optimizer_kept"] == 1

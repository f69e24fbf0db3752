"""A client's side of one message: its dataset checked and seen through its view, its model built and given the
weights the message carries (under SHARE and FEDBN with the parts it keeps itself)."""

import json
import tempfile
from pathlib import Path

from utils.classes import annotated, client_data
from utils.client_state import KeptState
from utils.datasets import check_dataset_cached, unique_label
from utils.devices import client_device
from utils.model import bn_entries, build_model, own_model, training_model
from utils.params import set_weights
from utils.share import shared_entries
from utils.tasks import get_task


def prepare_message(client, parameters, config):
    """Return, for one message to `client` (federated.YoloClient), (spec, dataset, its view's data.yaml, a model
    holding `parameters`, the classes it annotates), and set what the client keeps for the message: its task, train
    images, file label, kept state (utils/client_state.py), shared entries (SHARE) and whether its BatchNorm is its
    own (FEDBN)."""
    spec = json.loads(config["spec"])
    spec["hyp"]["device"] = client_device(client.device or spec["hyp"]["device"])  # resolved where it trains
    if client.dataset is None and client.partition_id is None:
        raise ValueError("this SuperNode has no dataset: start it with --node-config 'dataset=\"/path/data.yaml\"'")
    dataset = client.dataset or spec["datasets"][client.partition_id]
    arch, weights, task = own_model(spec, client.base_model, client.partition_id, deployed=client.dataset is not None)
    client.task, check, names = get_task(task), check_dataset_cached(dataset, task), spec["names"]
    client.train_images = check["train_images"]
    root = client.work_dir or (spec["work"] if client.dataset is None else Path(tempfile.gettempdir()) / "fedyolo")
    data_yaml = client_data(dataset, check, names, arch, own_head=arch is not spec["model"], root=root)
    if weights is None and spec.get("share", "all") == "all":  # every entry is set below: reused
        model = training_model(arch, names, seed=spec["hyp"]["seed"])
    else:
        model = build_model(arch, names, weights=weights, seed=spec["hyp"]["seed"])
    folder = client.save_dir or (spec.get("clients_dir") if client.dataset is None else None)  # SuperNode: save-dir
    client.label = unique_label(dataset, spec["datasets"])  # its files' name: folders may share one
    client.kept = KeptState(client.state, folder, client.label, int(config.get("start-epoch", 0)) > 0)
    client.shared = shared_entries(list(model.state_dict()), arch, spec.get("share", "all"))
    if client.shared is not None:  # partial sharing: the shared parts sent, this client's own parts kept here
        parameters = client.kept.own_parts(parameters, model, client.shared)
    own_bn = client.kept.own_bn(parameters, bn_entries(model)) if spec["fedbn"] else None
    client.local_bn = own_bn is not None  # FEDBN: this client's own BatchNorm, kept from its last round
    set_weights(model, parameters if own_bn is None else own_bn, source="the global parameters")
    classes = annotated(check, names)
    partial = spec["partial_labels"] and len(classes) < len(names)
    return spec, dataset, data_yaml, model, classes if partial else None

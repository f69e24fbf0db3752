"""The Flower client's per-node state across rounds: FedBN's local BatchNorm and the kept optimizer state."""

import shutil

import numpy as np
from flwr.common import RecordDict

import federated
from utils.client_prep import prepare_message
from utils.client_state import KeptState, read_state, write_state
from utils.config import resolve
from utils.datasets import unique_label
from utils.model import bn_entries
from utils.params import save_npz


def _client_and_config(tiny_fed, tmp_path, **settings):
    """One simulated node and the config the server sends in round r of a 3-round, 1-epoch run (the strategy's own)."""
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "r"),
                                       "imgsz": 32, "batch": 4, "nbs": 4, "device": "cpu", "epochs": 1,
                                       "num-rounds": 3, **settings})
    run = federated.prepare(cfg)
    strategy = federated.make_strategy(cfg, run)
    config = strategy.round_config  # round r: exactly the dict every client gets

    client = federated.YoloClient(partition_id=0, state=RecordDict())  # one node: its state outlives the rounds
    return client, config, run


def test_fedbn_client_trains_from_its_own_batchnorm(tiny_fed, tmp_path):
    client, config, run = _client_and_config(tiny_fed, tmp_path, fedbn=True)
    mine, _, metrics = client.fit(run["initial"], config(1))
    bn = bn_entries(run["model"])
    assert "local_bn" in metrics and metrics["local_bn"] == 0 and len(bn) == 57 * 5  # yolov8n: 57 BatchNorm layers
    other = [a + 0.5 if a.dtype.kind == "f" else a for a in run["initial"]]  # a new global model, other BN included

    _, _, _, model, _ = prepare_message(client, other, config(2))

    got = federated.get_weights(model)
    assert all(np.array_equal(got[i], mine[i]) for i in bn)  # BatchNorm: this client's own, from round 1
    conv = next(i for i in range(len(got)) if i not in bn and got[i].dtype.kind == "f")
    assert np.array_equal(got[conv], other[conv])  # everything else: the global weights as sent
    _, _, metrics = client.fit(other, config(2))
    assert metrics["local_bn"] == 1


def test_kept_optimizer_state_reaches_the_next_round(tiny_fed, tmp_path):
    client, config, run = _client_and_config(tiny_fed, tmp_path, keep_optimizer=True)
    weights, _, first = client.fit(run["initial"], config(1))
    saved = tmp_path / "r" / "clients" / "dark.optimizer"  # a simulated client keeps it in SAVE_DIR/clients
    assert first["optimizer_kept"] == 0 and saved.is_file() and "optimizer" not in client.state
    weights, _, second = client.fit(weights, config(2))
    assert second["optimizer_kept"] == 1

    restarted = federated.YoloClient(partition_id=0, state=RecordDict())  # a resumed run: a new process, no state
    _, _, third = restarted.fit(weights, config(3))
    assert third["optimizer_kept"] == 1
    _, _, first_again = federated.YoloClient(partition_id=0, state=RecordDict()).fit(run["initial"], config(1))
    assert first_again["optimizer_kept"] == 0  # round 1 of a run never continues an earlier run's optimizer

    node = federated.YoloClient(dataset=str(tiny_fed[0][1]), state=RecordDict())  # a SuperNode without save-dir
    weights, _, first = node.fit(run["initial"], config(1))
    assert first["optimizer_kept"] == 0 and "optimizer" in node.state  # in its memory
    _, _, second = node.fit(weights, config(2))
    assert second["optimizer_kept"] == 1


def test_clients_whose_folders_share_a_name_keep_their_own_optimizer_files(tiny_fed, tmp_path):
    sites = []
    for site, src in (("site_a", tiny_fed[0][0].parent), ("site_b", tiny_fed[0][1].parent)):
        dst = tmp_path / site / "dark"  # two owners whose dataset folders have the same name
        shutil.copytree(src, dst)
        (dst / "data.yaml").write_text((src / "data.yaml").read_text().replace(str(src), str(dst)))
        sites.append(dst / "data.yaml")
    assert [unique_label(s, sites) for s in sites] == ["0_dark", "1_dark"]  # as metrics.csv names them
    assert unique_label(tiny_fed[0][2], sites) == "noisy"  # a SuperNode's own dataset: its own name
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(p) for p in sites], "save-dir": str(tmp_path / "r"),
                                       "imgsz": 32, "batch": 4, "nbs": 4, "device": "cpu", "epochs": 1,
                                       "num-rounds": 2, "keep-optimizer": True})
    run = federated.prepare(cfg)
    config = federated.make_strategy(cfg, run).round_config
    for i in (0, 1):
        federated.YoloClient(partition_id=i, state=RecordDict()).fit(run["initial"], config(1))
    files = sorted(p.name for p in (tmp_path / "r" / "clients").iterdir())
    assert files == ["0_dark.optimizer", "1_dark.optimizer"]  # one shared file mixed them, in the order they ran
    a, b = (read_state(tmp_path / "r" / "clients" / f)[1] for f in files)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_optimizer_state_file_round_trips_bit_for_bit_and_a_damaged_one_counts_as_none(tmp_path):
    keys = ["exp_avg", "exp_avg_sq", "step"]
    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 2, 1), dtype=np.float32), rng.random(5), np.array(7.0, dtype=np.float32),
              np.zeros((0, 4), np.float32), np.arange(6, dtype=np.int64).reshape(2, 3), np.float32(2.5)]
    write_state(tmp_path / "a.optimizer", keys, arrays)
    got_keys, got = read_state(tmp_path / "a.optimizer")
    assert got_keys == keys and len(got) == len(arrays)
    assert all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) for a, b in zip(arrays, got))
    save_npz(tmp_path / "old.npz", [np.array(keys), *arrays[:3]])  # an earlier version's layout: one array each
    assert read_state(tmp_path / "old.npz")[1][2] == 7.0

    kept = KeptState(None, tmp_path, "dark", resumed=True)
    kept.keep_optimizer(keys, arrays)
    assert kept.optimizer()[0] == keys
    whole = (tmp_path / "dark.optimizer").read_bytes()
    for damaged in (whole[:-9], b""):  # what a power cut may leave of a write without fsync
        (tmp_path / "dark.optimizer").write_bytes(damaged)
        assert kept.optimizer() is None  # a fresh optimizer, with a warning, instead of a failed client


def test_a_client_whose_optimizer_file_is_removed_mid_run_starts_fresh_and_says_so(tmp_path):
    import logging

    from utils.console import LOGGER

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        kept = KeptState(RecordDict(), tmp_path, "dark", resumed=True)
        kept.keep_optimizer(["step"], [np.float32(3.0)])
        assert kept.optimizer()[1][0] == 3.0 and not seen
        (tmp_path / "dark.optimizer").unlink()
        assert kept.optimizer() is None
        assert len(seen) == 1 and "dark.optimizer is gone" in seen[0] and "starts fresh" in seen[0]
        assert KeptState(RecordDict(), tmp_path, "new", resumed=True).optimizer() is None and len(seen) == 1
    finally:
        LOGGER.removeHandler(handler)


def test_partial_sharing_keeps_the_clients_own_parts_bit_identical(tiny_fed, tmp_path):
    """SHARE=backbone: the client sends only backbone entries; in round 2 it starts from the sent backbone and its own
    neck and head exactly as it ended round 1; its personalized model file holds those."""
    import torch

    from utils.share import part

    client, config, run = _client_and_config(tiny_fed, tmp_path, share="backbone")
    keys = list(run["model"].state_dict())
    backbone = [i for i, k in enumerate(keys) if part(k, run["spec"]["model"]) == "backbone"]
    own = [i for i in range(len(keys)) if i not in backbone]
    assert run["shared"] == backbone and 0 < len(backbone) < len(keys)

    sent, n, _ = client.fit(run["initial"], config(1))  # round 1: the whole model arrives

    assert len(sent) == len(backbone)
    path = tmp_path / "r" / "clients" / "dark.pt"
    mine = [t.numpy() for t in torch.load(path, weights_only=False)["model"].state_dict().values()]
    assert all(np.array_equal(sent[j], mine[i]) for j, i in enumerate(backbone))
    assert any(not np.array_equal(mine[i], run["initial"][i]) for i in own)  # its head trained
    other = [a + 0.5 if a.dtype.kind == "f" else a for a in sent]  # a new global backbone, only it is sent

    _, _, _, model, _ = prepare_message(client, other, config(2))

    got = federated.get_weights(model)
    assert all(np.array_equal(got[i], mine[i]) for i in own)  # neck and head: its own, bit for bit
    assert all(np.array_equal(got[i], other[j]) for j, i in enumerate(backbone))


def test_partial_sharing_is_checked_against_the_model(tiny_fed, tmp_path):
    import pytest

    for share, words in (("backbone+tail", "share must be all or parts joined by +"),
                         ("neck", None)):
        cfg = resolve(federated.DEFAULTS, {"datasets": [str(p) for p in tiny_fed[0][:2]], "share": share,
                                           "save-dir": str(tmp_path / share)})
        if words:
            with pytest.raises(ValueError, match=words):
                federated.prepare(cfg)
        else:
            assert federated.prepare(cfg)["shared"]
    from utils.model import build_model, read_base
    from utils.share import check_share

    arch = read_base("yolov8n-cls.yaml")[0]
    keys = list(build_model(arch, ["a", "b"]).state_dict())
    problem = check_share({**cfg, "SHARE": "neck"}, arch, keys)
    assert problem == "share 'neck': this model has no neck (it has backbone, head)"
    problem = check_share({**cfg, "SHARE": "backbone", "SECAGG": True}, arch, keys)
    assert problem.endswith("cannot be combined with secagg (its masked vectors hold every entry)")

"""Weight handoff into the Ultralytics trainer and the one continuing schedule across rounds."""

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from utils.classes import client_view
from utils.datasets import check_dataset
from utils.model import build_model, read_base, training_model
from utils.params import get_weights, set_weights
from utils.train import client_batch, train_round


def _random_weights(model, seed):
    """Arrays for `model` that no initialisation would produce (so a reinit cannot pass for them)."""
    g = np.random.default_rng(seed)
    return [(g.normal(0, 0.05, a.shape).astype(a.dtype) if a.dtype.kind == "f" else a + 7) for a in get_weights(model)]


def _run(model, data_yaml, start, epochs, total, **hyp):
    """Train one round and record what the trainer held at its start and end."""
    seen = {}

    def at_start(tr):
        seen["start"] = get_weights(tr.model)
        seen["start_epoch"] = tr.epoch if hasattr(tr, "epoch") else None

    def at_epoch_end(tr):
        seen.setdefault("epochs", []).append(tr.epoch)
        seen["lr"] = [g["lr"] for g in tr.optimizer.param_groups]
        seen["lf"] = tr.lf(tr.epoch)

    def at_end(tr):
        seen["fitness"], seen["saved"] = tr.fitness, tr.last.exists() or tr.best.exists()
        seen["lr0"] = tr.args.lr0

    cbs = {"on_train_start": at_start, "on_train_epoch_end": at_epoch_end, "on_train_end": at_end}
    out = train_round(model, data_yaml, start, epochs, total, {**TINY, **hyp}, callbacks=cbs)
    return out, seen


@pytest.fixture()
def data_yaml(tiny_fed, tmp_path):
    check = check_dataset(tiny_fed[0][0])
    return client_view(check, check["names"], tmp_path / "view")


@pytest.mark.parametrize("base", ["yaml", "pt"])
def test_trainer_starts_from_exactly_the_sent_weights(base, data_yaml, tiny_model, tmp_path):
    cfg, names = tiny_model
    if base == "pt":  # a checkpoint trained on 80 other classes, adapted to the 4 demo classes
        src = build_model(cfg, [f"c{i}" for i in range(80)], seed=5)
        pt = tmp_path / "base80.pt"
        torch.save({"model": src, "train_args": {"task": "detect"}}, pt)
        cfg, weights = read_base(pt)
        model = build_model(cfg, names, weights=weights)
        moved = [k for k, v in model.state_dict().items() if torch.equal(v, src.state_dict()[k])]
        assert len(moved) > 300  # everything but the class outputs came from the .pt
    else:
        model = build_model(cfg, names)
    sent = _random_weights(model, seed=11)
    set_weights(model, sent)

    out, seen = _run(model, data_yaml, 0, 1, 3)

    assert all(np.array_equal(a, b) for a, b in zip(seen["start"], sent))  # training starts from them bit for bit
    back = get_weights(model)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(back, sent))
    assert any(not np.array_equal(a, b) for a, b in zip(back, sent) if a.dtype.kind == "f")  # it trained
    assert out["train_images"] == 8 and np.isfinite(out["box_loss"])


def test_a_kept_model_and_an_ema_that_copies_nothing_train_bit_for_bit_as_a_fresh_model(data_yaml, tiny_model):
    """A simulated client's process keeps the model it trained for the next client or round (utils/model.py
    training_model), and the trainer's unused EMA copies nothing: neither changes a single learned bit."""
    import copy

    cfg, names = tiny_model
    fresh = build_model(cfg, names)
    sent = _random_weights(fresh, seed=3)
    kept = training_model(cfg, names)
    set_weights(kept, _random_weights(kept, seed=4))
    train_round(kept, data_yaml, 0, 1, 2, TINY, proximal_mu=0.01, classes=[0])  # another client's round before
    again = training_model(cfg, names)
    assert again is kept and not hasattr(again, "criterion") and not hasattr(again, "class_weights")
    ema = []
    for model in (fresh, again):
        set_weights(model, sent)
        train_round(model, data_yaml, 1, 1, 2, TINY,
                    callbacks={"on_train_end": lambda tr: ema.append(len(list(tr.ema.ema.parameters())))})
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(fresh), get_weights(again)))
    assert ema == [0, 0]  # the EMA held no copy of the weights
    twin = copy.deepcopy(fresh)  # after training the model copies as usual again
    assert twin is not fresh and all(np.array_equal(a, b) for a, b in zip(get_weights(twin), get_weights(fresh)))


def test_evaluation_leaves_the_model_it_is_given_as_it_was_so_the_kept_model_serves_it_too(data_yaml, tiny_model):
    """The validator fuses Conv+BN into its own copy (Ultralytics 8.4), so a client evaluates on its kept model."""
    from utils.evaluate import evaluate

    cfg, names = tiny_model
    kept = training_model(cfg, names)
    sent = _random_weights(kept, seed=5)
    set_weights(kept, sent)
    fresh = build_model(cfg, names)
    set_weights(fresh, sent)

    first = evaluate(kept, data_yaml, TINY)

    assert not kept.is_fused() and kept.training  # nothing folded, still in training mode
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(kept), sent))
    assert training_model(cfg, names) is kept and evaluate(kept, data_yaml, TINY) == first == evaluate(fresh, data_yaml,
                                                                                                       TINY)


def test_recalibration_sets_the_batchnorm_statistics_and_nothing_else(data_yaml, tiny_model):
    """BN_RECALIBRATE: the same learned weights and step counts, running statistics of the trained weights."""
    cfg, names = tiny_model
    model = build_model(cfg, names)
    sent = [np.full_like(a, 100.0) if k.endswith("running_var") else a
            for k, a in zip(model.state_dict(), _random_weights(model, seed=6))]
    out = {}
    for recalibrate in (False, True):
        model = build_model(cfg, names)
        set_weights(model, sent)
        out[recalibrate] = train_round(model, data_yaml, 1, 1, 2, TINY, recalibrate=recalibrate), model.state_dict()
    (plain, before), (recal, after) = out[False], out[True]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(before[k], after[k]) for k in before if k not in stats)  # weights and counts alike
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # every statistic set again
    # sent running variances of 100, far from any data's: training moves them 3% a step, recalibration replaces them
    first = "model.0.bn.running_var"
    assert before[first].min() > 50 > 10 > after[first].max()
    assert "time_recalibrate" in recal and "time_recalibrate" not in plain


def test_fixed_batchnorm_trains_with_the_sent_statistics_and_keeps_them(data_yaml, tiny_model):
    """FIXED_BN: the epochs leave every running statistic as sent and still train the weights; BatchNorm's weight
    and bias included. Without it the same round moves the statistics."""
    cfg, names = tiny_model
    sent = get_weights(build_model(cfg, names, seed=0))
    got = {}
    for fixed in (False, True):
        model = build_model(cfg, names, seed=0)
        modes = []
        probe = {"on_train_batch_start": lambda tr: modes.append(tr.model.model[0].bn.training)}
        train_round(model, data_yaml, 1, 1, 2, {**TINY, "nbs": 4}, callbacks=probe, fixed_bn=fixed)
        got[fixed] = dict(zip(model.state_dict(), get_weights(model))), modes
    keys = list(got[True][0])
    stats = [i for i, k in enumerate(keys) if k.endswith(("running_mean", "running_var"))]
    (moved, train_modes), (fixed, eval_modes) = got[False], got[True]
    assert set(train_modes) == {True} and set(eval_modes) == {False}  # every step, not only the first epoch's
    assert all(np.array_equal(fixed[keys[i]], sent[i]) for i in stats)
    assert all(not np.array_equal(moved[keys[i]], sent[i]) for i in stats)
    assert not np.array_equal(fixed["model.0.bn.weight"], sent[keys.index("model.0.bn.weight")])
    assert not np.array_equal(fixed["model.0.conv.weight"], sent[keys.index("model.0.conv.weight")])


def test_round_continues_the_runs_schedule_without_local_validation(data_yaml, tiny_model):
    cfg, names = tiny_model
    model = build_model(cfg, names)

    out, seen = _run(model, data_yaml, 2, 1, 4, warmup_epochs=1.0)

    assert seen["epochs"] == [2]  # epoch 3 of 4 of the run, not epoch 1 of a new run
    # linear decay over the whole run: lr0 * lf(2) = lr0 * ((1 - 2/4) * 0.99 + 0.01); no warmup ramp any more
    assert seen["lf"] == pytest.approx(0.505)
    assert seen["lr"] == pytest.approx([TINY["lr0"] * 0.505] * 3)
    assert seen["fitness"] is None and not seen["saved"]  # no local validation, no best.pt from the client


@pytest.mark.parametrize("warmup", [3.0, 0.0])
def test_the_servers_warmup_applies_even_to_a_one_epoch_run(warmup, data_yaml, tiny_model):
    # Ultralytics caps warmup to epochs - 1 (none in a 1-epoch run); a trained start needs it whatever the length
    cfg, names = tiny_model
    out, seen = _run(build_model(cfg, names), data_yaml, 0, 1, 1, warmup_epochs=warmup, warmup_bias_lr=0.0)
    # 8 images / batch 4 = 2 batches; warmup 3 epochs = 6 iterations: the last batch (iteration 1) runs at lr0 / 6
    assert seen["lr"] == pytest.approx([TINY["lr0"] / 6 if warmup else TINY["lr0"]] * 3)


def test_last_round_of_the_run_skips_final_validation(data_yaml, tiny_model):
    cfg, names = tiny_model
    out, seen = _run(build_model(cfg, names), data_yaml, 1, 1, 2)
    assert seen["epochs"] == [1] and seen["fitness"] is None and not seen["saved"]


def test_training_and_evaluation_make_no_network_connection(data_yaml, tiny_model, monkeypatch):
    import socket

    from utils.evaluate import evaluate

    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr("ultralytics.utils.checks.USER_CONFIG_DIR", data_yaml.parent / "no-fonts-here")
    cfg, names = tiny_model
    model = build_model(cfg, names)

    train_round(model, data_yaml, 0, 1, 1, TINY)
    metrics = evaluate(build_model(cfg, names), data_yaml, TINY)

    assert tried == [] and metrics["images"] == 4


def test_labels_malformed_or_beyond_nc_are_skipped_not_trained(tiny_fed, tiny_model, tmp_path):
    import shutil

    src = tiny_fed[0][0].parent
    shutil.copytree(src, tmp_path / "c")
    labels = sorted((tmp_path / "c" / "labels" / "train").glob("*.txt"))
    labels[0].write_text("9 0.5 0.5 0.2 0.2\n")  # class 9 of a 4-class dataset
    labels[1].write_text("circle at the centre\n")  # not a label line at all
    data = tmp_path / "c" / "data.yaml"
    data.write_text((src / "data.yaml").read_text().replace(str(src), str(tmp_path / "c")))
    check = check_dataset(data)
    cfg, names = tiny_model

    out, _ = _run(build_model(cfg, names), client_view(check, names, tmp_path / "view"), 0, 1, 1)

    assert out["train_images"] == 6  # Ultralytics drops the images with bad labels (a warning), trains the rest


def test_evaluation_leaves_the_global_parameters_untouched(tiny_fed, tiny_model, tmp_path):
    import json

    import federated
    from utils.params import load_npz, save_npz

    cfg, names = tiny_model
    sent = _random_weights(build_model(cfg, names), seed=3)
    copy = [a.copy() for a in sent]
    spec = {"model": cfg, "names": names, "hyp": TINY, "datasets": [str(tiny_fed[0][0])], "work": str(tmp_path),
            "fedbn": False, "partial_labels": True, "keep_optimizer": False}
    client = federated.YoloClient(partition_id=0)

    loss, n, metrics = client.evaluate(sent, {"spec": json.dumps(spec)})

    assert n == 4 and metrics["client"] == "dark" and 0.0 <= metrics["map50_95"] <= 1.0
    assert all(np.array_equal(a, b) for a, b in zip(sent, copy))  # the validator fused its own copy only

    # server-side evaluation after a round: the saved npz stays the aggregate
    from flwr.common import ndarrays_to_parameters

    settings = {**federated.DEFAULTS, "SAVE_DIR": str(tmp_path), "SERVER_DATA": str(tiny_fed[1])}
    run = {"initial": sent, "spec": spec, "trainable": [], "bn_pairs": [], "offset": 0, "rows": [], "train_images": {},
           "server_check": check_dataset(tiny_fed[1])}
    strategy = federated.SaveFedAvg(settings, run)
    save_npz(tmp_path / "round1.npz", sent)
    loss, m = strategy.evaluate(1, ndarrays_to_parameters(sent))
    assert "map50_95" in m and strategy.record.pending["server_map50_95"] == m["map50_95"]
    for arrays in (load_npz(tmp_path / "round1.npz"), strategy.current):
        assert all(np.array_equal(a, b) for a, b in zip(arrays, copy))


def test_validation_reuses_its_fused_copy_for_the_same_weights_only(data_yaml, tiny_model, monkeypatch):
    """utils/evaluate.py validator_copy: a second validation of the same weights runs the fused copy the first one
    made; other weights get a fresh copy. (These random weights score 0: tests/test_truth.py compares a reused copy's
    nonzero scores with `yolo val`'s.)"""
    from ultralytics.engine.validator import BaseValidator

    from utils import evaluate as ev

    cfg, names = tiny_model
    model = build_model(cfg, names, seed=0)
    set_weights(model, _random_weights(model, seed=5))
    ev._LAST.clear()
    first = ev.evaluate(model, data_yaml, TINY)
    copy = ev._LAST["copy"]
    assert ev.evaluate(model, data_yaml, TINY) == first and ev._LAST["copy"] is copy  # reused, same scores
    assert copy.is_fused() and not model.is_fused()  # the validator fused its copy, not the model

    set_weights(model, _random_weights(model, seed=6))
    other = ev.evaluate(model, data_yaml, TINY)
    assert ev._LAST["copy"] is not copy  # new weights: a new copy
    monkeypatch.setattr(ev, "validator_copy", lambda m: BaseValidator.get_model(None, m))  # Ultralytics' own copy
    assert ev.evaluate(model, data_yaml, TINY) == other  # what the stock validator scores


def test_client_withholds_nan_weights(tiny_fed, tiny_model, tmp_path):
    import json

    import federated

    cfg, names = tiny_model
    arrays = get_weights(build_model(cfg, names))
    sent = [np.full(a.shape, np.nan, a.dtype) if a.dtype.kind == "f" else a for a in arrays]
    spec = {"model": cfg, "names": names, "hyp": TINY, "datasets": [str(tiny_fed[0][0])], "work": str(tmp_path),
            "fedbn": False, "partial_labels": True, "keep_optimizer": False}
    config = {"spec": json.dumps(spec), "server-round": 1, "start-epoch": 0, "epochs": 1, "total-epochs": 1,
              "proximal-mu": 0.0, "fp16": "off"}

    with pytest.raises(RuntimeError, match="NaN/Inf weights; the update is withheld"):
        federated.YoloClient(partition_id=0).fit(sent, config)


def test_optimizer_state_continues_into_the_next_round(data_yaml, tiny_model):
    cfg, names = tiny_model
    model = build_model(cfg, names, seed=0)
    hyp = {**TINY, "nbs": 4}
    first = train_round(model, data_yaml, 0, 1, 2, hyp)
    keys, arrays = first["optimizer_state"]
    assert first["optimizer_kept"] == 0 and "exp_avg_sq" in keys and any(np.abs(a).sum() > 0 for a in arrays)
    seen = {}

    def at_start(tr):  # after the state was loaded, before the first step of round 2
        seen["state"] = [torch.as_tensor(tr.optimizer.state[p][k]).numpy().copy()
                         for g in tr.optimizer.param_groups for p in g["params"] for k in keys]

    second = train_round(model, data_yaml, 1, 1, 2, hyp, callbacks={"on_train_start": at_start},
                         optimizer_state=(keys, arrays))
    assert second["optimizer_kept"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(seen["state"], arrays))
    fresh = train_round(build_model(cfg, names, seed=0), data_yaml, 1, 1, 2, hyp, optimizer_state=(keys, arrays[:-1]),
                        return_state=False)
    assert fresh["optimizer_kept"] == 0  # a state that does not fit the optimizer is not loaded
    assert fresh["optimizer_state"] == ([], [])  # a client that keeps no state gets no copy of it


def test_fused_adam_steps_as_ultralytics_does_to_float_rounding(data_yaml, tiny_model):
    """FUSED_ADAM: torch's fused AdamW kernel on the CPU; the trained weights match the unfused ones closely (the
    same update computed in another order) and other optimizers are left alone."""
    from utils.train import fuse_adam

    cfg, names = tiny_model
    start = build_model(cfg, names, seed=0)
    trained, flags = [], []
    for fused in (False, True):
        model = build_model(cfg, names, seed=0)
        cbs = {"on_train_start": lambda tr: flags.append({g.get("fused") for g in tr.optimizer.param_groups})}
        train_round(model, data_yaml, 0, 1, 2, {**TINY, "optimizer": "AdamW", "lr0": 0.002}, callbacks=cbs,
                    fused=fused)
        trained.append(get_weights(model))
    assert flags == [{None}, {True}]
    floats = [(a, b, s) for a, b, s in zip(*trained, get_weights(start)) if a.dtype.kind == "f"]
    assert any(not np.array_equal(a, s) for a, _, s in floats)  # it trained
    assert max(float(np.abs(a - b).max()) for a, b, _ in floats) < 1e-4
    sgd = torch.optim.SGD(start.parameters(), lr=0.01)
    fuse_adam(sgd)
    assert not any(g.get("fused") for g in sgd.param_groups)


def test_musgd_state_of_every_group_survives_the_round_trip():
    """MuSGD (Ultralytics' optimizer past 10,000 iterations) keeps other buffers for its Muon group than for its SGD
    groups; the kept state must hold every group's, or the next round's first step fails on a missing buffer."""
    from ultralytics.optim import MuSGD

    from utils.train import get_optimizer_state, set_optimizer_state

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        conv, bn = net[0], net[1]
        groups = [{"params": [bn.weight, bn.bias, conv.bias]}, {"params": [conv.weight], "use_muon": True}]
        return net, MuSGD(groups, lr=0.01, momentum=0.9)

    def step(net, opt):
        opt.zero_grad()
        net(torch.ones(2, 3, 8, 8)).square().mean().backward()
        opt.step()

    net, opt = make()
    step(net, opt)
    keys, arrays = get_optimizer_state(opt)
    assert keys == ["momentum_buffer", "momentum_buffer_SGD"]  # the SGD groups' parameter came first
    net2, opt2 = make()
    net2.load_state_dict(net.state_dict())
    assert set_optimizer_state(opt2, keys, arrays)
    step(net, opt)
    step(net2, opt2)  # failed on the Muon weight's missing momentum_buffer_SGD when only the first weight's keys came
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))


def test_the_state_is_copied_out_unless_the_optimizer_takes_no_more_steps():
    """train_round reads its optimizer's state as views (the optimizer is dropped after); any other caller gets a
    copy that the optimizer's next step leaves as it was."""
    from utils.train import get_optimizer_state

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    (keys, copied), (_, views) = get_optimizer_state(opt), get_optimizer_state(opt, copy=False)
    assert keys == ["exp_avg", "exp_avg_sq", "step"]
    assert all(np.array_equal(a, b) for a, b in zip(copied, views))
    before = [a.copy() for a in copied]
    opt.step()  # the same gradients once more: every moment moves
    assert all(np.array_equal(a, b) for a, b in zip(copied, before))
    first = opt.state[net.weight]["exp_avg"].numpy()
    assert np.array_equal(views[0], first) and not np.array_equal(views[0], before[0])


def test_a_small_client_halves_its_batch_until_an_epoch_makes_enough_steps():
    assert client_batch(8, 8, 96, 6) == {"batch": 8, "nbs": 8}  # 12 steps already
    assert client_batch(8, 8, 24, 6) == {"batch": 4, "nbs": 4}  # 3 steps -> 6
    assert client_batch(16, 64, 16, 6) == {"batch": 2, "nbs": 2}  # nbs follows: one step per 2 images
    assert client_batch(8, 8, 3, 6) == {"batch": 2, "nbs": 2}  # never below 2
    assert client_batch(8, 8, 24, 0) == {"batch": 8, "nbs": 8}  # MIN_STEPS 0: as set

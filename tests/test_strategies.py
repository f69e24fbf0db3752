"""Server side of every strategy on real client-update shapes: buffers are never moved by server optimizers."""

import csv

import numpy as np
import pytest

import federated
from tests.conftest import FED, run_in_process
from utils.params import decode_update, encode_update, load_npz, to_half
from utils.strategies import STRATEGIES, Aggregator, check_strategy

# A small stand-in for a state_dict: conv weight, BN weight (trainable), BN running_mean/var, num_batches_tracked.
TRAINABLE = [True, True, False, False, False]
BN_PAIRS = [(2, 3)]


def _arrays(v, n_batches=5):
    return [np.full((3, 2), v, np.float32), np.full(3, v, np.float32), np.full(3, v, np.float32),
            np.full(3, 1.0 + v, np.float32), np.array(n_batches, np.int64)]


def _cfg(strategy, **kw):
    return {**federated.DEFAULTS, "STRATEGY": strategy, **kw}


def _round(agg, current, updates):
    agg.begin()
    for arrays, n, *steps in updates:
        agg.add(arrays, n, *steps)
    return agg.result(current)


def test_fedavg_weights_by_images_and_keeps_dtypes():
    agg = Aggregator(_cfg("fedavg"), TRAINABLE, BN_PAIRS)
    new = _round(agg, _arrays(0.0), [(_arrays(1.0, 4), 1), (_arrays(4.0, 7), 2)])
    np.testing.assert_allclose(new[0], 3.0)  # (1 * 1 + 4 * 2) / 3
    assert new[4].dtype == np.int64 and new[4].shape == () and int(new[4]) == 6  # rint(18 / 3)


def test_fednova_divides_each_change_by_its_steps():
    agg = Aggregator(_cfg("fednova", POOLED_BN_VAR=False), TRAINABLE, BN_PAIRS)
    # p = 1/3, 2/3; tau = 2, 8: tau_eff = 6, the change 6 * (1/3 * 1/2 + 2/3 * 4/8)
    new = _round(agg, _arrays(0.0), [(_arrays(1.0, 4), 1, 2), (_arrays(4.0, 7), 2, 8)])
    np.testing.assert_allclose(new[0], 6 * (1 / 3 * 1.0 / 2 + 2 / 3 * 4.0 / 8))
    np.testing.assert_allclose(new[2], 3.0)  # buffers: FedAvg's mean, weighted by images only
    assert int(new[4]) == 6
    new = _round(agg, _arrays(1.0), [(_arrays(2.0), 1, 10), (_arrays(4.0), 1, 5)])  # FedAvg: 3
    np.testing.assert_allclose(new[0], 1 + 7.5 * (0.5 * 1 / 10 + 0.5 * 3 / 5), rtol=1e-6)
    same = _round(agg, _arrays(0.0), [(_arrays(1.0), 1, 4), (_arrays(4.0), 2, 4)])  # equal steps: FedAvg
    np.testing.assert_allclose(same[0], 3.0)
    assert "optimizer steps" in agg.check({}) and agg.check({"steps": 3}) is None
    assert Aggregator(_cfg("fedavg"), TRAINABLE).check({}) is None
    assert "secagg" in check_strategy(_cfg("fednova", SECAGG=True), 3)
    assert "secagg" in check_strategy(_cfg("fednova", DP_CLIP=1.0), 3)


def test_fedexp_sets_the_server_step_from_how_much_the_clients_changes_disagree():
    def fedexp_round(cap, *values):
        agg = Aggregator(_cfg("fedavg", FEDEXP_MAX=cap, POOLED_BN_VAR=False), TRAINABLE, BN_PAIRS)
        agg.begin(_arrays(0.0))  # each client's change is its value
        for v in values:
            agg.add(_arrays(v), 1)
        return agg.result(_arrays(0.0)), agg.fedexp

    # changes +3 and -1: mean 1, mean squared change 5, ratio 5, step max(1, 5 / 2) = 2.5
    new, fedexp = fedexp_round(4.0, 3.0, -1.0)
    assert fedexp == {"fedexp_ratio": 5.0, "fedexp_lr": 2.5}
    np.testing.assert_allclose(new[0], 2.5)  # trainable: 2.5 x the mean change
    np.testing.assert_allclose(new[2], 1.0)  # buffers: the plain mean
    np.testing.assert_allclose(fedexp_round(2.0, 3.0, -1.0)[0][0], 2.0)  # at most FEDEXP_MAX
    new, fedexp = fedexp_round(4.0, 1.0, 1.0)  # clients that agree: ratio 1, FedAvg's step
    assert fedexp["fedexp_lr"] == 1.0 and np.allclose(new[0], 1.0)
    assert Aggregator(_cfg("fedavg"), TRAINABLE).fedexp == {}  # off: no column
    assert "at least 1" in check_strategy(_cfg("fedavg", FEDEXP_MAX=0.5), 3)
    assert "has its own" in check_strategy(_cfg("fedavgm", FEDEXP_MAX=2.0), 3)
    assert "in the clear" in check_strategy(_cfg("fedavg", FEDEXP_MAX=2.0, SECAGG=True), 3)
    assert check_strategy(_cfg("fedprox", FEDEXP_MAX=2.0), 3) is None


def test_a_fedexp_federation_steps_by_what_its_clients_sent_and_records_the_step(tiny_fed, tmp_path, monkeypatch):
    """Three real clients in this process (tests/conftest.py): round 2's file is round 1's plus FedExP's step times
    the image-weighted mean change of the weights the clients sent, and metrics.csv has that step."""
    added, add = [], Aggregator.add

    def spy(self, arrays, n, *rest):
        added.append(([a.astype(np.float64) for a in arrays], n))  # each valid update, as the server received it
        return add(self, arrays, n, *rest)

    monkeypatch.setattr(Aggregator, "add", spy)
    done = run_in_process({"datasets": [str(p) for p in tiny_fed[0]], "save-dir": str(tmp_path / "run"), **FED,
                           "fedexp-max": 4.0, "avg-momentum": False})  # each client's own momentum: they disagree
    start, new = load_npz(done.save / "round1.npz"), load_npz(done.save / "round2.npz")
    trainable = done.run["trainable"]
    sent = added[3:]  # round 2's three updates
    assert len(added) == 6 and len(sent[0][0]) == len(start)
    total = sum(n for _, n in sent)
    mean = [sum(a[i] * n for a, n in sent) / total for i in range(len(start))]

    def squared(arrays):
        return sum(float(np.sum((a - s.astype(np.float64)) ** 2)) for a, s, t in zip(arrays, start, trainable) if t)

    ratio = sum(n * squared(a) for a, n in sent) / total / squared(mean)
    lr = min(max(1.0, ratio / 2), 4.0)
    assert lr > 1  # three clients whose changes disagree: a longer step than FedAvg's
    with (done.save / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[1]
    assert float(row["fedexp_ratio"]) == pytest.approx(ratio, rel=1e-3)
    assert float(row["fedexp_lr"]) == pytest.approx(lr, rel=1e-3)
    for i in (i for i, t in enumerate(trainable) if t):
        np.testing.assert_allclose(new[i], start[i] + float(row["fedexp_lr"]) * (mean[i] - start[i]), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_move_trainable_weights_only(strategy):
    agg = Aggregator(_cfg(strategy, SERVER_LR=3.0, ADAPTIVE_LR=0.5, POOLED_BN_VAR=False), TRAINABLE, BN_PAIRS)
    current, updates = _arrays(0.0), [(_arrays(1.0), 1), (_arrays(3.0), 1)]
    first = _round(agg, current, updates)
    second = _round(agg, first, updates)
    for new in (first, second):  # buffers: the plain mean of the clients (the pooled variance: the test below)
        np.testing.assert_allclose(new[2], 2.0)
        np.testing.assert_allclose(new[3], 3.0)
        assert int(new[4]) == 5
    assert not np.allclose(first[0], 2.0)  # the trainable weights took the optimizer's step, not the mean
    if strategy == "fedavgm":  # momentum 0.5: v1 = 0.5 * 2 = 1, w1 = 0 + 3 * 1; v2 = 0.5 + 0.5 * (2 - 3) = 0, w2 = 3
        np.testing.assert_allclose(first[0], 3.0)
        np.testing.assert_allclose(second[0], 3.0, rtol=1e-6)
    else:  # first Adam/Yogi step with bias correction: lr * sign(delta) (tau is small next to delta)
        np.testing.assert_allclose(first[0], 0.5, rtol=1e-2)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi"])
def test_a_resumed_server_optimizer_continues_as_if_the_run_had_never_stopped(strategy, tmp_path):
    cfg = _cfg(strategy, SERVER_LR=3.0, ADAPTIVE_LR=0.5, POOLED_BN_VAR=False, SAVE_DIR=str(tmp_path))
    rounds = [[(_arrays(1.0), 1), (_arrays(3.0), 1)], [(_arrays(2.0), 2), (_arrays(-1.0), 1)],
              [(_arrays(0.5), 1), (_arrays(4.0), 3)]]
    agg, w = Aggregator(cfg, TRAINABLE, BN_PAIRS), _arrays(0.0)
    for r, updates in enumerate(rounds[:2], 1):
        w = _round(agg, w, updates)
        agg.save_round(r)  # SAVE_DIR/server_state.npz, as after every round of a run
    straight = _round(agg, w, rounds[2])
    resumed = _round(Aggregator(cfg, TRAINABLE, BN_PAIRS, resumed=2), w, rounds[2])
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed))  # to the bit
    fresh = _round(Aggregator(cfg, TRAINABLE, BN_PAIRS), w, rounds[2])  # the optimizer from zero
    assert not np.allclose(fresh[0], straight[0])
    stale = _round(Aggregator(cfg, TRAINABLE, BN_PAIRS, resumed=1), w, rounds[2])  # another round's state: from zero
    assert all(np.array_equal(a, b) for a, b in zip(stale, fresh))


def test_a_fresh_run_in_the_folder_removes_an_earlier_runs_server_state_and_a_resumed_one_keeps_it(tmp_path):
    from utils.resume import start_save_dir

    files = ["metrics.csv", "momentum.npz", "server_state.npz", "clients/a.optimizer"]
    spec = {"names": ["a"], "hyp": {}, "lr_scale": 1.0, "datasets": [], "task": "detect", "model": {}}
    cfg = _cfg("fedadam", SAVE_DIR=str(tmp_path))
    for offset, kept in ((2, True), (0, False)):
        for f in files:
            (tmp_path / f).parent.mkdir(exist_ok=True)
            (tmp_path / f).write_bytes(b"x")
        start_save_dir(cfg, {"offset": offset, "spec": spec})
        assert [(tmp_path / f).exists() for f in files] == [kept] * len(files)


def test_robust_aggregators():
    updates = [(_arrays(v), n) for v, n in ((1.0, 1), (2.0, 1), (100.0, 5))]
    median = _round(Aggregator(_cfg("fedmedian"), TRAINABLE), _arrays(0.0), updates)
    np.testing.assert_allclose(median[0], 2.0)  # unweighted: the outlier's 5 images do not pull it
    assert median[4].dtype == np.int64 and median[4].shape == ()
    updates = [(_arrays(v), 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    trimmed = _round(Aggregator(_cfg("fedtrimmedavg", TRIM_BETA=0.2), TRAINABLE), _arrays(0.0), updates)
    np.testing.assert_allclose(trimmed[0], 3.0)  # 1 and 100 cut
    krum = _round(Aggregator(_cfg("krum", KRUM_F=1), TRAINABLE), _arrays(0.0), updates)
    assert float(krum[0][0, 0]) in (2.0, 3.0)  # a central update, never the outlier


def test_pooled_bn_variance():
    agg = Aggregator(_cfg("fedavg", POOLED_BN_VAR=True), TRAINABLE, BN_PAIRS)
    a, b = _arrays(0.0), _arrays(0.0)
    a[2][:], a[3][:], b[2][:], b[3][:] = -1.0, 1.0, 1.0, 1.0  # two clients: means -1 / +1, variance 1 each
    new = _round(agg, _arrays(0.0), [(a, 1), (b, 1)])
    np.testing.assert_allclose(new[2], 0.0)
    np.testing.assert_allclose(new[3], 2.0)  # the pooled data: 1 + spread of the means (1), not the mean variance 1


def test_fp16_transfer_is_exact_for_integers_and_precise_for_small_moves():
    rng = np.random.default_rng(0)
    sent = [rng.normal(0, 1, (64, 64)).astype(np.float32), np.array(123456789, np.int64)]
    trained = [sent[0] + rng.normal(0, 1e-3, (64, 64)).astype(np.float32), np.array(123456790, np.int64)]
    up = encode_update(trained, sent)
    assert up[0].dtype == np.float16 and up[1].dtype == np.int64
    back = decode_update(up, sent)
    assert int(back[1]) == 123456790
    err = np.abs(back[0] - trained[0]).max()
    assert err < 1e-6  # the change is sent, so the error scales with the 1e-3 move, not with the weights
    assert np.abs(to_half(trained)[0].astype(np.float32) - trained[0]).max() > 10 * err  # sending weights: worse


def test_strategy_settings_are_checked():
    assert all(check_strategy(_cfg(s), 5) is None for s in STRATEGIES)
    assert "is not one of" in check_strategy(_cfg("fedsgd"), 3)
    assert "proximal-mu" in check_strategy(_cfg("fedprox", PROXIMAL_MU=0.0), 3)
    assert "krum-f" in check_strategy(_cfg("krum", KRUM_F=1), 4)
    assert "trim-beta" in check_strategy(_cfg("fedtrimmedavg", TRIM_BETA=0.5), 3)

"""AVG_MOMENTUM: the clients' first moments averaged by the server, every client's next round started from the mean."""

import logging

import numpy as np
import pytest
import torch

import federated
from tests.conftest import FED, run_in_process
from utils import momentum
from utils.momentum import MomentumMean

BF16 = 2.0**-8  # the moments travel in bfloat16: 8 bits of mantissa, a relative rounding of at most 2^-9


def _state(rng, shapes=((3, 2), (4,), ()), v=100.0):
    """An optimizer state as utils/train.py get_optimizer_state returns it: per weight one array per key (second
    moments about `v`, 5 steps taken)."""
    keys = ["exp_avg", "exp_avg_sq", "step"]
    arrays = []
    for s in shapes:
        arrays += [rng.standard_normal(s).astype(np.float32), (v * (0.5 + rng.random(s))).astype(np.float32),
                   np.array(5.0, np.float32)]
    return keys, arrays


def _bound(v, t, beta1=0.9):
    """|m| <= sqrt(v) (1 - beta1^t) / sqrt(1 - beta2^t): Adam's bias-corrected |m_hat| <= sqrt(v_hat); 0 for a weight
    no step moved (the frozen DFL weights: t = 0)."""
    return np.sqrt(v.astype(np.float64)) * (1 - beta1**t) / np.sqrt(max(1 - momentum.BETA2**t, 1e-300))


def test_the_mean_replaces_the_first_moments_only_and_what_does_not_fit_changes_nothing():
    rng = np.random.default_rng(0)
    a, b = _state(rng), _state(rng)
    mean = MomentumMean()
    assert mean.config() == {}  # round 1: nothing to send yet
    for state, n in ((a, 1), (b, 3)):
        assert mean.check(momentum.encode(*state)["momentum"]) is None
        mean.add(momentum.encode(*state)["momentum"], n)
    mean.close()
    keys, got = momentum.receive(a, mean.config()["momentum"])
    for i in range(0, len(got), 3):  # per weight: exp_avg, exp_avg_sq, step
        np.testing.assert_allclose(got[i], (a[1][i] + 3 * b[1][i]) / 4, rtol=BF16)
        assert got[i].dtype == np.float32 and got[i].shape == a[1][i].shape
        assert got[i + 1] is a[1][i + 1] and got[i + 2] is a[1][i + 2]  # its own second moments and step count
    assert keys == a[0]
    sent = mean.config()["momentum"]
    mean.close()  # a round without any momentum (skipped): the last mean is sent again
    assert mean.config()["momentum"] == sent

    small = (a[0], [x * np.float32(1e-6) if i % 3 == 1 else x for i, x in enumerate(a[1])])  # v tiny: the others'
    got = momentum.receive(small, mean.config()["momentum"])[1]  # momentum is clipped to what its own v allows
    for i in range(0, len(got), 3):
        bound = _bound(small[1][i + 1], 5.0)
        assert np.all(np.abs(got[i]) <= bound * (1 + 1e-6)) and np.any(np.abs(got[i]) >= bound * (1 - 1e-6))
        wanted = np.clip((a[1][i] + 3 * b[1][i]) / 4, -bound, bound)
        np.testing.assert_allclose(got[i], wanted, rtol=BF16)

    other = _state(rng, shapes=((3, 2), (5,), ()))  # another model: one value more
    assert momentum.receive(other, mean.config()["momentum"]) is other
    assert momentum.receive(None, mean.config()["momentum"]) is None  # no state of its own: it starts fresh
    assert momentum.receive(a, None) is a  # no mean sent (round 1, a resumed run's first round)
    assert momentum.encode(["step"], [np.float32(1)]) == {}  # an optimizer without momentum sends none
    mean.add(momentum.encode(*a)["momentum"], 2)
    assert "12 values, the other clients' 11" in mean.check(momentum.encode(*other)["momentum"])
    assert mean.check("not bytes") == mean.check(b"abc") == "its momentum is not a bfloat16 buffer"


def test_the_mean_is_resumed_only_from_the_round_the_run_continues_after(tmp_path):
    rng = np.random.default_rng(1)
    mean = MomentumMean(tmp_path)
    mean.add(momentum.encode(*_state(rng))["momentum"], 1)
    mean.close()
    mean.save(4)
    assert MomentumMean(tmp_path, resumed=4).config() == mean.config()  # what round 5 would have been sent
    assert MomentumMean(tmp_path, resumed=3).config() == {}  # another round's mean: each client keeps its own
    assert MomentumMean(tmp_path).config() == {}  # a fresh run never reads it
    (tmp_path / momentum.FILE).write_bytes(b"damaged")
    assert MomentumMean(tmp_path, resumed=4).config() == {}


def test_avg_momentum_clients_start_each_round_from_the_image_weighted_mean_of_the_last(tiny_fed, tmp_path,
                                                                                          monkeypatch):
    received = []
    receive = momentum.receive

    def spy(state, data, beta1=0.9, who="a client", data_sq=None):
        out = receive(state, data, beta1, who, data_sq)
        received.append((who, state, data, out))
        return out

    monkeypatch.setattr(federated.momentum, "receive", spy)
    done = run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "run"), **FED,
                           "avg-momentum": True, "avg-second-moment": 0})
    first = [res for _, res in done.fits[1]]
    assert all(isinstance(res.metrics["momentum"], bytes) and "momentum_sq" not in res.metrics for res in first)
    n = np.array([res.num_examples for res in first], np.float64)
    sent = [momentum.unpack(res.metrics["momentum"]) for res in first]
    assert not np.array_equal(*sent)  # each its own images' momentum
    expected = momentum.unpack(momentum.pack(sum(m.astype(np.float64) * k for m, k in zip(sent, n)) / n.sum()))

    assert [data for _, _, data, _ in received[:2]] == [None, None]  # round 1: no state, no mean
    second = received[2:]
    assert len(second) == 2
    for who, own, data, out in second:
        assert np.array_equal(momentum.unpack(data), expected)  # what the server sent: the mean, in bfloat16
        keys = out[0]
        j, k, t = keys.index("exp_avg"), keys.index("exp_avg_sq"), keys.index("step")
        firsts = np.concatenate([a.ravel() for a in out[1][j::len(keys)]])
        bounds = np.concatenate([_bound(v, float(s)).ravel() for v, s in zip(own[1][k::len(keys)],
                                                                             own[1][t::len(keys)])])
        clipped = np.clip(expected, -bounds, bounds).astype(np.float32)
        assert np.array_equal(firsts, clipped)  # its optimizer starts round 2 from the mean, clipped by its own v
        assert np.mean(clipped == expected) > 0.5  # most of it as sent
        assert all(np.array_equal(x, y) for x, y in zip(own[1][k::len(keys)], out[1][k::len(keys)]))  # its own
    rows = (done.save / "metrics.csv").read_text().splitlines()
    assert "momentum" not in rows[0].split(",")  # it travels, it is not a metric
    header = rows[0].split(",")
    down = [int(float(r.split(",")[header.index("bytes_down")])) for r in rows[1:]]
    assert down[1] - down[0] == expected.size * 2  # round 2's fit message also carries the mean, 2 bytes a value

    # resumed after round 2: round 3's clients start from the mean round 2 made, as they would without the stop
    last = [res for _, res in done.fits[2]]
    n = np.array([res.num_examples for res in last], np.float64)
    expected = momentum.unpack(momentum.pack(sum(momentum.unpack(res.metrics["momentum"]).astype(np.float64) * k
                                                 for res, k in zip(last, n)) / n.sum()))
    received.clear()
    run_in_process({"resume": True, "save-dir": str(done.save), "num-rounds": 3},
                   given={"RESUME", "SAVE_DIR", "NUM_ROUNDS"})
    assert len(received) == 2
    for _, own, data, _ in received:
        assert own is not None and np.array_equal(momentum.unpack(data), expected)


def test_the_second_moment_sent_is_the_averaged_gradients_and_replaces_both_of_a_clients_moments():
    rng = np.random.default_rng(2)
    a, b = _state(rng), _state(rng, v=400.0)
    a[1][2] = np.array(7.0, np.float32)  # another step count for the first weight: its own bias correction
    mean, arrived = MomentumMean(second=4), []
    for state, n in ((a, 1), (b, 3)):
        sent = momentum.encode(*state, 0.9, second=True)
        assert mean.check(sent["momentum"], sent["momentum_sq"]) is None
        mean.add(sent["momentum"], n, sent["momentum_sq"])
        arrived.append({k: momentum.unpack(x).astype(np.float64) for k, x in sent.items()})  # as the server read it
    assert "none where they did" in mean.check(sent["momentum"])  # a client without a second moment among them
    mean.close()

    def corrected(state, key, beta):  # Adam's bias-corrected moment, float64
        keys, arrays = state
        j, t = keys.index(key), keys.index("step")
        return [arrays[i + j].astype(np.float64) / (1 - beta ** float(arrays[i + t])) for i in range(0, 9, 3)]

    m, v = ((arrived[0][k] + 3 * arrived[1][k]) / 4 for k in ("momentum", "momentum_sq"))  # the clients' mean
    want = m**2 + np.clip(v - m**2, 0, None) / 4
    sent = momentum.encode(*a, 0.9, second=True)  # to the bit: each moment divided in float64, rounded once
    for key, beta, name in (("exp_avg", 0.9, "momentum"), ("exp_avg_sq", momentum.BETA2, "momentum_sq")):
        assert sent[name] == momentum.pack(np.concatenate([x.ravel() for x in corrected(a, key, beta)]).astype(
            np.float32))
    got = {k: momentum.unpack(x) for k, x in mean.config().items()}
    np.testing.assert_allclose(got["momentum"], m, rtol=BF16)
    np.testing.assert_allclose(got["momentum_sq"], want, rtol=BF16)
    assert np.all(got["momentum_sq"] < v)  # smaller than the clients' own

    keys, out = momentum.receive(a, mean.config()["momentum"], 0.9, data_sq=mean.config()["momentum_sq"])
    for i, at in zip(range(0, 9, 3), np.cumsum([0] + [x.size for x in out[0:9:3]])):  # at its own step count
        t, w = float(a[1][i + 2]), slice(at, at + out[i].size)
        np.testing.assert_allclose(out[i].ravel(), m[w] * (1 - 0.9**t), rtol=2 * BF16)
        np.testing.assert_allclose(out[i + 1].ravel(), want[w] * (1 - momentum.BETA2**t), rtol=2 * BF16)
        assert out[i + 2] is a[1][i + 2]
    assert momentum.receive(a, mean.config()["momentum"], 0.9, data_sq=b"\0" * 8) is a  # does not fit: its own
    assert set(momentum.encode(*a, 0.9)) == {"momentum"}  # without AVG_SECOND_MOMENT: the first moment only


@pytest.mark.parametrize("flags, says", [
    (["--keep-optimizer", "false"], "it needs keep-optimizer"),
    (["--secagg"], "which secagg and dp-clip exist to protect"),
    (["--fedbn"], "which fedbn and share keep local"),
    (["--strategy", "krum"], "which strategy krum exists to prevent"),
    (["--avg-second-moment", "4", "--optimizer", "SGD"], "which optimizer SGD does not keep"),
    (["--avg-second-moment", "-1"], "avg-second-moment must be 0 (off) or more"),
])
def test_avg_momentum_is_refused_where_it_cannot_work(tiny_fed, tmp_path, refused, flags, says):
    status, last = refused("--datasets", *tiny_fed[0], "--avg-momentum", *flags, "--save-dir", tmp_path / "run")
    assert status != 0 and says in last
    assert not (tmp_path / "run").exists()


def test_avg_second_moment_needs_avg_momentum(tiny_fed, tmp_path, refused):
    status, last = refused("--datasets", *tiny_fed[0], "--avg-momentum", "false", "--avg-second-moment", "4",
                           "--save-dir", tmp_path / "run")
    assert status != 0 and "it needs avg-momentum" in last


def test_avg_second_moment_clients_start_round_two_from_the_averaged_gradients_moments(tiny_fed, tmp_path,
                                                                                       monkeypatch):
    received, receive = [], momentum.receive

    def spy(state, data, beta1=0.9, who="a client", data_sq=None):
        out = receive(state, data, beta1, who, data_sq)
        received.append((data, data_sq, out))
        return out

    monkeypatch.setattr(federated.momentum, "receive", spy)
    done = run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "run"), **FED,
                           "avg-momentum": True, "avg-second-moment": 2})
    first = [res for _, res in done.fits[1]]
    n = np.array([res.num_examples for res in first], np.float64)
    m, v = ((sum(momentum.unpack(res.metrics[k]).astype(np.float64) * w for res, w in zip(first, n)) /
             n.sum()).astype(np.float32).astype(np.float64) for k in ("momentum", "momentum_sq"))  # as averaged
    want = (m**2 + np.clip(v - m**2, 0, None) / 2).astype(np.float32)
    assert np.isfinite(m).all() and np.isfinite(v).all()  # the frozen weights (no step taken) send zeros
    assert np.mean(want < 0.9 * v) > 0.5  # for most weights a smaller second moment than the clients' mean

    assert [d for d, _, _ in received[:2]] == [None, None]  # round 1: no state, no mean
    for data, data_sq, (keys, out) in received[2:]:
        np.testing.assert_allclose(momentum.unpack(data_sq), want, rtol=BF16)  # bfloat16 rounding
        np.testing.assert_allclose(momentum.unpack(data), m, rtol=BF16)
        k, t = keys.index("exp_avg_sq"), keys.index("step")
        steps = np.concatenate([np.full(a.size, float(s)) for a, s in zip(out[k::len(keys)], out[t::len(keys)])])
        v_own = np.concatenate([a.ravel() for a in out[k::len(keys)]])
        np.testing.assert_allclose(v_own, momentum.unpack(data_sq) * (1 - momentum.BETA2**steps), rtol=1e-6)  # its v
    header, *rows = [r.split(",") for r in (done.save / "metrics.csv").read_text().splitlines()]
    down = [int(float(r[header.index("bytes_down")])) for r in rows]
    assert down[1] - down[0] == 2 * want.size * 2  # round 2's fit message carries both moments, 2 bytes a value
    saved = np.load(done.save / momentum.FILE)
    assert len(saved.files) == 3  # the round, the mean first and second moments: what a resumed round 3 is sent


@pytest.mark.parametrize("change, why", [
    ({"KEEP_OPTIMIZER": False}, "keep-optimizer is off"),
    ({"SECAGG": True}, "secagg and dp-clip protect"),
    ({"DP_CLIP": 1.0}, "secagg and dp-clip protect"),
    ({"FEDBN": True}, "fedbn and share keep weights local"),
    ({"SHARE": "backbone"}, "fedbn and share keep weights local"),
    ({"STRATEGY": "krum"}, "strategy krum must not average"),
    ({"OPTIMIZER": "SGD"}, "optimizer SGD has no Adam moments"),
])
def test_the_default_avg_momentum_turns_itself_off_beside_what_it_does_not_fit(change, why, caplog):
    cfg = {**federated.DEFAULTS, **change}
    with caplog.at_level(logging.INFO):
        momentum.defaults_off(cfg, set(change))
    assert (cfg["AVG_MOMENTUM"], cfg["AVG_SECOND_MOMENT"]) == (False, 0)
    assert caplog.text.count("are off for this run") == 1 and why in caplog.text
    assert momentum.check(cfg) is None  # the run goes on without them


def test_the_default_avg_momentum_stays_on_where_it_fits_and_a_set_value_is_left_to_the_checks(caplog):
    with caplog.at_level(logging.INFO):
        cfg = dict(federated.DEFAULTS)
        momentum.defaults_off(cfg, set(), "AdamW")
        assert (cfg["AVG_MOMENTUM"], cfg["AVG_SECOND_MOMENT"]) == (True, 4) and not caplog.text
        momentum.defaults_off(cfg, set(), "MuSGD")  # what OPTIMIZER=auto picks for a long run
        assert (cfg["AVG_MOMENTUM"], cfg["AVG_SECOND_MOMENT"]) == (False, 0) and "optimizer MuSGD" in caplog.text
    cfg = {**federated.DEFAULTS, "SECAGG": True}
    momentum.defaults_off(cfg, {"SECAGG", "AVG_MOMENTUM"})  # asked for by name: refused, not dropped
    assert cfg["AVG_MOMENTUM"] and "which secagg and dp-clip exist to protect" in momentum.check(cfg)
    cfg = {**federated.DEFAULTS, "OPTIMIZER": "SGD"}
    momentum.defaults_off(cfg, {"OPTIMIZER", "AVG_MOMENTUM"})  # SGD's momentum buffer: averaged, no second moment
    assert (cfg["AVG_MOMENTUM"], cfg["AVG_SECOND_MOMENT"]) == (True, 0) and momentum.check(cfg) is None


def test_avg_second_moment_asked_for_beside_secagg_is_refused_naming_why(tiny_fed, tmp_path, refused):
    status, last = refused("--datasets", *tiny_fed[0], "--secagg", "--avg-second-moment", "4", "--save-dir",
                           tmp_path / "run")
    assert status != 0 and "which does not run here: secagg and dp-clip protect" in last


def test_the_moments_travel_as_bfloat16_rounded_to_nearest_even_as_torch_rounds():
    x = np.random.default_rng(3).standard_normal(10000).astype(np.float32) * np.float32(1e-7)
    x[:4] = [0.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1e-40]  # ties to even (down, then up), a subnormal
    data = momentum.pack(x)
    assert len(data) == 2 * x.size
    assert np.array_equal(momentum.unpack(data), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert momentum.unpack(data)[1:3].tolist() == [1.0, 1.0 + 4 * 2.0**-8]

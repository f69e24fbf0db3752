"""Differential privacy: clipping bounds every change, the noise has its configured spread, epsilon is accounted."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from tests.conftest import FED, ROOT, run_in_process
from utils.params import load_npz
from utils.privacy import adaptive_noise, check_privacy, epsilon, next_clip, private_mean


def _model(rng, big=1000):
    """A float weight, a BatchNorm mean/var pair and an integer buffer, like a state_dict."""
    return [rng.normal(size=(big,)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32),
            np.full((8,), 0.01, np.float32), np.array(5, np.int64)]


def _change_norm(new, old):
    return float(np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(new, old) if a.dtype.kind == "f")))


def test_clipping_bounds_every_change_and_the_mean_is_unweighted():
    rng = np.random.default_rng(0)
    current = _model(rng)
    far = [a + 10 if a.dtype.kind == "f" else a + 7 for a in current]  # norm ~ 10 * sqrt(1016), far above the clip
    new, info = private_mean([far], current, clip=0.5, noise=0.0)
    assert _change_norm(new, current) == pytest.approx(0.5, rel=1e-4)  # scaled down to the clip exactly
    assert info["dp_clipped"] == 1 and info["dp_update_norm"] == pytest.approx(10 * np.sqrt(1016), rel=1e-4)
    assert new[3] == current[3] and new[3].dtype == np.int64  # integer buffers: the global value, never a client's

    near = [[a + s if a.dtype.kind == "f" else a for a in current] for s in (1e-4, 3e-4)]  # both below the clip
    new, info = private_mean(near, current, clip=0.5, noise=0.0)
    assert info["dp_clipped"] == 0
    for a, b in zip(new[:3], current[:3]):
        assert np.allclose(a - b, 2e-4, atol=1e-6)  # the plain mean: every client counts once

    new, info = private_mean([list(current), near[1]], current, clip=0.5, noise=0.0)  # a client that did not move
    assert info["dp_update_norm"] == pytest.approx(np.sqrt(1016) * 1.5e-4, rel=1e-3)  # median of 0 and 3e-4 x ...
    assert np.allclose(new[0] - current[0], 1.5e-4, atol=1e-6)  # counts as a zero change (Flower's clip divides by 0)


def test_noise_has_the_configured_standard_deviation():
    rng = np.random.default_rng(1)
    current = _model(rng, big=400_000)
    clients, clip, z = 4, 0.5, 2.0
    new, info = private_mean([list(current)] * clients, current, clip=clip, noise=z)  # no change: only noise
    noise = (new[0].astype(np.float64) - current[0])
    expected = z * clip / clients
    assert info["dp_noise_std"] == expected
    # 400k samples: the sample std is within 0.5% of the true one with overwhelming probability (~ 1/sqrt(2n))
    assert noise.std() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean()) < 5 * expected / np.sqrt(noise.size)


def test_a_noised_running_var_is_never_negative():
    rng = np.random.default_rng(2)
    current = _model(rng)
    new, _ = private_mean([list(current)] * 2, current, clip=1.0, noise=1.0, var_entries=[2])
    assert (new[2] >= 0).all() and (new[2] == 0).any()  # var 0.01 with noise std 0.5: most clamped at 0


def _exact_gaussian_epsilon(z, rounds, delta):
    """Epsilon of `rounds` composed Gaussian mechanisms (noise multiplier z), exactly: one of mu = sqrt(T) / z."""
    mu = np.sqrt(rounds) / z

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0, 500)


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (1.1, 15), (0.8, 50), (4.0, 100)])
def test_epsilon_is_a_valid_and_tight_bound(z, rounds):
    """RDP accounting is an upper bound on the exact privacy loss of the composed Gaussian mechanism, and close."""
    exact = _exact_gaussian_epsilon(z, rounds, 1e-5)
    eps = epsilon(z, rounds, 1e-5)
    assert exact <= eps <= 1.35 * exact, (exact, eps)


def test_epsilon_edges():
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(0.0, 3, 1e-5) == float("inf")  # clipping without noise protects nothing
    assert epsilon(1.0, 10, 1e-5) > epsilon(1.0, 5, 1e-5) > epsilon(2.0, 5, 1e-5)


def test_privacy_settings_are_checked():
    cfg = {"DP_CLIP": 1.0, "DP_NOISE": 1.0, "DP_DELTA": 1e-5, "STRATEGY": "fedavg", "FEDBN": False,
           "DP_ADAPTIVE": False, "DP_QUANTILE": 0.5}
    assert check_privacy(cfg) is None
    assert check_privacy({**cfg, "DP_CLIP": 0.0, "STRATEGY": "krum"}) is None  # off: anything goes
    assert "fedmedian cannot be used with dp-clip" in check_privacy({**cfg, "STRATEGY": "fedmedian"})
    assert "fedbn cannot be used with dp-clip" in check_privacy({**cfg, "FEDBN": True})
    assert "dp-delta" in check_privacy({**cfg, "DP_DELTA": 1.0})
    assert "dp-noise" in check_privacy({**cfg, "DP_NOISE": -1.0})
    adaptive = {**cfg, "DP_ADAPTIVE": True}
    assert check_privacy(adaptive, 11) is None
    assert "dp-quantile" in check_privacy({**adaptive, "DP_QUANTILE": 1.0}, 11)
    assert check_privacy(adaptive, 10).startswith("dp-noise 1.0 is too large for dp-adaptive with 10 clients")


@pytest.mark.parametrize("noise, clients", [(0.5, 20), (1.0, 100), (0.1, 3)])
def test_adaptive_clipping_splits_the_noise_as_flower_does(noise, clients):
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    assert adaptive_noise(noise, clients) == pytest.approx(compute_adaptive_noise_params(noise, clients, None))
    count_std, update = adaptive_noise(noise, clients)
    assert update > noise and (update ** -2 + (2 * count_std) ** -2) ** -0.5 == pytest.approx(noise)  # one budget


def test_adaptive_clip_moves_toward_the_quantile():
    assert next_clip(1.0, 0, 4, 0.0, 0.5) == pytest.approx(np.exp(0.1))  # every change clipped: the clip grows
    assert next_clip(1.0, 4, 4, 0.0, 0.5) == pytest.approx(np.exp(-0.1))  # none clipped: it shrinks
    assert next_clip(2.0, 2, 4, 0.0, 0.5) == pytest.approx(2.0)  # at the quantile: it stays
    steps = [np.log(next_clip(1.0, 2, 4, 1.0, 0.5)) for _ in range(4000)]  # noised count: std 1 / 4 clients
    assert np.mean(steps) == pytest.approx(0.0, abs=0.003) and np.std(steps) == pytest.approx(0.2 / 4, rel=0.05)


@pytest.mark.parametrize("secagg", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_private_run_records_the_privacy_spent_and_moves_the_model_at_most_the_clip(tiny_fed, tmp_path, secagg):
    """Server-side clipping; with SecAgg+ the clients clip their own changes, to a clip that adapts each round, and
    the server noises the secure mean."""
    save, clip, z = tmp_path / "run", 0.05, 1e-4  # noise norm std x sqrt(3.2M entries) ~ 0.005: the clip shows
    if secagg:  # SecAgg+ is Flower's workflow over the message grid: a real simulation
        cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, tiny_fed[0][:2]), "--num-rounds",
               "2", "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(save),
               "--dp-clip", str(clip), "--dp-noise", str(z), "--evaluate", "false", "--secagg", "--dp-adaptive"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        log = r.stdout + r.stderr
    else:  # server-side DP: the same run with the strategy and clients in this process (tests/conftest.py)
        log = run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED,
                              "dp-clip": clip, "dp-noise": z, "evaluate": False}).log
    assert "differential privacy: each client's change clipped to norm 0.05" in log
    assert ("secure aggregation (SecAgg+)" in log) == secagg

    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    clips = [float(row["dp_clip"]) for row in rows]
    assert clips[0] == clip
    if secagg:  # both clients clipped in round 1: the clip grows by exp(0.2 x (0.5 - noised 0/2)), count std 0.1
        assert np.log(clips[1] / clip) == pytest.approx(0.1, abs=0.05)
    else:
        assert clips[1] == clip
    for row, c in zip(rows, clips):
        r_ = int(row["round"])
        assert float(row["dp_epsilon"]) == pytest.approx(epsilon(z, r_, 1e-5), rel=1e-5)  # csv: 6 digits
        assert float(row["dp_noise_std"]) == pytest.approx(z * c / 2, rel=1e-5)
        assert int(row["dp_clipped"]) == 2  # real training moves far more than the clip
        assert secagg or float(row["dp_update_norm"]) > clip  # under SecAgg+ no client reports its norm
    config = json.loads((save / "config.json").read_text())
    assert config["privacy"]["epsilon"] == pytest.approx(epsilon(z, 2, 1e-5))

    from utils.model import build_model, read_base
    from utils.params import get_weights

    arch, _ = read_base("yolov8n.yaml")
    model = build_model(arch, ["circle", "square", "triangle", "cross"], seed=0)
    start = get_weights(model)
    one, two = load_npz(save / "round1.npz"), load_npz(save / "round2.npz")
    size = np.sqrt(sum(a.size for a in start if a.dtype.kind == "f"))
    quantization = 0.0
    if secagg:  # SecAgg+'s quantization error: below one level per entry (BatchNorm statistics: coarser)
        from federated import DEFAULTS
        from utils.secure import STAT_SCALE

        params, step = {k for k, _ in model.named_parameters()}, 2 * DEFAULTS["SECAGG_CLIP"] / DEFAULTS["SECAGG_QUANT"]
        quantization = np.sqrt(sum((a.size * (step if k in params else step * STAT_SCALE) ** 2)
                                   for k, a in zip(model.state_dict(), start) if a.dtype.kind == "f"))
    for (new, old), c in zip(((one, start), (two, one)), clips):  # a mean of changes of norm <= c has norm <= c
        noise = z * c / 2 * size  # the noise vector's norm
        assert 0.5 * c < _change_norm(new, old) <= c + 1.5 * noise + quantization

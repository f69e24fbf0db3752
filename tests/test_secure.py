"""Secure aggregation (SecAgg+): the strategy only ever gets the mean, which matches FedAvg; dropouts are survived."""

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT
from utils.params import load_npz
from utils.secure import STAT_SCALE, check_secagg, clipped_entries, decode, encode

CFG = {"SECAGG": True, "SECAGG_SHARES": 3, "SECAGG_THRESHOLD": 2, "SECAGG_CLIP": 8.0, "SECAGG_QUANT": 2**22,
       "STRATEGY": "fedavg", "DP_CLIP": 0.0, "POOLED_BN_VAR": False, "FP16": "off"}


def test_encode_then_decode_adds_the_weighted_mean_change():
    rng = np.random.default_rng(0)
    current = [rng.normal(size=(5, 3)).astype(np.float32), np.full(4, 30.0, np.float32), np.array(7, np.int64)]
    trainable = [True, False, False]  # a weight, a BatchNorm running_var, num_batches_tracked
    trained = [[c + rng.normal(size=c.shape).astype(c.dtype) * s for c, s in zip(current, (0.01, 20.0, 0))]
               for _ in range(2)]
    trained[0][2], trained[1][2] = np.array(9, np.int64), np.array(11, np.int64)
    sent = [encode(t, current, trainable) for t in trained]
    assert all(a.dtype == np.float32 for s in sent for a in s)
    np.testing.assert_allclose(sent[0][1], (trained[0][1] - current[1]) / STAT_SCALE, rtol=1e-6)  # stats scaled in
    assert sent[0][2] == 0  # integer buffers contribute nothing
    weights = (3, 1)
    mean = [sum(w * s[i].astype(np.float64) for w, s in zip(weights, sent)) / 4 for i in range(3)]
    new = decode(mean, current, trainable)
    for i in (0, 1):
        expected = sum(w * t[i].astype(np.float64) for w, t in zip(weights, trained)) / 4
        np.testing.assert_allclose(new[i], expected, rtol=1e-5, atol=1e-5)
        assert new[i].dtype == current[i].dtype
    assert new[2] == 7  # the global integer buffer is kept


def test_clipped_entries_counts_what_secagg_would_cut():
    change = [np.array([0.5, -7.9, 9.0], np.float32), np.array([-20.0], np.float32)]
    assert clipped_entries(change, 10, 10, 8.0) == 2
    assert clipped_entries(change, 5, 10, 8.0) == 1  # weight 0.5: only -20 * 0.5 stays beyond 8


def test_secagg_settings_and_conflicts_are_refused_in_one_line():
    assert check_secagg({**CFG, "SECAGG": False, "STRATEGY": "krum"}, 1) is None  # off: anything goes
    assert check_secagg(CFG, 3) is None
    assert "secagg-threshold (3)" in check_secagg({**CFG, "SECAGG_THRESHOLD": 3}, 3)
    assert "secagg-shares (2)" in check_secagg({**CFG, "SECAGG_SHARES": 2}, 3)
    assert "at least 2 clients" in check_secagg(CFG, 1)
    assert "below 2**32" in check_secagg({**CFG, "SECAGG_QUANT": 2**30}, 4)
    assert "secagg cannot be used with strategy fedmedian" in check_secagg({**CFG, "STRATEGY": "fedmedian"}, 3)
    assert check_secagg({**CFG, "DP_CLIP": 1.0}, 3) is None  # the clients clip (tests/test_privacy.py)
    assert "pooled-bn-var" in check_secagg({**CFG, "POOLED_BN_VAR": True}, 3)
    assert "fp16" in check_secagg({**CFG, "FP16": "up"}, 3)


def test_command_line_refuses_secagg_with_a_robust_strategy(tiny_fed, tmp_path, refused):
    status, last = refused("--datasets", *tiny_fed[0], "--secagg", "--strategy", "krum", "--save-dir", tmp_path / "run")
    assert status != 0 and "secagg cannot be used with strategy krum" in last
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_command_line_refuses_secagg_with_eval_in_fit(tiny_fed, tmp_path, refused):
    status, last = refused("--datasets", *tiny_fed[0], "--secagg", "--eval-in-fit", "--save-dir", tmp_path / "run")
    assert status != 0 and "eval-in-fit sends each client's scores with its update" in last
    assert not (tmp_path / "run").exists()


def test_pooled_bn_var_steps_aside_under_secagg_unless_asked_for(tiny_fed, tmp_path, refused):
    import federated
    from utils.config import resolve

    cfg = resolve(federated.DEFAULTS, {"datasets": [str(d) for d in tiny_fed[0]], "secagg": True,
                                       "save-dir": str(tmp_path / "a")})
    assert cfg["POOLED_BN_VAR"]  # on by default
    federated.prepare(cfg)  # SecAgg+ hides each client's BatchNorm means: the default turns it off
    assert not cfg["POOLED_BN_VAR"]
    status, last = refused("--datasets", *tiny_fed[0], "--secagg", "--pooled-bn-var", "--save-dir", tmp_path / "b")
    assert status != 0 and "secagg cannot be used with pooled-bn-var" in last


SPY = """
import hashlib, json, shutil, sys
sys.path.insert(0, {root!r})
import federated

seen, drop = {{}}, {drop!r}
aggregate_fit = federated.SaveFedAvg.aggregate_fit


def spy(self, server_round, results, failures):
    seen[server_round] = [{{"sha": hashlib.sha1(b"".join(res.parameters.tensors)).hexdigest(),
                           "n": res.num_examples}} for _, res in results]
    with open({out!r}, "w") as f:
        json.dump(seen, f)
    out = aggregate_fit(self, server_round, results, failures)
    if str(server_round) in drop:  # this client loses its data now: it fails while training the next round
        shutil.rmtree(drop[str(server_round)])
    return out


federated.SaveFedAvg.aggregate_fit = spy
federated.main({argv!r})
"""


@pytest.mark.slow
def test_secure_rounds_match_fedavg_hide_each_update_and_survive_dropouts(tiny_fed, tmp_path):
    from utils.model import build_model, read_base
    from utils.params import get_weights

    clients = []
    for src in tiny_fed[0]:  # copies: two of them lose their images during the run
        mine = tmp_path / src.parent.name
        shutil.copytree(src.parent, mine)
        (mine / "data.yaml").write_text(src.read_text().replace(str(src.parent), str(mine)))
        clients.append(mine / "data.yaml")
    args = ["--datasets", *map(str, clients), "--num-rounds", "3", "--epochs", "1", "--imgsz", "32", "--batch", "4",
            "--device", "cpu", "--evaluate", "false"]  # the same schedule in both runs (it spans all rounds)
    plain = subprocess.run([sys.executable, str(ROOT / "federated.py"), *args, "--save-dir", str(tmp_path / "plain"),
                            "--pooled-bn-var", "false"],  # as under SecAgg+: the clients' variances averaged
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-3000:]

    save, seen = tmp_path / "secure", tmp_path / "seen.json"
    drop = {"1": str(clients[1].parent / "images"), "2": str(clients[2].parent / "images")}
    script = tmp_path / "spy.py"
    script.write_text(textwrap.dedent(SPY).format(root=str(ROOT), drop=drop, out=str(seen), argv=[
        *args, "--save-dir", str(save), "--secagg"]))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "secure aggregation (SecAgg+): the server sees only the sum" in log

    # The strategy never gets a client's own update: every result of a round carries the same arrays (the mean).
    calls = json.loads(seen.read_text())
    assert [len(calls[k]) for k in ("1", "2", "3")] == [3, 2, 0]
    for k in ("1", "2"):
        assert len({c["sha"] for c in calls[k]}) == 1 and all(c["n"] == 8 for c in calls[k])

    # Round 1 equals plain FedAvg of the same three trained clients, within SecAgg+'s quantization error.
    arch, _ = read_base("yolov8n.yaml")
    model = build_model(arch, ["circle", "square", "triangle", "cross"], seed=0)
    params = {k for k, _ in model.named_parameters()}
    trainable = [k in params for k in model.state_dict()]
    start, fedavg = get_weights(model), load_npz(tmp_path / "plain" / "round1.npz")
    secure = load_npz(save / "round1.npz")
    step = 2 * 8.0 / 2**22  # one quantization level; each client's error is below one, so the mean's too (equal sizes)
    for train, tol in ((True, step + 1e-6), (False, step * STAT_SCALE + 1e-5)):
        idx = [i for i, t in enumerate(trainable) if t == train and start[i].dtype.kind == "f"]
        diff = max(float(np.abs(secure[i].astype(np.float64) - fedavg[i]).max()) for i in idx)
        moved = max(float(np.abs(fedavg[i].astype(np.float64) - start[i]).max()) for i in idx)
        assert diff <= tol < moved / 100, (train, diff, tol, moved)

    # Round 2: client light failed while training; its masks were rebuilt and the round is the others' mean.
    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["updates"] for row in rows] == ["3", "2", "0"]
    assert int(rows[0]["bytes_up"]) > 1.9 * int(rows[0]["bytes_down"])  # int64 masked vectors: twice float32
    assert float(rows[0]["train_secagg_clipped"]) == 0
    one, two, three = (load_npz(save / f"round{i}.npz") for i in (1, 2, 3))
    change = max(float(np.abs(b.astype(np.float64) - a).max()) for a, b, t in zip(one, two, trainable) if t)
    assert 0 < change < 1.0  # a mask left in the sum would throw weights by up to +-8 (the clipping range)
    round_lines = [line for line in log.splitlines() if "round 2/3" in line and "elapsed" in line]
    assert round_lines and "1 failed: client light: " in round_lines[0] and "does not exist" in round_lines[0]

    # Round 3: two of three clients failed, too few to rebuild the masks: skipped, the global model kept.
    assert all(np.array_equal(a, b) for a, b in zip(two, three))
    round3 = next(line for line in log.splitlines() if "round 3/3" in line and "elapsed" in line)
    assert "skipped (0 valid updates)" in round3 and "secure aggregation halted" in round3

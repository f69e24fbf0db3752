"""The same app on Flower's Deployment Engine: a TLS SuperLink and SuperNodes as real processes on 127.0.0.1."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, export_cli

BIN = Path(sys.executable).parent
NAMES = "circle,square,triangle,cross"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink with TLS certificates from deploy/make_certs.sh, and SuperNodes; `close()` stops every process."""

    def __init__(self, tmp, auth=False):
        self.tmp, self.auth, self.procs, self.port = tmp, auth, [], _free_port()
        self.env = {**os.environ, "FLWR_HOME": str(tmp / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        (tmp / "flwr-home").mkdir()
        self.certs = tmp / "certs"
        subprocess.run(["bash", str(ROOT / "deploy" / "make_certs.sh"), "127.0.0.1", str(self.certs)], check=True,
                       capture_output=True)
        (tmp / "flwr-home" / "config.toml").write_text(
            f'[superlink.fed]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')

    def _start(self, name, cmd):
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log_path = self.tmp / f"{name}.log"
        self.procs.append(p)
        return p

    def superlink(self):
        """Start the SuperLink and wait until it accepts connections."""
        c = self.certs
        cmd = [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
               str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"), "--port", str(self.port),
               "--disable-runtime-dependency-installation"]  # in-memory state: see docs/deployment.md
        p = self._start("superlink", cmd + (["--enable-supernode-auth"] if self.auth else []))
        deadline = time.time() + 90
        while time.time() < deadline:
            assert p.poll() is None, p.log_path.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return p
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("the SuperLink did not start")

    def supernode(self, name, dataset=None, key=None, retries=None):
        """Start one SuperNode (one data owner) with its dataset in node config."""
        cmd = [str(BIN / "flower-supernode"), "--root-certificates", str(self.certs / "ca.crt"),
               "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port())]
        if dataset is not None:
            cmd += ["--node-config", f'dataset="{dataset}"']
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if retries is not None:
            cmd += ["--max-retries", str(retries)]
        return self._start(name, cmd)

    def flwr(self, *args, timeout=600):
        """Run the flwr CLI against this deployment (federation `fed`)."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def close(self):
        """Stop every process this deployment started, whatever happened, and the apps their SuperExecs started
        (a ServerApp or ClientApp process can outlive its SuperLink or SuperNode when a test fails mid-run)."""
        apps = [c for p in self.procs if p.poll() is None for c in _children(p.pid)]
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for c in apps:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


def _children(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture()
def deployment(tmp_path):
    made = []

    def make(auth=False):
        made.append(Deployment(tmp_path, auth))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _run_config(save, rounds, told=True):
    """The run config of a test run; `told` False: no names and min-clients, which the SuperNodes then give."""
    return ((f'names="{NAMES}" min-clients=2 ' if told else "") +
            f'num-rounds={rounds} epochs=1 imgsz=32 batch=4 device="cpu" save-dir="{save}"')


def _start_run(d, config):
    """Start `flwr run` with this run config in the background; its process is stopped with the deployment."""
    run = subprocess.Popen([str(BIN / "flwr"), "run", ".", "fed", "--stream", "--run-config", config], cwd=ROOT,
                           env=d.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    d.procs.append(run)
    return run


def _wait_for_clientapps(node, n):
    """Wait until the SuperNode `node` has started its n-th ClientApp process (one per message it handles: the first
    says who the node is, then one per training or evaluation)."""
    deadline = time.time() + 300
    while time.time() < deadline and node.log_path.read_text().count("Start `flwr-clientapp` process") < n:
        time.sleep(0.1)


@pytest.mark.slow
def test_unregistered_supernode_is_refused_when_auth_is_on(deployment, tmp_path):
    d = deployment(auth=True)
    d.superlink()
    keys = {}
    for n in ("registered", "stranger"):
        keys[n] = tmp_path / f"{n}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(keys[n])],
                       check=True)
    r = d.flwr("supernode", "register", str(keys["registered"]) + ".pub", "fed", timeout=60)
    assert r.returncode == 0 and "registered successfully" in r.stdout, r.stdout + r.stderr

    good = d.supernode("registered", key=keys["registered"])
    bad = d.supernode("stranger", key=keys["stranger"], retries=1)

    assert bad.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in bad.log_path.read_text()
    time.sleep(2)
    assert good.poll() is None, good.log_path.read_text()[-2000:]  # the registered node stays connected


@pytest.mark.slow
def test_tls_is_required_and_a_wrong_ca_fails_fast(deployment, tmp_path):
    d = deployment()
    r = subprocess.run([str(BIN / "flower-superlink"), "--port", str(_free_port()), "--database", ":memory:"],
                       capture_output=True, text=True, timeout=120, env=d.env, cwd=tmp_path)
    assert r.returncode != 0 and "Certificates are required unless running in insecure mode" in r.stdout + r.stderr

    d.superlink()
    other = tmp_path / "other-ca"
    subprocess.run(["bash", str(ROOT / "deploy" / "make_certs.sh"), "127.0.0.1", str(other)], check=True,
                   capture_output=True)
    d.certs, real = other, d.certs  # a SuperNode that trusts another CA
    node = d.supernode("wrong-ca", retries=1)
    d.certs = real
    start = time.time()
    assert node.wait(timeout=120) != 0
    assert time.time() - start < 120 and "CERTIFICATE_VERIFY_FAILED" in node.log_path.read_text()


@pytest.mark.slow
def test_tls_deployment_two_supernodes_two_rounds(deployment, tiny_fed, tmp_path):
    d = deployment()
    d.superlink()
    for i, ds in enumerate(tiny_fed[0][:2]):
        d.supernode(f"node{i}", ds)
    save = tmp_path / "run"

    dp = " dp-clip=1000.0 dp-noise=0.0001 dp-delta=0.001"  # differential privacy runs in the ServerApp too
    eval_last = " eval-every=2"  # the clients validate after round 2 only: fewer ClientApp processes
    r = d.flwr("run", ".", "fed", "--stream", "--run-config", _run_config(save, 2, told=False) + dp + eval_last)

    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    from utils.classes import union_names
    from utils.datasets import check_dataset

    names = union_names([check_dataset(f) for f in tiny_fed[0][:2]], tiny_fed[0][:2])[0]  # what a simulation uses
    assert f"the federation's classes ({len(names)}): {', '.join(names)}" in log  # told by the SuperNodes
    assert "round 2/2" in log and "differential privacy: each client's change clipped to norm 1000" in log
    assert f"done: 2 rounds in {save}" in log and "best model" in log  # the run's outputs, named under flwr run too
    assert (save / "round1.npz").is_file() and (save / "round2.npz").is_file()
    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["round"] for row in rows] == ["1", "2"] and rows[1]["map50_95_dark"] != ""
    from utils.privacy import epsilon

    for row in rows:  # the privacy spent after each round, as the accountant computes it
        assert float(row["dp_epsilon"]) == pytest.approx(epsilon(0.0001, int(row["round"]), 0.001), rel=1e-5)
    status, last = export_cli("yolov8n.yaml", save / "round2.npz")
    assert status == 0, last
    from ultralytics import YOLO

    assert list(YOLO(str(save / "round2.pt")).names.values()) == names


# -- A site that fails ------------------------------------------------------------------------------------------------
# Three federations with a SuperNode that fails: its dataset is missing; it is killed mid-round (then restarted); it
# is killed mid-round under SecAgg+. Most of each run is waiting (for Flower's heartbeat to declare a dead node gone,
# about a minute), so the three run at once, each in its own thread, started when the first of their tests asks; each
# test then checks its own run. (Not more at once: with five such runs on 2 cores, a ClientApp's reply was lost in
# Flower's transport and its run, without a round deadline, waited for it until the test's timeout.)


def _missing_dataset(d, tiny_fed, save):
    d.superlink()
    d.supernode("good", tiny_fed[0][0])
    d.supernode("broken", save.parent / "gone" / "data.yaml")
    return _start_run(d, _run_config(save, 1) + " evaluate=false")


def _killed_and_restarted(d, tiny_fed, save):
    d.superlink()
    d.supernode("steady", tiny_fed[0][0])
    victim = d.supernode("victim", tiny_fed[0][1])
    run = _start_run(d, _run_config(save, 2) + " evaluate=false")  # no evaluation: fewer ClientApp processes
    _wait_for_clientapps(victim, 2)  # the second one trains round 1
    os.killpg(victim.pid, signal.SIGKILL)  # the data owner's machine dies while it trains round 1
    victim.wait()
    d.supernode("victim-restarted", tiny_fed[0][1])
    return run


def _killed_under_secagg(d, tiny_fed, save):
    d.superlink()
    d.supernode("steady0", tiny_fed[0][0])
    d.supernode("steady1", tiny_fed[0][1])
    victim = d.supernode("victim", tiny_fed[0][2])
    dp = " dp-clip=1000.0 dp-noise=0.00001 dp-delta=0.001"  # with SecAgg+, the clients clip their own changes
    config = _run_config(save, 2).replace("min-clients=2", "min-clients=3") + " secagg=true evaluate=false" + dp
    run = _start_run(d, config)
    _wait_for_clientapps(victim, 4)  # then SecAgg+ starts one per stage: setup, share keys, then train + mask
    os.killpg(victim.pid, signal.SIGKILL)  # after it shared its secrets, before it sent its masked update
    victim.wait()
    d.supernode("victim-restarted", tiny_fed[0][2])
    return run


SCENARIOS = (_missing_dataset, _killed_and_restarted, _killed_under_secagg)


@pytest.fixture(scope="module")
def runs(tiny_fed, tmp_path_factory):
    """{scenario name: a future of (the `flwr run` log, its exit status, the run's save-dir)} for the three runs above,
    all started at once; every process is stopped at the end of this module."""
    from concurrent.futures import ThreadPoolExecutor

    made = []

    def scenario(how):
        tmp = tmp_path_factory.mktemp(how.__name__.strip("_"))
        made.append(Deployment(tmp))
        save = tmp / "run"
        run = how(made[-1], tiny_fed, save)
        log, _ = run.communicate(timeout=900)
        return log, run.returncode, save

    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    futures = {how.__name__.strip("_"): pool.submit(scenario, how) for how in SCENARIOS}
    yield futures
    for d in made:  # a run still going (a test failed early) ends here, and its thread with it
        d.close()
    pool.shutdown(wait=True)
    for d in made:
        d.close()


@pytest.mark.slow
def test_supernode_with_missing_dataset_fails_its_part_only(runs):
    log, code, save = runs["missing_dataset"].result()

    assert code == 0, log[-3000:]
    # it cannot say what it holds: named with its error before round 1, asked again each round, never sampled
    assert "could not say what it holds" in log and "does not exist" in log and "round 1/1" in log
    assert (save / "round1.npz").is_file()
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    assert (rows[0]["sampled"], rows[0]["updates"]) == ("1", "1")


@pytest.mark.slow
def test_supernode_killed_mid_round_then_restarted_rejoins(runs):
    log, code, save = runs["killed_and_restarted"].result()

    assert code == 0, log[-3000:]
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    assert [row["round"] for row in rows] == ["1", "2"]
    assert rows[0]["updates"] == "1" and rows[1]["updates"] == "2"  # round 1 without it, round 2 with it again


@pytest.mark.slow
def test_secagg_deployment_survives_a_supernode_killed_while_it_trains(runs):
    log, code, save = runs["killed_under_secagg"].result()

    assert code == 0, log[-3000:]
    assert "secure aggregation (SecAgg+)" in log
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    assert [row["updates"] for row in rows] == ["2", "3"]  # round 1: the victim's masks rebuilt from its shares
    from utils.privacy import epsilon

    for row in rows:  # noise on the mean of the clients that made it into the secure sum
        assert float(row["dp_noise_std"]) == pytest.approx(0.00001 * 1000.0 / int(row["updates"]), rel=1e-5)
        assert float(row["dp_epsilon"]) == pytest.approx(epsilon(0.00001, int(row["round"]), 0.001), rel=1e-5)
    from utils.model import build_model, read_base
    from utils.params import get_weights, load_npz

    model = build_model(read_base("yolov8n.yaml")[0], NAMES.split(","), seed=0)
    params = {k for k, _ in model.named_parameters()}
    start, one = get_weights(model), load_npz(save / "round1.npz")
    keys = list(model.state_dict())
    change = max(float(abs(b.astype(float) - a).max()) for a, b, k in zip(start, one, keys) if k in params)
    assert 0 < change < 1.0  # a mask left in the sum would throw weights by up to +-8 (the clipping range)


@pytest.mark.slow
def test_a_supernode_that_stalls_mid_round_is_late_and_its_work_never_lands_later(deployment, tiny_fed, tmp_path):
    d, save = deployment(), tmp_path / "run"
    d.superlink()
    d.supernode("steady", tiny_fed[0][0])
    victim = d.supernode("victim", tiny_fed[0][1])
    # Flower declares a silent SuperNode gone 60 s after its last heartbeat, which it sends every 21-27 s: at least
    # 33 s after the stall. A deadline of 25 s ends round 1 before that, so the site is late, not failed; the steady
    # site needs about 8 s of it (on a machine of its own: this test does not run beside the three above). Stopping
    # only the site's ClientApp is no stall: its SuperNode starts another one for the same message after 30 s.
    run = _start_run(d, _run_config(save, 2, told=False) + " round-timeout=25.0 evaluate=false")
    _wait_for_clientapps(victim, 2)  # the second one trains round 1
    os.killpg(victim.pid, signal.SIGSTOP)  # the site's machine stalls (a busy GPU, a swapped-out process) mid-round
    deadline = time.time() + 300
    while time.time() < deadline and not ((save / "metrics.csv").exists() and (save / "round1.npz").exists()):
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGCONT)  # it wakes during round 2 and sends its stale round-1 update

    log, _ = run.communicate(timeout=600)

    assert run.returncode == 0, log[-3000:]
    assert "1 late: client light" in log, "\n".join(x for x in log.splitlines() if "round" in x or "fail" in x)
    rows = list(csv.DictReader((save / "metrics.csv").open()))
    assert [(row["round"], row["updates"], row["late"]) for row in rows[:1]] == [("1", "1", "1")]
    # round 2: the steady site's update, and the woken site's fresh one or its lateness (a slow machine may not finish
    # its stale round 1 and then round 2 within the deadline), never its stale round-1 update as a third
    assert rows[1]["round"] == "2" and int(rows[1]["updates"]) + int(rows[1]["late"]) == 2, rows[1]

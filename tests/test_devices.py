"""Devices and Ray resources: what each simulated client is given and sees, with no GPU, 1 GPU and 2 GPUs."""

import os

import pytest

from tests.conftest import ROOT
from utils.aggregate import failure_reason
from utils.devices import client_device, plan_simulation, restrict_visible

CPU = {"num_cpus": 1}  # CLIENT_RESOURCES' default: num_gpus derived from DEVICE


@pytest.mark.parametrize(
    "gpus, clients, device, want_device, want_share, want_gpus, at_once",
    [
        (0, 3, "", "cpu", 0.0, [], 3),
        (0, 3, "cpu", "cpu", 0.0, [], 3),
        (1, 3, "", "cuda", 0.3333, [0], 3),  # 3 clients share one GPU, all at once
        (1, 3, "cpu", "cpu", 0.0, [], 3),
        (1, 3, "0", "cuda", 0.3333, [0], 3),
        (1, 1, "", "cuda", 1.0, [0], 1),
        (2, 8, "", "cuda", 0.25, [0, 1], 8),  # 8 clients spread over both GPUs, 4 on each
        (2, 8, "cpu", "cpu", 0.0, [], 8),
        (2, 8, "0", "cuda", 0.125, [0], 8),
        (2, 8, "cuda:1", "cuda", 0.125, [1], 8),
        (2, 8, "0,1", "cuda", 0.25, [0, 1], 8),
        (2, 1, "0,1", "cuda", 1.0, [0, 1], 1),
    ],
)
def test_plan_gives_clients_gpu_shares_that_match_the_device(gpus, clients, device, want_device, want_share,
                                                               want_gpus, at_once):
    plan = plan_simulation(device, CPU, clients, n_gpus=gpus, n_cpus=16)

    assert plan["device"] == want_device
    assert plan["resources"] == {"num_cpus": 1.0, "num_gpus": want_share}
    assert plan["gpus"] == want_gpus and plan["at_once"] == at_once
    assert f"{clients} clients, {at_once} at a time on " in plan["line"]
    assert want_share * clients <= max(len(want_gpus), 0) + 1e-9 or want_share == 0  # never more GPU than exists


@pytest.mark.parametrize(
    "gpus, device, resources, words",
    [
        (0, "0", CPU, "device '0' names GPU [0] but this machine has no GPU"),
        (0, "0,1", CPU, "names GPU [0, 1] but this machine has no GPU"),
        (0, "cuda", CPU, "asks for a GPU, but this machine has none"),
        (1, "0,1", CPU, r"device '0,1' names GPU \[1\] but this machine has 1 GPU"),
        (2, "2", CPU, "names GPU [2] but this machine has 2 GPU"),
        (1, "0", {"num_cpus": 1, "num_gpus": 0.0}, "device '0' needs a GPU share per client, but client-resources "
                                                   "gives num_gpus=0"),
        (1, "", {"num_cpus": 1, "num_gpus": 0.0}, "client-resources gives num_gpus=0"),
        (1, "", {"num_cpus": 1, "num_gpus": 2}, "client-resources num_gpus=2: a client trains on one GPU"),
        (1, "cpu", {"num_cpus": 1, "num_gpus": 0.5}, "num_gpus=0.5 with device 'cpu'"),
        (0, "", {"num_cpus": 1, "num_gpus": 0.5}, "this machine has no GPU"),
        (1, "", {"num_cpus": 4}, "num_cpus=4 is more than the 2 CPUs"),
        (1, "gpu", CPU, "device 'gpu' is not cpu, cuda"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(gpus, device, resources, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]") if "\\" not in words else words):
        plan_simulation(device, resources, 3, n_gpus=gpus, n_cpus=2)


def test_explicit_share_is_kept_and_limits_clients_at_once():
    plan = plan_simulation("", {"num_cpus": 1, "num_gpus": 0.5}, 3, n_gpus=1, n_cpus=16)

    assert plan["resources"]["num_gpus"] == 0.5 and plan["at_once"] == 2
    assert plan_simulation("", {"num_cpus": 2}, 3, n_gpus=1, n_cpus=4)["at_once"] == 2  # CPUs limit too


def test_device_naming_some_gpus_restricts_what_ray_sees(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # registers the variable for restoring after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    restrict_visible([1], 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the user's own restriction: indices count within it
    restrict_visible([1], 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    restrict_visible([0, 1], 2)  # all of them: left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"


def test_client_resolves_its_own_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert client_device("cpu") == "cpu" and client_device("") == "cpu" and client_device(None) == "cpu"
    assert client_device("1") == "1"  # a SuperNode's node config names its own GPU
    with pytest.raises(RuntimeError, match="was to train on a GPU but sees none .*num_gpus"):
        client_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert client_device("cuda") == "0"  # the GPU Ray gave it, whatever its physical index


class _Probe:
    """A Ray actor like Flower's client actors: reports what it sees and the device a client would train on."""

    def look(self, device):
        from utils.devices import client_device

        try:
            return os.environ.get("CUDA_VISIBLE_DEVICES"), client_device(device)
        except RuntimeError as e:
            return os.environ.get("CUDA_VISIBLE_DEVICES"), str(e)


@pytest.mark.slow
def test_ray_client_started_with_the_project_resources_sees_its_gpu(monkeypatch):
    import ray

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    plan = plan_simulation("", CPU, 3, n_gpus=1, n_cpus=2)  # what main() asks Ray for on a 1-GPU machine
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a faked GPU resource
    try:
        actor = ray.remote(_Probe)
        given = actor.options(**plan["resources"]).remote()
        old = actor.options(num_cpus=1, num_gpus=0.0).remote()  # the resources every client got before
        seen, device = ray.get(given.look.remote(plan["device"]), timeout=120)
        old_seen, old_device = ray.get(old.look.remote("cuda"), timeout=120)
    finally:
        ray.shutdown()

    assert plan["resources"]["num_gpus"] == 0.3333 and plan["device"] == "cuda"
    assert (seen, device) == ("0", "0")  # it sees the GPU Ray gave it and trains on it
    assert old_seen == "" and "was to train on a GPU but sees none" in old_device  # Ray hid it: refused, loudly


def test_failure_reason_is_the_clients_first_error_line():
    ray_text = ("Message contains an Error (reason: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'"
                "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n  File \"x.py\", line 1\nValueError: inner\n\n"
                "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: "
                "client dark: Invalid CUDA 'device=0' requested.\ntorch.cuda.is_available(): False'>). It originated")
    assert failure_reason(ValueError(ray_text)) == "client dark: Invalid CUDA 'device=0' requested."
    assert failure_reason(Exception("<class 'RuntimeError'>:<'client b: gone\nmore'>")) == "client b: gone"
    assert failure_reason(Exception("Traceback:\n  x\nKeyError: 'spec'")) == "KeyError: 'spec'"
    from flwr.app import Error  # an error reply, as SecAgg+'s workflow hands it on

    assert failure_reason(Exception(Error(0, "<class 'RuntimeError'>:<'client c: gone'>"))) == "client c: gone"


def test_run_in_which_no_client_trained_is_a_failure_naming_the_first_error(tiny_fed, tmp_path):
    import federated
    from utils.config import resolve

    cfg = resolve(federated.DEFAULTS, {"datasets": [str(tiny_fed[0][0])], "num-rounds": 2, "evaluate": False,
                                       "save-dir": str(tmp_path / "run"), "imgsz": 32})
    run = federated.prepare(cfg)
    strategy = federated.make_strategy(cfg, run)
    error = ValueError("Exception ClientAppException occurred. Message: client dark: Invalid CUDA 'device=0'\nmore")

    for r in (1, 2):  # every client of every round failed, as on a GPU machine whose clients could not see it
        strategy.aggregate_fit(r, [], [error])
        strategy.wait_for_files()

    assert strategy.failure() == ("the run failed: no round got a valid client update "
                                  "(first client error: client dark: Invalid CUDA 'device=0')")
    assert (tmp_path / "run" / "round2.npz").is_file()  # the kept global model is still saved

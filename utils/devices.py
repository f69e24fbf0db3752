"""Which device each client trains on, and the Ray resources that let it see that device.

Simulation (Flower's Ray backend): Ray sets CUDA_VISIBLE_DEVICES="" in every client actor that asks for
`num_gpus=0`, so a client can only train on a GPU if it holds a GPU share, and then it sees exactly the GPU Ray
placed it on, as cuda:0. DEVICE therefore names the GPUs the simulation may use ("" = all of them, "cpu" = none);
each client gets `num_gpus = GPUs / clients` (at most 1) unless CLIENT_RESOURCES gives `num_gpus`, and trains on
the GPU it sees (device "cuda" in the clients' settings). Everything is checked before Ray starts.

Deployment: a SuperNode trains on its own hardware: node config `device` ("cpu", "0", ...), else its first GPU
when it has one, else the CPU. The server's view of GPUs says nothing about a data owner's machine.
"""

import math
import os

import torch

SIMULATION_GPU = "cuda"  # a simulated client's device: the GPU Ray gave it


def parse_device(device, n_gpus):
    """Return the GPU indices that DEVICE names, or None for the CPU ("cpu", "mps", or "" without GPUs).

    Raises:
        ValueError: a CUDA device on a machine without one, or an index that does not exist.
    """
    d = str(device).strip().lower()
    if d in ("cpu", "mps") or (d == "" and n_gpus == 0):
        return None
    if d in ("", "cuda"):
        if not n_gpus:
            raise ValueError(f"device {device!r} asks for a GPU, but this machine has none (use --device cpu)")
        return list(range(n_gpus))
    try:
        gpus = [int(x) for x in d.replace("cuda:", "").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"device {device!r} is not cpu, cuda, a GPU index (0) or a list of them (0,1)") from None
    missing = [g for g in gpus if not 0 <= g < n_gpus]
    if missing or not gpus:
        have = f"{n_gpus} GPU(s) (0-{n_gpus - 1})" if n_gpus else "no GPU"
        raise ValueError(f"device {device!r} names GPU {missing or d} but this machine has {have}")
    return sorted(set(gpus))


def plan_simulation(device, resources, n_clients, n_gpus, n_cpus):
    """Return the clients' device, Ray resources, the GPUs Ray may use and a one-line summary; refuse what can't work.

    Args:
        device (str): DEVICE ("", "cpu", "0", "0,1", "cuda:1", ...).
        resources (dict): CLIENT_RESOURCES; `num_gpus` absent means "derive it".
        n_clients (int): simulated clients.
        n_gpus (int): GPUs this (the driver's) machine sees.
        n_cpus (int): CPUs Ray gets.

    Returns:
        (dict): `device` for the clients ("cpu", "mps" or "cuda"), `resources` for Ray, `gpus` (indices Ray may use;
            [] on the CPU), `at_once` (clients training at the same time) and `line` (what the run logs at start).

    Raises:
        ValueError: one sentence naming device and client-resources when they cannot work together.
    """
    gpus = parse_device(device, n_gpus)
    res = {"num_cpus": 1.0, **{k: float(v) for k, v in resources.items()}}
    if res["num_cpus"] > n_cpus:
        raise ValueError(f"client-resources num_cpus={res['num_cpus']:g} is more than the {n_cpus} CPUs Ray has")
    asked = res.get("num_gpus")
    if gpus is None:
        if asked:
            raise ValueError(f"client-resources num_gpus={asked:g} with device {device or 'cpu'!r}: clients would "
                             f"hold GPU shares they never use" + ("" if n_gpus else " (and this machine has no GPU)"))
        res["num_gpus"] = 0.0
        at_once = min(n_clients, int(n_cpus // res["num_cpus"]))
        kind = str(device).strip().lower() or "cpu"
        line = f"{n_clients} clients, {at_once} at a time on the {kind.upper()} ({res['num_cpus']:g} CPU each)"
        return {"device": kind, "resources": res, "gpus": [], "at_once": at_once, "line": line}
    if asked is not None:
        if asked <= 0:
            raise ValueError(f"device {device!r} needs a GPU share per client, but client-resources gives num_gpus=0 "
                             "(Ray then hides every GPU from the clients); use --device cpu or a num_gpus above 0")
        if asked > 1:
            raise ValueError(f"client-resources num_gpus={asked:g}: a client trains on one GPU (at most 1)")
        share = asked
    else:
        share = math.floor(min(1.0, len(gpus) / n_clients) * 10000) / 10000  # Ray counts GPU shares in 1/10000
        res["num_gpus"] = share
    per_gpu = int(1 / share + 1e-9)
    at_once = min(n_clients, int(n_cpus // res["num_cpus"]), len(gpus) * per_gpu)
    names = ", ".join(f"cuda:{g}" for g in gpus)
    line = (f"{n_clients} clients, {at_once} at a time on {names} "
            f"({share:g} GPU and {res['num_cpus']:g} CPU each)")
    return {"device": SIMULATION_GPU, "resources": res, "gpus": gpus, "at_once": at_once, "line": line}


def restrict_visible(gpus, n_gpus):
    """Make Ray (started after this) see only `gpus` when DEVICE names fewer than all of them."""
    if not gpus or len(gpus) == n_gpus:
        return
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in current.split(",")] if current else [str(i) for i in range(n_gpus)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] for g in gpus)


def client_device(requested):
    """Return the device this client process trains on, resolved where it runs.

    "cpu"/"mps" and explicit indices stay; "" takes this machine's first GPU, else the CPU (a SuperNode);
    "cuda" (a simulated client) takes the GPU Ray gave it and raises if Ray gave it none.
    """
    d = str(requested or "").strip().lower()
    if d in ("cpu", "mps") or (d and d != SIMULATION_GPU):
        return d
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if d == SIMULATION_GPU:
        if visible == "" or (visible is None and not _cuda()):
            raise RuntimeError(f"this client was to train on a GPU but sees none (CUDA_VISIBLE_DEVICES={visible!r}): "
                               "Ray gave it no GPU share; check client-resources num_gpus")
        return "0"
    return "0" if visible != "" and _cuda() else "cpu"


def _cuda():
    """Return True when torch sees a CUDA device."""
    return torch.cuda.is_available()


def count_gpus():
    """Return the number of CUDA GPUs this process sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

"""A federation run in Flower's simulation engine on this machine: devices planned, Ray started and stopped, the
rounds run, and the run's last lines and exit status.

`plan` checks and says what will run before anything starts; `simulate` runs it. Ctrl-C ends Ray and prints how to
resume (utils/interrupt.py). In a simulation the summary is printed here, after Ray stopped, so it comes last.
"""

import os
import resource
from logging import ERROR, INFO
from pathlib import Path

from flwr.server import ServerApp

from utils.console import log
from utils.devices import count_gpus, plan_simulation, restrict_visible
from utils.interrupt import on_interrupt, start_ray, stop_ray
from utils.record import RunStopped
from utils.resume import interrupted_line

ROOT = Path(__file__).resolve().parent.parent  # the project folder: Ray's workers import federated.py from it


def plan(cfg, run):
    """Return the device plan of a simulation (utils/devices.py) and say what will run; ValueError with one sentence
    when it cannot (no datasets, GPUs that are not there). Restricts the visible GPUs before Ray starts."""
    n, n_gpus = len(run["spec"]["datasets"]), count_gpus()
    if not n:
        raise ValueError("a simulation needs DATASETS (or neither DATASETS nor NAMES, for the demo)")
    out = plan_simulation(cfg["DEVICE"], cfg["CLIENT_RESOURCES"], n, n_gpus, os.cpu_count())
    restrict_visible(out["gpus"], n_gpus)
    run["spec"]["hyp"]["device"] = out["device"]
    log(INFO, "%d clients: %s", n, ", ".join(run["spec"]["datasets"]))
    log(INFO, "%s", out["line"])
    if run["offset"]:
        log(INFO, "resuming %s after round %d of %d", cfg["SAVE_DIR"], run["offset"], cfg["NUM_ROUNDS"])
    return out


def interrupted(cfg, record):
    """The line a Ctrl-C prints: the complete rounds and how to continue. The record's closing lock is kept, so no
    round completes between this line and the exit (a round closing at this moment finishes first)."""
    record.closing.acquire(timeout=10)
    return interrupted_line(cfg)


def simulate(cfg, run, devices, strategy, client_app, serve):
    """Run the rounds with one simulated client per dataset on Ray; return None, or the sentence the run failed with.

    Args:
        devices (dict): `plan`'s result. strategy: the run's strategy. client_app (flwr.client.ClientApp): the
            clients. serve (callable): `serve(grid, context, cfg, strategy)`, the server's round loop.
    """
    from flwr.simulation import run_simulation  # imports Ray (seconds): only a simulation needs it

    strategy.record.defer_summary = True  # printed last, below every line Ray forwards from the clients
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    start_ray(num_cpus=os.cpu_count(), num_gpus=len(devices["gpus"]), logging_level="WARNING", log_to_driver=True)
    on_interrupt(lambda: interrupted(cfg, strategy.record))  # Ctrl-C: Ray ended, the resume command printed, exit 130
    app = ServerApp()
    app.main()(lambda grid, context: serve(grid, context, cfg, strategy))
    try:
        run_simulation(server_app=app, client_app=client_app, num_supernodes=len(run["spec"]["datasets"]),
                       backend_config={"client_resources": devices["resources"]})  # on the Ray started above
    except RunStopped:
        pass  # the strategy said why; the failure below repeats it
    stop_ray()
    try:
        strategy.wait_for_files()  # a run cut short may still be writing its last round's checkpoints
    except OSError as e:
        log(ERROR, "could not write last.pt, best.pt or results.png: %s", e)
    if strategy.record.finished:
        strategy.record.summary()
    if strategy.failure():
        return strategy.failure()
    last = Path(cfg["SAVE_DIR"]) / f"round{strategy.record.last_round}.npz"
    if not last.exists():
        return f"the run ended without {last}; see the log above (continue it with --resume)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the server (driver) process, not Ray's workers
    log(INFO, "  peak memory of the server process: %.0f MB", peak)
    return None

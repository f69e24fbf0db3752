"""Ctrl-C stops a simulation at once: Ray and its workers with it, one line on how to resume, exit code 130.

A terminal's Ctrl-C reaches every process of the foreground group: the driver and Ray's workers. Left to
themselves, the workers die mid-task, the driver waits on actors whose owner is gone, and the run hangs until a
second Ctrl-C. Instead the driver, on the first SIGINT (or SIGTERM), ends every process it started (Ray's
services and workers: its descendants), says which rounds are complete and how to continue, and exits 130.
Files are safe at any point: each output is written to a temp file and renamed into place (a temp file a kill
leaves behind is removed by the next start).
"""

import logging
import os
import signal
import sys
import time

import psutil

RAY_LOG_DELAY = 1.0  # seconds to wait for Ray's last forwarded worker lines before stopping it


def start_ray(**init_args):
    """Start Ray for Flower's simulation here, so that on_interrupt, called after it, holds SIGINT and SIGTERM.

    Ray replaces the SIGTERM handler when it starts, so Ray must start before on_interrupt; Flower's Ray backend then
    uses this Ray instead of starting its own (its usual arguments are given here: no dashboard, the driver's import
    path). SIGINT is ignored while Ray spawns its services, so a Ctrl-C during start-up cannot reach them half-made;
    the processes Ray starts block SIGINT themselves, leaving Ctrl-C to the driver, which ends them (on_interrupt).
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each client's lines, each once: no "[repeated 4x across cluster]"
    import ray  # seconds to import: only a simulation needs it

    # the workers inherit the driver's import path through the environment Ray starts them in: a runtime_env instead
    # (Flower's own way) makes Ray start a fresh worker for it, where its pre-started ones are ready (0.7 s -> 0.07 s)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(include_dashboard=False, **init_args)
    finally:
        signal.signal(signal.SIGINT, old)


def stop_ray():
    """Stop the Ray that start_ray started, once its workers' last lines have reached this console."""
    import ray

    time.sleep(RAY_LOG_DELAY)  # Ray forwards a worker's lines to the driver within about a second
    end_autoscaler_monitor(ray)
    ray.shutdown()


def end_autoscaler_monitor(ray):
    """Kill the autoscaler monitor of the Ray this process started (Ray 2.55: `ray._private.worker._global_node`).

    A simulation on one machine has nothing for it to scale. `ray.shutdown` stops Ray's processes one kind at a time,
    each with SIGTERM and up to 1 s to exit before SIGKILL; the monitor, signalled after the GCS it polls is gone,
    never exits in time, so every run ended 1 s later (1.4 s for the shutdown, 0.4 s with the monitor killed first;
    a SIGTERM while the GCS is up makes the monitor report itself failed on the console instead). Where Ray keeps its
    processes elsewhere, nothing is killed and the shutdown just takes the second."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):  # ray_constants.PROCESS_TYPE_MONITOR
        try:
            info.process.kill()
            info.process.wait(1)
        except Exception:  # noqa: BLE001  (gone already, or another Ray's layout: ray.shutdown handles it)
            pass


def end_descendants():
    """Kill every process started by this one (recursively): Ray's services and workers, which hold no project file."""
    for p in psutil.Process().children(recursive=True):
        try:
            p.kill()
        except psutil.Error:
            pass


def say(text):
    """Write `text` as the console's last line: nothing Ray forwards comes after it. An output whose reader is gone (a
    closed pipe, a `tee` or parent process that died) raises on every write; the stop goes on without the line (before,
    the error ended the handler early and the interpreter's shutdown then waited forever on Flower's threads)."""
    for write in (sys.stdout.flush, sys.stderr.flush, lambda: os.write(2, f"\n{text}\n".encode())):
        try:
            write()
        except (OSError, ValueError):  # a broken pipe; a closed file
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)


def on_interrupt(message):
    """Install a SIGINT/SIGTERM handler that ends Ray, prints `message()` (a callable) and exits (130 on SIGINT).

    Call it after Ray started: Ray replaces the SIGTERM handler when it starts.
    """

    def handler(signum, frame):  # exits with 128 + the signal's number: 130 for Ctrl-C
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            logging.disable(logging.CRITICAL)  # the server's threads would report the clients being ended as failures
            try:
                text = message()
            except Exception as e:  # the line must not fail the stop
                text = f"interrupted ({e})"
            say(text)
        finally:  # whatever failed above (an output whose reader is gone): Ray ended, and the process with it
            try:
                end_descendants()  # right before exiting: Ray's driver code exits (code 1) once its services are gone
            finally:
                os._exit(128 + signum)  # no interpreter shutdown: it would wait on Flower's and Ray's threads

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)

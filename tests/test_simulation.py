"""Real Flower simulations end to end through `python3 federated.py`: outputs, metrics, resume."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, check_metrics, check_round_files, export_cli, run_in_process
from utils.params import load_npz

NAMES = ["circle", "square", "triangle", "cross"]


def _cmd(tiny_fed, save, rounds, *extra):
    return [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, tiny_fed[0][:2]),
            "--num-rounds", str(rounds), "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu",
            "--save-dir", str(save), *extra]


def _rows(save):
    with (save / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _start_until_round(cmd, save, cwd, rounds=1, **output):
    """Start a run in its own process group (as a terminal's job); return it once `rounds` rows are in metrics.csv."""
    output = output or {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True, **output)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (save / "metrics.csv").exists() and len(_rows(save)) >= rounds:
            break
        time.sleep(0.2)
    return proc


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_simulation_two_clients_two_rounds(tiny_fed, tmp_path):
    save = tmp_path / "run"

    r = subprocess.run(_cmd(tiny_fed, save, 2), capture_output=True, text=True, cwd=tmp_path, timeout=600)

    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "round 1/2" in log and "round 2/2" in log and "mAP50-95" in log and "best.pt" in log
    assert "Traceback" not in log
    assert "client dark  round 2/2  epoch 1/1  loss " in log and " img/s" in log  # progress inside a round
    # the learning rate and where its scale comes from: two 8-image clients at batch 2 (4 steps per epoch each)
    # against a centralized epoch of 16 images at nbs 8 (2 steps): 0.5
    assert "optimizer AdamW, lr0 0.000625: Ultralytics' own rate x 0.5 (derived from the clients' image counts)" in log
    for noise in ("[SUMMARY]", "History (", "DEPRECATED", "FutureWarning", "\x1b[", "configure_fit"):
        assert noise not in log, noise  # Flower's and Ray's chatter (and colour codes off a terminal): --verbose
    rounds = check_round_files(save, NAMES)
    check_metrics(save)

    from ultralytics import YOLO

    for name in ("last.pt", "best.pt"):
        model = YOLO(str(save / name))
        assert list(model.names.values()) == NAMES
    # last.pt holds exactly round 2's weights
    last = [v.numpy() for v in YOLO(str(save / "last.pt")).model.state_dict().values()]
    assert all(np.array_equal(a, b) for a, b in zip(last, rounds[1]))

    status, last = export_cli("yolov8n.yaml", save / "round2.npz")
    assert status == 0, last
    assert YOLO(str(save / "round2.pt")).names[3] == "cross"


@pytest.mark.slow
def test_resume_after_kill_continues_the_run_with_its_saved_settings_and_extends_it(tiny_fed, tmp_path, refused):
    save = tmp_path / "run"
    proc = _start_until_round(_cmd(tiny_fed, save, 3), save, tmp_path, 2, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.killpg(proc.pid, signal.SIGKILL)  # kill the whole run (driver and Ray) as soon as round 2 is complete
    proc.wait()
    assert [row["round"] for row in _rows(save)][:2] == ["1", "2"]
    for f in save.glob("round*.npz"):
        assert len(load_npz(f)) == 355  # every round file that exists is whole (a kill can only leave .*.tmp files)
    (save / "round3.npz").unlink(missing_ok=True)  # if round 3 got as far as its npz, its row is still missing
    (save / ".round3.npz.x1y2z3.tmp").write_bytes(b"half a file")  # what a kill during a write leaves
    kept = {n: _sha(save / n) for n in ("round1.npz", "round2.npz")}

    resume = [sys.executable, str(ROOT / "federated.py"), "--resume", "--save-dir", str(save)]  # no other flag
    r = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "resuming" in log and "round 3/3" in log and "round 1/3" not in log
    assert {n: _sha(save / n) for n in kept} == kept
    assert not [p.name for p in save.iterdir() if p.name.endswith(".tmp")]  # the next start removed any leftovers
    rows = _rows(save)
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    # round 3 is epoch 3 of 3 of one run: linear decay lr0 * ((1 - 2/3) * 0.99 + 0.01), lr0 = 0.5 x 0.00125 (auto;
    # 0.5: each 8-image client halves its batch to 2 and takes 4 steps per epoch, a centralized epoch 16 / 8 = 2)
    assert float(rows[2]["train_lr"]) == pytest.approx(0.000625 * (1 / 3 * 0.99 + 0.01), rel=1e-4)
    assert len(load_npz(save / "round3.npz")) == 355

    status, last = refused(*resume[2:])  # the same command line, refused in this process before Ray starts
    assert status != 0 and "already finished all 3 rounds" in last
    status, last = refused(*resume[2:], "--imgsz", "64")
    assert last.endswith("with other settings: imgsz was 32, now 64")

    # the same run never interrupted: on CPU, every round's weights are bit-identical
    whole = tmp_path / "whole"
    r = subprocess.run(_cmd(tiny_fed, whole, 3), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for i in (1, 2, 3):
        assert all(np.array_equal(a, b) for a, b in zip(load_npz(save / f"round{i}.npz"),
                                                         load_npz(whole / f"round{i}.npz"))), i

    # a finished run extended by one round: the schedule is recomputed over 4 rounds, the optimizer kept; the round
    # runs in this process (tests/conftest.py), with the settings `--resume --save-dir S --num-rounds 4` gives
    run_in_process({"resume": True, "save-dir": str(save), "num-rounds": 4}, given={"RESUME", "SAVE_DIR", "NUM_ROUNDS"})
    rows = _rows(save)
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]
    assert float(rows[3]["train_lr"]) == pytest.approx(0.000625 * (1 / 4 * 0.99 + 0.01), rel=1e-4)
    config = json.loads((save / "config.json").read_text())
    assert config["settings"]["NUM_ROUNDS"] == 4 and config["settings"]["IMGSZ"] == 32
    assert config["hyp"]["lr0"] == 0.000625 and config["lr_scale"] == 0.5  # the optimizer the run started with


def test_resume_refuses_changed_settings(tiny_fed, tmp_path, refused):
    save = tmp_path / "run"
    save.mkdir()
    settings = {"IMGSZ": 32, "BATCH": 4, "NUM_ROUNDS": 3, "DATASETS": [str(p) for p in tiny_fed[0][:2]]}
    (save / "config.json").write_text(json.dumps({"settings": settings}))

    status, last = refused(*_cmd(tiny_fed, save, 3, "--resume", "--imgsz", "64")[2:])  # main() of that command line

    assert status != 0
    assert last == f"federated.py: cannot resume the run in {save} with other settings: imgsz was 32, now 64"


@pytest.mark.slow
def test_client_whose_data_disappears_fails_alone_and_the_run_completes(tiny_fed, tmp_path):
    import shutil

    src = tiny_fed[0][1].parent
    mine = tmp_path / "light"
    shutil.copytree(src, mine)
    (mine / "data.yaml").write_text((src / "data.yaml").read_text().replace(str(src), str(mine)))
    save = tmp_path / "run"
    cmd = _cmd(tiny_fed, save, 3)
    cmd[cmd.index(str(tiny_fed[0][1]))] = str(mine / "data.yaml")
    proc = _start_until_round(cmd, save, tmp_path)
    try:
        shutil.rmtree(mine / "images")  # the data owner's data disappears after round 1
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert proc.returncode == 0, log[-3000:]
    rows = _rows(save)
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["updates"] == "2" and rows[2]["updates"] == "1"
    assert "a client failed" in log and "does not exist" in log
    assert float(rows[2]["map50_95_dark"]) >= 0 and rows[2].get("map50_95_light", "") == ""


@pytest.mark.slow
def test_run_whose_clients_all_stop_training_exits_nonzero_naming_them(tiny_fed, tmp_path):
    import shutil

    mine, cmd, save = [], _cmd(tiny_fed, tmp_path / "run", 4), tmp_path / "run"
    for src in tiny_fed[0][:2]:
        mine.append(tmp_path / src.parent.name)
        shutil.copytree(src.parent, mine[-1])
        (mine[-1] / "data.yaml").write_text(src.read_text().replace(str(src.parent), str(mine[-1])))
        cmd[cmd.index(str(src))] = str(mine[-1] / "data.yaml")
    proc = _start_until_round(cmd, save, tmp_path)
    try:
        for folder in mine:  # every data owner's data disappears after round 1
            shutil.rmtree(folder / "images")
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert proc.returncode == 1, log[-3000:]
    assert "warmup-epochs 3 covers 3 of the run's 4 epochs" in log  # warned at start: mostly warmup
    rows = _rows(save)
    assert rows[0]["updates"] == "2" and rows[3]["updates"] == "0"
    round4 = next(line for line in log.splitlines() if "round 4/4" in line)
    assert "skipped (0 valid updates)  2 failed: client dark: " in round4 and "; client light: " in round4
    assert "Traceback" not in round4
    last = log.strip().splitlines()[-1]
    assert last.startswith("federated.py: the run failed: the last ") and "rounds got no valid client update" in last
    first = last.split("(first client error: ", 1)[1][:-1]  # the first failure's line, as a round line showed it
    assert first.startswith("client ") and any(f"failed: {first}" in line or f"; {first}" in line
                                               for line in log.splitlines() if "valid updates)" in line)


@pytest.mark.slow
def test_ctrl_c_mid_round_stops_everything_and_says_how_to_resume(tiny_fed, tmp_path):
    import psutil

    save = tmp_path / "run"
    # 4 rounds, so that the interrupt comes while rounds are left whichever round is training at that moment (with 2,
    # an idle machine finished round 2 within the wait and the run was already closing)
    proc = _start_until_round(_cmd(tiny_fed, save, 4), save, tmp_path)  # its own process group, as a terminal's job
    try:
        time.sleep(1.5)  # a later round's clients are training
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group gets it
        log, _ = proc.communicate(timeout=60)
        took = time.time() - t0
        for _ in range(50):  # killed processes are gone (or zombies, dead but not yet reaped) within moments
            left = [p.pid for p in psutil.process_iter() if _session(p) == proc.pid and _alive(p)]
            if not left:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert proc.returncode == 130, log[-3000:]
    assert took < 20 and left == []  # within seconds; no Ray service or worker outlives the run
    last = log.strip().splitlines()[-1]
    done = len(_rows(save))  # the rounds complete when the interrupt came: at least round 1, never all 4
    assert 1 <= done < 4, last
    rounds = f"rounds 1-{done} of 4 are" if done > 1 else "round 1 of 4 is"
    assert last.startswith(f"interrupted: {rounds} complete in {save}; continue with: "), last
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    resume = last.split("continue with: ", 1)[1]

    r = subprocess.run(resume, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resuming" in r.stdout + r.stderr and [row["round"] for row in _rows(save)] == ["1", "2", "3", "4"]


def test_a_stop_signal_ends_the_run_even_when_its_output_is_gone():
    # A run whose output reader died (a `tee`, a parent process) and which is then stopped with SIGTERM: writing the
    # stop line fails, and the handler must still exit at once, not leave the main thread to the interpreter's
    # shutdown, which waits forever on a thread that never ends (Flower's, blocked on a Ray actor that was ended).
    code = (f"import sys, threading, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from utils.interrupt import on_interrupt\n"
            "threading.Thread(target=threading.Event().wait).start()  # a thread that never ends, as Flower's\n"
            "on_interrupt(lambda: 'interrupted: the stop line')\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.stdout.close()
        proc.stderr.close()  # its reader is gone: every write now fails (EPIPE)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM


def test_ray_stops_with_its_autoscaler_monitor_killed_first_and_leaves_no_process():
    # ray.shutdown gives each of Ray's processes 1 s to exit after SIGTERM; its autoscaler monitor, signalled after the
    # GCS is gone, never did, so every run ended a second later. stop_ray kills it first (and everything still ends).
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "import psutil, ray\n"
            "from utils.interrupt import end_autoscaler_monitor, start_ray, stop_ray\n"
            "start_ray(num_cpus=1, logging_level='WARNING')\n"
            "monitor = [i.process for i in ray._private.worker._global_node.all_processes['monitor']]\n"
            "started = psutil.Process().children(recursive=True)\n"
            "end_autoscaler_monitor(ray)\n"
            "print('monitor', [m.poll() for m in monitor])\n"
            "print('ray works', ray.get(ray.remote(lambda: 7).remote()))\n"
            "stop_ray()\n"
            "gone, alive = psutil.wait_procs(started, timeout=10)\n"
            "print('left', [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "monitor [-9]" in r.stdout, r.stdout  # killed at once, while the rest of Ray runs on
    assert "ray works 7" in r.stdout and "left []" in r.stdout, r.stdout


def _session(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def _alive(process):
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_twenty_clients_complete_a_round(tmp_path):
    from utils.demo import make_demo

    data = []
    for seed in range(7):  # 7 x 3 demo clients, 4 train and 2 val images each
        data += make_demo(tmp_path / f"set{seed}", seed=seed, n_train=4, n_val=2)[0]
    save = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *map(str, data[:20]), "--num-rounds", "1",
           "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(save)]

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)

    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "peak memory of the server process" in r.stdout + r.stderr
    row = _rows(save)[0]
    assert row["updates"] == "20"
    assert len([k for k in row if k.startswith("map50_95_") and row[k] != ""]) == 20  # one column per client


def _snapshot(folder):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.slow
def test_different_class_lists_train_into_their_union(tiny_fed, tmp_path):
    import shutil

    from ultralytics import YOLO

    src = tiny_fed[0][1].parent
    mine = tmp_path / "owner"  # the light client, whose owner calls classes 0 and 1 star and moon
    shutil.copytree(src, mine)
    text = (src / "data.yaml").read_text().replace(str(src), str(mine))
    (mine / "data.yaml").write_text(text.replace("0: circle", "0: star").replace("1: square", "1: moon"))
    before, save = _snapshot(mine), tmp_path / "run"
    cmd = _cmd(tiny_fed, save, 2, "--fedbn", "--fp16", "both", "--strategy", "fedavgm", "--keep-rounds", "1",
               "--verbose")
    cmd[cmd.index(str(tiny_fed[0][1]))] = str(mine / "data.yaml")

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "[SUMMARY]" in r.stdout + r.stderr  # --verbose: Flower's own log too
    rows = _rows(save)
    best = max(rows, key=lambda row: float(row["map50_95"]))["round"]  # KEEP_ROUNDS 1: the last round and the best
    assert sorted(p.name for p in save.glob("round*.npz")) == sorted({"round2.npz", f"round{best}.npz"})
    union = ["circle", "square", "triangle", "cross", "star", "moon"]
    assert json.loads((save / "config.json").read_text())["names"] == union
    assert _snapshot(mine) == before  # no label cache or remapped label beside the owner's data
    view = next((save / "work").glob("owner-*"))
    for label in sorted((mine / "labels" / "train").iterdir()):  # the view holds the labels in global ids
        remapped = next((view / "train" / "labels").glob(f"*_{label.name}")).read_text().split()
        original = label.read_text().split()
        assert remapped and remapped[0::5] == [str([4, 5, 2, 3][int(c)]) for c in original[0::5]]
    rows = _rows(save)
    assert [float(row["train_local_bn"]) for row in rows] == [0.0, 1.0]  # round 2 started from the clients' own BN
    assert all(int(row["bytes_down"]) < 7e6 and int(row["bytes_up"]) < 7e6 for row in rows)  # fp32 would be 12 MB
    status, last = export_cli("yolov8n.yaml", save / "round2.npz")
    assert status == 0, last
    result = YOLO(str(save / "round2.pt")).predict(next((mine / "images" / "val").iterdir()), imgsz=32, verbose=False)
    assert result[0].names == dict(enumerate(union))


def _map(weights, data):
    from ultralytics import YOLO

    return YOLO(str(weights)).val(data=str(data), imgsz=64, batch=8, device="cpu", plots=False, verbose=False).box.map


@pytest.mark.slow
def test_a_converged_model_survives_one_short_round(tiny_fed, tmp_path):
    # A model fitted to one client's images (plain Ultralytics, 60 epochs), then one federated round of one epoch on
    # the same images from it: the defaults keep what it knows. Ultralytics' own rule (no warmup in a 1-epoch run)
    # at 3x its learning rate, the defaults for a random init, knock it down: the hazard is real on this data.
    import shutil

    from ultralytics import YOLO

    dark = tiny_fed[0][0].parent
    data = tmp_path / "fit.yaml"
    data.write_text(f"path: {dark}\ntrain: images/train\nval: images/train\nnames: {NAMES}\n")
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), epochs=60, imgsz=64, batch=2, nbs=2, workers=0, device="cpu", seed=0,
                optimizer="AdamW", lr0=0.00125, val=False, plots=False, project=str(tmp_path), name="fit")
    base = tmp_path / "fitted.pt"
    shutil.copy(model.trainer.last, base)
    fitted = _map(base, data)
    assert fitted > 0.3  # it learned these images

    kept = {}
    for name, flags in (("defaults", []), ("random-init rule", ["--warmup-epochs", "0", "--lr-scale", "3"])):
        save = tmp_path / name
        r = subprocess.run([sys.executable, str(ROOT / "federated.py"), "--datasets", str(data), "--base-model",
                            str(base), "--num-rounds", "1", "--epochs", "1", "--imgsz", "64", "--batch", "2", "--nbs",
                            "2", "--device", "cpu", "--evaluate", "false", "--save-dir", str(save), *flags],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        status, last = export_cli(base, save / "round1.npz")
        assert status == 0, last
        kept[name] = _map(save / "round1.pt", data) / fitted

    print(f"fitted mAP50-95 {fitted:.3f}, kept {kept}")
    assert kept["defaults"] >= 0.8, (fitted, kept)
    assert kept["random-init rule"] < 0.5, (fitted, kept)


@pytest.mark.slow
def test_a_round_deadline_drops_the_slow_client_names_it_and_never_aggregates_it_later(tiny_fed, tmp_path):
    from utils.demo import make_demo

    slow = make_demo(tmp_path / "big", seed=5, n_train=3000, n_val=2)[0][1]  # ~25 s an epoch: past every deadline
    save = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", str(tiny_fed[0][0]), str(slow), "--num-rounds",
           "2", "--epochs", "1", "--imgsz", "32", "--batch", "4", "--device", "cpu", "--save-dir", str(save),
           "--round-timeout", "15", "--evaluate", "false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    log = r.stdout + r.stderr

    assert r.returncode == 0, log[-3000:]
    assert "round 1/2" in log and "1 late: client light" in log and "round 2/2" in log
    rows = _rows(save)
    # round 2 counts only its own fresh update: the slow client's round-1 reply, which came during round 2, is gone
    assert [(row["updates"], row["late"], row["sampled"]) for row in rows] == [("1", "1", "2")] * 2
    assert float(rows[1]["time_round"]) < 15 * 1.1 + 3  # the deadline, its polling and the round's files
    assert "a client failed" not in log

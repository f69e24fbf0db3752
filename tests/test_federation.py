"""A real federation in this process (tests/conftest.py run_in_process): the strategy and real clients, round by
round as Flower's server loop drives them, and every output file of the run; no Ray, so it stays in the fast tier.
tests/test_simulation.py runs the same through `python3 federated.py` (Ray)."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import FED, check_metrics, check_round_files, export_cli, run_in_process
from utils.params import load_npz

NAMES = ["circle", "square", "triangle", "cross"]


def _rows(save):
    with (save / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_round_file_is_the_whole_model_and_round_two_moved_it(fed_run):
    check_round_files(fed_run.save, NAMES)
    assert [sorted(cid for cid, _ in fed_run.fits[r]) for r in (1, 2)] == [["0", "1"]] * 2  # both clients, both rounds


def test_metrics_rows_hold_every_column_and_the_global_map_is_the_val_weighted_mean(fed_run):
    check_metrics(fed_run.save)


def test_last_and_best_load_in_ultralytics_and_a_round_exports(fed_run, tmp_path):
    from ultralytics import YOLO

    save = fed_run.save
    for name in ("last.pt", "best.pt"):
        assert list(YOLO(str(save / name)).names.values()) == NAMES
    # last.pt holds exactly round 2's weights
    last = [v.numpy() for v in YOLO(str(save / "last.pt")).model.state_dict().values()]
    assert all(np.array_equal(a, b) for a, b in zip(last, load_npz(save / "round2.npz")))

    out = tmp_path / "round2.pt"  # the run's folder is shared by the tests: exported elsewhere
    assert export_cli("yolov8n.yaml", save / "round2.npz", "-o", out) == (0, "")
    assert YOLO(str(out)).names[3] == "cross"


def test_the_run_says_its_learning_rate_each_round_and_where_its_outputs_are(fed_run):
    log = fed_run.log
    # two 8-image clients at batch 2 (4 steps per epoch each) against a centralized epoch of 16 images at nbs 8
    # (2 steps): 0.5
    assert "optimizer AdamW, lr0 0.000625: Ultralytics' own rate x 0.5 (derived from the clients' image counts)" in log
    assert "round 1/2" in log and "round 2/2" in log and "mAP50-95" in log and "best.pt" in log
    assert "client dark  round 2/2  epoch 1/1  loss " in log and " img/s" in log  # progress inside a round
    assert "a client failed" not in log and fed_run.strategy.failure() is None


def test_a_finished_run_extended_by_a_round_continues_its_schedule(fed_run, tmp_path):
    """Resume with a larger num-rounds: the earlier rounds kept byte for byte, the schedule recomputed over 3 rounds,
    the optimizer and learning rate the run started with."""
    save = tmp_path / "run"
    shutil.copytree(fed_run.save, save)
    kept = {n: _sha(save / n) for n in ("round1.npz", "round2.npz")}

    ext = run_in_process({"resume": True, "save-dir": str(save), "num-rounds": 3},
                         given={"RESUME", "SAVE_DIR", "NUM_ROUNDS"})  # as `--resume --save-dir S --num-rounds 3`

    assert ext.run["offset"] == 2 and sorted(ext.fits) == [1]  # one more round, Flower's round 1 is the run's 3
    assert {n: _sha(save / n) for n in kept} == kept
    rows = _rows(save)
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    # round 3 is epoch 3 of 3 of one run: linear decay lr0 * ((1 - 2/3) * 0.99 + 0.01), lr0 0.000625 as above
    assert float(rows[2]["train_lr"]) == pytest.approx(0.000625 * (1 / 3 * 0.99 + 0.01), rel=1e-4)
    assert len(load_npz(save / "round3.npz")) == 355
    config = json.loads((save / "config.json").read_text())
    assert config["settings"]["NUM_ROUNDS"] == 3 and config["settings"]["IMGSZ"] == 32
    assert config["hyp"]["lr0"] == 0.000625 and config["lr_scale"] == 0.5  # the optimizer the run started with


def test_partial_sharing_sends_only_the_shared_parts_and_keeps_the_rest_on_each_client(tiny_fed, tmp_path):
    """SHARE=backbone+neck with the median: after round 1 only those entries travel (fewer bytes both ways), the
    global model's head stays the starting one, and each client writes its own model with its own head."""
    import torch

    from utils.model import build_model, read_base
    from utils.params import get_weights
    from utils.share import part

    save = tmp_path / "run"
    run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED,
                    "share": "backbone+neck", "strategy": "fedmedian"})
    rows = _rows(save)
    full, up, down2 = int(rows[0]["bytes_down"]), int(rows[0]["bytes_up"]), int(rows[1]["bytes_down"])
    assert up == down2 == int(rows[1]["bytes_up"]) and up < 0.9 * full  # the head never travels after round 1
    arch = read_base("yolov8n.yaml")[0]
    model = build_model(arch, NAMES, seed=0)
    keys, start = list(model.state_dict()), get_weights(model)
    head = [i for i, k in enumerate(keys) if part(k, arch) == "head"]
    shared = [i for i in range(len(keys)) if i not in head and start[i].dtype.kind == "f"]
    for n in (1, 2):
        arrays = load_npz(save / f"round{n}.npz")
        assert all(np.array_equal(arrays[i], start[i]) for i in head)
        assert any(not np.array_equal(arrays[i], start[i]) for i in shared)
    for client in ("dark", "light"):
        mine = [t.numpy() for t in torch.load(save / "clients" / f"{client}.pt", weights_only=False)["model"]
                .state_dict().values()]
        assert any(not np.array_equal(mine[i], start[i]) for i in head), client  # its own trained head


def test_patience_stops_the_run_once_the_score_stops_improving_and_personalize_tunes_the_best(tiny_fed, tmp_path):
    """With PERSONALIZE, the stop is followed by one more evaluation in which every client fine-tunes the best
    round's model (not the last one's); its scores join the best round's row."""
    save, clients = tmp_path / "run", tiny_fed[0][:2]
    done = run_in_process({"datasets": [str(p) for p in clients], "save-dir": str(save), **FED,
                           "num-rounds": 4, "patience": 1, "personalize": 1})

    rows = _rows(save)
    scores = [float(row["map50_95"]) for row in rows]
    best = [max(scores[:i + 1]) for i in range(len(scores))]
    stop = next(r for r in range(2, 5) if best[r - 1] <= best[r - 2])  # the first round that did not improve
    top = scores.index(best[-1]) + 1  # the best round (ties: the first)
    assert len(scores) == stop < 4  # no round trained after it
    assert (save / f"round{stop}.npz").is_file() and not (save / f"round{stop + 1}.npz").exists()
    assert f"stopping after round {stop} of 4: the global mAP50-95 has not improved for 1 rounds" in done.log
    assert f"done: {stop} rounds in {save}" in done.log and done.strategy.failure() is None
    assert (save / "best.pt").is_file() and (save / "last.pt").is_file()
    for data in clients:
        name = data.parent.name
        ckpt = torch.load(save / "clients" / f"{name}.finetuned.pt", weights_only=False)
        assert ckpt["federated"]["finetuned_from_round"] == top
        assert rows[top - 1][f"personal_score_{name}"] != ""  # the best round's row, the others without
        assert all(row.get(f"personal_score_{name}") in ("", None) for i, row in enumerate(rows) if i != top - 1)
    assert f"fine-tuned   each client's best model (round {top}) after 1 more epochs" in done.log


def test_eval_in_fit_scores_a_round_with_the_next_rounds_updates_the_same_weights_and_scores(fed_run, tmp_path):
    """EVAL_IN_FIT: the clients validate round 1's model at the start of round 2's fit and send the scores with their
    updates; the last round's model goes out in an evaluate message. Weights and scores are those of fed_run, the
    same run with an evaluate message every round."""
    save = tmp_path / "run"
    done = run_in_process({"datasets": fed_run.cfg["DATASETS"], "save-dir": str(save), **FED, "eval-in-fit": True})

    assert not any(k.startswith("eval_") for _, res in done.fits[1] for k in res.metrics)
    assert all(res.metrics["eval_images"] > 0 and "eval_map50_95" in res.metrics for _, res in done.fits[2])
    for r in (1, 2):
        ours, theirs = load_npz(save / f"round{r}.npz"), load_npz(fed_run.save / f"round{r}.npz")
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    rows, base = _rows(save), _rows(fed_run.save)
    scores = [k for k in base[0] if k.startswith(("precision", "recall", "map50"))]
    assert len(scores) >= 6 and [[row[k] for k in scores] for row in rows] == [[row[k] for k in scores] for row in base]
    assert float(rows[0]["time_evaluate"]) == 0 < float(rows[1]["time_evaluate"])  # round 1: no evaluate message
    assert "train_eval_map50_95" not in rows[0] and "train_eval_map50_95" not in rows[1]


def _fingerprint(arrays):
    return float(np.mean([a.mean(dtype=np.float64) for a in arrays if a.dtype.kind == "f"]))


def test_eval_in_fit_scores_the_model_the_clients_were_sent_not_the_one_they_trained(tiny_fed, tmp_path, monkeypatch):
    """The tiny runs score 0 whichever model is validated, so here the validator's score is a fingerprint of the
    weights it is given (real validation: tests/test_truth.py): each row's score must be its own round file's."""
    import utils.evaluate

    def fingerprint(model, data_yaml, hyp):
        value = _fingerprint([t.detach().numpy() for t in model.state_dict().values()])
        return {"precision": value, "recall": value, "map50": value, "map50_95": value, "images": 4}

    monkeypatch.setattr(utils.evaluate, "evaluate", fingerprint)
    save = tmp_path / "run"
    run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED, "num-rounds": 3,
                    "eval-in-fit": True})
    scores = [float(row["map50_95"]) for row in _rows(save)]
    rounds = [_fingerprint(load_npz(save / f"round{r}.npz")) for r in (1, 2, 3)]
    assert scores == pytest.approx(rounds, rel=1e-5) and len(set(rounds)) == 3


def test_eval_in_fit_with_patience_stops_without_the_round_that_brought_the_scores(tiny_fed, tmp_path):
    """The round whose updates carry the scores that stop the run (PATIENCE) trained for nothing: its update is not
    used and its round file not written; the run ends on the stopped round as without EVAL_IN_FIT."""
    save = tmp_path / "run"
    done = run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED,
                           "num-rounds": 4, "patience": 1, "eval-in-fit": True})

    scores = [float(row["map50_95"]) for row in _rows(save)]
    best = [max(scores[:i + 1]) for i in range(len(scores))]
    stop = next(r for r in range(2, 4) if best[r - 1] <= best[r - 2])
    assert len(scores) == stop and [r for r, fits in done.fits.items() if fits] == list(range(1, stop + 2))
    assert not (save / f"round{stop + 1}.npz").exists() and (save / f"round{stop}.npz").is_file()
    assert f"stopping after round {stop} of 4" in done.log and done.strategy.failure() is None


def test_patience_needs_a_score_every_round(tiny_fed, tmp_path):
    with pytest.raises(ValueError, match="patience 2 needs a global score every round"):
        run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "r"), **FED,
                        "patience": 2, "evaluate": False})


def test_personalize_needs_the_last_rounds_evaluation(tiny_fed, tmp_path):
    with pytest.raises(ValueError, match="personalize needs evaluate on"):
        run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(tmp_path / "r"), **FED,
                        "personalize": 2, "evaluate": False})
    assert not (tmp_path / "r").exists()


def test_eval_every_scores_every_nth_round_and_the_last_and_picks_best_among_them(tiny_fed, tmp_path):
    save = tmp_path / "run"
    done = run_in_process({"datasets": [str(p) for p in tiny_fed[0][:2]], "save-dir": str(save), **FED,
                           "num-rounds": 3, "eval-every": 2})

    rows = _rows(save)
    assert [row["round"] for row in rows] == ["1", "2", "3"]  # every round is recorded
    assert [row["map50_95"] != "" for row in rows] == [False, True, True]  # round 2, then the last
    assert [row.get("time_evaluate", "") != "" for row in rows] == [False, True, True]
    assert done.strategy.record.best_round in (2, 3) and (save / "best.pt").is_file()
    assert all(row["train_time_prepare"] != "" and row["train_time_upload"] != "" for row in rows)
    assert all(float(row["train_time_state"]) > 0 for row in rows)  # KEEP_OPTIMIZER's file, written every round

"""Every Ultralytics task: demo data, dataset checks, the task's model, trainer and validator, and a real
federation per task whose exported round file `yolo val` takes."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FED, ROOT, TINY, export_cli, run_in_process
from utils.classes import client_view
from utils.datasets import check_dataset, check_federation
from utils.demo import NAMES, make_demo
from utils.model import build_model, model_task, read_base
from utils.tasks import TASKS

BASES = {"segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml",
         "classify": "yolov8n-cls.yaml"}


@pytest.fixture(scope="session")
def task_fed(tmp_path_factory):
    """{task: (client datasets, test dataset)}: tiny demo federations (8 train, 4 val images per client)."""
    root = tmp_path_factory.mktemp("tasks")
    return {t: make_demo(root / t, seed=0, n_train=8, n_val=4, task=t) for t in BASES}


def _label_lengths(dataset):
    return {len(line.split()) for f in (Path(dataset).parent / "labels" / "train").glob("*.txt")
            for line in f.read_text().splitlines() if line.strip()}


def test_demo_labels_have_each_tasks_format(task_fed):
    seg = _label_lengths(task_fed["segment"][0][0])
    assert all(n >= 7 and n % 2 == 1 for n in seg) and max(seg) == 33  # polygons; a circle has 16 points
    assert _label_lengths(task_fed["obb"][0][0]) == {9}
    assert _label_lengths(task_fed["pose"][0][0]) == {5 + 4 * 3}
    checks = check_federation(task_fed["classify"][0], "classify")  # class lists: the folders of train/ and val/
    assert [c["train_images"] for c in checks] == [8, 8, 8]
    assert sorted({n for c in checks for n in c["names"]}) == sorted(NAMES)
    for c in checks:
        folders = {p.name for split in ("train", "val") for p in (Path(c["yaml"]["path"]) / split).iterdir()}
        assert c["names"] == sorted(folders)


def test_labels_that_do_not_fit_the_task_are_refused(task_fed, tiny_fed):
    (task_fed["obb"][0][0].parent / "pose.yaml").write_text(task_fed["obb"][0][0].read_text() + "kpt_shape: [4, 3]\n")
    detect = tiny_fed[0][0]
    for task in ("segment", "obb", "pose"):
        with pytest.raises(ValueError, match=f"dataset {detect}") as e:
            check_dataset(detect, task)
        assert ("kpt_shape" in str(e.value)) if task == "pose" else (f"task '{task}'" in str(e.value))
    with pytest.raises(ValueError, match="no label line fits the task 'pose' .* 9 numbers; with kpt_shape"):
        check_dataset(task_fed["obb"][0][0].parent / "pose.yaml", "pose")
    with pytest.raises(ValueError, match="train/ and val/"):
        check_dataset(detect, "classify")  # a data.yaml given to a classification run


def test_pose_clients_must_share_kpt_shape(task_fed, tmp_path):
    a = task_fed["pose"][0][0]
    other = tmp_path / "other.yaml"
    other.write_text(a.read_text().replace("kpt_shape: [4, 3]", "kpt_shape: [4, 2]"))
    with pytest.raises(ValueError, match="kpt_shape"):
        check_federation([a, other], "pose")


@pytest.mark.parametrize("task", list(BASES))
def test_base_model_gives_the_tasks_model(task, task_fed):
    arch, _ = read_base(BASES[task])
    assert model_task(arch).name == task
    if task == "pose":
        arch["kpt_shape"] = check_dataset(task_fed["pose"][0][0], "pose")["yaml"]["kpt_shape"]
    model = build_model(arch, NAMES)
    assert type(model).__name__ == TASKS[task].model and model.names == dict(enumerate(NAMES))
    if task == "pose":
        assert list(model.model[-1].kpt_shape) == [4, 3]


def test_a_mixed_task_clients_base_model_is_read_once_per_file_version(tmp_path):
    import shutil

    from utils.model import read_base_cached

    pt = tmp_path / "base.pt"
    torch.save({"model": build_model(read_base("yolov8n-seg.yaml")[0], NAMES)}, pt)
    (a, ma), (b, mb) = read_base_cached(pt), read_base_cached(pt)
    assert mb is ma and a == b and a is not b  # the model read once; each caller gets its own architecture dict
    a["kpt_shape"] = [4, 3]
    assert "kpt_shape" not in read_base_cached(pt)[0]
    shutil.copy(pt, tmp_path / "copy.pt")
    os.utime(tmp_path / "copy.pt", ns=(1, 1))
    os.replace(tmp_path / "copy.pt", pt)  # another version of the file: read again
    assert read_base_cached(pt)[1] is not ma


def test_classify_folders_take_the_federations_class_ids(task_fed, tmp_path):
    """A classify client with some of the classes, in another order: its images carry the federation's class ids."""
    from utils.train import train_round

    client = tmp_path / "client"
    for cls in ("square", "cross"):  # sorted, Ultralytics would number these cross 0, square 1
        images = sorted(f for src in task_fed["classify"][0] for f in src.glob(f"*/{cls}/*.png"))
        for split, files in (("train", images[:2]), ("val", images[2:3])):
            (client / split / cls).mkdir(parents=True)
            for i, f in enumerate(files):
                (client / split / cls / f"{i}.png").symlink_to(f)
    check = check_dataset(client, "classify")
    assert check["names"] == ["cross", "square"]
    seen = {}

    def look(trainer):
        seen["ids"] = {Path(f).parent.name: c for f, c, *_ in trainer.train_loader.dataset.samples}

    model = build_model(read_base(BASES["classify"])[0], NAMES)
    data = client_view(check, NAMES, tmp_path / "view")
    assert sorted(p.name for p in (data / "train").iterdir()) == ["cross", "square"]  # links to its class folders
    before = sorted(p.relative_to(client) for p in client.rglob("*"))
    train_round(model, data, 0, 1, 1, TINY, callbacks={"on_pretrain_routine_end": look})
    assert seen["ids"] == {"square": NAMES.index("square"), "cross": NAMES.index("cross")}
    assert model.names == dict(enumerate(NAMES))
    assert sorted(p.relative_to(client) for p in client.rglob("*")) == before  # no train.cache beside the data
    assert (data / "train.cache").is_file()  # Ultralytics' cache went to the view


def test_proximal_term_on_a_batch_mean_loss():
    """Classification's loss is a 0-d batch mean: FedProx adds the term once (no batch-size factor)."""
    from utils.train import ProximalLoss

    model = torch.nn.Linear(2, 1)
    loss = ProximalLoss(lambda preds, batch: (torch.tensor(1.0), {"loss": 1.0}), model, mu=2.0)
    with torch.no_grad():
        model.weight += 1.0  # ||w - w0||^2 = 2
    out, _ = loss(None, {"img": torch.zeros(8, 3, 4, 4)})
    assert out.dim() == 0 and float(out) == pytest.approx(1.0 + 0.5 * 2.0 * 2.0)


@pytest.mark.parametrize("task", list(BASES))
def test_task_federation_export_and_yolo_val(task, task_fed, tmp_path):
    """A real 2-client federation of each task, run in this process (the strategy and real clients, as a simulation
    without Ray, which is the same for every task): the task's metrics in metrics.csv, best.pt of the task, and the
    exported round file validated by the `yolo` command on the held-out test split."""
    clients, test = task_fed[task]
    save = tmp_path / "run"
    run = run_in_process({"base-model": BASES[task], "datasets": [str(c) for c in clients[:2]], "save-dir": str(save),
                          **FED, "num-rounds": 1})
    metric, label = TASKS[task].metric, TASKS[task].label
    assert any(line.startswith("round 1/1") and f" {label} " in line for line in run.log.splitlines())  # its score
    with (save / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["updates"] == "2"
    for key in (*TASKS[task].metrics.values(), f"{metric}_dark", f"{metric}_light"):
        assert 0.0 <= float(row[key]) <= 1.0, key
    ckpt = torch.load(save / "best.pt", weights_only=False)
    assert ckpt["train_args"]["task"] == task and type(ckpt["model"]).__name__ == TASKS[task].model

    out = tmp_path / "exported.pt"
    status, last = export_cli(save / "round1.npz", "-o", out)
    assert status == 0, last
    yolo = Path(sys.executable).parent / "yolo"
    r = subprocess.run([str(yolo), "val", f"model={out}", f"data={test}", "imgsz=32", "batch=4", "device=cpu",
                        "plots=False", f"project={tmp_path / 'val'}"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, env={**os.environ, "YOLO_VERBOSE": "true"})
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    columns = {"classify": "top1_acc", "segment": "Mask(P", "pose": "Pose(P", "obb": "Box(P"}[task]
    assert columns in text and " all " in text, text[-3000:]  # the task's metrics over the whole test split


def _mixed_cfg(task_fed, tiny_fed, tmp_path, **settings):
    from federated import DEFAULTS
    from utils.config import resolve

    datasets = [str(tiny_fed[0][0]), str(tiny_fed[0][1]), str(task_fed["segment"][0][2])]
    return resolve(DEFAULTS, {"datasets": datasets, "client-models": ["yolov8n.yaml", "yolov8n.yaml", BASES["segment"]],
                              "share": "backbone+neck", "save-dir": str(tmp_path / "run"), **settings})


def test_mixed_tasks_are_checked_before_training(task_fed, tiny_fed, tmp_path):
    import federated

    run = federated.prepare(_mixed_cfg(task_fed, tiny_fed, tmp_path))
    assert run["spec"]["client_models"][2] == BASES["segment"] and run["shared"]
    for settings, words in (({"share": "all"}, "clients of different models keep their own head; set share to"),
                            ({"client-models": ["yolov8n.yaml", "yolov8n.yaml", "yolov8s-seg.yaml"]},
                             "client model yolov8s-seg.yaml does not fit the shared parts (backbone+neck) of "
                             "yolov8n.yaml: entry model.0.conv.weight"),
                            ({"client-models": ["yolov8n.yaml", BASES["segment"]]}, "names 2 models for 3 datasets"),
                            ({"client-models": ["yolov8n.yaml", "yolov8n.yaml", BASES["pose"]]},
                             "needs 'kpt_shape")):
        with pytest.raises(ValueError, match=re.escape(words)):
            federated.prepare(_mixed_cfg(task_fed, tiny_fed, tmp_path, **settings))


@pytest.mark.slow
def test_mixed_task_federation_shares_the_backbone_and_neck(task_fed, tiny_fed, tmp_path):
    """Two detection clients and one segmentation client: one shared backbone and neck, each keeping its own head; the
    segmentation client's personalized model is a segmentation model that holds the shared parts of the round."""
    import numpy as np

    from utils.params import load_npz
    from utils.share import part

    cfg = _mixed_cfg(task_fed, tiny_fed, tmp_path)
    save = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "federated.py"), "--datasets", *cfg["DATASETS"], "--client-models",
           *cfg["CLIENT_MODELS"], "--share", "backbone+neck", "--num-rounds", "2", "--epochs", "1", "--imgsz", "32",
           "--batch", "4", "--device", "cpu", "--save-dir", str(save)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    with (save / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["updates"] for row in rows] == ["3", "3"]
    row = rows[-1]
    assert row["mask_map50_95"] != "" and row["map50_95"] != ""  # each task's metrics, over its own clients
    assert all(0.0 <= float(row[f"score_{c}"]) <= 1.0 for c in ("dark", "light", "noisy"))
    seg = torch.load(save / "clients" / "noisy.pt", weights_only=False)
    assert seg["train_args"]["task"] == "segment" and type(seg["model"]).__name__ == "SegmentationModel"
    models = [[t.numpy() for t in torch.load(save / "clients" / f"{c}.pt", weights_only=False)["model"]
               .state_dict().values()] for c in ("dark", "light", "noisy")]
    keys = list(torch.load(save / "clients" / "dark.pt", weights_only=False)["model"].state_dict())
    glob = load_npz(save / "round2.npz")
    arch = read_base("yolov8n.yaml")[0]
    shared = [i for i, k in enumerate(keys) if part(k, arch) != "head"]
    assert 0 < len(shared) < len(glob) and int(row["bytes_up"]) < 0.9 * sum(a.nbytes for a in glob)
    for i in (i for i in shared if glob[i].dtype.kind == "f"):  # the global backbone and neck: the mean of the three
        mean = sum(m[i].astype(np.float64) for m in models) / 3  # clients' (8 train images each), seg included
        if keys[i].endswith("running_var"):  # POOLED_BN_VAR: the variance of their data taken together
            j = keys.index(keys[i][:-3] + "mean")
            mean += sum(m[j].astype(np.float64) ** 2 for m in models) / 3 - (sum(m[j] for m in models) / 3) ** 2
        np.testing.assert_allclose(glob[i], mean, rtol=1e-4, atol=1e-6)
    assert np.array_equal(load_npz(save / "round1.npz")[-1], glob[-1])  # the global head never moves


def test_personalize_keeps_each_clients_fine_tuned_model_and_scores_it_on_its_own_val_split(task_fed, tmp_path):
    """Classification: a tiny model's scores are above 0 (a detector's mAP at this size is 0.000 whatever it holds),
    so the score written beside each client's fine-tuned model is checked against the model in the file."""
    from ultralytics import YOLO

    from utils.classes import view_folder
    from utils.evaluate import evaluate

    save, clients = tmp_path / "run", task_fed["classify"][0][:2]
    done = run_in_process({"datasets": [str(p) for p in clients], "save-dir": str(save), **FED, "num-rounds": 1,
                           "base-model": BASES["classify"], "personalize": 2, "fraction-evaluate": 0.5})

    with (save / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    final = YOLO(str(save / "last.pt")).model.state_dict()
    for data in clients:  # every client fine-tuned, though half of them were to validate
        client = data.name
        tuned = YOLO(str(save / "clients" / f"{client}.finetuned.pt")).model  # an ordinary Ultralytics checkpoint
        assert any(not torch.equal(v, final[k]) for k, v in tuned.state_dict().items())  # trained past the final
        view = client_view(check_dataset(data, "classify"), NAMES, view_folder(tmp_path / "views", data, NAMES))
        own = evaluate(tuned, view, {"imgsz": 32, "batch": 4, "device": "cpu", "workers": 0})["top1"]
        assert own > 0 and float(row[f"personal_score_{client}"]) == pytest.approx(own, abs=1e-6)
        assert float(row[f"top1_{client}"]) >= 0  # the global model's score on the same split, beside it
    assert "fine-tuned   each client's final model after 2 more epochs on its own images" in done.log
    assert "mean of 2" in done.log

"""Export of a round npz to an Ultralytics .pt, and its refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, export_cli
from utils.export_federated import main as export_main
from utils.model import build_model, read_base
from utils.params import get_weights, save_npz

EXPORT = [sys.executable, str(ROOT / "utils" / "export_federated.py")]  # the script's smoke test: the round trip


@pytest.fixture()
def round_file(tiny_model, tmp_path):
    """A round npz of trained-looking weights with the run's config.json beside it, and the in-memory model."""
    cfg, names = tiny_model
    model = build_model(cfg, names, seed=4)
    g = np.random.default_rng(0)
    arrays = [a + g.normal(0, 0.01, a.shape).astype(a.dtype) if a.dtype.kind == "f" else a for a in get_weights(model)]
    model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(model.state_dict(), arrays)})
    save_npz(tmp_path / "round3.npz", arrays)
    (tmp_path / "config.json").write_text(json.dumps({"names": names, "hyp": {"imgsz": 32}}))
    return tmp_path / "round3.npz", model.eval()


def test_export_round_trip_predicts_like_the_in_memory_model(round_file, tiny_fed, tmp_path):
    from ultralytics import YOLO

    npz, model = round_file
    r = subprocess.run([*EXPORT, "yolov8n.yaml", str(npz)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = npz.with_suffix(".pt")
    assert out.is_file()

    yolo = YOLO(str(out))
    assert list(yolo.names.values()) == ["circle", "square", "triangle", "cross"]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(yolo.model.eval()(x)[0].numpy(), model(x)[0].numpy(), rtol=1e-5, atol=1e-5)
    image = str(next((tiny_fed[1].parent / "images" / "test").iterdir()))
    res = yolo.predict(image, imgsz=64, verbose=False, project=str(tmp_path))
    assert res[0].names == dict(enumerate(["circle", "square", "triangle", "cross"]))
    metrics = yolo.val(data=str(tiny_fed[1]), imgsz=32, batch=8, workers=0, plots=False, verbose=False,
                       project=str(tmp_path))
    assert 0.0 <= metrics.box.map <= 1.0


def test_export_custom_output_path(round_file, tmp_path):
    npz, _ = round_file
    out = tmp_path / "sub" / "model.pt"
    status, _ = export_cli("yolov8n.yaml", npz, "-o", out)
    assert status == 0 and out.is_file() and not npz.with_suffix(".pt").exists()


def test_export_refuses_npz_of_another_model(round_file, tiny_model, tmp_path):
    cfg, names = tiny_model
    npz = tmp_path / "other.npz"
    save_npz(npz, get_weights(build_model(cfg, names + ["extra"])))  # five classes, config.json says four

    status, last = export_cli("yolov8n.yaml", npz)

    assert status != 0
    assert "other.npz" in last and "model.22.cv3.0.2.weight" in last and "shape" in last
    assert not npz.with_suffix(".pt").exists()


def test_export_refuses_wrong_dtype_and_count(round_file, tmp_path):
    npz, model = round_file
    arrays = get_weights(model)
    bad = tmp_path / "dtype.npz"
    save_npz(bad, [a.astype(np.float32) for a in arrays])  # integer buffers turned into floats
    short = tmp_path / "short.npz"
    save_npz(short, arrays[:-1])
    for f, words in ((bad, "dtype"), (short, "354 arrays")):
        status, last = export_cli("yolov8n.yaml", f)
        assert status != 0 and words in last
        assert not f.with_suffix(".pt").exists()


def test_export_refuses_truncated_npz(round_file):
    npz, _ = round_file
    npz.write_bytes(npz.read_bytes()[:1000])
    status, last = export_cli("yolov8n.yaml", npz)
    assert status != 0 and "round3.npz" in last
    assert not npz.with_suffix(".pt").exists()


def test_exported_model_exports_to_onnx_and_predicts_the_same(round_file, tiny_fed, tmp_path):
    import onnxruntime
    from ultralytics import YOLO

    npz, _ = round_file
    out = tmp_path / "m.pt"
    assert export_cli("yolov8n.yaml", npz, "-o", out) == (0, "")
    onnx_path = YOLO(str(out)).export(format="onnx", imgsz=64)  # what `yolo export format=onnx` runs

    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    session = onnxruntime.InferenceSession(onnx_path)
    y_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        y_pt = YOLO(str(out)).model.eval()(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(y_onnx, y_pt, atol=1e-3, rtol=1e-3)
    image = str(next((tiny_fed[1].parent / "images" / "test").iterdir()))
    res = YOLO(onnx_path, task="detect").predict(image, imgsz=64, verbose=False, project=str(tmp_path))
    assert res[0].names == dict(enumerate(["circle", "square", "triangle", "cross"]))


def _run_dir(folder, npz_names, config_names, settings=True):
    """A folder holding round1.npz of a yolov8n for `npz_names` and a minimal config.json naming `config_names`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_npz(folder / "round1.npz", get_weights(build_model(read_base("yolov8n.yaml")[0], npz_names)))
    info = {"settings": {"BASE_MODEL": "yolov8n.yaml"} if settings else {}, "names": config_names, "hyp": {}}
    (folder / "config.json").write_text(json.dumps(info))
    return folder / "round1.npz"


def test_export_without_base_takes_it_from_config_json(tmp_path):
    from ultralytics import YOLO

    npz = _run_dir(tmp_path / "run", ["a", "b"], ["a", "b"])
    assert export_cli(npz) == (0, "")
    ckpt = YOLO(str(npz.with_suffix(".pt")))
    assert ckpt.names == {0: "a", 1: "b"} and ckpt.ckpt["train_args"]["model"] == "yolov8n.yaml"


def test_export_without_base_refuses_a_mismatch_or_a_missing_base_model(tmp_path):
    npz = _run_dir(tmp_path / "mismatch", ["a", "b", "c"], ["a", "b"])  # the npz has 3 classes, config.json 2
    with pytest.raises(SystemExit, match=r"round1.npz entry \d+ \(model.22.cv3.0.2.weight\) has shape"):
        export_main([str(npz)])
    npz = _run_dir(tmp_path / "no_settings", ["a", "b"], ["a", "b"], settings=False)
    with pytest.raises(SystemExit, match=r"no BASE given and .*config.json has no settings.BASE_MODEL: give BASE"):
        export_main([str(npz)])
    (npz.parent / "config.json").unlink()
    with pytest.raises(SystemExit, match=r"no BASE given and there is no .*config.json: give BASE, the .pt or .yaml"):
        export_main([str(npz)])
    export_main(["yolov8n.yaml", str(npz), "--names", "a", "b"])  # BASE NPZ still works without a config.json
    assert not (tmp_path / "mismatch" / "round1.pt").exists() and npz.with_suffix(".pt").is_file()

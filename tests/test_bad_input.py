"""Bad input stops federated.py before any training, with one clear last line, and leaves saved rounds alone."""

import hashlib
import re
import shutil

import pytest

import federated
from tests.conftest import ROOT
from utils.config import resolve
from utils.datasets import check_dataset, check_federation


def _copy_client(tiny_fed, tmp_path, name="client"):
    """A writable copy of one demo client; returns its data.yaml."""
    src = tiny_fed[0][0].parent
    dst = tmp_path / name
    shutil.copytree(src, dst)
    (dst / "data.yaml").write_text((src / "data.yaml").read_text().replace(str(src), str(dst)))
    return dst / "data.yaml"


def _edit(yaml_path, old, new):
    yaml_path.write_text(yaml_path.read_text().replace(old, new))
    return yaml_path


CASES = {
    "missing_dataset": (lambda y: y.parent / "nope.yaml", "nope.yaml does not exist"),
    "missing_split": (lambda y: _edit(y, "val: images/val\n", ""), "has no 'val' split"),
    "split_path_missing": (lambda y: _edit(y, "val: images/val", "val: images/gone"), "images/gone does not exist"),
    "nc_mismatch": (lambda y: _edit(y, "names:", "nc: 7\nnames:"), "'nc: 7' does not match the 4 entries"),
    "download_key": (
        lambda y: _edit(y, "names:", "download: |\n  open('PWNED', 'w').write('x')\nnames:"),
        "has a 'download:' key",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_is_named_before_training(case, tiny_fed, tmp_path):
    make, words = CASES[case]
    bad = make(_copy_client(tiny_fed, tmp_path))
    with pytest.raises(ValueError, match=words):
        check_federation([str(tiny_fed[0][1]), str(bad)])
    assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists()


def test_dataset_given_as_a_folder_names_the_data_yaml_inside(tiny_fed, tmp_path):
    y = _copy_client(tiny_fed, tmp_path)
    folder, file = re.escape(str(y.parent)), re.escape(str(y))
    with pytest.raises(ValueError, match=f"^dataset {folder} is a folder, not a data.yaml; did you mean {file}\\?$"):
        check_federation([str(tiny_fed[0][0]), str(y.parent)])
    y.unlink()
    with pytest.raises(ValueError, match=f"^dataset {folder} is a folder, not a data.yaml, and holds no .yaml file"):
        check_dataset(y.parent)
    with pytest.raises(ValueError, match=f"^dataset {file} does not exist$"):
        check_dataset(y)


def test_clients_with_different_classes_form_the_union_and_names_must_cover_it(tiny_fed, tmp_path):
    other = _edit(_copy_client(tiny_fed, tmp_path), "3: cross", "3: star")
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(tiny_fed[0][0]), str(other)], "save-dir": str(tmp_path / "r")})
    assert federated.prepare(dict(cfg))["spec"]["names"] == ["circle", "square", "triangle", "cross", "star"]
    with pytest.raises(ValueError, match=r"lack the classes \['star'\]"):
        federated.prepare({**cfg, "NAMES": ["circle", "square", "triangle", "cross"]})


def test_client_without_any_label_is_refused(tiny_fed, tmp_path):
    y = _copy_client(tiny_fed, tmp_path)
    for label in (y.parent / "labels" / "train").iterdir():
        label.write_text("")
    with pytest.raises(ValueError, match=f"dataset {y}: none of its 8 train images has a label"):
        check_federation([str(tiny_fed[0][1]), str(y)])


def test_dataset_path_relative_to_yaml_folder(tiny_fed, tmp_path):
    y = _copy_client(tiny_fed, tmp_path)
    _edit(y, f"path: {y.parent}", "path: .")
    assert check_dataset(y)["train_images"] == 8


def test_cli_refuses_bad_input_and_keeps_earlier_rounds(tiny_fed, tmp_path, refused):
    save = tmp_path / "run"
    save.mkdir()
    (save / "round1.npz").write_bytes(b"earlier round")
    digest = hashlib.sha256((save / "round1.npz").read_bytes()).hexdigest()
    bad = _edit(_copy_client(tiny_fed, tmp_path), "names:", "download: bash get.sh\nnames:")
    cmd = ["--save-dir", save, "--exist-ok"]  # federated.py's command line, run by main() in this process

    status, last = refused(*cmd, "--datasets", tiny_fed[0][0], bad)
    assert status != 0
    assert last.startswith(f"federated.py: dataset {bad} has a 'download:' key")

    status, last = refused(*cmd[:-1], "--datasets", tiny_fed[0][0])
    assert status != 0 and "already holds round files" in last

    status, last = refused(*cmd, "--epochs", "two")
    assert status != 0 and "setting epochs: expected int" in last

    assert hashlib.sha256((save / "round1.npz").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in save.iterdir()) == ["round1.npz"]


@pytest.mark.parametrize("key,value", [("LR_SCALE", -1.0), ("LR_SCALE_MAX", 0.0), ("WARMUP_EPOCHS", -1.0),
                                       ("MIN_STEPS", -2), ("MIN_STEPS", "few"), ("FIXED_BN", -1), ("PERSONALIZE", -1)])
def test_schedule_settings_out_of_range_are_refused_naming_them(key, value, tiny_fed, tmp_path):
    cfg = resolve(federated.DEFAULTS, {"datasets": [str(tiny_fed[0][0])], "save-dir": str(tmp_path / "r")})
    flag = key.lower().replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} \\({value}\\)"):
        federated.prepare({**cfg, key: value})
    assert not (tmp_path / "r").exists()  # refused before anything was written

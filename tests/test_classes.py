"""Clients with different class lists: the union of names, the local -> global map, and a client's remapped view."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.classes import annotated, class_map, client_view, union_names
from utils.datasets import check_dataset, check_federation

BOX = "0.500000 0.500000 0.250000 0.250000"


def _dataset(root, names, labels, val=None, test=False):
    """Write a tiny dataset: {image stem: label text or None (no file)} for train (and val); return its data.yaml."""
    for split, items in (("train", labels), ("val", val or labels)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, text in items.items():
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), np.full((32, 32, 3), 127, np.uint8))
            if text is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(text)
    extra = "test: images/val\n" if test else ""
    names_yaml = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n{extra}names:\n{names_yaml}")
    return root / "data.yaml"


def _snapshot(root):
    """(path, size, mtime_ns) of everything under root, symlinks not followed."""
    return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in Path(root).rglob("*"))


def _view_labels(folder, split="train"):
    """{view label file name: text} of a view split."""
    return {p.name: p.read_text() for p in sorted((folder / split / "labels").glob("*.txt"))}


@pytest.fixture
def two_clients(tmp_path):
    """Client A names [cat, dog], client B names [dog, bird]; B's labels use its own ids 0 (dog) and 1 (bird)."""
    a = _dataset(tmp_path / "a", ["cat", "dog"], {"0000": f"0 {BOX}\n1 {BOX}\n", "0001": f"1 {BOX}\n"})
    b = _dataset(tmp_path / "b", ["dog", "bird"], {"0000": f"0 {BOX}\n", "0001": f"1 {BOX}\n0 {BOX}\n", "0002": None})
    return [a, b]


def test_union_is_first_seen_and_notes_case_or_space_variants():
    checks = [{"names": ["Car", "dog"]}, {"names": ["car ", "dog", "bird"]}, {"names": ["bird", "CAR", "cat"]}]
    files = ["a.yaml", "b.yaml", "c.yaml"]
    names, notes = union_names(checks, files)
    assert names == ["Car", "dog", "car ", "bird", "CAR", "cat"]
    assert union_names(checks, files) == (names, notes)  # deterministic
    assert notes == [
        "classes 'Car' (a.yaml) and 'car ' (b.yaml) differ only by case or spaces; they are kept as two classes - "
        "rename one if they are the same",
        "classes 'Car' (a.yaml) and 'CAR' (c.yaml) differ only by case or spaces; they are kept as two classes - "
        "rename one if they are the same",
    ]
    assert union_names(checks[::-1], files[::-1])[0] == ["bird", "CAR", "cat", "car ", "dog", "Car"]  # DATASETS order

    names, notes = union_names([{"names": ["traffic  light", "Traffic light", "person", "person"]}], ["x.yaml"])
    assert names == ["traffic  light", "Traffic light", "person"]
    assert "'traffic  light' (x.yaml) and 'Traffic light' (x.yaml) differ only by case or spaces" in notes[0]
    assert "'person' is listed twice in x.yaml" in notes[1]
    assert union_names([{"names": ["a", "b"]}, {"names": ["a", "b"]}], ["1", "2"]) == (["a", "b"], [])


def test_class_map_and_annotated():
    assert class_map(["dog", "bird"], ["cat", "dog", "bird"]) == [1, 2]
    assert class_map(["bird", "cat"], ["cat", "dog", "bird"]) == [2, 0]
    with pytest.raises(ValueError, match="class 'fish' is not one of the federation's classes"):
        class_map(["dog", "fish"], ["cat", "dog", "bird"])
    assert annotated({"names": ["bird", "dog"]}, ["cat", "dog", "bird"]) == [1, 2]


def test_federation_of_different_classes_is_checked_not_refused(two_clients):
    checks = check_federation(two_clients)
    assert [c["names"] for c in checks] == [["cat", "dog"], ["dog", "bird"]]
    assert [c["labelled_images"] for c in checks] == [2, 2] and checks[1]["train_images"] == 3
    assert union_names(checks, two_clients)[0] == ["cat", "dog", "bird"]


def test_view_remaps_ids_and_leaves_the_source_alone(two_clients, tmp_path):
    from ultralytics.data.dataset import YOLODataset

    checks = check_federation(two_clients)
    names, _ = union_names(checks, two_clients)
    before = _snapshot(tmp_path / "b")
    data = client_view(checks[1], names, tmp_path / "work" / "b")

    view = data.parent
    text = data.read_text()
    assert f"path: {view}\n" in text and "train: train/images" in text and "val: val/images" in text
    assert "test:" not in text and "2: bird" in text
    assert _view_labels(view) == {
        "000000_0000.txt": f"1 {BOX}\n",
        "000001_0001.txt": f"2 {BOX}\n1 {BOX}\n",
        "000002_0002.txt": "",
    }  # no label file: an empty one (a background image)
    image = view / "train" / "images" / "000001_0001.png"
    assert image.is_symlink() and Path(os.readlink(image)) == tmp_path / "b" / "images" / "train" / "0001.png"

    ds = YOLODataset(
        img_path=str(view / "train" / "images"),
        data={"names": dict(enumerate(names)), "nc": 3, "channels": 3},
        imgsz=32,
        augment=False,
    )
    assert [sorted(lb["cls"].ravel().astype(int).tolist()) for lb in ds.labels] == [[1], [1, 2], []]
    assert all(Path(f).parent == view / "train" / "images" for f in ds.im_files)  # symlinks are not resolved
    cache = view / "train" / "labels.cache"
    assert cache.is_file()
    assert _snapshot(tmp_path / "b") == before  # no label, cache or other file written beside the source data
    assert not list((tmp_path / "b").rglob("*.cache"))

    # Same inputs: nothing rewritten, and Ultralytics reuses its cache.
    after_first = _snapshot(view)
    assert client_view(checks[1], names, view) == data
    YOLODataset(
        img_path=str(view / "train" / "images"),
        data={"names": dict(enumerate(names)), "nc": 3, "channels": 3},
        imgsz=32,
        augment=False,
    )
    assert _snapshot(view) == after_first

    # A changed source label: that split is rebuilt, the other split is left alone.
    label = tmp_path / "b" / "labels" / "train" / "0000.txt"
    label.write_text(f"1 {BOX}\n")
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    val_before = _snapshot(view / "val")
    client_view(checks[1], names, view)
    assert _view_labels(view)["000000_0000.txt"] == f"2 {BOX}\n"
    assert not cache.exists()  # Ultralytics rescans the rebuilt split
    assert _snapshot(view / "val") == val_before


def test_view_follows_a_changed_class_list(two_clients, tmp_path):
    check = check_dataset(two_clients[1])
    view = client_view(check, ["cat", "dog", "bird"], tmp_path / "w").parent
    client_view(check, ["bird", "cat", "dog"], view)  # e.g. a client joined with other classes
    assert _view_labels(view)["000001_0001.txt"] == f"0 {BOX}\n2 {BOX}\n"
    assert "0: bird" in (view / "data.yaml").read_text()
    with pytest.raises(ValueError, match="class 'bird' is not one of"):
        client_view(check, ["cat", "dog"], view)


def test_bad_label_lines_stay_rejected(tmp_path):
    y = _dataset(
        tmp_path / "c",
        ["dog", "bird"],
        {"0000": f"0 {BOX}\n", "0001": f"5 {BOX}\n", "0002": "bird at the centre\n", "0003": f"1.5 {BOX}\n"},
    )
    view = client_view(check_dataset(y), ["cat", "dog", "bird"], tmp_path / "w").parent
    labels = _view_labels(view)
    assert labels["000001_0001.txt"] == f"6 {BOX}\n"  # beyond B's 2 classes -> beyond the federation's 3
    assert labels["000002_0002.txt"] == "bird at the centre\n" and labels["000003_0003.txt"] == f"1.5 {BOX}\n"


def test_view_of_clashing_names_txt_lists_and_test_split(tmp_path):
    root = tmp_path / "d"
    y = _dataset(root, ["dog"], {"0000": f"0 {BOX}\n"}, test=True)
    _dataset(root / "more", ["dog"], {"0000": None})  # same image name in another folder
    (root / "list.txt").write_text("./more/images/train/0000.png\nimages/train/0000.png\n")
    y.write_text(y.read_text().replace("train: images/train", "train: [images/train, list.txt]"))
    check = check_dataset(y)
    assert check["train_images"] == 3 and check["labelled_images"] == 2 and "test" in check["yaml"]
    view = client_view(check, ["cat", "dog"], tmp_path / "w").parent
    assert sorted(_view_labels(view)) == ["000000_0000.txt", "000001_0000.txt", "000002_0000.txt"]
    assert list(_view_labels(view).values()) == [f"1 {BOX}\n", f"1 {BOX}\n", ""]  # each entry sorted
    assert "test: test/images" in (view / "data.yaml").read_text() and _view_labels(view, "test")


def test_view_never_takes_over_a_foreign_folder(two_clients, tmp_path):
    check = check_dataset(two_clients[0])
    with pytest.raises(ValueError, match="already holds train/ but no view.json"):
        client_view(check, ["cat", "dog"], tmp_path / "a" / "images")  # holds the user's train/ images
    with pytest.raises(ValueError, match="is inside the dataset's 'train' split"):
        client_view(check, ["cat", "dog"], tmp_path / "a" / "images" / "train" / "view")
    assert (tmp_path / "a" / "images" / "train" / "0000.png").is_file()


def test_dataset_without_any_label_is_refused(tmp_path):
    y = _dataset(tmp_path / "e", ["dog"], {"0000": "", "0001": "\n \n", "0002": None})
    with pytest.raises(ValueError, match=f"dataset {y}: none of its 3 train images has a label .*labels/train"):
        check_dataset(y)

"""utils/partition.py: one dataset split into client datasets, deterministic, complete, skewed on request, read-only."""

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ultralytics.data.utils import img2label_paths

from tests.conftest import ROOT
from utils.datasets import check_dataset
from utils.demo import NAMES, make_demo
from utils.partition import main, partition, split_images


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A demo client with 40 train / 8 val images and a uniform class mix; its data.yaml."""
    return make_demo(tmp_path_factory.mktemp("partsrc"), seed=0, n_train=40, n_val=8)[0][2]


def _lines(path):
    return Path(path).read_text().splitlines()


def _instances(images):
    """Instances per class id in the label files of the images."""
    counts = Counter()
    for label in img2label_paths(images):
        if Path(label).is_file():
            counts.update(int(line.split()[0]) for line in _lines(label) if line.strip())
    return [counts[c] for c in range(len(NAMES))]


def _source_images(src, split):
    return split_images(check_dataset(src)["yaml"][split])[0]


def _table(text):
    """{row name: [train, val, instances per class...]} of the printed table."""
    rows = [line.split() for line in text.splitlines() if line.startswith(("client", "total"))]
    assert rows[0] == ["client", "train", "val", *NAMES]
    return {r[0]: [int(v) for v in r[1:]] for r in rows[1:]}


def _snapshot(folder):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*")}


def test_same_seed_same_files_other_seed_other_split(source, tmp_path):
    for mode in ("iid", "dirichlet"):
        a = partition(source, 4, mode, alpha=0.3, seed=1, out=tmp_path / mode / "a", verbose=False)
        b = partition(source, 4, mode, alpha=0.3, seed=1, out=tmp_path / mode / "b", verbose=False)
        c = partition(source, 4, mode, alpha=0.3, seed=2, out=tmp_path / mode / "c", verbose=False)
        for f in ("train.txt", "val.txt"):
            assert [(y.parent / f).read_bytes() for y in a] == [(y.parent / f).read_bytes() for y in b]
        assert [_lines(y.parent / "train.txt") for y in a] != [_lines(y.parent / "train.txt") for y in c]
        before = {p: p.read_bytes() for y in a for p in y.parent.iterdir()}
        partition(source, 4, mode, alpha=0.3, seed=1, out=tmp_path / mode / "a", verbose=False)  # rewrite in place
        assert {p: p.read_bytes() for y in a for p in y.parent.iterdir()} == before


@pytest.mark.parametrize("mode,skew", [("iid", 0.0), ("dirichlet", 0.0), ("iid", 0.5), ("dirichlet", 1.0)])
def test_every_image_once_and_counts_add_up(source, tmp_path, capsys, mode, skew):
    yamls = partition(source, 5, mode, alpha=0.1, seed=0, out=tmp_path, quantity_skew=skew)
    table = _table(capsys.readouterr().out)
    for split in ("train", "val"):
        listed = [f for y in yamls for f in _lines(y.parent / f"{split}.txt")]
        assert sorted(listed) == _source_images(source, split)  # each source image in exactly one client
        assert all(Path(f).is_absolute() for f in listed)
    train = _source_images(source, "train")
    assert table["total"] == [len(train), 8, *_instances(train)]
    for y in yamls:
        t, v = _lines(y.parent / "train.txt"), _lines(y.parent / "val.txt")
        assert t and v
        assert table[y.parent.name] == [len(t), len(v), *_instances(t)]
    assert [sum(table[y.parent.name][i] for y in yamls) for i in range(2 + len(NAMES))] == table["total"]


def _max_class_share(yamls):
    """Mean over clients of the largest class's share of the client's train instances."""
    shares = []
    for y in yamls:
        inst = _instances(_lines(y.parent / "train.txt"))
        shares.append(max(inst) / max(sum(inst), 1))
    return float(np.mean(shares))


def test_dirichlet_skews_labels_and_quantity_skew_sizes(source, tmp_path):
    def run(**kw):
        return partition(source, 4, out=tmp_path / "out", verbose=False, **kw)

    def sizes(**kw):
        return [len(_lines(y.parent / "train.txt")) for y in run(**kw)]

    iid = np.mean([_max_class_share(run(mode="iid", seed=s)) for s in range(4)])
    dirichlet = np.mean([_max_class_share(run(mode="dirichlet", alpha=0.1, seed=s)) for s in range(4)])
    assert dirichlet > iid + 0.1, (dirichlet, iid)
    assert max(sizes()) - min(sizes()) <= 1
    skewed = sizes(quantity_skew=0.3)
    assert sum(skewed) == 40 and min(skewed) >= 1 and max(skewed) >= 2 * min(skewed), skewed


def test_source_folder_untouched(source, tmp_path):
    root = source.parent.parent  # every demo client and the test split
    before = _snapshot(root)
    partition(source, 3, "iid", seed=0, out=tmp_path / "a", verbose=False)
    partition(source, 3, "dirichlet", alpha=0.1, seed=0, out=tmp_path / "b", quantity_skew=1.0, verbose=False)
    assert _snapshot(root) == before


def test_bad_input_names_the_setting(source, tmp_path, capsys):
    cases = [
        (dict(clients=0), "--clients must be at least 1"),
        (dict(clients=41), "--clients 41 is more than the 40 train images"),
        (dict(clients=2, mode="dirichlet", alpha=0), "--alpha must be greater than 0"),
        (dict(clients=2, mode="dirichlet", alpha=-1), "--alpha must be greater than 0"),
        (dict(clients=2, mode="shards"), "--mode must be one of"),
        (dict(clients=2, quantity_skew=-1), "--quantity-skew"),
        (dict(clients=2, out=source.parent / "parts"), "--out .* is inside the source dataset"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            partition(source, **{"out": tmp_path / "out", **kw})
    assert not (source.parent / "parts").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="^partition.py: --clients must be at least 1, got 0$"):
        main([str(source), "--clients", "0", "--out", str(tmp_path / "out")])


def test_fewer_val_images_than_clients_gives_everyone_all(source, tmp_path, capsys):
    yamls = partition(source, 10, "dirichlet", alpha=0.5, seed=0, out=tmp_path)
    assert "fewer than 10 clients: each gets all of them" in capsys.readouterr().out
    val = _source_images(source, "val")
    assert all(_lines(y.parent / "val.txt") == val for y in yamls)
    assert all(_lines(y.parent / "train.txt") for y in yamls)


def test_txt_list_source(source, tmp_path):
    """A source whose train split is an image list with './x', 'x' and absolute lines, one path listed twice."""
    data = tmp_path / "data"
    shutil.copytree(source.parent, data)
    images = sorted((data / "images" / "train").glob("*.png"))
    lines = [f"./images/train/{p.name}" for p in images[:10]] + [f"images/train/{p.name}" for p in images[10:20]]
    lines += [str(p) for p in images[20:30]] + [f"./images/train/{images[0].name}"]
    (data / "train.txt").write_text("\n".join(lines) + "\n")
    (data / "data.yaml").write_text(f"path: {data}\ntrain: train.txt\nval: images/val\nnames: {NAMES}\n")
    yamls = partition(data / "data.yaml", 3, "dirichlet", alpha=0.5, seed=0, out=tmp_path / "out", verbose=False)
    assert sorted(f for y in yamls for f in _lines(y.parent / "train.txt")) == [str(p) for p in images[:30]]


def test_ultralytics_reads_the_client_datasets(source, tmp_path):
    from ultralytics.data.dataset import YOLODataset

    data = tmp_path / "data"  # a copy: Ultralytics writes its labels .cache beside the labels
    shutil.copytree(source.parent, data)
    (data / "data.yaml").write_text((source.parent / "data.yaml").read_text().replace(str(source.parent), str(data)))
    yamls = partition(data / "data.yaml", 3, "dirichlet", alpha=0.5, seed=0, out=tmp_path / "out", verbose=False)
    for y in yamls:
        check = check_dataset(y)
        assert check["names"] == NAMES
        for split in ("train", "val"):
            files = _lines(y.parent / f"{split}.txt")
            assert check[f"{split}_images"] == len(files)
            ds = YOLODataset(
                img_path=str(y.parent / f"{split}.txt"),
                data={"names": dict(enumerate(NAMES)), "nc": len(NAMES), "channels": 3},
                imgsz=32,
                augment=False,
            )
            assert sorted(ds.im_files) == files
            cls = Counter(int(c) for lb in ds.labels for c in lb["cls"].ravel())
            assert [cls[c] for c in range(len(NAMES))] == _instances(files)


def test_runs_as_a_script(source, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "utils/partition.py", str(source), "--clients", "2", "--mode", "dirichlet"]
    r = subprocess.run([*args, "--alpha", "0.5", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _table(r.stdout)["total"][:2] == [40, 8]
    assert sorted(p.name for p in out.iterdir()) == ["client0", "client1"]

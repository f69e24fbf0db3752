"""Check client datasets before any training: splits, class names, labelled images, labels that fit the task.

A detect, segment, pose or obb client gives a data.yaml (label files under labels/); a classify client gives a folder
with train/ and val/ (or validation/, valid/), each holding one folder of images per class, as Ultralytics expects.
"""

import glob
import json
import os
from copy import deepcopy
from pathlib import Path

import yaml
from ultralytics.data.utils import IMG_FORMATS, img2label_paths

from utils.tasks import get_task

SPLITS = ("train", "val")


def _names(data, file):
    """Return the class names of a parsed data.yaml as a list, checking `nc` against them."""
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise ValueError(f"dataset {file}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise ValueError(f"dataset {file}: 'names' must be a non-empty list or 0-based mapping of class names")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise ValueError(f"dataset {file}: 'nc: {data['nc']}' does not match the {len(names)} entries of 'names'")
    return names


def image_files(paths):
    """Return the image files a split names, by Ultralytics' rules, as absolute paths.

    A folder gives its image files (recursive, hidden names skipped as Ultralytics' glob does); a .txt file lists one
    image per line, a relative line taken from the .txt's folder (or the working directory when it is not there); an
    image file gives itself. Only names with an Ultralytics image suffix are kept; existence is not checked.

    Args:
        paths (list[str | Path]): a split's entries (folders, .txt lists, image files).

    Returns:
        (list[str]): absolute image paths, each entry's sorted, in entry order.
    """
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = glob.glob(os.path.join(glob.escape(str(p)), "**", "*.*"), recursive=True)
        elif p.suffix == ".txt":
            found = []
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                if line := line.strip():
                    near = p.parent / line
                    found.append(str(near if Path(line).is_absolute() or near.exists() else Path(line)))
        else:
            found = [str(p)]
        files += sorted(os.path.abspath(f) for f in found if f.rpartition(".")[-1].lower() in IMG_FORMATS)
    return files


def _count_images(paths, file, split):
    """Return the image files a split names, refusing a split with none."""
    images = image_files(paths)
    if not images:
        raise ValueError(f"dataset {file}: '{split}' split has no images in {', '.join(map(str, paths))}")
    return images


def _labelled(images, file, task, kpt_shape=None):
    """Return how many images have a label file with a non-empty line; refuse a train split where none has, or where
    no label line fits the task (a detection dataset given to a segmentation run, ...). A few bad lines among good
    ones are left to Ultralytics, which drops their images with a warning."""
    labels = img2label_paths(images)
    n, fits, misfit = 0, 0, None
    for lb in labels:
        try:
            with open(lb, "rb") as f:
                lines = [line.split() for line in f if line.strip()]
        except OSError:
            continue
        n += bool(lines)
        for values in lines:
            problem = task.label_problem(len(values), kpt_shape)
            fits += problem is None
            misfit = misfit or (problem and (lb, problem))
    if n and not fits:
        raise ValueError(f"dataset {file}: no label line fits the task '{task.name}' (label file {misfit[0]}: "
                         f"{misfit[1]})")
    if n == 0:
        folders = sorted({str(Path(lb).parent) for lb in labels})
        where = ", ".join(folders[:3]) + (f" and {len(folders) - 3} more folders" if len(folders) > 3 else "")
        raise ValueError(
            f"dataset {file}: none of its {len(images)} train images has a label (label files missing or empty under "
            f"{where})"
        )
    return n


def _folder_message(folder):
    """Return the sentence for a dataset given as a folder, naming the data.yaml (or other .yaml files) inside it."""
    found = sorted(p for p in folder.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
    found = [p for p in found if p.name == "data.yaml"] or found
    if not found:
        return f"dataset {folder} is a folder, not a data.yaml, and holds no .yaml file: give each client's data.yaml"
    return f"dataset {folder} is a folder, not a data.yaml; did you mean {' or '.join(map(str, found[:3]))}?"


def _check_folders(folder):
    """Check a classification dataset folder (train/ and val/ of class folders); return it as check_dataset does."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise ValueError(f"dataset {folder} {what}; a classify client's dataset is a folder with train/ and val/, "
                         "each holding one folder of images per class")
    val = next((folder / v for v in ("val", "validation", "valid") if (folder / v).is_dir()), None)
    if not (folder / "train").is_dir() or val is None:
        raise ValueError(f"dataset {folder} needs a train/ and a val/ folder, each holding one folder per class")
    if not any(p.is_dir() for p in (folder / "train").iterdir()):
        raise ValueError(f"dataset {folder}: train/ holds no class folders")
    # its classes: every class folder of train/ and val/ (a class it only validates on is still one of the run's)
    names = sorted({p.name for split in (folder / "train", val) for p in split.iterdir() if p.is_dir()})
    images = {s: _count_images([p], folder, s) for s, p in (("train", folder / "train"), ("val", val))}
    resolved = {"path": str(folder.resolve()), "train": str((folder / "train").resolve()), "val": str(val.resolve()),
                "names": dict(enumerate(names))}
    return {"yaml": resolved, "names": names, "train_images": len(images["train"]), "val_images": len(images["val"]),
            "labelled_images": len(images["train"]), "folders": True}


def check_dataset(file, task="detect"):
    """Check one client dataset for `task` (a data.yaml; classify: a folder); never runs a `download:` script.

    `path` may be absolute, relative to the data.yaml's folder, or relative to the working directory (tried in
    that order); absent, the data.yaml's folder is the root. `train` and `val` must exist and hold images, and at
    least one train image must have a non-empty label file (Ultralytics' images/ -> labels/ rule). An optional `test`
    split must exist; it is resolved too, not counted. Some train label line must fit the task (segment: a polygon,
    obb: 4 corners, pose: kpt_shape's numbers, which the data.yaml must give); the rest are left to Ultralytics.

    Args:
        file (str | Path): the data.yaml (classify: the dataset folder).
        task (str): detect, segment, pose, obb or classify.

    Returns:
        (dict): `yaml` (resolved, absolute; `test` only when given; pose: `kpt_shape`, and `flip_idx` when given) and
            `names`, `train_images`, `val_images`, `labelled_images` (train images with at least one label line).
    """
    task, file = get_task(task), Path(file)
    if task.folders:
        return _check_folders(file)
    if file.is_dir():
        raise ValueError(_folder_message(file))
    if not file.is_file():
        raise ValueError(f"dataset {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {file} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"dataset {file} must be a YAML mapping with path/train/val/names")
    if data.get("download"):
        raise ValueError(
            f"dataset {file} has a 'download:' key; datasets are never downloaded or scripted here: "
            "put the data in place and remove the key"
        )
    names = _names(data, file)
    root = Path(str(data.get("path") or file.parent.resolve()))
    if not root.is_absolute():
        root = next((r for r in (file.parent / root, Path.cwd() / root) if r.exists()), file.parent / root)
    resolved = {"path": str(root.resolve())}
    images = {}
    for split in (*SPLITS, "test"):
        if not data.get(split):
            if split == "test":
                continue
            raise ValueError(f"dataset {file} has no '{split}' split")
        entries = data[split] if isinstance(data[split], list) else [data[split]]
        paths = [(root / str(e)).resolve() for e in entries]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"dataset {file}: '{split}' split {missing[0]} does not exist")
        if split in SPLITS:
            images[split] = _count_images(paths, file, split)
        resolved[split] = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
    resolved["names"] = dict(enumerate(names))
    if task.name == "pose":
        shape = data.get("kpt_shape")
        if not isinstance(shape, list) or len(shape) != 2 or shape[1] not in (2, 3):
            raise ValueError(f"dataset {file} needs 'kpt_shape: [keypoints, 2 or 3]' for a pose model")
        resolved.update({k: data[k] for k in ("kpt_shape", "flip_idx") if k in data})
    return {
        "yaml": resolved,
        "names": names,
        "train_images": len(images["train"]),
        "val_images": len(images["val"]),
        "labelled_images": _labelled(images["train"], file, task, data.get("kpt_shape")),
    }


def _version(path):
    """Return a path's modification time (None if it is gone): what tells a changed dataset from a checked one."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


_CHECKED = {}  # (data.yaml as given, task) -> (its check, the versions it was made at)


def check_dataset_cached(file, task="detect"):
    """Return check_dataset(file, task) (a copy), checked again only when the data.yaml or a split folder changed.

    Flower builds a new client object for every message; without this every fit and evaluate would read every label
    file of the client's train split again. Images added or removed (or a split folder gone) change a split folder's
    modification time, which checks the dataset again; a label file edited in place during a run is read by
    Ultralytics' own scan, not here.
    """
    key = (str(file), task)
    hit = _CHECKED.get(key)
    if hit is None or any(_version(p) != v for p, v in hit[1]):
        check = check_dataset(file, task)
        splits = [check["yaml"][s] for s in SPLITS]
        paths = [file, *(p for s in splits for p in (s if isinstance(s, list) else [s]))]
        hit = _CHECKED[key] = check, [(p, _version(p)) for p in paths]
    return deepcopy(hit[0])


def check_federation(files, task="detect"):
    """Check every client's dataset for `task` (a list: one task per client, mixed tasks); return their checks.

    Clients may declare different class lists: the federation's classes are their union (`utils.classes.union_names`).
    Pose clients must agree on kpt_shape (and flip_idx where given): the keypoint head is shared.
    """
    if not files:
        raise ValueError("no datasets given: set DATASETS or --datasets to one data.yaml per client")
    tasks = task if isinstance(task, list) else [task] * len(files)
    checks = [check_dataset(f, t) for f, t in zip(files, tasks)]
    for key in ("kpt_shape", "flip_idx"):
        seen = {json.dumps(c["yaml"].get(key)): f for c, f in zip(checks, files) if key in c["yaml"]}
        if len(seen) > 1:
            (a, fa), (b, fb) = list(seen.items())[:2]
            raise ValueError(f"datasets {fa} ({key} {a}) and {fb} ({key} {b}) differ; every pose client needs the same")
    return checks


def client_label(file):
    """Return a short name for a client's dataset: its folder for a file named data.yaml, else the file's stem."""
    file = Path(file)
    return file.parent.name if file.stem == "data" and file.parent.name else file.stem


def client_name(label):
    """Return how the log names a client: "client <label>", or the label alone when it says client already
    (utils/partition.py names its clients client0, client1, ...)."""
    label = str(label)
    return label if label.lower().startswith("client") else f"client {label}"


def node_name(dataset, partition_id, config):
    """Return how the server's log names a node: its dataset's label (a SuperNode's own, else the simulation's
    DATASETS[partition id] from the round's config), else its partition id."""
    try:
        datasets = json.loads(config.get("spec", "{}")).get("datasets", [])
        return client_name(unique_label(dataset or datasets[partition_id], datasets))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return client_name(partition_id)


def client_labels(files):
    """Return {resolved path: unique short name} for the datasets; a name shared by several gets its index first."""
    names = [client_label(f) for f in files]
    unique = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]
    return {str(Path(f).resolve()): n for f, n in zip(files, unique)}


def unique_label(dataset, datasets):
    """Return a client's name among the run's `datasets` (`client_labels`: the one metrics.csv uses), else its own
    label (a SuperNode's dataset). Its files are named by it (the optimizer state, a personalized model): clients
    whose folders share a name (site_a/data/data.yaml, site_b/data/data.yaml) must not share them."""
    return client_labels(datasets).get(str(Path(dataset).resolve()), client_label(dataset))

"""Clients with different class lists: the federation's classes are their union, and each client trains on a view of
its data whose labels carry the federation's class ids.

The view of a client lives in a work folder owned by the run, never beside the user's data: `<split>/images/` holds a
symlink per image (a hard link, else a copy, where symlinks cannot be made) and `<split>/labels/` the remapped label
files. Ultralytics 8.4 lists images with glob and derives each label path from the image path as listed, without
resolving symlinks, so it reads the remapped labels and writes its label cache as `<split>/labels.cache` in the view.
"""

import hashlib
import json
import os
import shutil
from logging import WARNING
from pathlib import Path

import yaml
from ultralytics.data.utils import img2label_paths

from utils.atomic import atomic_write_text
from utils.console import log
from utils.datasets import client_label, image_files

VIEW_SPLITS = ("train", "val", "test")
MANIFEST = "view.json"


def _key(name):
    """Return a class name with case and spacing ignored, to spot names that are probably meant to be the same."""
    return " ".join(name.split()).lower()


def union_names(checks, files):
    """Return the federation's class list, the union of the clients' names, and notes on suspicious names.

    Names are matched exactly; the order is first seen, clients in the given order and each client's names in its own
    order, so the same datasets always give the same list. Names that differ only by case or spaces are kept apart and
    noted, as are names listed twice by one client.

    Args:
        checks (list[dict]): `utils.datasets.check_dataset` results, one per client.
        files (list[str | Path]): the clients' data.yaml files, in the same order (named in the notes).

    Returns:
        (tuple[list[str], list[str]]): the class names, and one warning sentence per suspicious name.
    """
    names, notes, first = [], [], {}  # first: key -> (name, file) where a spelling of it was first seen
    known = set()
    for check, file in zip(checks, files):
        mine = set()
        for name in check["names"]:
            if name in mine:
                notes.append(f"class '{name}' is listed twice in {file}; both ids are trained as one class")
                continue
            mine.add(name)
            if name in known:
                continue
            known.add(name)
            names.append(name)
            if _key(name) in first:
                other, where = first[_key(name)]
                notes.append(
                    f"classes '{other}' ({where}) and '{name}' ({file}) differ only by case or spaces; they are kept "
                    "as two classes - rename one if they are the same"
                )
            else:
                first[_key(name)] = name, file
    return names, notes


def federation_names(checks, files, given):
    """Return the federation's classes: `given` (NAMES, the user's list and order, which must hold every dataset's
    classes), else the union of the datasets' names; log the notes on suspicious names. ValueError with one sentence.
    """
    names, notes = union_names(checks, files) if checks else (given, [])
    for note in notes:
        log(WARNING, "%s", note)
    missing = [n for n in names if n not in given]
    if given and missing:
        raise ValueError(f"names {given} lack the classes {missing} of the datasets")
    return given or names


def view_folder(root, dataset, names):
    """Return the work folder of a client's dataset view: one per dataset and class list, under `root`."""
    key = hashlib.sha1(json.dumps([str(Path(dataset).resolve()), names]).encode()).hexdigest()[:10]
    return Path(root) / f"{client_label(dataset)}-{key}"


def class_map(client_names, global_names):
    """Return the global class id of each of a client's class ids.

    Args:
        client_names (list[str]): the client's class names, by local id.
        global_names (list[str]): the federation's class names, by global id.

    Returns:
        (list[int]): `map[local id] = global id`.
    """
    index = {}
    for i, name in enumerate(global_names):
        index.setdefault(name, i)
    missing = [n for n in client_names if n not in index]
    if missing:
        raise ValueError(f"class '{missing[0]}' is not one of the federation's classes {list(global_names)}")
    return [index[n] for n in client_names]


def annotated(check, global_names):
    """Return the sorted global ids of the classes a client declares (the classes its labels can contain)."""
    return sorted(set(class_map(check["names"], global_names)))


def _stat(path):
    """Return [size, mtime_ns] of a file, or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _sources(entries):
    """Return [image, label file, image stat, label stat] for each existing image a split names."""
    images = image_files(entries)
    rows = [[im, lb, _stat(im), _stat(lb)] for im, lb in zip(images, img2label_paths(images))]
    return [r for r in rows if r[2] is not None]


def _remap_id(token, mapping, nc):
    """Return a label line's class token in global ids; a token Ultralytics would reject stays rejectable.

    Not a number, negative or fractional: kept as written. A local id beyond the client's classes becomes an id beyond
    the federation's classes, so Ultralytics still drops the image with a warning instead of training a wrong class.
    """
    try:
        v = float(token)
    except ValueError:
        return token
    if v < 0 or not v.is_integer():
        return token
    v = int(v)
    return str(mapping[v] if v < len(mapping) else nc + v - len(mapping))


def _remap(label, mapping, nc):
    """Return the bytes of a view label file: the source's lines with the class column in global ids."""
    try:
        raw = Path(label).read_bytes()
    except OSError:
        return b""  # no label file: a background image, as in Ultralytics
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw  # Ultralytics reports the image as corrupt, as it would the source
    lines = []
    for line in text.splitlines():
        if parts := line.split(maxsplit=1):
            lines.append(" ".join([_remap_id(parts[0], mapping, nc), *parts[1:]]))
    return "".join(f"{line}\n" for line in lines).encode()


def _link(src, dst):
    """Make dst show the image src: a symlink, else a hard link, else a copy."""
    try:
        os.symlink(src, dst)
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _build(dst, sources, mapping, nc):
    """Write one split of a view from scratch: linked images, remapped labels (Ultralytics' cache goes with them)."""
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    for i, (image, label, *_) in enumerate(sources):
        view_image = dst / "images" / f"{i:06d}_{Path(image).name}"
        _link(image, view_image)
        Path(img2label_paths([view_image])[0]).write_bytes(_remap(label, mapping, nc))


def _folder_view(check, folder):
    """Write a classify client's view: folder/<split>/<class>/ holding a link per image of its class folders (pathlib's
    glob, which Ultralytics counts images with, does not enter linked folders); return folder."""
    for split in ("train", "val"):
        src = Path(check["yaml"][split])
        if folder.is_relative_to(src.parent.resolve()):
            raise ValueError(f"work folder {folder} is inside the dataset {src.parent}")
        want = {Path(d.name) / f"{i:06d}_{Path(f).name}": f for d in sorted(src.iterdir()) if d.is_dir()
                for i, f in enumerate(image_files([d]))}
        have = {p.relative_to(folder / split) for p in (folder / split).glob("*/*")}
        for stale in have - set(want):
            (folder / split / stale).unlink()
        for rel in set(want) - have:
            (folder / split / rel).parent.mkdir(parents=True, exist_ok=True)
            _link(want[rel], folder / split / rel)
    return folder


def client_view(check, global_names, folder):
    """Materialise a client's dataset under the federation's class ids; return the view's data.yaml.

    Each split of the check (`train`, `val`, `test` when given) becomes `folder/<split>/images/` (`{i:06d}_<name>`
    links to the original images; names from different source folders may clash) and `folder/<split>/labels/`
    (the source label lines with the class column mapped local -> global, a missing label file an empty one).
    Nothing is written beside the source data. Called again with the same inputs it rewrites nothing: `view.json`
    keeps a digest of every image and label file (path, size, mtime_ns) and the class map per split, and only a
    split whose digest or map changed is rebuilt, so Ultralytics' label cache in the view stays valid otherwise.

    A classification dataset (folders per class) needs no label mapping: its class folders are matched to the
    federation's class ids by name (Ultralytics' ClassificationDataset does that given the model's names,
    utils/train.py). Its view is `folder/train/<class>/` and `folder/val/<class>/` with a link per image, so that
    Ultralytics' `train.cache` / `val.cache` (written beside the split folder) land in the view, not beside the data.

    Args:
        check (dict): the client's `utils.datasets.check_dataset` result.
        global_names (list[str]): the federation's class names (`union_names`).
        folder (str | Path): the client's work folder (created); one view per folder.

    Returns:
        (Path): `folder/data.yaml` (absolute `path`, `train: train/images`, `val: val/images`, global `names`, a pose
            dataset's `kpt_shape` and `flip_idx`); classify: the view folder (train/ and val/ of linked images).
    """
    if check.get("folders"):
        class_map(check["names"], global_names)  # every class folder must be one of the federation's classes
        return _folder_view(check, Path(folder).resolve())
    folder = Path(folder).resolve()
    splits = {}
    for split in VIEW_SPLITS:
        entries = check["yaml"].get(split)
        if entries:
            splits[split] = [Path(e) for e in (entries if isinstance(entries, list) else [entries])]
            for e in splits[split]:
                if e.is_dir() and folder.is_relative_to(e.resolve()):
                    raise ValueError(f"work folder {folder} is inside the dataset's '{split}' split {e}")
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if manifest is None:  # the folder is not (yet) a view: never delete what is not ours
        ours = [folder / s for s in VIEW_SPLITS if (folder / s).exists()]
        if ours:
            raise ValueError(f"work folder {folder} already holds {ours[0].name}/ but no {MANIFEST}: give a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {}
    mapping, nc = class_map(check["names"], global_names), len(global_names)
    data = {"path": str(folder)}
    for split, entries in splits.items():
        sources = _sources(entries)
        digest = hashlib.sha256(json.dumps(sources).encode()).hexdigest()
        state = {"sources": digest, "images": len(sources), "map": mapping, "nc": nc}
        if manifest.get(split) != state or not (folder / split / "labels").is_dir():
            manifest.pop(split, None)  # a build cut short must not pass for a finished one
            atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
            _build(folder / split, sources, mapping, nc)
            manifest[split] = state
        data[split] = f"{split}/images"
    for split in set(manifest) - set(splits):  # a split the dataset no longer has
        shutil.rmtree(folder / split, ignore_errors=True)
        del manifest[split]
    data["names"] = dict(enumerate(global_names))
    data.update({k: check["yaml"][k] for k in ("kpt_shape", "flip_idx") if k in check["yaml"]})
    text = json.dumps(manifest, indent=1)
    if not manifest_file.is_file() or manifest_file.read_text(encoding="utf-8") != text:
        atomic_write_text(manifest_file, text)
    out = folder / "data.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        atomic_write_text(out, text)
    return out


def client_data(dataset, check, global_names, arch, own_head, root):
    """Check a client's dataset against the federation (its classes map onto the global names; a pose dataset's
    keypoints fit the model: with `own_head`, a mixed federation's own pose head, `arch` takes them) and return the
    data.yaml of its view in the federation's class ids under `root`; ValueError naming the dataset."""
    try:
        class_map(check["names"], global_names)
    except ValueError as e:
        raise ValueError(f"dataset {dataset}: {e}") from None
    kpt = check["yaml"].get("kpt_shape")
    if kpt and own_head:
        arch["kpt_shape"] = kpt  # its own pose head (mixed tasks): its own keypoints
    elif kpt and kpt != arch.get("kpt_shape"):
        raise ValueError(f"dataset {dataset} has kpt_shape {kpt}, the federation's model {arch.get('kpt_shape')}")
    return client_view(check, global_names, view_folder(root, dataset, global_names))

"""Check client data.yaml files before any training, and write the resolved copy a trainer reads."""

from pathlib import Path

import yaml
from ultralytics.data.utils import IMG_FORMATS

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


def _count_images(paths, file, split):
    """Return the number of images a split names (folders of images or .txt lists of image paths)."""
    n = 0
    for p in paths:
        if p.is_dir():
            n += sum(1 for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.suffix == ".txt":
            n += sum(1 for line in p.read_text().splitlines() if line.strip())
        elif p.suffix[1:].lower() in IMG_FORMATS:
            n += 1
    if n == 0:
        raise ValueError(f"dataset {file}: '{split}' split has no images in {', '.join(map(str, paths))}")
    return n


def check_dataset(file):
    """Check one client data.yaml; never runs a `download:` script.

    `path` may be absolute, relative to the data.yaml's folder, or relative to the working directory (tried in
    that order); absent, the data.yaml's folder is the root. `train` and `val` must exist and hold images.

    Args:
        file (str | Path): the data.yaml.

    Returns:
        (dict): `yaml` (resolved, absolute) and `names`, `train_images`, `val_images`.
    """
    file = Path(file)
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
    counts = {}
    for split in SPLITS:
        if not data.get(split):
            raise ValueError(f"dataset {file} has no '{split}' split")
        entries = data[split] if isinstance(data[split], list) else [data[split]]
        paths = [(root / str(e)).resolve() for e in entries]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"dataset {file}: '{split}' split {missing[0]} does not exist")
        counts[split] = _count_images(paths, file, split)
        resolved[split] = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
    resolved["names"] = dict(enumerate(names))
    return {"yaml": resolved, "names": names, "train_images": counts["train"], "val_images": counts["val"]}


def check_federation(files):
    """Check every client's data.yaml and that all clients agree on the class names; return their checks."""
    if not files:
        raise ValueError("no datasets given: set DATASETS or --datasets to one data.yaml per client")
    checks = [check_dataset(f) for f in files]
    first = checks[0]["names"]
    for f, c in zip(files[1:], checks[1:]):
        if c["names"] != first:
            raise ValueError(
                f"dataset {f} has classes {c['names']} but {files[0]} has {first}; every client must use the same "
                "names in the same order"
            )
    return checks


def write_resolved(check, folder):
    """Write a checked dataset's resolved data.yaml into folder (never beside the user's data); return its path."""
    out = Path(folder) / "data.yaml"
    out.write_text(yaml.safe_dump(check["yaml"], sort_keys=False))
    return out


def client_label(file):
    """Return a short name for a client's dataset: its folder for a file named data.yaml, else the file's stem."""
    file = Path(file)
    return file.parent.name if file.stem == "data" and file.parent.name else file.stem


def client_labels(files):
    """Return {resolved path: unique short name} for the datasets; a name shared by several gets its index first."""
    names = [client_label(f) for f in files]
    unique = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]
    return {str(Path(f).resolve()): n for f, n in zip(files, unique)}

"""Split one Ultralytics dataset into K client datasets for federated experiments (IID or non-IID).

Usage:
    .venv/bin/python utils/partition.py SRC_DATA_YAML --clients K --mode iid|dirichlet --alpha A --seed S --out DIR
        [--quantity-skew Q]

Writes DIR/client0 ... DIR/client{K-1}, each with a `data.yaml` (absolute `path`, `train: train.txt`,
`val: val.txt`, the source's `names`) and `train.txt` / `val.txt` listing the absolute paths of the original
images: nothing is copied or linked, and Ultralytics finds each image's labels beside it as usual. Nothing is
written into the source dataset (federated.py trains through per-client views, so no label cache lands there
either; plain `yolo train` on a client's data.yaml would write Ultralytics' usual `labels/*.cache`).

Modes:
- `iid`: the train images are shuffled with the seed and dealt out in equal shares.
- `dirichlet`: label-distribution skew. Each image's class is its most frequent label class (ties: the lowest
  class id; images without labels are dealt out in equal shares); for each class, proportions over the clients
  are drawn from Dirichlet(alpha) and that class's images are split accordingly. Small alpha = very skewed.

`--quantity-skew Q` (0 = off) draws client weights from Dirichlet(Q) (small Q = very different sizes). In `iid`
mode the client sizes follow those weights; in `dirichlet` mode each class's proportions are multiplied by the
weights and renormalised (images without labels follow the weights), so sizes and label mix are both skewed.

Val: the source val images are split the same way (`iid`: the train shares; `dirichlet`: each val image goes by
its own class with that class's drawn proportions). Every client gets at least one train and one val image
(moved from the largest client where needed); if the source val has fewer images than clients, every client
gets the whole val list. The same arguments give byte-identical files.
"""

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

if __package__ in {None, ""}:  # run as a script: make `utils` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ultralytics.data.utils import img2label_paths  # noqa: E402

from utils.datasets import SPLITS, check_dataset, image_files  # noqa: E402

MODES = ("iid", "dirichlet")


def split_images(entries):
    """Return the sorted, de-duplicated absolute image paths of one split and the listed paths that do not exist.

    Args:
        entries (str | list[str]): absolute folders of images (searched recursively, hidden names skipped as
            Ultralytics' glob does), .txt image lists (a relative line is taken from the list's folder, or from the
            working directory when it is not there) or image files, as in a resolved data.yaml.

    Returns:
        (tuple[list[str], list[str]]): the existing images and the missing ones named by .txt lists.
    """
    files = image_files(entries if isinstance(entries, list) else [entries])
    found = sorted({f for f in files if os.path.isfile(f)})
    missing = sorted({f for f in files if not os.path.exists(f)})
    return found, missing


def image_classes(images, nc):
    """Return the class id of every label line of each image (an image without a label file has none).

    Args:
        images (list[str]): image paths; labels follow Ultralytics' `img2label_paths` rule.
        nc (int): number of classes; a label class outside 0..nc-1 is an error.

    Returns:
        (list[list[int]]): the label classes of each image.
    """
    classes = []
    for label in img2label_paths(images):
        cls = []
        if os.path.isfile(label):
            for line in Path(label).read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    c = int(float(line.split()[0]))
                except ValueError:
                    raise ValueError(f"label file {label} has a line that is not YOLO format: {line!r}") from None
                if not 0 <= c < nc:
                    raise ValueError(f"label file {label} has class {c} but the dataset names {nc} classes")
                cls.append(c)
        classes.append(cls)
    return classes


def dominant_class(cls):
    """Return the most frequent class of one image's labels (ties: the lowest id), or -1 for no labels."""
    if not cls:
        return -1
    counts = Counter(cls)
    return min(counts, key=lambda c: (-counts[c], c))


def split_sizes(n, weights, minimum=0):
    """Split n items into len(weights) shares proportional to weights, each at least `minimum` (largest remainder).

    Args:
        n (int): items to split; at least minimum * len(weights).
        weights (np.ndarray): non-negative weights, one per share.
        minimum (int): smallest share.

    Returns:
        (np.ndarray): the share sizes (int), summing to n.
    """
    k = len(weights)
    w = np.asarray(weights, float)
    w = w / w.sum() if w.sum() > 0 and np.isfinite(w).all() else np.full(k, 1 / k)
    raw = w * (n - minimum * k)
    sizes = np.floor(raw).astype(int)
    extra = int(round(n - minimum * k - sizes.sum()))
    sizes[np.argsort(-(raw - sizes), kind="stable")[:extra]] += 1
    return sizes + minimum


def _deal(idx, sizes):
    """Return idx cut into consecutive chunks of the given sizes."""
    bounds = np.cumsum([0, *sizes])
    return [list(idx[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _at_least_one(parts):
    """Move one item from the largest part to each empty part (the largest part's last item; ties: lowest index)."""
    for i, part in enumerate(parts):
        if not part:
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            part.append(parts[donor].pop())
    return parts


def assign(train_dom, val_dom, clients, mode="iid", alpha=0.5, seed=0, quantity_skew=0.0):
    """Assign train and val images to clients.

    Args:
        train_dom (list[int]): the dominant class of each train image (-1: no labels).
        val_dom (list[int]): the dominant class of each val image.
        clients (int): number of clients; at most len(train_dom).
        mode (str): "iid" or "dirichlet".
        alpha (float): Dirichlet concentration of the per-class proportions ("dirichlet" mode).
        seed (int): seed of numpy's default_rng; the same arguments give the same assignment.
        quantity_skew (float): Dirichlet concentration of the client sizes; 0 = equal sizes.

    Returns:
        (tuple[list[list[int]], list[list[int]]]): per client, the sorted indices of its train and val images; if
            there are fewer val images than clients, every client gets all of them.
    """
    rng = np.random.default_rng(seed)
    k, n_train, n_val = clients, len(train_dom), len(val_dom)
    weights = rng.dirichlet(np.full(k, quantity_skew)) if quantity_skew > 0 else np.full(k, 1 / k)
    if mode == "iid":
        train = _deal(rng.permutation(n_train), split_sizes(n_train, weights, 1))
        val = _deal(rng.permutation(n_val), split_sizes(n_val, weights, 1)) if n_val >= k else None
    else:
        nc = max([*train_dom, *val_dom, -1]) + 1
        props = {-1: weights}  # images without labels follow the client weights (equal without quantity skew)
        for c in range(nc):
            p = rng.dirichlet(np.full(k, alpha)) * weights
            props[c] = p / p.sum() if p.sum() > 0 and np.isfinite(p).all() else weights
        train, val = [[] for _ in range(k)], [[] for _ in range(k)]
        for c in range(-1, nc):
            for dom, parts in ((train_dom, train), (val_dom, val)):
                idx = rng.permutation(np.flatnonzero(np.asarray(dom, int) == c))
                for part, chunk in zip(parts, _deal(idx, split_sizes(len(idx), props[c]))):
                    part.extend(chunk)
        train = _at_least_one(train)
        val = _at_least_one(val) if n_val >= k else None
    if val is None:
        val = [list(range(n_val)) for _ in range(k)]
    return [sorted(int(i) for i in p) for p in train], [sorted(int(i) for i in p) for p in val]


def format_table(names, rows):
    """Return a fixed-width text table of (client, train images, val images, instances per class) rows + total."""
    header = ["client", "train", "val", *names]
    body = [[name, str(nt), str(nv), *map(str, inst)] for name, nt, nv, inst in rows]
    total = ["total", *(str(sum(int(r[i]) for r in body)) for i in range(1, len(header)))]
    table = [header, *body, total]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))]) for r in table
    )


def _check_args(clients, mode, alpha, quantity_skew):
    """Raise ValueError naming the first bad setting."""
    if clients < 1:
        raise ValueError(f"--clients must be at least 1, got {clients}")
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "dirichlet" and not alpha > 0:
        raise ValueError(f"--alpha must be greater than 0 in dirichlet mode, got {alpha}")
    if not quantity_skew >= 0:
        raise ValueError(f"--quantity-skew must be 0 (off) or greater than 0, got {quantity_skew}")


def _inside(path, folder):
    """Return True if path is folder or inside it."""
    return path == folder or folder in path.parents


def partition(src, clients, mode="iid", alpha=0.5, seed=0, out="partitions", quantity_skew=0.0, verbose=True):
    """Write `clients` client datasets split from the data.yaml `src` under `out`; print a table of the split.

    Args:
        src (str | Path): the source Ultralytics data.yaml (path/train/val/names).
        clients (int): number of clients K; at least 1 and at most the number of train images.
        mode (str): "iid" (equal random shares) or "dirichlet" (label-distribution skew).
        alpha (float): Dirichlet concentration per class in "dirichlet" mode; smaller = more skewed.
        seed (int): random seed; the same arguments give byte-identical files.
        out (str | Path): output folder; receives client0 ... client{K-1}; must not be inside the source dataset.
        quantity_skew (float): Dirichlet concentration of client sizes; 0 = off, smaller = more unequal.
        verbose (bool): print notes and the table.

    Returns:
        (list[Path]): the clients' data.yaml files.
    """
    _check_args(clients, mode, alpha, quantity_skew)
    check = check_dataset(src)
    resolved, names = check["yaml"], check["names"]
    notes, images = [], {}
    for split in SPLITS:
        images[split], missing = split_images(resolved[split])
        if missing:
            notes.append(f"{len(missing)} {split} images listed by {src} do not exist and were left out: {missing[0]}")
        if not images[split]:
            raise ValueError(f"dataset {src}: '{split}' split has no existing images")
    if clients > len(images["train"]):
        raise ValueError(
            f"--clients {clients} is more than the {len(images['train'])} train images of {src}; every client needs one"
        )

    out = Path(out).resolve()
    dirs = [out / f"client{i}" for i in range(clients)]
    entries = [e for s in SPLITS for e in (resolved[s] if isinstance(resolved[s], list) else [resolved[s]])]
    src_files = {Path(src).resolve(), *map(Path, entries)}
    roots = [Path(resolved["path"]), *sorted(p for p in src_files if p.is_dir())]
    for root in roots:
        if _inside(out, root):
            raise ValueError(f"--out {out} is inside the source dataset {root}; choose a folder outside it")
    for d in dirs:
        if any(d / f in src_files for f in ("data.yaml", "train.txt", "val.txt")):
            raise ValueError(f"--out {out} would overwrite the source dataset's files in {d}; choose another folder")

    classes = {s: image_classes(images[s], len(names)) for s in SPLITS}
    train, val = assign(
        [dominant_class(c) for c in classes["train"]],
        [dominant_class(c) for c in classes["val"]],
        clients,
        mode,
        alpha,
        seed,
        quantity_skew,
    )
    if len(images["val"]) < clients:
        n_val = len(images["val"])
        notes.append(f"the source val split has {n_val} images, fewer than {clients} clients: each gets all of them")

    rows = []
    for d, t, v in zip(dirs, train, val):
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.txt").write_text("".join(images["train"][i] + "\n" for i in t))
        (d / "val.txt").write_text("".join(images["val"][i] + "\n" for i in v))
        data = {"path": str(d), "train": "train.txt", "val": "val.txt", "names": dict(enumerate(names))}
        (d / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        counts = Counter(c for i in t for c in classes["train"][i])
        rows.append((d.name, len(t), len(v), [counts[c] for c in range(len(names))]))
    stale = sorted(p.name for p in out.glob("client*") if p.is_dir() and p not in dirs)
    if stale:
        notes.append(f"{out} also holds {', '.join(stale)} from another partition; they were left as they are")
    if verbose:
        print(f"{mode} partition of {src} into {clients} clients (seed {seed}) in {out}")
        for note in notes:
            print(f"note: {note}")
        print(format_table(names, rows))
    return [d / "data.yaml" for d in dirs]


def get_args_parser():
    """Return the partitioner's argument parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="the source Ultralytics data.yaml")
    p.add_argument("--clients", type=int, required=True, help="number of clients K")
    p.add_argument("--mode", choices=MODES, default="iid", help="iid shares or dirichlet label skew (default: iid)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration per class (default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default="partitions", help="output folder (default: partitions)")
    p.add_argument("--quantity-skew", type=float, default=0.0, help="Dirichlet concentration of client sizes; 0 = off")
    return p


def main(argv=None):
    """Partition from the command line; exit non-zero with one sentence on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        partition(args.src, args.clients, args.mode, args.alpha, args.seed, args.out, args.quantity_skew)
    except ValueError as e:
        sys.exit(f"partition.py: {e}")


if __name__ == "__main__":
    main()

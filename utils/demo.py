"""Deterministic demo federation: drawn shapes in YOLO format, non-IID across clients, for every Ultralytics task.

detect: boxes; segment: the shapes' polygons; pose: 4 keypoints at the corners of each shape's (rotated) square;
obb: that rotated square as an oriented box; classify: one centred shape per image, in a folder per class.

Usage: .venv/bin/python -m utils.demo OUT_DIR [TASK]
"""

import sys
from pathlib import Path

import cv2
import numpy as np

NAMES = ["circle", "square", "triangle", "cross"]
# Each client: (name, class probabilities, background style, train images, val images).
# Clients differ in class mix, background and size (non-IID); the test split mixes every style and class.
CLIENTS = [
    ("dark", [0.45, 0.45, 0.05, 0.05], "dark", 96, 24),
    ("light", [0.05, 0.05, 0.45, 0.45], "light", 72, 24),
    ("noisy", [0.25, 0.25, 0.25, 0.25], "noise", 48, 24),
]
TEST_IMAGES = 96
IMG = 64  # image side in pixels
CROP = 32  # classify: image side in pixels


def _background(rng, style):
    """Return an IMGxIMG BGR background in one of the demo styles."""
    if style == "dark":
        return np.full((IMG, IMG, 3), rng.integers(0, 60, 3), np.uint8)
    if style == "light":
        return np.full((IMG, IMG, 3), rng.integers(190, 256, 3), np.uint8)
    return rng.integers(60, 190, (IMG, IMG, 3)).astype(np.uint8)


def _color(rng, mean):
    """Return a random BGR colour that stays visible against a background of brightness `mean`."""
    color = rng.integers(0, 256, 3)
    if abs(float(color.mean()) - mean) < 60:
        color = 255 - color if mean < 128 else color // 3
    return tuple(int(c) for c in color)


def _draw(img, cls, cx, cy, r, color):
    """Draw shape `cls` centred at (cx, cy) with half-size r; return its box (x1, y1, x2, y2)."""
    if cls == 0:
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
    elif cls == 1:
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    elif cls == 2:
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    else:
        t = max(r // 3, 2)
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), color, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), color, -1)
    return cx - r, cy - r, cx + r, cy + r


def _image(rng, probs, style):
    """Return one image and its YOLO label lines (1-3 non-overlapping shapes)."""
    img = _background(rng, style)
    mean = img.mean()
    boxes, lines = [], []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            r = int(rng.integers(6, 14))
            cx, cy = (int(v) for v in rng.integers(r + 1, IMG - r - 1, 2))
            if all(abs(cx - bx) > r + br + 1 or abs(cy - by) > r + br + 1 for bx, by, br in boxes):
                break
        else:
            continue
        cls = int(rng.choice(len(NAMES), p=probs))
        x1, y1, x2, y2 = _draw(img, cls, cx, cy, r, _color(rng, mean))
        boxes.append((cx, cy, r))
        xc, yc, w, h = (x1 + x2) / 2 / IMG, (y1 + y2) / 2 / IMG, (x2 - x1) / IMG, (y2 - y1) / IMG
        lines.append(f"{cls} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return img, lines


def _write_split(root, split, n, rng, probs, styles, image=None):
    """Write n images and labels under root/images/split and root/labels/split (`image(rng, probs, style)` draws
    one image and its label lines; the demo's `_image` unless given)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lines = (image or _image)(rng, probs, styles[i % len(styles)])
        cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), img)
        (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")


def _write_yaml(root, splits):
    """Write root/data.yaml mapping each split key to an image folder and naming the demo classes."""
    text = f"path: {root.resolve()}\n" + "".join(f"{k}: images/{v}\n" for k, v in splits.items())
    text += "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES))
    (root / "data.yaml").write_text(text)
    return root / "data.yaml"


def _polygon(cls, cx, cy, r, angle):
    """Return the outline of shape `cls` (centre, half-size r, rotated by `angle` radians) as float (x, y) points."""
    if cls == 0:
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    elif cls == 1:
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif cls == 2:
        pts = [(0, -r), (r, r), (-r, r)]
    else:
        t = max(r / 3, 2)
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
               (-t, -t)]
    c, s = np.cos(angle), np.sin(angle)
    return np.array([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts])


def _task_image(rng, probs, style, task):
    """Return one image and its label lines for segment, pose or obb: 1-3 rotated shapes that do not overlap."""
    img = _background(rng, style)
    mean = img.mean()
    placed, lines = [], []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            r = int(rng.integers(6, 12))
            reach = int(np.ceil(r * 1.42)) + 1  # the rotated square's corners stay inside the image
            cx, cy = (int(v) for v in rng.integers(reach, IMG - reach, 2))
            if all(np.hypot(cx - px, cy - py) > reach + pr for px, py, pr in placed):
                break
        else:
            continue
        cls, angle = int(rng.choice(len(NAMES), p=probs)), float(rng.uniform(0, np.pi / 2))
        outline = _polygon(cls, cx, cy, r, angle)
        cv2.fillPoly(img, [np.round(outline).astype(np.int32)], _color(rng, mean), cv2.LINE_AA)
        placed.append((cx, cy, reach))
        corners = _polygon(1, cx, cy, r, angle) / IMG  # the shape's rotated square
        if task == "segment":
            values = (outline / IMG).clip(0, 1).ravel()
        elif task == "obb":
            values = corners.ravel()
        else:  # pose: the box of the outline, then the square's corners as visible keypoints
            x1, y1 = outline.min(0) / IMG
            x2, y2 = outline.max(0) / IMG
            values = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
            values += [v for x, y in corners for v in (x, y, 2)]
        lines.append(f"{cls} " + " ".join(f"{v:.6f}" if not isinstance(v, int) else str(v) for v in values))
    return img, lines


def _crop(rng, probs, style):
    """Return one classification image (CROP px, one centred shape) and its class id."""
    img = _background(rng, style)[:CROP, :CROP].copy()
    cls = int(rng.choice(len(NAMES), p=probs))
    r, (dx, dy) = int(rng.integers(6, 12)), rng.integers(-3, 4, 2)
    color = _color(rng, img.mean())
    outline = _polygon(cls, CROP // 2 + int(dx), CROP // 2 + int(dy), r, float(rng.uniform(0, np.pi / 2)))
    cv2.fillPoly(img, [np.round(outline).astype(np.int32)], color, cv2.LINE_AA)
    return img, cls


def _write_task_split(root, split, n, rng, probs, styles, task):
    """Write n images of a segment/pose/obb split (root/images/split, root/labels/split) or a classify split
    (root/split/<class>/)."""
    for i in range(n):
        style = styles[i % len(styles)]
        if task == "classify":
            img, cls = _crop(rng, probs, style)
            folder = root / split / NAMES[cls]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i:04d}.png"), img)
            continue
        img, lines = _task_image(rng, probs, style, task)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), img)
        (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")


def _make_task_demo(out, seed, n_train, n_val, task):
    """Write the demo federation of a task other than detect (see make_demo); return (datasets, test dataset)."""
    rng = np.random.default_rng(seed)
    extra = "kpt_shape: [4, 3]\nflip_idx: [1, 0, 3, 2]\n" if task == "pose" else ""
    datasets = []
    for name, probs, style, n_train_, n_val_ in CLIENTS:
        _write_task_split(out / name, "train", n_train or n_train_, rng, probs, [style], task)
        _write_task_split(out / name, "val", n_val or n_val_, rng, probs, [style], task)
        if task == "classify":
            datasets.append(out / name)
        else:
            datasets.append(_write_yaml(out / name, {"train": "train", "val": "val"}))
            (datasets[-1]).write_text(datasets[-1].read_text() + extra)
    uniform, styles = [1 / len(NAMES)] * len(NAMES), [c[2] for c in CLIENTS]
    for split in ("train", "val", "test") if task == "classify" else ("test",):  # the same images in each split
        _write_task_split(out / "test", split, TEST_IMAGES, np.random.default_rng([seed, 1]), uniform, styles, task)
    if task == "classify":
        return datasets, out / "test"
    test = _write_yaml(out / "test", {"train": "test", "val": "test", "test": "test"})
    test.write_text(test.read_text() + extra)
    return datasets, test


def make_demo(out_dir, seed=0, n_train=None, n_val=None, task="detect"):
    """Generate the demo federation under out_dir (skipped when already complete).

    Args:
        out_dir (str | Path): folder that receives one sub-folder per client plus `test/`.
        seed (int): random seed; the same seed gives the same images.
        n_train (int | None): train images per client instead of the defaults (tests use a handful).
        n_val (int | None): val images per client instead of the defaults.
        task (str): detect, segment, pose, obb or classify (the labels the images get).

    Returns:
        (tuple[list[Path], Path]): the clients' data.yaml files and the held-out test data.yaml (classify: the
            dataset folders, each with train/ and val/ holding a folder per class).
    """
    out = Path(out_dir)
    marker = out / f".complete{'' if task == 'detect' else '-' + task}-seed{seed}-{n_train}-{n_val}"
    folders = task == "classify"
    yamls = [out / name if folders else out / name / "data.yaml" for name, *_ in CLIENTS]
    test_yaml = out / "test" if folders else out / "test" / "data.yaml"
    if marker.exists():
        return yamls, test_yaml
    if task != "detect":
        _make_task_demo(out, seed, n_train, n_val, task)
        marker.touch()
        return yamls, test_yaml
    rng = np.random.default_rng(seed)
    for name, probs, style, n_train_, n_val_ in CLIENTS:
        _write_split(out / name, "train", n_train or n_train_, rng, probs, [style])
        _write_split(out / name, "val", n_val or n_val_, rng, probs, [style])
        _write_yaml(out / name, {"train": "train", "val": "val"})
    uniform = [1 / len(NAMES)] * len(NAMES)
    styles = [c[2] for c in CLIENTS]
    _write_split(out / "test", "test", TEST_IMAGES, rng, uniform, styles)
    _write_yaml(out / "test", {"train": "test", "val": "test", "test": "test"})  # evaluation only
    marker.touch()
    return yamls, test_yaml


def demo_datasets(folder, seed, tasks):
    """Generate the demo federation (3 clients) under `folder` for one task per client; return their datasets.

    Tasks other than detect get their own folder, `folder`-<task>.
    """
    if len(tasks) > 3:
        raise ValueError(f"the demo federation has 3 clients, client-models names {len(tasks)}: give datasets too")
    where = {t: folder if t == "detect" else f"{folder}-{t}" for t in tasks}
    return [str(make_demo(where[t], seed=seed, task=t)[0][i]) for i, t in enumerate(tasks)]


if __name__ == "__main__":
    print(*make_demo(sys.argv[1] if len(sys.argv) > 1 else "datasets/demo",
                     task=sys.argv[2] if len(sys.argv) > 2 else "detect")[0], sep="\n")

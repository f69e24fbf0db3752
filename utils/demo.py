"""Deterministic demo federation: drawn shapes in YOLO format, non-IID across clients.

Usage: python3 -m utils.demo OUT_DIR
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


def _background(rng, style):
    """Return an IMGxIMG BGR background in one of the demo styles."""
    if style == "dark":
        return np.full((IMG, IMG, 3), rng.integers(0, 60, 3), np.uint8)
    if style == "light":
        return np.full((IMG, IMG, 3), rng.integers(190, 256, 3), np.uint8)
    return rng.integers(60, 190, (IMG, IMG, 3)).astype(np.uint8)


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
        color = rng.integers(0, 256, 3)
        if abs(float(color.mean()) - mean) < 60:  # keep shapes visible against the background
            color = 255 - color if mean < 128 else color // 3
        x1, y1, x2, y2 = _draw(img, cls, cx, cy, r, tuple(int(c) for c in color))
        boxes.append((cx, cy, r))
        xc, yc, w, h = (x1 + x2) / 2 / IMG, (y1 + y2) / 2 / IMG, (x2 - x1) / IMG, (y2 - y1) / IMG
        lines.append(f"{cls} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return img, lines


def _write_split(root, split, n, rng, probs, styles):
    """Write n images and labels under root/images/split and root/labels/split."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lines = _image(rng, probs, styles[i % len(styles)])
        cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), img)
        (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")


def _write_yaml(root, splits):
    """Write root/data.yaml mapping each split key to an image folder and naming the demo classes."""
    text = f"path: {root.resolve()}\n" + "".join(f"{k}: images/{v}\n" for k, v in splits.items())
    text += "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES))
    (root / "data.yaml").write_text(text)
    return root / "data.yaml"


def make_demo(out_dir, seed=0, n_train=None, n_val=None):
    """Generate the demo federation under out_dir (skipped when already complete).

    Args:
        out_dir (str | Path): folder that receives one sub-folder per client plus `test/`.
        seed (int): random seed; the same seed gives the same images.
        n_train (int | None): train images per client instead of the defaults (tests use a handful).
        n_val (int | None): val images per client instead of the defaults.

    Returns:
        (tuple[list[Path], Path]): the clients' data.yaml files and the held-out test data.yaml.
    """
    out = Path(out_dir)
    marker = out / f".complete-seed{seed}-{n_train}-{n_val}"
    yamls = [out / name / "data.yaml" for name, *_ in CLIENTS]
    test_yaml = out / "test" / "data.yaml"
    if marker.exists():
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


if __name__ == "__main__":
    print(*make_demo(sys.argv[1] if len(sys.argv) > 1 else "datasets/demo")[0], sep="\n")

"""Keep Ultralytics from downloading anything at run time (DESIGN: offline).

Two checks inside a training run download on a connected machine: `check_det_dataset` calls `check_font`, which
fetches Arial.ttf for plots when it is not installed, and on CUDA `check_amp` fetches yolo26n.pt to compare AMP
against fp32. Both are replaced by local-only versions; plots are off in this project, and without the reference
model AMP is kept on, as Ultralytics itself does when it is offline. YOLO_OFFLINE=1 (set by federated.py) turns
off Ultralytics' other network use (update checks, events).
"""

from pathlib import Path

import ultralytics.data.utils as data_utils
import ultralytics.engine.trainer as trainer
from matplotlib import font_manager
from ultralytics.utils import USER_CONFIG_DIR, WEIGHTS_DIR
from ultralytics.utils.checks import check_amp


def _local_font(font="Arial.ttf"):
    """Return the font's path if it is already on this machine, else None; never download."""
    file = USER_CONFIG_DIR / Path(font).name
    if file.exists():
        return file
    return next((f.fname for f in font_manager.fontManager.ttflist if font in f.fname), None)


def _local_amp_check(model):
    """Ultralytics' AMP check, except that on CUDA without its reference model on disk it keeps AMP on."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return check_amp(model) if not on_cuda or (WEIGHTS_DIR / "yolo26n.pt").is_file() else True


def no_downloads():
    """Install the local-only font and AMP checks in the Ultralytics modules that call them (idempotent)."""
    data_utils.check_font = _local_font
    trainer.check_amp = _local_amp_check

"""Output files appear whole and get the permissions the umask gives, like files written with open(); a quiet plot."""

import os
import stat

import pytest

from utils.atomic import atomic_write_text, current_umask
from utils.checkpoint import write_checkpoint
from utils.model import build_model, read_base
from utils.params import save_npz
from utils.report import plot, write_rows


@pytest.fixture(scope="module")
def small_model():
    """A yolov8n model for two classes."""
    return build_model(read_base("yolov8n.yaml")[0], ["a", "b"])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_every_output_writer_gives_umask_permissions(umask, mode, small_model, tmp_path):
    rows = [{"round": 1, "map50_95": 0.1, "train_box_loss": 2.0}, {"round": 2, "map50_95": 0.2, "train_box_loss": 1.5}]
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "config.json", "{}")
        save_npz(tmp_path / "round1.npz", [p.detach().numpy() for p in small_model.parameters()][:3])
        write_rows(tmp_path / "metrics.csv", rows)
        plot(tmp_path / "results.png", rows)
        write_checkpoint(small_model, tmp_path / "last.pt")
    finally:
        os.umask(old)
    files = ["config.json", "round1.npz", "metrics.csv", "results.png", "last.pt"]
    assert {f: oct(stat.S_IMODE((tmp_path / f).stat().st_mode)) for f in files} == {f: oct(mode) for f in files}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temp file left behind


def test_plot_of_a_run_without_evaluation_warns_nothing(tmp_path):
    import warnings

    rows = [{"round": 1, "updates": 2}, {"round": 2, "updates": 2}]  # --evaluate false, every round skipped

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot(tmp_path / "results.png", rows)

    assert [str(w.message) for w in caught] == []  # matplotlib's "No artists with labels found" among them before
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"

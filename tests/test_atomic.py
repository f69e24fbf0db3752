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


@pytest.mark.parametrize("clients, lines, bands", [(3, 4, 0), (12, 1, 2)], ids=["3clients", "12clients"])
def test_plot_draws_a_line_per_client_up_to_ten_and_their_range_beyond(clients, lines, bands, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from utils.report import _spread

    rows = [{"round": r, "map50_95": 0.5, **{f"map50_95_client{i}": i / 100 + r for i in range(clients)}}
            for r in (1, 2)]
    rows.append({**{k: "" for k in rows[0]}, "round": 3, "updates": 0})  # a round without scores, as metrics.csv has it
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    plot(tmp_path / "results.png", rows)

    ax = figs[0].axes[0]
    assert (len(ax.lines), len(ax.collections)) == (lines, bands)
    x, (low, q1, q3, high) = _spread(rows, [f"map50_95_client{i}" for i in range(clients)])
    top = (clients - 1) / 100  # the clients score r + 0.00 ... r + top in round r
    assert x == [1, 2] and list(low) == [1.0, 2.0] and list(high) == pytest.approx([1 + top, 2 + top])
    assert list(q1) == pytest.approx([1 + top / 4, 2 + top / 4]) and list(q3) == pytest.approx([1 + top * 3 / 4,
                                                                                                2 + top * 3 / 4])

"""The one override path: command line flags and Flower run-config keys, type-checked."""

import tomllib

import pytest
import torch

import federated
from tests.conftest import ROOT
from utils import schedule
from utils.config import coerce, get_args_parser, resolve, setting_help


def test_pyproject_run_config_matches_the_constants():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert resolve(federated.DEFAULTS, app) == federated.DEFAULTS
    assert set(app) == {k.lower().replace("_", "-") for k in federated.DEFAULTS}


def test_command_line_overrides_every_kind():
    p = get_args_parser(federated.DEFAULTS)
    args = p.parse_args(["--num-rounds", "3", "--datasets", "a.yaml", "b.yaml", "--exist-ok", "--lr0", "0.02",
                         "--client-resources", "num_cpus=2,num_gpus=0.5", "--evaluate", "false"])
    cfg = resolve(federated.DEFAULTS, vars(args))
    assert cfg["NUM_ROUNDS"] == 3 and cfg["DATASETS"] == ["a.yaml", "b.yaml"] and cfg["EXIST_OK"] is True
    assert cfg["LR0"] == 0.02 and cfg["CLIENT_RESOURCES"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert cfg["EVALUATE"] is False and cfg["EPOCHS"] == federated.EPOCHS


def test_run_config_strings_and_type_errors():
    cfg = resolve(federated.DEFAULTS, {"num-rounds": 4, "datasets": "a.yaml b.yaml", "cos-lr": True})
    assert cfg["NUM_ROUNDS"] == 4 and cfg["DATASETS"] == ["a.yaml", "b.yaml"] and cfg["COS_LR"] is True
    with pytest.raises(ValueError, match="setting num-rounds: expected int"):
        coerce("NUM_ROUNDS", "3.5", 15)
    with pytest.raises(ValueError, match="setting amp: expected bool"):
        coerce("AMP", "maybe", True)
    with pytest.raises(ValueError, match="unknown setting 'rounds'"):
        resolve(federated.DEFAULTS, {"rounds": 3})


def test_help_shows_every_setting_with_its_comment_and_default():
    helps, groups = setting_help(ROOT / "federated.py")
    assert [k for k in federated.DEFAULTS if not helps.get(k)] == []
    assert [k for k in federated.DEFAULTS if not groups.get(k)] == []  # every setting sits under a header
    text = " ".join(get_args_parser(federated.DEFAULTS, "", helps, groups).format_help().split())  # unwrapped
    assert "--num-rounds INT federated rounds (default: 15)" in text
    assert "--save-dir STR folder for round{N}.npz" in text and "(default: runs/federated)" in text
    assert text.count("(default: ") == len(federated.DEFAULTS)
    # a comment continued on the next lines is shown whole
    assert "its task (detect, segment, pose, obb, classify) is the run's; adapted to the datasets' classes" in text
    assert "halves BATCH and NBS (down to 2) until an epoch makes this many optimizer steps" in text
    # grouped as the constants are: the everyday groups first, then the expert ones
    titles = ["Run:", "Data and model:", "Federation:", "Training", "Strategy", "Privacy", "Communication:",
              "Advanced training", "Advanced run:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    body = text[text.index("options:"):]  # below the usage line
    assert body.index("--num-rounds") < body.index("Data and model:") < body.index("--base-model")


def test_a_misspelled_or_shortened_flag_is_one_line_naming_the_closest_flag(capsys):
    p = get_args_parser(federated.DEFAULTS)
    for typo in ("--num-runds", "--num-round"):  # a prefix is never taken for the flag it starts
        with pytest.raises(SystemExit) as e:
            p.parse_args([typo, "3"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "did you mean --num-rounds?" in err, err


def test_setting_help_reads_only_top_level_upper_case_comments(tmp_path):
    f = tmp_path / "settings.py"
    f.write_text('A = 1  # (int) first\nB = "x # y"  # (str) hash inside the value\nlower = 2  # not a setting\n'
                 'C = 3\nD = {"k": 1,\n     "j": 2}  # (dict) spans lines\nif True:\n    E = 4  # indented\n'
                 'F = 5  # 100% sure\n# --- Later ---\nG = 6  # (int) a comment\n#          on two lines\n# not G\n')
    helps, groups = setting_help(f)
    assert helps == {"A": "first", "B": "hash inside the value", "D": "spans lines", "F": "100% sure",
                     "G": "a comment on two lines"}
    assert groups == {"G": "Later"}
    text = " ".join(get_args_parser({"A": 1, "C": 3, "F": 5}, "", helps).format_help().split())
    assert "--a INT first (default: 1)" in text and "--c INT (default: 3)" in text and "100% sure (default: 5)" in text


def test_federated_help_lists_every_flag_with_its_meaning_and_default():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "federated.py"), "--help"], capture_output=True, text=True)

    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "--num-rounds INT federated rounds (default: 15)" in text
    assert "--keep-rounds INT round{N}.npz files kept" in text and text.count("(default: ") == len(federated.DEFAULTS)


@pytest.mark.parametrize("trained", [False, True])
def test_warmup_depends_on_the_start(trained):
    # a random init: Ultralytics' warmup, capped to leave the last epoch at full rate; a trained .pt: never capped,
    # and the learning-rate scale (at least 1) times as long with OPTIMIZER=auto (the rate climbs as Ultralytics' own
    # would over its warmup)
    one = {**federated.DEFAULTS, "NUM_ROUNDS": 1, "EPOCHS": 1}
    assert schedule.resolve_optimizer(one, 4, 300, scale=3)["lr0"] == pytest.approx(0.00125 * 3)
    assert schedule.resolve_warmup(one, trained, scale=3) == (9.0 if trained else 0.0)
    assert schedule.resolve_warmup({**one, "NUM_ROUNDS": 15, "EPOCHS": 2}, trained, 3) == (9.0 if trained else 3.0)
    assert schedule.resolve_warmup(one, trained, scale=0.5) == (3.0 if trained else 0.0)  # never shorter
    explicit = {**one, "OPTIMIZER": "SGD", "NUM_ROUNDS": 4}
    assert schedule.resolve_warmup(explicit, trained, 3) == 3.0  # no scale applies to an explicit optimizer


def test_learning_rate_scale_is_derived_from_the_clients_image_counts():
    # the ratio of a centralized epoch's optimizer steps (one per max(BATCH, NBS) of all images) to the image-
    # weighted mean of the clients' steps per epoch (their own batch after MIN_STEPS)
    cfg = {**federated.DEFAULTS, "BATCH": 8, "NBS": 8, "MIN_STEPS": 6}  # LR_SCALE 0: derived, at most LR_SCALE_MAX 4
    scale = schedule.resolve_lr_scale
    assert scale(cfg, [96], 1) == 1.0  # one client: plain Ultralytics
    assert scale(cfg, [200, 200, 200], 3) == 3.0  # K equal clients at the same batch: K
    assert scale(cfg, [100] * 8, 8) == 4.0  # 8, capped at LR_SCALE_MAX
    assert scale({**cfg, "LR_SCALE_MAX": 10.0}, [100] * 8, 8) == 8.0
    assert scale(cfg, [96, 72, 48], 3) == pytest.approx(216**2 / (96**2 + 72**2 + 48**2), abs=0.01)  # 2.79
    # 8 clients of 27 images halve their batch to 4 (6.75 steps each): half of 8
    assert scale(cfg, [27] * 8, 8) == 4.0
    assert scale({**cfg, "MIN_STEPS": 0}, [27] * 8, 8) == 4.0  # 8, capped
    assert scale({**cfg, "LR_SCALE": 2.5}, [27] * 8, 8) == 2.5  # set: as given
    assert scale(cfg, [], 3) == 3.0  # a deployment: the sizes are on the SuperNodes, K equal clients assumed
    assert scale(cfg, [], 5) == 4.0  # capped
    run = federated.prepare({**cfg, "DATASETS": [], "NAMES": ["a"], "MIN_CLIENTS": 4, "SAVE_DIR": "/nonexistent/x"})
    assert run["spec"]["lr_scale"] == 4.0 and run["spec"]["hyp"]["lr0"] == pytest.approx(0.002 * 5 / 5 * 4)


def test_one_client_trains_as_plain_ultralytics_would(tiny_fed, tmp_path):
    # no federated adjustment for one client: Ultralytics' own auto learning rate and the given batch (an 8-image
    # client among several would halve it for MIN_STEPS); two such clients get both adjustments
    cfg = {**federated.DEFAULTS, "BATCH": 4, "SAVE_DIR": str(tmp_path / "r")}
    one = federated.prepare({**cfg, "DATASETS": [str(tiny_fed[0][0])]})["spec"]
    assert (one["lr_scale"], one["min_steps"], one["hyp"]["lr0"], one["hyp"]["batch"]) == (1.0, 0, 0.00125, 4)
    two = federated.prepare({**cfg, "DATASETS": [str(d) for d in tiny_fed[0][:2]]})["spec"]
    assert (two["lr_scale"], two["min_steps"], two["hyp"]["lr0"]) == (0.5, 6, 0.000625)


def test_min_steps_auto_is_6_from_a_random_init_and_3_from_a_trained_start(tiny_fed, tiny_model, tmp_path):
    # from a trained start, clients of 12-32 images learned more at batch 4-8 (MIN_STEPS 3) than at 2-4 (6)
    from utils.model import build_model

    assert [schedule.resolve_min_steps({"MIN_STEPS": v}, 3, t) for v, t in
            [("auto", False), ("auto", True), ("6", True), (0, True)]] == [6, 3, 6, 0]
    assert schedule.resolve_min_steps({"MIN_STEPS": "auto"}, 1, True) == 0  # one client: plain Ultralytics
    pt = tmp_path / "trained.pt"
    torch.save({"model": build_model(*tiny_model), "train_args": {"task": "detect"}}, pt)
    cfg = {**federated.DEFAULTS, "DATASETS": [str(d) for d in tiny_fed[0][:2]], "SAVE_DIR": str(tmp_path / "r")}
    assert federated.prepare({**cfg, "BASE_MODEL": str(pt)})["spec"]["min_steps"] == 3
    assert federated.prepare({**cfg, "BASE_MODEL": str(pt), "MIN_STEPS": "5"})["spec"]["min_steps"] == 5
    assert federated.prepare(cfg)["spec"]["min_steps"] == 6

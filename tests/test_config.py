"""The one override path: command line flags and Flower run-config keys, type-checked."""

import tomllib

import pytest

import federated
from tests.conftest import ROOT
from utils.config import coerce, get_args_parser, resolve


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

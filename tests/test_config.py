"""Config validation and the expansion of experiments into runs."""

import copy
from pathlib import Path

import pytest
import yaml

from ntkcl import config
from ntkcl.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    with open(REPO / "config.yaml") as f:
        return yaml.safe_load(f)


def test_repository_config_is_valid(cfg):
    config.validate_config(cfg)


def test_runs_have_readable_ids_and_full_settings(cfg):
    runs = config.expand_runs(cfg, "demo")["width_regime"]
    ids = [r["run_id"] for r in runs]
    assert "w64-fl-s0" in ids and "w1024-lazy-s1" in ids
    run = runs[ids.index("w1024-lazy-s1")]
    assert run["model"]["width"] == 1024 and run["regime"] == "lazy"
    assert run["params"] == {"width": 1024, "regime": "lazy", "seed": 1}
    assert run["data"]["name"] == "digits"  # the demo block applies
    assert run["ntk"]["every"] == 10  # a schema default fills what nobody set
    paper = config.expand_runs(cfg, "paper")["width_regime"]
    assert len(paper) == 6 * 2 * 3 and paper[0]["data"]["name"] == "CIFAR10"


def test_merge_order(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["experiments"]["width_regime"]["overrides"] = {"optim": {"lr": 0.3}}
    run = config.expand_runs(cfg, "paper")["width_regime"][0]
    assert run["optim"] == {"lr": 0.3, "reference_width": 32, "batch_size": 128}
    # the demo block is applied after the experiment's overrides
    assert config.expand_runs(cfg, "demo")["width_regime"][0]["optim"]["lr"] == 0.1


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda c: c["defaults"].update(widht=3),
            ["config.defaults", "'widht'", "allowed keys here", "model"],
        ),
        (
            lambda c: c["defaults"]["model"].update(width="big"),
            ["config.defaults.model.width", "'big' is not of type 'integer'"],
        ),
        (
            lambda c: c["defaults"].update(regime="greedy"),
            ["config.defaults.regime", "'greedy' is not one of ['fl', 'lazy']"],
        ),
        (
            lambda c: c["experiments"]["width_regime"]["grid"].update(
                {"model.widht": [1]}
            ),
            ["experiments.width_regime.grid", "'model.widht'", "model.width"],
        ),
        (
            lambda c: c["experiments"]["width_regime"]["grid"].update(
                {"regime": ["fast"]}
            ),
            ["run width_regime/w64-fast-s0", "regime", "'fast' is not one of"],
        ),
        (lambda c: c.update(scale="huge"), ["config.scale", "'huge' is not one of"]),
    ],
)
def test_bad_config_names_the_key_and_allowed_values(cfg, edit, expected):
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    for fragment in expected:
        assert fragment in str(error.value)


def test_run_id_formatting():
    assert config.make_run_id({"model.width": 1024, "regime": "lazy"}, 0) == (
        "w1024-lazy-s0"
    )
    assert config.make_run_id({"optim.lr": 0.1, "tasks.alpha": 0.25}, 2) == (
        "lr0.1-a0.25-s2"
    )


def test_find_run_errors_name_the_alternatives(cfg):
    with pytest.raises(ConfigError, match="its runs are"):
        config.find_run(cfg, "demo", "width_regime", "w3-fl-s0")

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
        (
            lambda c: c["experiments"]["width_regime"]["demo"].update(
                overrides={"model": {"depht": 2}}
            ),
            [
                "config.experiments.width_regime.demo.overrides.model: Additional",
                "'depht'",
                "allowed keys here: activation, arch, bias, depth, width",
            ],
        ),
        (
            lambda c: c["experiments"]["width_regime"]["demo"].update(seedz=2),
            ["width_regime.demo: Additional", "allowed keys here: grid, overrides"],
        ),
        (lambda c: c.update(scale="huge"), ["config.scale", "'huge' is not one of"]),
        (lambda c: c.update(only="width_regime"), ["e.g. [width_regime]"]),
        (
            lambda c: c["defaults"]["tasks"].update(iterations=[10, 10, 10]),
            [
                "(paper run width_regime/w64-fl-s0 and ",
                "tasks.iterations is [10, 10, 10]",
            ],
        ),
        (
            lambda c: c.update(checkpoint_seconds=-1),
            ["config.checkpoint_seconds", "-1 is less than the minimum of 0"],
        ),
        (
            lambda c: c["experiments"]["width_regime"]["figure"].update(line="depth"),
            ["experiments.width_regime.figure.line", "'depth' is not a run dim"],
        ),
        (
            lambda c: c["experiments"]["class_overlap"]["figure"].update(summary="k"),
            ["class_overlap.figure.summary", "'shared', 'seed', 'similarity'"],
        ),
    ],
)
def test_bad_config_names_the_key_and_allowed_values(cfg, edit, expected):
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize("at", ["grid", "demo.grid"])
def test_a_grid_typo_is_named_where_it_is_and_only_once(cfg, at):
    cfg = copy.deepcopy(cfg)
    experiment = cfg["experiments"]["width_regime"]
    grid = experiment["demo"].setdefault("grid", {}) if at == "demo.grid" else None
    (grid if grid is not None else experiment["grid"])["model.widht"] = [1, 2]
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 1, problems
    expected = f"config.experiments.width_regime.{at}: unknown setting 'model.widht'"
    assert expected in problems[0]


def test_workflow_settings_fall_back_to_the_schema_default(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.pop("checkpoint_seconds", None)
    assert config.workflow_setting(cfg, "checkpoint_seconds") == 60
    assert (
        config.workflow_setting({**cfg, "checkpoint_seconds": 5}, "checkpoint_seconds")
        == 5
    )
    assert config.workflow_setting({}, "scale") == "paper"


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
    with pytest.raises(ConfigError, match="Did you mean 'width_regime'"):
        config.find_run(cfg, "demo", "width_regmie", "w64-fl-s0")
    with pytest.raises(ConfigError, match="'imagenet100' has no demo version"):
        config.find_run(cfg, "demo", "imagenet100", "w64-fl-s0")


EXPERIMENTS = {
    # name: (dims of its runs, runs at paper scale)
    "width_regime": (["width", "regime", "seed"], 36),
    "width_regime_cnn": (["width", "regime", "seed"], 24),
    "class_overlap": (["shared", "seed"], 18),
    "class_frequency": (["alpha", "seed"], 15),
    "learning_rate": (["lr", "seed"], 9),
    "training_duration": (["iterations", "seed"], 15),
    "multitask_cifar10": (["regime", "seed"], 6),
    "multitask_cifar100": (["regime", "seed"], 6),
    "imagenet100": (["width", "regime", "seed"], 24),
}
NO_DEMO = {"multitask_cifar100", "imagenet100"}


def test_every_experiment_expands_at_both_scales(cfg):
    assert set(cfg["experiments"]) == set(EXPERIMENTS)
    paper, demo = (config.expand_runs(cfg, scale) for scale in config.SCALES)
    assert set(paper) == set(EXPERIMENTS)
    assert set(demo) == set(EXPERIMENTS) - NO_DEMO
    for name, (dims, count) in EXPERIMENTS.items():
        assert len(paper[name]) == count, name
        assert list(paper[name][0]["params"]) == dims, name
        if name in demo:
            assert 1 <= len(demo[name]) <= 12, name
            assert list(demo[name][0]["params"]) == dims, name
            assert {run["data"]["name"] for run in demo[name]} == {"digits"}, name
    assert len(sum(demo.values(), [])) <= 40  # the demo stays minutes on 2 cores


def test_experiment_settings_and_readable_ids(cfg):
    paper = config.expand_runs(cfg, "paper")
    overlap = {r["run_id"]: r for r in paper["class_overlap"]}
    assert overlap["k3-s1"]["tasks"]["scheme"] == "overlap"
    assert overlap["k3-s1"]["tasks"]["shared"] == 3
    frequency = {r["run_id"]: r for r in paper["class_frequency"]}
    assert frequency["a0.25-s0"]["tasks"]["alpha"] == 0.25
    duration = {r["run_id"]: r for r in paper["training_duration"]}
    assert duration["it250x2000-s0"]["tasks"]["iterations"] == [250, 2000]
    assert duration["it250x2000-s0"]["params"]["iterations"] == [250, 2000]
    cnn = paper["width_regime_cnn"][0]
    assert cnn["run_id"] == "w64-fl-s0" and cnn["model"]["arch"] == "cnn"
    lr = [r["run_id"] for r in paper["learning_rate"]]
    assert lr[:2] == ["lr0.01-s0", "lr0.01-s1"]

    cifar100 = paper["multitask_cifar100"][0]
    assert cifar100["data"]["name"] == "CIFAR100"
    assert cifar100["tasks"]["classes"] == [
        list(range(10 * k, 10 * k + 10)) for k in range(10)
    ]
    cifar10 = config.expand_runs(cfg, "demo")["multitask_cifar10"][0]
    assert cifar10["tasks"]["classes"] == [[2 * k, 2 * k + 1] for k in range(5)]

    imagenet = paper["imagenet100"][0]
    assert imagenet["data"]["name"] == "ImageFolder"
    assert imagenet["data"]["image_size"] == 32
    assert imagenet["tasks"]["classes"] == [list(range(50)), list(range(50, 100))]
    class_list = REPO / imagenet["data"]["class_list"]
    names = [
        line
        for line in class_list.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(names) == len(set(names)) == 100
    assert all(name.startswith("n") and len(name) == 9 for name in names)


def test_an_experiment_can_opt_out_of_the_demo(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["experiments"]["learning_rate"]["demo"] = False
    config.validate_config(cfg)
    assert "learning_rate" not in config.expand_runs(cfg, "demo")
    assert "learning_rate" in config.expand_runs(cfg, "paper")
    cfg["experiments"]["learning_rate"]["demo"] = True
    with pytest.raises(ConfigError, match="experiments.learning_rate.demo"):
        config.validate_config(cfg)


def tiny_experiment(cfg, **experiment):
    """``cfg`` with one experiment, ``tiny``, made of ``experiment``."""
    cfg = copy.deepcopy(cfg)
    cfg["experiments"] = {"tiny": experiment}
    cfg["only"] = []
    return cfg


def test_a_grid_key_named_like_the_seed_gets_its_whole_name(cfg):
    cfg = tiny_experiment(
        cfg,
        grid={"probe.seed": [0, 1]},
        seeds=[0, 1],
        figure={"line": "seed", "row": "probe_seed"},
    )
    config.validate_config(cfg)
    runs = config.expand_runs(cfg, "demo")["tiny"]
    assert [r["run_id"] for r in runs] == [
        "probe_seed0-s0",
        "probe_seed0-s1",
        "probe_seed1-s0",
        "probe_seed1-s1",
    ]
    run = runs[2]
    assert run["params"] == {"probe_seed": 1, "seed": 0}
    assert run["probe"]["seed"] == 1 and run["seed"] == 0
    # the figure names it as the metrics do
    cfg["experiments"]["tiny"]["figure"] = {"line": "probe_seed", "row": "seed"}
    config.validate_config(cfg)
    cfg["experiments"]["tiny"]["figure"] = {"line": "seed", "row": "probe"}
    with pytest.raises(ConfigError, match=r"use one of \['probe_seed', 'seed'\]"):
        config.validate_config(cfg)


@pytest.mark.parametrize(
    "grid, figure, expected",
    [
        (
            {"model.width": [8, 16]},
            {"row": "width"},
            "line and row are both 'width'",
        ),
        (
            {"model.width": [8, 16], "regime": ["fl", "lazy"], "optim.lr": [0.1, 1]},
            {},
            "one row per regime, which leaves no place for {'lr': [0.1, 1]}",
        ),
    ],
)
def test_a_figure_without_a_place_for_every_dimension_is_rejected(
    cfg, grid, figure, expected
):
    cfg = tiny_experiment(cfg, grid=grid, seeds=[0, 1], figure=figure)
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    assert expected in str(error.value)


def test_a_line_per_seed_puts_the_grid_dimension_in_the_rows(cfg):
    cfg = tiny_experiment(
        cfg, grid={"probe.seed": [0, 1]}, seeds=[0, 1], figure={"line": "seed"}
    )
    config.validate_config(cfg)
    layout = config.figure_layout({"line": "seed"}, {"probe_seed": 2})
    assert layout == {"line": "seed", "row": "probe_seed"}
    assert config.figure_layout({}, {"width": 2}) == {"line": "width", "row": None}


def test_the_default_layout_places_dimensions_with_several_values_first(cfg):
    sizes = {"depth": 1, "width": 2, "regime": 2}
    assert config.figure_layout({}, sizes) == {"line": "width", "row": "regime"}
    assert config.figure_layout({}, {"depth": 1}) == {"line": "depth", "row": None}
    grid = {"model.depth": [3], "model.width": [8, 16], "regime": ["fl", "lazy"]}
    config.validate_config(tiny_experiment(cfg, grid=grid, seeds=[0], figure={}))


def test_only_dimensions_with_several_values_need_a_place_in_the_figure(cfg):
    grid = {"model.width": [8, 16], "regime": ["fl", "lazy"], "probe.seed": [1]}
    cfg = tiny_experiment(cfg, grid=grid, seeds=[0, 1], figure={})
    config.validate_config(cfg)
    # at the scale where it has several values, it needs one
    cfg["experiments"]["tiny"]["demo"] = {"grid": {"probe.seed": [0, 1]}}
    with pytest.raises(ConfigError, match=r"figure \(demo scale\): .*probe_seed"):
        config.validate_config(cfg)


def test_grid_keys_sharing_a_last_part_get_their_whole_names():
    names = config.dimension_names(["model.width", "regime", "other.width"])
    assert names == {
        "model.width": "model_width",
        "regime": "regime",
        "other.width": "other_width",
    }
    assert config.dimension_names(["model.width", "tasks.classes"]) == {
        "model.width": "width",
        "tasks.classes": "classes",
    }
    for reserved in ("a.seed", "a.step", "a.task", "a.similarity"):
        assert config.dimension_names([reserved])[reserved] == reserved.replace(
            ".", "_"
        )
    with pytest.raises(ConfigError, match="no distinct run dimension names"):
        config.dimension_names(["x.a.b", "x_a.b"])
    # the same key has the same name at both scales
    experiment = {"grid": {"probe.seed": [0]}, "demo": {"grid": {"probe.size": [4]}}}
    assert config.experiment_dimensions(experiment) == {
        "probe.seed": "probe_seed",
        "probe.size": "size",
    }


def test_nested_grid_values_keep_their_structure_in_run_ids(cfg):
    classes = [[[0, 1], [2, 3]], [[0], [1, 2, 3]], [[0, 1, 2], [3]]]
    cfg = tiny_experiment(cfg, grid={"tasks.classes": classes})
    config.validate_config(cfg)
    runs = config.expand_runs(cfg, "paper")["tiny"]
    assert [r["run_id"] for r in runs] == [
        "classes0x1_2x3-s0",
        "classes0_1x2x3-s0",
        "classes0x1x2_3-s0",
    ]
    assert [r["tasks"]["classes"] for r in runs] == classes
    assert runs[1]["params"] == {"classes": [[0], [1, 2, 3]], "seed": 0}

    assert config.format_value([250, 2000]) == "250x2000"  # as before
    assert config.format_value([[0, 1], [2]]) == "0x1_2"
    assert config.format_value(((0,), (1, 2))) == "0_1x2"  # tuples as lists
    assert config.format_value([[[0, 1], [2]], [[3]]]) == "0x1_2__3"
    assert config.format_value(1e-5) == "1e-05"


def test_duplicate_run_ids_name_the_points_and_the_fix(cfg):
    cfg = tiny_experiment(cfg, grid={"optim.lr": [0.1, 0.1000000001]})
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    message = str(error.value)
    assert "two runs the id 'lr0.1-s0'" in message
    assert "{'optim.lr': 0.1} and {'optim.lr': 0.1000000001}" in message
    assert "6 significant digits" in message
    cfg["experiments"]["tiny"]["grid"] = {"model.width": [8, 8]}
    with pytest.raises(ConfigError, match="lists the point .* twice; remove"):
        config.validate_config(cfg)


def test_values_nested_in_snakemake_config_are_explained(cfg):
    from snakemake.cli import parse_config

    # Snakemake types top-level --config values but leaves nested ones as text
    # (snakemake/snakemake#2374); if that changes, the note below can go.
    given = parse_config(
        [
            "scale=demo",
            "defaults={'optim': {'lr': -1}, 'tasks': {'classes': [[0, 1], [2]]}}",
        ]
    )
    assert given["scale"] == "demo"
    assert given["defaults"]["optim"]["lr"] == "-1"
    cfg = copy.deepcopy(cfg)
    cfg["scale"] = given["scale"]
    cfg["defaults"] = config.deep_merge(cfg["defaults"], given["defaults"])
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    message = str(error.value)
    assert (
        "config.defaults.optim.lr: '-1' is not of type 'number' (it is the text '-1'"
    ) in message
    assert "config.defaults.tasks.classes.0.1: '1' is not of type 'integer'" in message
    assert "--configfile" in message and message.count("Note on --config") == 1

    # a string where a string is allowed, or a wrong type that is no text, gets none
    cfg = tiny_experiment(cfg, grid={"model.width": [8]})
    cfg["defaults"]["model"]["width"] = "big"
    cfg["defaults"]["optim"] = {"lr": [0.1]}
    cfg["defaults"]["tasks"] = {}
    with pytest.raises(ConfigError) as error:
        config.validate_config(cfg)
    assert "Note on --config" not in str(error.value)

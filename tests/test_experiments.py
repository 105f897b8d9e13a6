"""The paper's experiments in config.yaml: planned by Snakemake, run on fixture data.

Nothing downloads here, so the experiments on CIFAR and ImageNet-100 run on tiny
files written in the real on-disk formats (tests/fixtures.py):

- ImageNet-100 (an ImageFolder tree and a class-list file) runs through Snakemake
  itself, from prepare_data to the claims table and the report.
- The CIFAR-10 and CIFAR-100 multi-task experiments run in-process through the
  functions every rule calls (``ntkcl.cli``'s prepare, train, reduce, aggregate,
  plot and claims). torchvision refuses CIFAR files whose md5 is not the
  published one, and the fixture's checksums can only be patched in this
  process, not in the Python processes Snakemake starts for its jobs; the rules
  themselves are dataset-agnostic and run end to end in the ImageFolder test.
"""

import copy
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from fixtures import md5_lists, write_cifar10, write_cifar100, write_image_folder
from test_workflow import snakemake, write_config
from torchvision import datasets

from ntkcl import cli, config, plots

REPO_CONFIG = config.load_config(config.SCHEMA_PATH.parents[2] / "config.yaml")

SMALL = {  # every run tiny: a few iterations per task, a small probe and network
    "device": "cpu",
    "tasks": {"iterations": 6},
    "probe": {"size": 4},
    "model": {"depth": 1, "width": 8},
    "optim": {"batch_size": 8},
    "ntk": {"every": 3},
    "eval": {"max_examples": 20},
}


def small_config(experiment: str, **overrides) -> dict:
    """The repository config with only ``experiment``, shrunk to seconds."""
    cfg = copy.deepcopy(REPO_CONFIG)
    cfg["defaults"] = config.deep_merge(cfg["defaults"], SMALL)
    entry = cfg["experiments"][experiment]
    entry["overrides"] = config.deep_merge(entry.get("overrides", {}), overrides)
    entry["grid"] = {"regime": ["fl", "lazy"]}
    entry["seeds"] = [0]
    entry["figure"] = {"line": "regime"}
    cfg["experiments"] = {experiment: entry}
    config.validate_config(cfg)
    return cfg


def test_dry_run_lists_every_experiments_jobs(tmp_path):
    write_config(tmp_path, REPO_CONFIG)
    for scale in config.SCALES:
        result = snakemake(tmp_path, "-n", "--config", f"scale={scale}", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        listing = result.stdout + result.stderr
        runs = config.expand_runs(REPO_CONFIG, scale)
        for experiment in REPO_CONFIG["experiments"]:
            archives = set(
                re.findall(rf"results/{scale}/runs/{experiment}/([^/\s]+)\.h5", listing)
            )
            expected = {run["run_id"] for run in runs.get(experiment, [])}
            assert archives == expected, (scale, experiment)
            figure = f"results/{scale}/figures/{experiment}.png"
            assert (figure in listing) == (experiment in runs), (scale, figure)
        summaries = {"class_overlap", "class_frequency"}
        for experiment in summaries:
            assert f"results/{scale}/figures/{experiment}-summary.png" in listing
        assert f"results/{scale}/claims.csv" in listing


def test_only_runs_the_experiments_it_names(tmp_path, capsys):
    write_config(tmp_path, {**REPO_CONFIG, "only": ["class_overlap"]})
    assert cli.main(["check-config", str(tmp_path / "config.yaml")]) == 0
    assert capsys.readouterr().out.startswith("class_overlap: ")
    write_config(tmp_path, REPO_CONFIG)
    only = "only=[width_regime, class_overlap]"
    result = snakemake(tmp_path, "-n", "--config", only, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    listing = result.stdout + result.stderr
    planned = set(re.findall(r"results/paper/runs/(\w+)/", listing))
    assert planned == {"width_regime", "class_overlap"}
    assert "imagenet100" not in listing and "results/paper/claims.csv" in listing

    bad = snakemake(tmp_path, "-n", "--config", "only=[width_regmie]", timeout=300)
    assert bad.returncode != 0
    assert "config.only: No experiment 'width_regmie'" in bad.stdout + bad.stderr

    # an experiment without a demo version: an error, not an empty claims table
    demo = ("scale=demo", "only=[multitask_cifar100]")
    bad = snakemake(tmp_path, "-n", "--config", *demo, timeout=300)
    assert bad.returncode != 0
    assert "only: Experiment 'multitask_cifar100' has no demo version" in (
        bad.stdout + bad.stderr
    )


@pytest.mark.slow
def test_imagenet100_runs_end_to_end_on_an_image_folder(tmp_path):
    root = tmp_path / "imagenet"
    folders = ["n01", "n02", "n03", "n04", "n05", "n06"]
    write_image_folder(root, folders, per_class=4)
    (tmp_path / "classes.txt").write_text("# four of six\nn05\nn02\nn03\nn06\n")
    cfg = small_config(
        "imagenet100",
        data={"root": str(root), "class_list": "classes.txt", "image_size": 8},
        tasks={"classes": [[0, 1], [2, 3]]},
    )
    cfg["experiments"]["imagenet100"]["grid"] = {"regime": ["fl"]}
    write_config(tmp_path, cfg)
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]

    results = tmp_path / "results"
    with xr.open_dataset(
        results / "paper" / "runs" / "imagenet100" / "fl-s0.h5", engine="h5netcdf"
    ) as run:
        assert run.attrs["status"] == "complete"
        dataset = run.attrs["dataset"]  # the class list's stem, size, source hash
        assert re.fullmatch(r"ImageFolder-classes-8px-[0-9a-f]{8}", dataset)
        assert list(run["task_start"].values) == [0, 6]
        assert sorted(set(run["probe_label"].values)) == [0, 1]
    for name in ("imagenet100.pdf", "imagenet100.png"):
        assert (results / "paper" / "figures" / name).stat().st_size > 1000
    table = pd.read_csv(results / "paper" / "claims.csv")
    assert set(table["experiment"]) == {"imagenet100"}
    assert {"C1", "C3"} <= set(table["claim"])

    report = snakemake(tmp_path, "--report", "report.zip", timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        html = archive.read("report/report.html").decode()
    assert "imagenet100 (paper scale): top eigenvalue" in html  # figure caption
    assert "one line per regime, one seed, every task switch dashed." in html
    assert "Every experiment at paper scale: for each claim" in html
    assert "<li><strong>imagenet100</strong>: ImageNet-100" in html  # workflow.rst


@pytest.mark.parametrize(
    "experiment, write, cls, n_tasks",
    [
        ("multitask_cifar10", write_cifar10, datasets.CIFAR10, 5),
        ("multitask_cifar100", write_cifar100, datasets.CIFAR100, 10),
    ],
)
def test_cifar_multitask_runs_end_to_end_in_process(
    tmp_path, monkeypatch, experiment, write, cls, n_tasks
):
    root = tmp_path / "data"
    write(root, **({"per_batch": 10} if cls is datasets.CIFAR10 else {}))
    for name, value in md5_lists(cls, root).items():
        monkeypatch.setattr(cls, name, value)
    cfg = small_config(experiment, data={"root": str(root), "download": False})
    runs = config.expand_runs(cfg, "paper")[experiment]
    out = tmp_path / "results" / "paper"

    # the chain of rules, step by step: prepare, train and reduce every run,
    # aggregate, plot and check the claims
    data_path = tmp_path / "results" / "data" / f"{cls.__name__}.h5"
    cli.prepare(runs[0]["data"], data_path)
    metrics = []
    for run in runs:
        archive = out / "runs" / experiment / f"{run['run_id']}.h5"
        status = cli.train(run, data_path, archive, out / "work" / run["run_id"])
        assert status == "complete"
        metrics.append(out / "metrics" / experiment / f"{run['run_id']}.nc")
        cli.reduce(archive, metrics[-1])
    combined = out / "metrics" / f"{experiment}.nc"
    cli.aggregate(metrics, list(runs[0]["params"]), combined)
    figure = out / "figures" / experiment
    cli.plot(combined, f"{figure}.pdf", f"{figure}.png", line="regime")
    cli.claims(combined, out / "claims" / f"{experiment}.csv")

    ds = xr.load_dataset(combined, engine="h5netcdf")
    assert ds.sizes["task"] == n_tasks
    starts = 6 * np.arange(n_tasks)
    np.testing.assert_array_equal(ds["task_start"].sel(regime="fl", seed=0), starts)
    # every switch is marked in every panel
    fig = plots.make_figure(ds, line="regime")
    for ax in fig.axes:
        dashed = {
            ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"
        }
        assert dashed == set(starts[1:])
    assert (out / "figures" / f"{experiment}.png").stat().st_size > 1000
    table = pd.read_csv(out / "claims" / f"{experiment}.csv")
    c11 = table[table["claim"] == "C11"]
    assert sorted(set(c11["switch"])) == list(range(1, n_tasks))
    assert len(c11) == 2 * (n_tasks - 1)  # both regimes, every switch
    assert {"C1", "C2", "C3"} <= set(table["claim"])

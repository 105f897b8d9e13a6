"""End to end: Snakemake runs the whole chain on a tiny config, and refuses bad ones."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

TINY = {
    "scale": "demo",
    "demo": {
        "device": "cpu",
        "data": {"name": "digits"},
        "tasks": {"iterations": [15, 10]},
        "probe": {"size": 10},
        "model": {"depth": 2},
        "optim": {"lr": 0.1, "batch_size": 16},
        "ntk": {"every": 5},
        "eval": {"max_examples": 50},
    },
    "experiments": {
        "width_regime": {
            "description": "Tiny width by regime.",
            "grid": {"model.width": [8, 16], "regime": ["fl", "lazy"]},
            "seeds": [0],
            "figure": {"line": "width", "row": "regime"},
        }
    },
}


def snakemake(workdir, *args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def write_config(workdir, cfg):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path):
    write_config(tmp_path, TINY)
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]

    results = tmp_path / "results"
    assert (results / "data" / "digits.h5").is_file()
    runs = sorted((results / "demo" / "runs" / "width_regime").glob("*.h5"))
    assert [r.stem for r in runs] == sorted(
        f"w{w}-{r}-s{s}" for w in (8, 16) for r in ("fl", "lazy") for s in (0,)
    )
    for run in runs:
        with xr.open_dataset(run, engine="h5netcdf") as ds:
            assert ds.attrs["status"] == "complete"
            assert list(ds["step"].values) == [0, 5, 10, 15, 16, 20, 25]
        log = results / "demo" / "logs" / "train" / "width_regime" / f"{run.stem}.log"
        assert log.read_text().count(" dump ") == 7
    with xr.open_dataset(
        results / "demo" / "metrics" / "width_regime.nc", engine="h5netcdf"
    ) as ds:
        assert dict(ds.sizes) == {
            "width": 2,
            "regime": 2,
            "seed": 1,
            "step": 7,
            "task": 2,
        }
        assert ds["velocity"].attrs["units"] == "1/iteration"
    for ext in ("pdf", "png"):
        assert (results / "demo" / "figures" / f"width_regime.{ext}").stat().st_size
    claims = (results / "demo" / "claims" / "width_regime.csv").read_text()
    assert "C1" in claims
    assert (results / "demo" / "benchmarks" / "train" / "width_regime").is_dir()
    assert not any((results / "demo" / "work").rglob("*.h5"))

    # a second run has nothing to do, also with another checkpoint interval
    again = snakemake(tmp_path, "--cores", "2", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    interval = "checkpoint_seconds=5"
    again = snakemake(tmp_path, "--cores", "2", "-n", "--config", interval)
    assert "Nothing to be done" in again.stdout + again.stderr

    # an experiment without a summary figure says so
    target = "results/demo/figures/width_regime-summary.png"
    result = snakemake(tmp_path, "--cores", "1", "-n", target, timeout=120)
    assert result.returncode != 0
    assert "'width_regime' has no summary figure" in result.stdout + result.stderr


def test_bad_config_fails_fast_with_a_clear_message(tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(TINY))
    bad["demo"]["model"]["widht"] = 3
    bad["experiments"]["width_regime"]["grid"]["regime"] = ["fl", "greedy"]
    write_config(tmp_path, bad)
    result = snakemake(tmp_path, "--cores", "1", "-n", timeout=120)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "config.demo.model: Additional properties are not allowed" in message
    assert "'widht' was unexpected" in message
    assert "allowed keys here: activation, arch, bias, depth, width" in message
    assert not (tmp_path / "results").exists()


def test_an_unknown_experiment_target_names_the_experiments(tmp_path):
    write_config(tmp_path, TINY)
    target = "results/demo/figures/width_regmie.png"
    result = snakemake(tmp_path, "--cores", "1", "-n", target, timeout=120)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "No experiment 'width_regmie' in the config" in message
    assert "Did you mean 'width_regime'?" in message
    assert "KeyError" not in message


def test_prepared_data_is_shared_and_written_once(tmp_path):
    write_config(tmp_path, TINY)
    result = snakemake(tmp_path, "--cores", "1", "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepare_data" in result.stdout and "train" in result.stdout
    counts = {
        line.split()[0]: line.split()[1]
        for line in result.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    assert counts.get("prepare_data") == "1"
    assert counts.get("train") == "4"


def test_ntkcl_train_leaves_a_finished_archive_alone(tmp_path, monkeypatch, capsys):
    from ntkcl import cli

    write_config(tmp_path, TINY)
    monkeypatch.chdir(tmp_path)
    args = ["train", "config.yaml", "width_regime", "w8-fl-s0", "--scale", "demo"]
    out = tmp_path / "mine.h5"
    assert cli.main([*args, "--out", str(out)]) == 0
    assert f"complete: {out}" in capsys.readouterr().out
    written = out.stat().st_mtime_ns
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "exists (complete); nothing to do" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written

    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    assert "is a folder; give the archive's file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--threads", "0"])
    assert "0 is not a positive number" in capsys.readouterr().err

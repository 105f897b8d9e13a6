"""The ntkcl workflow on a real SLURM cluster, with the project's SLURM profile.

What the README's "Running on SLURM" section tells users to do, on tiny configs:

1. ``snakemake -s REPO/Snakefile -d WORKDIR --executor slurm --workflow-profile
   REPO/workflow/profiles/slurm`` runs the whole chain (train, reduce and
   aggregate as SLURM jobs, data preparation, plots and claims locally) and writes
   every output.
2. A ``train`` job cancelled with ``scancel`` after its first checkpoint fails the
   run (``--retries 0`` here, so that the failure shows), and rerunning the same
   command continues the run from its checkpoint: the log says ``resuming ... at
   iteration N`` with N > 0, and the finished archive holds every dump once, in
   order.
3. The train rule asks for a GPU only for ``device: cuda`` runs, and for the time and
   memory estimated in workflow/rules/resources.smk (a dry run, no cluster; also
   part of the plain test suite).

1 and 2 are opt-in: ``pytest -m slurm tests/slurm`` (see conftest.py). Every
Snakemake call runs under a timeout that kills (subprocess's SIGKILL; Snakemake
ignores SIGTERM while it waits for jobs). About 9 minutes on 2 cores (1: 2.5 min,
2: 6.5 min, 3: 0.5 min), most of it Snakemake's start-up inside each SLURM job
(about 30 s), its status polling (the interval grows by 10 s per check while no job
ends), and the 60 s before the train rule's first checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

# The tiny config of tests/test_workflow.py, 2 runs of 25 iterations (each SLURM job
# costs about 30 s on 2 cores: Snakemake starts under sbatch, again under srun).
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
            "description": "Tiny widths.",
            "grid": {"model.width": [8, 16]},
            "seeds": [0],
            "figure": {"line": "width"},
        }
    },
}

# One run that trains for 30 s to 2 minutes on one core of a 2-core CI machine,
# long enough to pass its first checkpoint (every 2 s here) and be cancelled well
# before its end. 802 dumps.
LONG_ITERATIONS = [4000, 4000]
LONG = {
    "scale": "demo",
    # checkpoint every 2 s: the first one comes well before the run ends
    "checkpoint_seconds": 2,
    "demo": {
        "device": "cpu",
        "data": {"name": "digits"},
        "tasks": {"iterations": LONG_ITERATIONS},
        "probe": {"size": 20},
        "model": {"depth": 2},
        "optim": {"lr": 0.05, "batch_size": 64},
        "ntk": {"every": 10},
        "eval": {"max_examples": 50},
    },
    "experiments": {
        "long": {
            "description": "One run long enough to cancel.",
            "grid": {"model.width": [1024]},
            "seeds": [0],
            "figure": {"line": "width"},
        }
    },
}
LONG_RUN = "w1024-s0"


def _command(workdir: Path, *extra: str) -> list[str]:
    """The README's command, plus a fast first status check for the test."""
    return [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--executor",
        "slurm",
        "--workflow-profile",
        str(PROFILE),
        "-j",
        "4",
        # The profile keeps the plugin's 40 s before the first status query.
        "--slurm-init-seconds-before-status-checks",
        "2",
        *extra,
    ]


def _env(cluster) -> dict[str, str]:
    env = cluster.environ()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _write_config(workdir: Path, cfg: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


def _snakemake(cluster, workdir: Path, *extra: str, timeout: int):
    # subprocess's timeout kills with SIGKILL; SLURM jobs left behind are cancelled
    # when the fixture stops the cluster.
    return subprocess.run(
        _command(workdir, *extra),
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _resources():
    """The train rule's resource functions (workflow/rules/resources.smk)."""
    namespace: dict = {}
    exec((REPO / "workflow" / "rules" / "resources.smk").read_text(), namespace)
    return namespace


def _runs(workdir: Path) -> list[dict]:
    """The resolved runs of the config in ``workdir`` (demo scale)."""
    from ntkcl import config as ntkcl_config

    cfg = ntkcl_config.load_config(workdir / "config.yaml")
    return [
        run for runs in ntkcl_config.expand_runs(cfg, "demo").values() for run in runs
    ]


def _train_job(env) -> tuple[str, dict[str, str]]:
    """The id and `scontrol show job` fields of the one running train job."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    jobs = [line.split()[0] for line in out.splitlines() if "rule_train" in line]
    assert len(jobs) == 1, f"expected one running train job, squeue says:\n{out}"
    show = subprocess.run(
        ["scontrol", "show", "job", jobs[0]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    fields = dict(re.findall(r"(\w[\w:/]*)=(\S*)", show))
    return jobs[0], fields


def _megabytes(slurm_memory: str) -> int:
    """scontrol's memory (``1313M``, ``2G``) in MB."""
    number, unit = float(slurm_memory[:-1]), slurm_memory[-1]
    return int(number * {"M": 1, "G": 1024, "T": 1024**2}[unit])


def test_workflow_runs_on_slurm_and_writes_every_output(slurm_cluster, tmp_path):
    _write_config(tmp_path, TINY)
    result = _snakemake(slurm_cluster, tmp_path, timeout=900)
    message = result.stdout + result.stderr
    assert result.returncode == 0, message[-4000:]
    # A misspelt --workflow-profile path is ignored without a word: check it loaded.
    assert f"Using workflow specific profile {PROFILE}" in message

    results = tmp_path / "results"
    assert (results / "data" / "digits.h5").is_file()
    runs = sorted((results / "demo" / "runs" / "width_regime").glob("*.h5"))
    expected = ["w16-s0", "w8-s0"]
    assert [r.stem for r in runs] == expected
    for run in runs:
        with xr.open_dataset(run, engine="h5netcdf") as ds:
            assert ds.attrs["status"] == "complete"
            assert list(ds["step"].values) == [0, 5, 10, 15, 16, 20, 25]
        log = results / "demo" / "logs" / "train" / "width_regime" / f"{run.stem}.log"
        assert log.read_text().count(" dump ") == 7
        metrics = results / "demo" / "metrics" / "width_regime" / f"{run.stem}.nc"
        assert metrics.stat().st_size
        bench = results / "demo" / "benchmarks" / "train" / "width_regime"
        assert (bench / f"{run.stem}.tsv").is_file()
    with xr.open_dataset(
        results / "demo" / "metrics" / "width_regime.nc", engine="h5netcdf"
    ) as ds:
        assert dict(ds.sizes) == {
            "width": 2,
            "seed": 1,
            "step": 7,
            "task": 2,
        }
    for ext in ("pdf", "png"):
        assert (results / "demo" / "figures" / f"width_regime.{ext}").stat().st_size
    assert "C1" in (results / "demo" / "claims" / "width_regime.csv").read_text()
    assert (results / "demo" / "claims.csv").stat().st_size
    assert not any((results / "demo" / "work").rglob("*.h5"))

    # train, reduce and aggregate ran as SLURM jobs (their SLURM logs are kept by
    # the profile); data preparation, plots and claims ran locally, never queued.
    slurm_logs = tmp_path / ".snakemake" / "slurm_logs"
    assert len(list((slurm_logs / "rule_train").rglob("*.log"))) == 2
    assert len(list((slurm_logs / "rule_reduce").rglob("*.log"))) == 2
    assert len(list((slurm_logs / "rule_aggregate").rglob("*.log"))) == 1
    for local in ("prepare_data", "plot", "claims", "claims_table"):
        assert not (slurm_logs / f"rule_{local}").exists(), local

    again = _snakemake(slurm_cluster, tmp_path, "-n", timeout=120)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_cancelled_train_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    from ntkcl.train import dump_schedule

    _write_config(tmp_path, LONG)
    env = _env(slurm_cluster)
    work = tmp_path / "results" / "demo" / "work" / "long" / LONG_RUN
    archive = tmp_path / "results" / "demo" / "runs" / "long" / f"{LONG_RUN}.h5"
    log = tmp_path / "results" / "demo" / "logs" / "train" / "long" / f"{LONG_RUN}.log"
    first_log = tmp_path / "first.out"

    # 1. Submit with --retries 0 (the profile's retries would resubmit the
    #    cancelled job in the same run), wait for the first checkpoint, scancel.
    with (
        first_log.open("w") as out,
        subprocess.Popen(
            _command(tmp_path, "--retries", "0"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 400
            while not (work / "checkpoint.pt").exists():
                assert not archive.exists(), (
                    "the run finished before its first checkpoint: lengthen LONG"
                )
                assert proc.poll() is None, first_log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint within 400 s"
                time.sleep(0.5)
            job_id, job = _train_job(env)
            # The rule's portable resources reached sbatch: the estimate's minutes
            # and memory (attempt 1), no GPU for a `device: cpu` run.
            (run,) = _runs(tmp_path)
            want = _resources()["train_estimate"](run)
            hours, minutes = divmod(want["runtime"], 60)
            assert job["TimeLimit"] == f"{hours:02d}:{minutes:02d}:00", job
            assert _megabytes(job["MinMemoryNode"]) == want["mem_mb"], job
            assert "gpu" not in job.get("TresPerJob", ""), job
            subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first = first_log.read_text()
    assert proc.returncode != 0, first[-4000:]
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in first
    assert not archive.exists()
    # the work folder outlives the failed job: that is what the rerun resumes
    assert (work / "checkpoint.pt").is_file() and (work / "archive.h5").is_file()

    # 2. Rerun the same command (the profile's retries are back in force).
    result = _snakemake(slurm_cluster, tmp_path, timeout=600)
    message = result.stdout + result.stderr
    assert result.returncode == 0, message[-4000:]

    resumed = re.findall(rf"resuming {LONG_RUN} at iteration (\d+)", log.read_text())
    assert len(resumed) == 1, log.read_text()[-3000:]
    assert 0 < int(resumed[0]) < sum(LONG_ITERATIONS)
    with xr.open_dataset(archive, engine="h5netcdf") as ds:
        assert ds.attrs["status"] == "complete"
        steps = [int(s) for s in ds["step"].values]
    assert steps == dump_schedule(LONG_ITERATIONS, 10)  # each dump once, in order
    assert not work.exists() or not any(work.glob("*.h5"))
    for ext in ("pdf", "png"):
        path = tmp_path / "results" / "demo" / "figures" / f"long.{ext}"
        assert path.stat().st_size


@pytest.mark.parametrize(
    ("device", "gpu", "cpus_per_gpu"), [("cuda", 1, 4), ("auto", 0, 0), ("cpu", 0, 0)]
)
def test_train_asks_for_a_gpu_only_for_device_cuda(tmp_path, device, gpu, cpus_per_gpu):
    """The rule's resources, as Snakemake resolves them (a dry run; no cluster)."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["demo"]["device"] = device
    cfg["experiments"]["width_regime"]["grid"]["model.width"] = [8]
    _write_config(tmp_path, cfg)
    result = subprocess.run(
        [
            str(SNAKEMAKE),
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "-n",
            "--cores",
            "1",
            "results/demo/runs/width_regime/w8-s0.h5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = result.stdout + result.stderr
    assert result.returncode == 0, message[-3000:]
    train = message[message.index("rule train:") :]
    resources = dict(
        re.findall(
            r"(\w+)=([^,\s]+)", train[train.index("resources:") :].split("\n")[0]
        )
    )
    (run,) = _runs(tmp_path)
    want = _resources()["train_estimate"](run)
    assert int(resources["runtime"]) == want["runtime"]
    assert int(resources["mem_mb"]) == want["mem_mb"]
    assert int(resources["gpu"]) == gpu
    assert int(resources["cpus_per_gpu"]) == cpus_per_gpu

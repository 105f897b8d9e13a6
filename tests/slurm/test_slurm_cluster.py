"""The test cluster and the SLURM profile work together (tiny Snakefiles, no ntkcl).

Opt-in: ``pytest -m slurm tests/slurm`` (see conftest.py). About a minute and a
half on 2 cores, most of it Snakemake's status polling.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

PROFILE = Path(__file__).resolve().parents[2] / "workflow" / "profiles" / "slurm"

GPU_SNAKEFILE = """\
localrules: all, summarize


rule all:
    input:
        "done.txt",


rule gpu_job:
    output:
        "gpu.txt",
    log:
        "logs/gpu.log",
    resources:
        gpu=1,
        runtime=5,
        mem_mb=200,
    shell:
        "(echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; "
        "echo SLURM_JOB_ID=$SLURM_JOB_ID) > {output} 2> {log}"


rule summarize:
    input:
        "gpu.txt",
    output:
        "done.txt",
    shell:
        "cat {input} > {output}"
"""

# Attempt 1 waits until it is cancelled; attempt 2 finishes at once.
CANCEL_SNAKEFILE = """\
rule train:
    output:
        "train.txt",
    resources:
        gpu=1,
        mem_mb=200,
        runtime=5,
        hang=lambda wc, attempt: int(attempt == 1),
    shell:
        "echo $SLURM_JOB_ID > started.{resources.hang}; "
        "if [ {resources.hang} = 1 ]; then sleep 600; fi; "
        "echo attempt-with-hang-{resources.hang} > {output}"
"""


def _snakemake_cmd(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--executor",
        "slurm",
        "--workflow-profile",
        str(PROFILE),
        "-j",
        "2",
        # Fast first status check; the profile keeps the plugin's 40 s.
        "--slurm-init-seconds-before-status-checks",
        "2",
        *extra,
    ]


def _env(cluster) -> dict[str, str]:
    env = cluster.environ()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def test_gpu_rule_runs_on_slurm_and_local_rule_locally(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(GPU_SNAKEFILE)
    # subprocess's timeout kills with SIGKILL: Snakemake ignores SIGTERM while it
    # waits for a job whose status it cannot read.
    res = subprocess.run(
        _snakemake_cmd(),
        cwd=tmp_path,
        env=_env(slurm_cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # A misspelt --workflow-profile path is ignored without a word: check it loaded.
    assert f"Using workflow specific profile {PROFILE}" in res.stderr
    gpu = (tmp_path / "gpu.txt").read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in gpu
    assert "SLURM_JOB_ID=" in gpu and "SLURM_JOB_ID=\n" not in gpu
    assert (tmp_path / "done.txt").read_text() == gpu
    # slurm-keep-successful-logs: the SLURM log of the successful job is kept.
    assert list((tmp_path / ".snakemake" / "slurm_logs" / "rule_gpu_job").glob("*.log"))


def test_scancel_is_reported_and_the_retry_completes(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(CANCEL_SNAKEFILE)
    env = _env(slurm_cluster)
    started = tmp_path / "started.1"
    with subprocess.Popen(
        _snakemake_cmd(),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + 180
            while not started.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "attempt 1 never started"
                time.sleep(0.5)
            job_id = started.read_text().strip()
            subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert f"Using workflow specific profile {PROFILE}" in out
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in out
    assert "Trying to restart job" in out
    assert (tmp_path / "train.txt").read_text() == "attempt-with-hang-0\n"

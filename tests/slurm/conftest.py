"""Fixtures for tests against a real one-node SLURM cluster (see README.md here).

The tests marked ``slurm`` are opt-in: they install packages with apt-get and start
daemons, so they run only when selected (``pytest -m slurm``) or when
``NTKCL_SLURM_TESTS=1``; otherwise they are skipped with that reason. Where SLURM
cannot run (no Linux, no root, no apt-get), they are skipped with the reason why.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest


def _load_cluster_module():
    """Import cluster.py by path (tests/ is not a package)."""
    name = "ntkcl_tests_slurm_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("cluster.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cluster_module = _load_cluster_module()


def _slurm_selected(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    explicitly = "slurm" in markexpr and "not slurm" not in markexpr
    return explicitly or os.environ.get("NTKCL_SLURM_TESTS") == "1"


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest):
    """A running cluster (a ``Cluster``); stopped at the end if this session
    started it, left running if it was already up (someone else's)."""
    if not _slurm_selected(request.config):
        pytest.skip(
            "SLURM tests are opt-in (they install packages and start daemons): "
            "run `pytest -m slurm` or set NTKCL_SLURM_TESTS=1."
        )
    pytest.importorskip(
        "snakemake_executor_plugin_slurm",
        reason="snakemake-executor-plugin-slurm is not installed "
        '(pip install "ntkcl[slurm]").',
    )
    try:
        # NTKCL_SLURM_ACCOUNTING=0: no slurmdbd/MariaDB (faster; squeue status).
        accounting = os.environ.get("NTKCL_SLURM_ACCOUNTING", "1") != "0"
        cluster = cluster_module.start_cluster(accounting=accounting)
    except cluster_module.ClusterUnavailable as err:
        pytest.skip(f"SLURM unavailable on this machine: {err}")
    yield cluster
    if cluster.started:
        cluster_module.stop_cluster()

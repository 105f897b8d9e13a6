"""The conda environments in envs/ parse and pin what pyproject.toml pins.

Conda cannot be reached from CI, so this is the check that `--sdm conda` would
build the same software as `pip install .`.
"""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def _pins(requirements):
    pins = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        assert version, f"{requirement!r} is not pinned with =="
        pins[name.strip().lower()] = version.strip()
    return pins


def _project_pins():
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return _pins(project["dependencies"])


def test_there_is_an_environment():
    assert ENV_FILES


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_environment_matches_pyproject(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(re.fullmatch(r"python\s*=\s*3\.11", d) for d in conda_deps)
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_lists) == 1
    assert _pins(pip_lists[0]) == _project_pins()


def test_every_rule_declares_an_existing_environment():
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        envs = re.findall(r'conda:\s*\n\s*"([^"]+)"', text)
        assert len(envs) == len(rules), f"{smk.name}: a rule has no conda: env"
        for env in envs:
            assert (smk.parent / env).resolve().is_file(), f"{smk.name}: {env}"

"""Shared test setup: deterministic seeds, one thread, the repository root."""

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture
def repo() -> Path:
    return REPO

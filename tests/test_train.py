"""The training loop: dump schedule, archived kernels, reproducibility, divergence."""

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from ntkcl import config, data, train
from ntkcl.config import deep_merge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    data.prepare({"name": "digits", "test_fraction": 0.2}, path)
    return path


def tiny_run(**overrides):
    run = deep_merge(
        config.run_defaults(),
        {
            "device": "cpu",
            "data": {"name": "digits"},
            "tasks": {"classes": [[0, 1, 2], [3, 4]], "iterations": [12, 7]},
            "probe": {"size": 6},
            "model": {"width": 8, "depth": 2},
            "optim": {"lr": 0.1, "batch_size": 16},
            "ntk": {"every": 5, "kind": "full", "dtype": "float64"},
            "eval": {"max_examples": 40},
        },
    )
    run = deep_merge(run, overrides)
    run.update(
        run_id="w8-fl-s0",
        experiment="t",
        scale="demo",
        seed=0,
        params={"width": 8, "regime": "fl", "seed": 0},
    )
    return run


def test_dump_schedule_brackets_every_switch():
    assert train.dump_schedule([12, 7], 5) == [0, 5, 10, 12, 13, 15, 19]
    assert train.dump_schedule([10, 10], 10) == [0, 10, 11, 20]


def per_example_ntk(model, x):
    """Reference: the full NTK from per-example, per-logit autograd gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1])[0]
        for k in range(out.shape[0]):
            grads = torch.autograd.grad(out[k], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows).reshape(len(x), -1, rows[0].numel())  # (n, K, P)
    return torch.einsum("iap,jbp->ijab", jac, jac)


def test_archived_kernels_equal_per_example_autograd(tmp_path, digits, monkeypatch):
    seen = []
    real = train.empirical_ntk

    def spy(model, x, **kwargs):
        seen.append((copy.deepcopy(model).double().eval(), x.double()))
        return real(model, x, **kwargs)

    monkeypatch.setattr(train, "empirical_ntk", spy)
    out = tmp_path / "run.h5"
    status = train.train_run(tiny_run(), digits, out, tmp_path / "work")
    assert status == "complete"
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert list(ds["step"].values) == [0, 5, 10, 12, 13, 15, 19]
        assert list(ds["active_task"].values) == [0, 0, 0, 0, 1, 1, 1]
        assert list(ds["task_start"].values) == [0, 12]
        assert ds["ntk"].shape == (7, 6, 6, 10, 10)
        assert set(ds["probe_label"].values) == {0, 1, 2}
        assert len(seen) == 7
        for i, (model, x) in enumerate(seen):
            reference = per_example_ntk(model, x).detach().numpy()
            np.testing.assert_allclose(
                ds["ntk"][i].values, reference, rtol=1e-10, atol=1e-12
            )
        # the kernel moved, so the test is not comparing initial kernels only
        assert not np.allclose(ds["ntk"][0].values, ds["ntk"][-1].values)
        assert json.loads(ds.attrs["config_json"])["run_id"] == "w8-fl-s0"
        assert ds.attrs["status"] == "complete"
        assert ds.attrs["dataset"] == "digits"
    assert not (tmp_path / "work" / "archive.h5").exists()


def test_same_config_and_seed_give_the_same_archive(tmp_path, digits):
    values = []
    for attempt in range(2):
        out = tmp_path / f"{attempt}.h5"
        train.train_run(
            tiny_run(ntk={"kind": "trace"}), digits, out, tmp_path / f"work{attempt}"
        )
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            values.append({v: ds[v].values for v in ("ntk", "logits", "accuracy")})
    for name in values[0]:
        np.testing.assert_array_equal(values[0][name], values[1][name])


def test_a_diverging_run_is_archived_as_diverged(tmp_path, digits):
    out = tmp_path / "run.h5"
    run = tiny_run(optim={"lr": 1e30}, ntk={"kind": "trace"})
    status = train.train_run(run, digits, out, tmp_path / "work")
    assert status == "diverged"
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["status"] == "diverged"
        assert ds.attrs["diverged_iteration"] > 0
        assert "loss became" in ds.attrs["status_reason"]
        assert ds["step"].values[-1] < ds.attrs["diverged_iteration"]


def test_a_second_writer_of_one_run_is_refused(tmp_path, digits):
    run, work = tiny_run(), tmp_path / "work"
    work.mkdir()
    with train._work_dir_lock(work, run["run_id"]):
        with pytest.raises(train.RunLockedError) as info:
            train.train_run(run, digits, tmp_path / "a.h5", work)
        assert f"pid {os.getpid()}" in str(info.value)
    assert not (tmp_path / "a.h5").exists()
    # once the first writer is gone, the run trains, and leaves no lock behind
    assert train.train_run(run, digits, tmp_path / "a.h5", work) == "complete"
    assert not (work / "lock").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error():
    # a ValueError: the workflow's rule reports it in one line, without a traceback
    with pytest.raises(ValueError, match="sees no GPU; set device: auto or cpu"):
        train.pick_device("cuda")


def test_a_checkpoint_of_another_configuration_is_a_user_error(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    train._save_checkpoint(path, {"config_json": '{"a": 1}'})
    with pytest.raises(ValueError, match="different configuration.*delete"):
        train._load_checkpoint(path, "cpu", '{"a": 2}', "w64-s0")
    assert train._load_checkpoint(path, "cpu", '{"a": 1}', "w64-s0") is not None


def test_the_archive_records_the_prepared_files_id_not_its_name(tmp_path, digits):
    custom = tmp_path / "custom.h5"
    shutil.copy(digits, custom)
    out = tmp_path / "run.h5"
    assert train.train_run(tiny_run(), custom, out, tmp_path / "work") == "complete"
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["dataset"] == "digits"

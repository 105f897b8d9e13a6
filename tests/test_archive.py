"""The kernel archive: netCDF-clean layout, SWMR appends, truncation, clear errors."""

import h5py
import numpy as np
import pytest
import xarray as xr

from ntkcl import archive
from ntkcl.archive import ArchiveError

N, K = 4, 3


def _make(path, kind="trace", dumps=3):
    archive.create(
        path,
        kind=kind,
        dtype="float64",
        probe_indices=np.array([7, 3, 9, 1]),
        probe_labels=np.array([0, 0, 1, 1]),
        num_classes=K,
        task_start=[0, 20],
        attrs={"run_id": "w8-fl-s0", "experiment": "x", "config_json": "{}"},
    )
    writer = archive.Writer(path)
    shape = {"trace": (N, N), "diagonal": (N, N, K), "full": (N, N, K, K)}[kind]
    for i in range(dumps):
        writer.append(
            iteration=10 * i,
            active_task=int(i >= 2),
            wall_time=0.5 * i,
            train_loss=1.0 / (i + 1),
            accuracy=np.array([0.5 + 0.1 * i, 0.1]),
            logits=np.full((N, K), i, dtype=np.float32),
            ntk=np.full(shape, float(i)),
        )
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["trace", "diagonal", "full"])
def test_xarray_opens_with_named_dimensions(tmp_path, kind):
    path = _make(tmp_path / "a.h5", kind)
    archive.finish(path)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert ds["ntk"].dims[:3] == ("step", "sample_1", "sample_2")
        assert ds["ntk"].shape[0] == 3
        assert list(ds["step"].values) == [0, 10, 20]
        assert list(ds["sample_1"].values) == [7, 3, 9, 1]
        assert list(ds["active_task"].values) == [0, 0, 1]
        assert ds["accuracy"].dims == ("step", "task")
        assert ds.attrs["status"] == "complete"
        assert ds["ntk"].attrs["kind"] == kind
        assert float(ds["ntk"][2].max()) == 2.0
        for name in ds.variables:
            assert "long_name" in ds[name].attrs, name


def test_reader_sees_dumps_while_the_writer_appends(tmp_path):
    path = tmp_path / "live.h5"
    _make(path, dumps=0)
    writer = archive.Writer(path)
    for i in range(3):
        writer.append(
            iteration=i,
            active_task=0,
            wall_time=0.0,
            train_loss=0.0,
            accuracy=np.zeros(2),
            logits=np.zeros((N, K), np.float32),
            ntk=np.eye(N),
        )
        with h5py.File(path, "r", libver="latest", swmr=True) as reader:
            assert reader["ntk"].shape[0] == i + 1
            assert reader["step"][i] == i
    writer.close()


def test_writer_drops_dumps_after_the_checkpoint(tmp_path):
    path = _make(tmp_path / "a.h5", dumps=3)
    writer = archive.Writer(path, keep=2)
    assert writer.count == 2
    writer.close()
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert list(ds["step"].values) == [0, 10]
        assert ds["accuracy"].shape == (2, 2)
    with pytest.raises(ArchiveError, match="expects 5"):
        archive.Writer(path, keep=5)


def test_open_archive_errors_name_file_and_problem(tmp_path):
    with pytest.raises(ArchiveError, match="no such archive"):
        archive.open_archive(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ArchiveError, match="junk.h5: cannot be read"):
        archive.open_archive(junk)
    newer = _make(tmp_path / "newer.h5")
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = archive.FORMAT_VERSION + 1
    with pytest.raises(ArchiveError, match="newer than this ntkcl reads"):
        archive.open_archive(newer)
    plain = tmp_path / "plain.h5"
    xr.Dataset({"x": ("a", np.arange(3))}).to_netcdf(plain, engine="h5netcdf")
    with pytest.raises(ArchiveError, match="not an ntkcl kernel archive"):
        archive.open_archive(plain)


def test_publish_is_a_rename(tmp_path):
    work = _make(tmp_path / "w.h5")
    out = tmp_path / "runs" / "x" / "a.h5"
    archive.publish(work, out)
    assert out.is_file() and not work.exists()

"""The kernel archive: netCDF-clean layout, SWMR appends, truncation, clear errors."""

import os
import signal

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
    with pytest.raises(ArchiveError, match="junk.h5: not an HDF5 file"):
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


def test_kernel_says_how_it_was_computed_and_steps_carry_coordinates(tmp_path):
    path = _make(tmp_path / "a.h5", "diagonal")
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert {"active_task", "wall_time"} <= set(ds["ntk"].coords)
        attrs = ds["ntk"].attrs
        assert attrs["kind"] == "diagonal"
        assert "ntk[s, i, j, a]" in attrs["definition"]
        assert "empirical_ntk" in attrs["computed_with"]
        assert attrs["units"] == "1" and attrs["long_name"]
        assert list(ds.attrs["task_start"]) == [0, 20]
        assert ds["ntk"].encoding["shuffle"] and ds["ntk"].encoding["fletcher32"]
        assert ds["ntk"].encoding["chunksizes"] == (1, N, N, K)


def _kill_writer_midway(path, whole_dumps):
    """A child process writes whole dumps, half a dump, and dies by SIGKILL."""
    pid = os.fork()
    if pid == 0:
        try:
            writer = archive.Writer(_make(path, dumps=0))
            for i in range(whole_dumps):
                writer.append(**_dump(i))
            for name in archive.STEP_VARIABLES[:3]:  # half a dump, on disk
                writer._file[name].resize(whole_dumps + 1, axis=0)
            writer._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _dump(i):
    return dict(
        iteration=10 * i,
        active_task=0,
        wall_time=float(i),
        train_loss=0.5,
        accuracy=np.full(2, 0.5),
        logits=np.zeros((N, K), np.float32),
        ntk=np.eye(N) * (i + 1),
    )


def test_a_killed_writer_leaves_whole_dumps_that_open_and_resume(tmp_path):
    path = tmp_path / "killed.h5"
    _kill_writer_midway(path, whole_dumps=3)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")  # what HDF5 alone says; open_archive reads it in SWMR
    with archive.open_archive(path) as ds:
        assert ds.attrs["status"] == "running"
        assert list(ds["step"].values) == [0, 10, 20]  # not padded to 4 dumps
        assert list(ds["active_task"].values) == [0, 0, 0]
    writer = archive.Writer(path, keep=2)  # a checkpoint after 2 dumps
    writer.append(**_dump(5))
    writer.close()
    archive.finish(path)
    with archive.open_archive(path) as ds:
        assert list(ds["step"].values) == [0, 10, 50]
        assert float(ds["ntk"][2, 0, 0]) == 6.0
        assert "truncated to 2 of 3 dump(s)" in ds.attrs["history"]
        assert ds.attrs["run_id"] == "w8-fl-s0" and ds["ntk"].attrs["kind"] == "trace"


def test_open_archive_names_each_kind_of_broken_file(tmp_path):
    good = _make(tmp_path / "good.h5")
    archive.finish(good)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="truncated.h5: truncated"):
        archive.open_archive(truncated)
    missing = _make(tmp_path / "missing.h5")
    with h5py.File(missing, "r+") as f:
        del f["accuracy"]
    with pytest.raises(ArchiveError, match=r"missing.h5: missing variable\(s\) \['acc"):
        archive.open_archive(missing)
    extra = _make(tmp_path / "extra.h5")
    with h5py.File(extra, "r+") as f:
        f["notes"] = np.arange(3)
    with pytest.raises(ArchiveError, match=r"unexpected variable\(s\) \['notes'\]"):
        archive.open_archive(extra)

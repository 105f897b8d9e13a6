"""Resume after SIGKILL: a killed run, rerun, gives the uninterrupted run's archive.

Each test trains a tiny run in a child process (forked, so torch is not imported
again) that kills itself with SIGKILL at one point: in the middle of writing a
dump, in the middle of writing a checkpoint, between dumps, before the first
checkpoint, between finishing the archive and publishing it. The rerun (in this
process) must give an archive identical in every dump to an uninterrupted run.
"""

import logging
import os
import signal
import traceback

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from test_train import tiny_run

from ntkcl import archive, data, train

RUN = tiny_run(ntk={"kind": "full"})
COMPARED = ("step", "active_task", "ntk", "logits", "accuracy", "train_loss")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    data.prepare({"name": "digits", "test_fraction": 0.2}, path)
    return path


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """Every compared variable of the uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "run.h5"
    train.train_run(RUN, digits, out, folder / "work", checkpoint_interval=0)
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        return {name: ds[name].values for name in COMPARED}


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_writing_dump(n):
    """After dump n's first variables are written and ntk resized, flushed."""
    resize = h5py.Dataset.resize

    def patched(self, size, axis=None):
        resize(self, size, axis)
        if self.name == "/ntk" and size == n + 1:
            self.file.flush()  # the half-written dump reaches the file
            _die()

    h5py.Dataset.resize = patched


def _kill_at_replace(suffix, n=1):
    """At the n-th os.replace of a file named ``*suffix``: written, not renamed."""
    replace, calls = os.replace, []

    def patched(src, dst):
        if str(src).endswith(suffix):
            calls.append(src)
            if len(calls) == n:
                _die()
        replace(src, dst)

    os.replace = patched


def _kill_in_ntk(n):
    """At the n-th kernel computation, i.e. between dump n - 1 and dump n."""
    ntk, calls = train.empirical_ntk, []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            _die()
        return ntk(*args, **kwargs)

    train.empirical_ntk = patched


def train_and_get_killed(digits, out, work, kill):
    """Train in a forked child that ``kill`` arranges to SIGKILL; wait for it."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            kill()
            train.train_run(RUN, digits, out, work, checkpoint_interval=0)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"the child was not killed: {status}"
    assert os.WTERMSIG(status) == signal.SIGKILL


def resume_and_compare(digits, out, work, reference):
    assert not out.exists()
    assert train.train_run(RUN, digits, out, work, checkpoint_interval=0) == "complete"
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["status"] == "complete"
        for name in COMPARED:
            np.testing.assert_array_equal(ds[name].values, reference[name], name)
        history = ds.attrs["history"]
    assert list(work.iterdir()) == []  # no archive, checkpoint or temporary left
    return history


@pytest.mark.parametrize(
    "kill, dumps_on_disk, dumps_kept",
    [
        (lambda: _kill_in_writing_dump(4), 4, 4),  # 4 whole dumps, half of the 5th
        (lambda: _kill_at_replace("checkpoint.tmp", 3), 4, 3),  # old checkpoint
        (lambda: _kill_in_ntk(5), 4, 4),  # between dumps: after iteration 12's
        (lambda: _kill_in_ntk(2), 1, None),  # no checkpoint yet: start afresh
    ],
    ids=["in-dump", "in-checkpoint", "between-dumps", "before-checkpoint"],
)
def test_a_killed_run_resumes_to_the_uninterrupted_archive(
    tmp_path, digits, reference, kill, dumps_on_disk, dumps_kept
):
    out, work = tmp_path / "run.h5", tmp_path / "work"
    train_and_get_killed(digits, out, work, kill)

    # what the kill left is readable, whole dumps only (inspect uses this)
    with archive.open_archive(work / "archive.h5") as ds:
        assert ds.attrs["status"] == "running"
        np.testing.assert_array_equal(
            ds["step"].values, reference["step"][:dumps_on_disk]
        )
    history = resume_and_compare(digits, out, work, reference)
    if dumps_kept is None:
        assert "truncated" not in history
    else:
        assert f"truncated to {dumps_kept} of {dumps_on_disk} dump(s)" in history


def test_killed_twice_and_killed_after_finishing(tmp_path, digits, reference):
    out, work = tmp_path / "run.h5", tmp_path / "work"
    train_and_get_killed(digits, out, work, lambda: _kill_in_writing_dump(5))
    # the rerun is killed while it copies the kept dumps into a fresh archive
    train_and_get_killed(digits, out, work, lambda: _kill_at_replace("archive.h5.tmp"))
    history = resume_and_compare(digits, out, work, reference)
    assert "truncated to 5 of 5 dump(s) to resume" in history

    # killed after the archive was finished, before it was moved to its place
    out.unlink()
    train_and_get_killed(digits, out, work, lambda: _kill_at_replace("archive.h5"))
    assert (work / "archive.h5").exists() and not out.exists()
    resume_and_compare(digits, out, work, reference)


def test_a_checkpoint_ahead_of_its_archive_starts_afresh(tmp_path, digits, reference):
    out, work = tmp_path / "run.h5", tmp_path / "work"
    train_and_get_killed(digits, out, work, lambda: _kill_in_ntk(5))
    # as if the node failed and the archive's last dumps never reached the disk
    archive.truncate(work / "archive.h5", 2)
    assert "truncated" not in resume_and_compare(digits, out, work, reference)


def test_a_resume_with_another_thread_count_says_so(digits, tmp_path, caplog):
    out, work = tmp_path / "run.h5", tmp_path / "work"
    threads = torch.get_num_threads()

    def kill():
        torch.set_num_threads(threads + 1)
        _kill_in_ntk(4)

    train_and_get_killed(digits, out, work, kill)
    caplog.set_level(logging.WARNING, logger="ntkcl")
    assert train.train_run(RUN, digits, out, work, checkpoint_interval=0) == "complete"
    assert f"the killed attempt trained with {threads + 1} CPU thread(s)" in caplog.text
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["torch_threads"] == threads + 1  # the first attempt


def test_a_fresh_run_ignores_what_a_killed_attempt_left(digits, tmp_path, reference):
    out, work = tmp_path / "run.h5", tmp_path / "work"
    train_and_get_killed(digits, out, work, lambda: _kill_in_ntk(4))
    assert (work / "checkpoint.pt").exists()
    assert train.train_run(RUN, digits, out, work, fresh=True) == "complete"
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert "truncated" not in ds.attrs["history"]
        for name in COMPARED:
            np.testing.assert_array_equal(ds[name].values, reference[name], name)

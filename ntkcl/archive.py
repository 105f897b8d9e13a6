"""The HDF5 kernel archive: one file per run, netCDF-4 compatible.

A reader needs neither this package nor the run's config: the file opens with
``xarray.open_dataset(path, engine="h5netcdf")`` (named dimensions and
coordinates, lazily), with h5py, and with ``h5dump``.

Layout (format version 1):

* dimensions ``step`` (unlimited, one entry per dump), ``sample_1``,
  ``sample_2`` (the probe examples), ``logit_1``, ``logit_2`` (the classes),
  ``task``;
* coordinates ``step`` (the global training iteration of each dump),
  ``sample_1``/``sample_2`` (the probe examples' indices into the prepared train
  split), ``logit_1``/``logit_2`` (class ids), ``task``; along ``step`` also
  ``active_task`` (the task whose update produced the state) and ``wall_time``;
* ``ntk``: ``trace`` (step, sample_1, sample_2), ``diagonal`` (step, sample_1,
  sample_2, logit_1) or ``full`` (step, sample_1, sample_2, logit_1, logit_2);
* ``probe_label`` (sample_1), ``logits`` (step, sample_1, logit_1),
  ``accuracy`` (step, task), ``train_loss`` (step), ``task_start`` (task);
* root attributes: ``format_version``, ``run_id``, ``experiment``, ``params_json``,
  ``config_json``, ``kernel_kind``, ``seed``, ``status`` (``running``,
  ``complete`` or ``diverged``), ``diverged_iteration``, ``status_reason``,
  versions, device and a ``history``.

The writer creates every variable first and then appends in HDF5's
single-writer/multiple-reader (SWMR) mode, one dump per chunk, flushing after
each dump: a reader may open the file while training runs, and a killed writer
leaves a readable file whose whole dumps a resumed run keeps.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import xarray as xr

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("full", "diagonal", "trace")
_KERNEL_DIMS = {
    "trace": ("step", "sample_1", "sample_2"),
    "diagonal": ("step", "sample_1", "sample_2", "logit_1"),
    "full": ("step", "sample_1", "sample_2", "logit_1", "logit_2"),
}
_KERNEL_MEANING = {
    "trace": "summed over logits: sum_k <df_k(x1)/dtheta, df_k(x2)/dtheta>",
    "diagonal": "one block per logit: <df_k(x1)/dtheta, df_k(x2)/dtheta>",
    "full": "every pair of logits: <df_k(x1)/dtheta, df_l(x2)/dtheta>",
}
# Variables that grow by one entry per dump, in the order they are written.
STEP_VARIABLES = (
    "step",
    "active_task",
    "wall_time",
    "train_loss",
    "accuracy",
    "logits",
    "ntk",
)


class ArchiveError(ValueError):
    """An archive is missing, unreadable or not what this version expects."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def create(
    path: str | Path,
    *,
    kind: str,
    dtype: str,
    probe_indices: np.ndarray,
    probe_labels: np.ndarray,
    num_classes: int,
    task_start: list[int],
    attrs: dict,
) -> None:
    """Create an empty archive with every variable, ready for :class:`Writer`.

    Args:
        kind: ``full``, ``diagonal`` or ``trace``.
        dtype: ``float32`` or ``float64``, the kernel's storage precision.
        probe_indices: (n,) indices of the probe examples in the train split.
        probe_labels: (n,) their labels.
        num_classes: K, the number of logits.
        task_start: global iteration at which each task starts.
        attrs: root attributes (run id, config JSON, versions, ...).
    """
    if kind not in KINDS:
        raise ArchiveError(f"Unknown kernel kind {kind!r}; expected one of {KINDS}.")
    n, n_tasks = len(probe_indices), len(task_start)
    with h5netcdf.File(path, "w", libver="latest") as f:
        f.dimensions = {
            "step": None,
            "sample_1": n,
            "sample_2": n,
            "logit_1": num_classes,
            "logit_2": num_classes,
            "task": n_tasks,
        }

        def variable(name, dims, dtype_, long_name, units, data=None, **kw):
            v = f.create_variable(name, dims, dtype_, data=data, **kw)
            v.attrs.update(long_name=long_name, units=units)
            return v

        # coordinates
        variable("step", ("step",), "i8", "training iteration", "iteration")
        for dim in ("sample_1", "sample_2"):
            variable(
                dim,
                (dim,),
                "i8",
                "probe example (index in train split)",
                "1",
                data=np.asarray(probe_indices, dtype=np.int64),
            )
        for dim in ("logit_1", "logit_2"):
            variable(
                dim,
                (dim,),
                "i8",
                "logit (class id)",
                "1",
                data=np.arange(num_classes, dtype=np.int64),
            )
        variable(
            "task",
            ("task",),
            "i8",
            "task index",
            "1",
            data=np.arange(n_tasks, dtype=np.int64),
        )
        variable(
            "task_start",
            ("task",),
            "i8",
            "first iteration of the task",
            "iteration",
            data=np.asarray(task_start, dtype=np.int64),
        )
        variable(
            "probe_label",
            ("sample_1",),
            "i8",
            "probe example label",
            "1",
            data=np.asarray(probe_labels, dtype=np.int64),
        )

        # one entry per dump
        variable("active_task", ("step",), "i8", "task of the latest update", "1")
        variable("wall_time", ("step",), "f8", "wall time since the run started", "s")
        variable(
            "train_loss",
            ("step",),
            "f8",
            "cross-entropy of the last minibatch before the dump",
            "nats",
        )
        variable(
            "accuracy",
            ("step", "task"),
            "f8",
            "accuracy on the task's held-out examples",
            "1",
        )
        variable(
            "logits",
            ("step", "sample_1", "logit_1"),
            "f4",
            "network outputs on the probe set",
            "1",
            chunks=(1, n, num_classes),
        )
        dims = _KERNEL_DIMS[kind]
        chunks = (1, n, n) + (num_classes,) * (len(dims) - 3)
        ntk = variable(
            "ntk",
            dims,
            "f8" if dtype == "float64" else "f4",
            f"empirical NTK on the probe set ({kind})",
            "1",
            chunks=chunks,
            fletcher32=True,
        )
        ntk.attrs.update(
            kind=kind,
            definition=_KERNEL_MEANING[kind],
            computed_with="ntkcl.ntk.empirical_ntk, exact, w.r.t. all trainable "
            "parameters, network in eval mode",
        )

        f.attrs.update(
            format_version=FORMAT_VERSION,
            title="ntkcl kernel archive",
            kernel_kind=kind,
            status="running",
            status_reason="",
            diverged_iteration=-1,
            created_at=_now(),
            history=f"{_now()} created",
            **attrs,
        )


class Writer:
    """Appends dumps to an archive made by :func:`create`, in SWMR mode.

    Args:
        path: the archive.
        keep: keep this many dumps and drop the rest (a resumed run continues
            after its checkpoint's last dump); None keeps all.
    """

    def __init__(self, path: str | Path, keep: int | None = None):
        self.path = Path(path)
        self._file = h5py.File(self.path, "r+", libver="latest")
        self.count = self._file["step"].shape[0]
        if keep is not None and keep != self.count:
            if keep > self.count:
                self._file.close()
                raise ArchiveError(
                    f"{self.path} holds {self.count} dumps but the checkpoint "
                    f"expects {keep}; delete the run's work folder to start over."
                )
            log.info(
                "dropping %d dump(s) written after the checkpoint", self.count - keep
            )
            for name in STEP_VARIABLES:
                self._file[name].resize(keep, axis=0)
            self.count = keep
        self._file.swmr_mode = True

    def append(
        self, *, iteration, active_task, wall_time, train_loss, accuracy, logits, ntk
    ) -> None:
        """Write one dump and flush it to disk."""
        i = self.count
        values = dict(
            step=iteration,
            active_task=active_task,
            wall_time=wall_time,
            train_loss=train_loss,
            accuracy=accuracy,
            logits=logits,
            ntk=ntk,
        )
        for name in STEP_VARIABLES:
            dataset = self._file[name]
            dataset.resize(i + 1, axis=0)
            dataset[i] = values[name]
        self._file.flush()
        self.count = i + 1

    def close(self) -> None:
        self._file.close()


def finish(
    path: str | Path,
    status: str = "complete",
    reason: str = "",
    diverged_iteration: int = -1,
) -> None:
    """Mark a closed archive finished (``complete`` or ``diverged``)."""
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["status"] = status
        f.attrs["status_reason"] = reason
        f.attrs["diverged_iteration"] = diverged_iteration
        f.attrs["history"] = (
            f.attrs["history"] + f"\n{_now()} {status} {reason}".rstrip()
        )


def publish(work_path: str | Path, out_path: str | Path) -> None:
    """Move a finished archive to its final place in one atomic step."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work_path, out_path)


def open_archive(path: str | Path) -> xr.Dataset:
    """Open an archive lazily with xarray, checking that it is one this version reads.

    Raises:
        ArchiveError: naming the file and the problem (missing, not HDF5, not an
            ntkcl archive, a newer format version, missing variables).
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive.")
    try:
        ds = xr.open_dataset(path, engine="h5netcdf")
    except Exception as error:  # h5py/h5netcdf raise many types for broken files
        raise ArchiveError(
            f"{path}: cannot be read as a netCDF-4/HDF5 archive ({error})."
        ) from error
    version = ds.attrs.get("format_version")
    if version is None:
        ds.close()
        raise ArchiveError(f"{path}: not an ntkcl kernel archive (no format_version).")
    if int(version) > FORMAT_VERSION:
        ds.close()
        raise ArchiveError(
            f"{path}: format version {version} is newer than this ntkcl reads "
            f"({FORMAT_VERSION}); update ntkcl."
        )
    missing = [
        v
        for v in (*STEP_VARIABLES, "probe_label", "task_start")
        if v not in ds.variables
    ]
    if missing:
        ds.close()
        raise ArchiveError(f"{path}: missing variable(s) {missing}.")
    return ds


def run_config(ds: xr.Dataset) -> dict:
    """The resolved run config stored in an opened archive."""
    return json.loads(ds.attrs["config_json"])


def summary(ds: xr.Dataset, path: str | Path) -> dict:
    """A short description of an opened archive, for ``ntkcl inspect``."""
    config = run_config(ds)
    steps = ds["step"].values
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "run_id": ds.attrs.get("run_id"),
        "experiment": ds.attrs.get("experiment"),
        "status": ds.attrs.get("status"),
        "model": "{arch} depth {depth} width {width}".format(**config["model"]),
        "regime": config["regime"],
        "dataset": ds.attrs.get("dataset"),
        "dumps": int(len(steps)),
        "iterations": [int(steps[0]), int(steps[-1])] if len(steps) else [],
        "task_start": [int(s) for s in ds["task_start"].values],
        "kernel_kind": ds.attrs.get("kernel_kind"),
        "kernel_shape": list(ds["ntk"].shape),
    }

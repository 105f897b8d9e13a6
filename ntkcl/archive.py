"""The HDF5 kernel archive: one file per run, netCDF-4 compatible.

A reader needs neither this package nor the run's config: the file opens with
``xarray.open_dataset(path, engine="h5netcdf")`` (named dimensions and
coordinates, lazily), with h5py, and with ``h5dump``. The README documents every
dimension, variable and attribute.

Layout (format version 1):

* dimensions ``step`` (unlimited, one entry per dump), ``sample_1``,
  ``sample_2`` (the probe examples), ``logit_1``, ``logit_2`` (the classes),
  ``task``, each with a coordinate variable of the same name;
* along ``step`` the coordinates ``step`` (the global training iteration),
  ``active_task`` and ``wall_time``, and ``train_loss``, ``accuracy`` (step,
  task), ``logits`` (step, sample_1, logit_1) and ``ntk``: ``trace`` (step,
  sample_1, sample_2), ``diagonal`` (+ logit_1) or ``full`` (+ logit_1,
  logit_2);
* ``probe_label`` (sample_1) and ``task_start`` (task);
* root attributes: ``format_version``, the run, its resolved config as JSON,
  versions, device, ``status`` (``running``, ``complete`` or ``diverged``) and
  a ``history``.

The writer creates every variable first and then appends in HDF5's
single-writer/multiple-reader (SWMR) mode, one dump per chunk, writing ``step``
last and flushing after each dump: a reader may open the file while training
runs and counts only whole dumps. A writer killed by SIGKILL leaves a file that
HDF5 marks as still open for writing; :func:`open_archive` reads it in SWMR
mode, and :func:`truncate` copies its whole dumps into a fresh file for a
resumed run.
"""

from __future__ import annotations

import contextlib
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
KERNEL_DIMS = {
    "trace": ("step", "sample_1", "sample_2"),
    "diagonal": ("step", "sample_1", "sample_2", "logit_1"),
    "full": ("step", "sample_1", "sample_2", "logit_1", "logit_2"),
}
_KERNEL_MEANING = {
    "trace": "ntk[s, i, j] = sum_a <df_a(x_i)/dtheta, df_a(x_j)/dtheta> "
    "(summed over logits)",
    "diagonal": "ntk[s, i, j, a] = <df_a(x_i)/dtheta, df_a(x_j)/dtheta> "
    "(one block per logit)",
    "full": "ntk[s, i, j, a, b] = <df_a(x_i)/dtheta, df_b(x_j)/dtheta> "
    "(every pair of logits)",
}
# Every variable: dimensions (ntk's by kind, below), type, long_name, units.
SCHEMA = {
    "step": (("step",), "i8", "training iteration", "iteration"),
    "sample_1": (
        ("sample_1",),
        "i8",
        "probe example (index in the prepared train split)",
        "1",
    ),
    "sample_2": (
        ("sample_2",),
        "i8",
        "probe example (index in the prepared train split)",
        "1",
    ),
    "logit_1": (("logit_1",), "i8", "logit (class id)", "1"),
    "logit_2": (("logit_2",), "i8", "logit (class id)", "1"),
    "task": (("task",), "i8", "task index", "1"),
    "task_start": (
        ("task",),
        "i8",
        "first iteration of the task (its first update is this + 1)",
        "iteration",
    ),
    "probe_label": (("sample_1",), "i8", "probe example label (class id)", "1"),
    "active_task": (
        ("step",),
        "i8",
        "task of the latest update (0 before any update)",
        "1",
    ),
    "wall_time": (("step",), "f8", "wall time since the run started", "s"),
    "train_loss": (
        ("step",),
        "f8",
        "cross-entropy of the last minibatch before the dump (NaN at 0)",
        "nats",
    ),
    "accuracy": (
        ("step", "task"),
        "f8",
        "accuracy on the task's held-out examples",
        "1",
    ),
    "logits": (
        ("step", "sample_1", "logit_1"),
        "f4",
        "network outputs (before softmax) on the probe set, eval mode",
        "1",
    ),
    "ntk": (None, None, "empirical NTK on the probe set", "1"),
}
# Variables that grow by one entry per dump, in the order they are written:
# ``step`` last, so a reader that counts dumps by ``step`` sees only whole ones.
STEP_VARIABLES = (
    "active_task",
    "wall_time",
    "train_loss",
    "accuracy",
    "logits",
    "ntk",
    "step",
)
VARIABLES = tuple(SCHEMA)
STATUSES = ("running", "complete", "diverged")
# Kernel compression by kind, measured on real demo kernels by
# benchmarks/archive_compression.py (numbers in the README). A symmetric kernel
# stores every value twice; gzip finds the repeats when they are contiguous: a
# float for trace kernels (gzip alone 1.4x, shuffle breaks it), the K floats of
# a logit diagonal for diagonal kernels (shuffle + gzip 2x), too scattered in
# full kernels (1.1x to 1.2x for 20 times the write time: not worth it).
KERNEL_COMPRESSION = {
    "trace": {"compression": "gzip", "compression_opts": 1},
    "diagonal": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "full": {},
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# attributes that HDF5 dimension scales and netCDF-4 keep for themselves
_INTERNAL_ATTRS = {"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"}
# root attributes that create() derives from its arguments
_CREATE_ATTRS = {"format_version", "kernel_kind", "task_start"}


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
    kernel_attrs: dict | None = None,
) -> None:
    """Create an empty archive with every variable, ready for :class:`Writer`.

    Args:
        kind: ``full``, ``diagonal`` or ``trace``.
        dtype: ``float32`` or ``float64``, the kernel's storage precision.
        probe_indices: (n,) indices of the probe examples in the train split.
        probe_labels: (n,) their labels.
        num_classes: K, the number of logits.
        task_start: global iteration at which each task starts.
        attrs: root attributes (run id, config JSON, versions, ...); they
            override the defaults (``status``, ``history``, ...).
        kernel_attrs: more attributes of ``ntk``: how it was computed.
    """
    if kind not in KINDS:
        raise ArchiveError(f"Unknown kernel kind {kind!r}; expected one of {KINDS}.")
    n, n_tasks = len(probe_indices), len(task_start)
    static = {
        "sample_1": probe_indices,
        "sample_2": probe_indices,
        "logit_1": np.arange(num_classes),
        "logit_2": np.arange(num_classes),
        "task": np.arange(n_tasks),
        "task_start": task_start,
        "probe_label": probe_labels,
    }
    sizes = {
        "sample_1": n,
        "sample_2": n,
        "logit_1": num_classes,
        "logit_2": num_classes,
        "task": n_tasks,
    }
    with h5netcdf.File(path, "w", libver="latest") as f:
        f.dimensions = {"step": None, **sizes}  # step: unlimited
        for name, (dims, type_, long_name, units) in SCHEMA.items():
            # checksums everywhere: a damaged chunk fails loudly when read
            options = {"fletcher32": True}
            if name == "ntk":
                dims, type_ = KERNEL_DIMS[kind], "f8" if dtype == "float64" else "f4"
                long_name = f"{long_name} ({kind})"
                options |= KERNEL_COMPRESSION[kind]
            if name in ("logits", "ntk"):  # one dump per chunk
                options["chunks"] = (1, *(sizes[d] for d in dims[1:]))
            data = static.get(name)
            v = f.create_variable(
                name,
                dims,
                type_,
                data=None if data is None else np.asarray(data, dtype=np.int64),
                **options,
            )
            v.attrs.update(long_name=long_name, units=units)
            if dims[0] == "step" and name not in ("step", "active_task", "wall_time"):
                v.attrs["coordinates"] = "active_task wall_time"  # CF: aux. coords
        f["ntk"].attrs.update(
            kind=kind,
            definition=_KERNEL_MEANING[kind],
            computed_with="ntkcl.ntk.empirical_ntk: exact, gradients with respect "
            "to all trainable parameters, network in eval mode",
        )
        f["ntk"].attrs.update(kernel_attrs or {})

        now = _now()
        f.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "title": "ntkcl kernel archive",
                "kernel_kind": kind,
                "task_start": np.asarray(task_start, dtype=np.int64),
                "status": "running",
                "status_reason": "",
                "diverged_iteration": -1,
                "created_at": now,
                "history": f"{now} created",
                **attrs,
            }
        )


def _append_history(f: h5py.File, line: str) -> None:
    f.attrs["history"] = f"{f.attrs.get('history', '')}\n{_now()} {line}".strip()


def _hdf5_file(path: Path) -> h5py.File:
    """Open for reading; a file a writer holds (or a killed writer left) in SWMR.

    HDF5 refuses a plain open of a file marked as open for writing, which is
    what a training run (or one killed by SIGKILL) leaves; SWMR reading is made
    for exactly that. Only then: on a damaged file SWMR reading retries every
    metadata read for minutes instead of failing.
    """
    _check_header(path)
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if "already open for write" not in str(error):
            raise ArchiveError(
                f"{path}: cannot be read as a netCDF-4/HDF5 archive ({error})."
            ) from error
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except Exception as error:
        raise ArchiveError(
            f"{path}: cannot be read as a netCDF-4/HDF5 archive in SWMR mode ({error})."
        ) from error


def _check_header(path: Path) -> None:
    """Name the two commonest broken files before HDF5 does: not HDF5, truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(48)
    if not head.startswith(_HDF5_SIGNATURE):
        raise ArchiveError(
            f"{path}: not an HDF5 file (no HDF5 signature at its start); a kernel "
            "archive is the .h5 file that `ntkcl train` writes."
        )
    version, offset_size = head[8], head[9]
    if version in (2, 3) and offset_size == 8:  # superblock: base, ext, EOF addresses
        base = int.from_bytes(head[12:20], "little")
        end = int.from_bytes(head[28:36], "little")
        if size < base + end:
            raise ArchiveError(
                f"{path}: truncated: the file has {size} bytes but its HDF5 "
                f"superblock says {base + end}; copy it again from its source."
            )


def whole_dumps(f: h5py.File) -> int:
    """The number of dumps every per-dump variable holds (whole dumps)."""
    return min(f[name].shape[0] for name in STEP_VARIABLES if name in f)


def _check_file(f: h5py.File, path: Path) -> int:
    """Check version and variables of an open file; return its whole dumps."""
    version = f.attrs.get("format_version")
    if version is None:
        raise ArchiveError(
            f"{path}: not an ntkcl kernel archive (no format_version attribute)."
        )
    try:
        version = int(np.asarray(version).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise ArchiveError(
            f"{path}: format_version {version!r} is no integer."
        ) from None
    if version > FORMAT_VERSION:
        raise ArchiveError(
            f"{path}: format version {version} is newer than this ntkcl reads "
            f"({FORMAT_VERSION}); update ntkcl."
        )
    names = set(f.keys())
    missing = [name for name in VARIABLES if name not in names]
    extra = sorted(names - set(VARIABLES))
    if missing or extra:
        problems = [f"missing variable(s) {missing}"] if missing else []
        problems += [f"unexpected variable(s) {extra}"] if extra else []
        raise ArchiveError(f"{path}: {' and '.join(problems)} for format {version}.")
    kind = f.attrs.get("kernel_kind")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if kind not in KINDS:
        raise ArchiveError(
            f"{path}: kernel_kind attribute is {kind!r}; expected one of {KINDS}."
        )
    if f["ntk"].ndim != len(KERNEL_DIMS[kind]):
        raise ArchiveError(
            f"{path}: a {kind} kernel has dims {KERNEL_DIMS[kind]}, but ntk has "
            f"{f['ntk'].ndim} axes."
        )
    return whole_dumps(f)


@contextlib.contextmanager
def _unreadable(path: Path):
    """HDF5 errors while reading a damaged file, as one ArchiveError naming it."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as error:
        raise ArchiveError(f"{path}: cannot be read ({error}).") from error


def open_archive(path: str | Path) -> xr.Dataset:
    """Open an archive lazily with xarray, checking that it is one this version reads.

    Works on a finished archive and on one being written (or left by a killed
    writer): it is then read in SWMR mode and holds the whole dumps so far.

    Raises:
        ArchiveError: naming the file and the problem (missing, not HDF5,
            truncated, not an ntkcl archive, a newer format version, missing or
            unexpected variables, wrong dimensions).
    """
    path = Path(path)
    if path.is_dir():
        raise ArchiveError(
            f"{path} is a folder; give one archive file, for example "
            f"{path / '<run>.h5'} (runs are in results/<scale>/runs/<experiment>/)."
        )
    if not path.is_file():
        raise ArchiveError(f"{path}: no such archive.")
    with _hdf5_file(path) as f, _unreadable(path):
        swmr = f.swmr_mode
        dumps = _check_file(f, path)
    driver = {"driver_kwds": {"libver": "latest", "swmr": True}} if swmr else {}
    try:
        ds = xr.open_dataset(path, engine="h5netcdf", **driver)
    except Exception as error:  # h5py/h5netcdf raise many types for broken files
        raise ArchiveError(
            f"{path}: cannot be read as a netCDF-4 archive ({error})."
        ) from error
    # h5netcdf pads per-dump variables to the longest one; keep whole dumps only
    ds = ds.isel(step=slice(0, dumps))
    kind = ds.attrs["kernel_kind"]
    expected = {name: dims for name, (dims, *_) in SCHEMA.items()}
    expected["ntk"] = KERNEL_DIMS[kind]
    wrong = [
        f"{name} has dims {ds[name].dims}, expected {dims}"
        for name, dims in expected.items()
        if ds[name].dims != dims
    ]
    if wrong:
        ds.close()
        raise ArchiveError(f"{path}: {'; '.join(wrong)}.")
    return ds


class Writer:
    """Appends dumps to an archive made by :func:`create`, in SWMR mode.

    Args:
        path: the archive.
        keep: keep this many dumps and drop the rest (a resumed run continues
            after its checkpoint's last dump), through :func:`truncate`; None
            keeps all.
    """

    def __init__(self, path: str | Path, keep: int | None = None):
        self.path = Path(path)
        if keep is not None:
            truncate(self.path, keep)
        self._file = h5py.File(self.path, "r+", libver="latest")
        self.count = whole_dumps(self._file)
        self._file.swmr_mode = True

    def append(
        self, *, iteration, active_task, wall_time, train_loss, accuracy, logits, ntk
    ) -> None:
        """Write one dump and flush it (not fsync: see :meth:`sync`)."""
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

    def sync(self) -> None:
        """Flush and fsync, so that the dumps so far survive a node failure."""
        self._file.flush()
        os.fsync(self._file.id.get_vfd_handle())

    def close(self) -> None:
        self._file.close()


def truncate(path: str | Path, keep: int) -> None:
    """Keep the first ``keep`` dumps of an archive, in a freshly written file.

    The archive may be one a killed writer left (still marked open for writing,
    perhaps with a dump written to some variables only). It is read in SWMR mode
    and never modified; its static variables, attributes and first ``keep``
    dumps are copied into a new file that replaces it.

    Raises:
        ArchiveError: the archive is unreadable or holds fewer than ``keep``
            whole dumps.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with _hdf5_file(path) as old, _unreadable(path):
        count = _check_file(old, path)
        if keep > count:
            raise ArchiveError(
                f"{path} holds {count} whole dumps but the checkpoint expects {keep}."
            )
        ntk = old["ntk"]
        kernel_attrs = {
            key: value
            for key, value in ntk.attrs.items()
            if not key.startswith("_") and key not in _INTERNAL_ATTRS
        }
        create(
            tmp,
            kind=old.attrs["kernel_kind"],
            dtype=str(ntk.dtype),
            probe_indices=old["sample_1"][()],
            probe_labels=old["probe_label"][()],
            num_classes=old["logit_1"].shape[0],
            task_start=list(old["task_start"][()]),
            attrs={
                key: value
                for key, value in old.attrs.items()
                if not key.startswith("_") and key not in _CREATE_ATTRS
            },
            kernel_attrs=kernel_attrs,
        )
        writer = Writer(tmp)
        try:
            for i in range(keep):
                dump = {name: old[name][i] for name in STEP_VARIABLES}
                writer.append(iteration=dump.pop("step"), **dump)
        finally:
            writer.close()
    with h5py.File(tmp, "r+", libver="latest") as f:
        _append_history(f, f"truncated to {keep} of {count} dump(s) to resume")
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)


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
        _append_history(f, f"{status} {reason}".strip())


def run_config(config_json: str) -> dict:
    """The run's configuration from an archive's ``config_json`` attribute.

    Raises ValueError, saying what is wrong, when the text is not a JSON object
    (damaged metadata).
    """
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as error:
        raise ValueError(str(error)) from error
    if not isinstance(config, dict):
        raise ValueError(f"it holds a {type(config).__name__}")
    return config


def read_status(path: str | Path) -> tuple[str, str]:
    """The ``status`` and ``config_json`` attributes of an archive."""
    with _hdf5_file(Path(path)) as f:
        return str(f.attrs.get("status", "")), str(f.attrs.get("config_json", ""))


def publish(work_path: str | Path, out_path: str | Path) -> None:
    """Move a finished archive to its final place in one atomic step."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work_path, out_path)

"""Kernel archives to per-dump metrics (xarray), runs to one experiment Dataset.

``reduce_archive`` turns one run's archive, as ``xr.open_dataset(path,
engine="h5netcdf")`` opens it, into a small Dataset of metrics along ``step``
(and ``task``); it reads one kernel at a time, so archives larger than memory
reduce fine. ``aggregate`` puts the reduced runs of one experiment on named run
dimensions (width, regime, seed, ...) and ``write_netcdf`` saves atomically.

Two run properties are derived for every run, so that experiments can be read
against them: ``similarity``, the class similarity ``|C0 ∩ C1| / |C0 ∪ C1|`` of
the first two tasks (read from the run's config; the class-overlap experiment's
x axis), kept by ``aggregate`` as a coordinate when it differs between runs; and
list-valued grid parameters (``tasks.iterations: [250, 2000]``, or
``tasks.classes: [[0, 1], [2, 3]]``), which become string coordinates written
like the run ids (``250x2000``, ``0x1_2x3``), in numeric order.
The metric definitions live in :mod:`ntkcl.metrics`.
"""

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ntkcl import archive, metrics
from ntkcl.config import format_value

logger = logging.getLogger(__name__)

_KERNEL_DIMS = {
    "trace": ("sample_1", "sample_2"),
    "diagonal": ("sample_1", "sample_2", "logit_1"),
    "full": ("sample_1", "sample_2", "logit_1", "logit_2"),
}
_CENTRED = "centred over examples per logit pair, (I_K kron H) K (I_K kron H)"
# name -> (long_name, units, comment); "kernel" units are the archive's ntk units
_METRICS = {
    "max_eigenvalue": ("NTK max eigenvalue", "kernel", "lambda_max of the kernel"),
    "kernel_trace": ("NTK trace", "kernel", "Tr K, summed over examples and logits"),
    "distance_from_init": (
        "kernel distance from initialisation",
        "1",
        f"1 - CKA(K_0, K_t), {_CENTRED}; K_0 is the first dump",
    ),
    "distance_from_init_uncentered": (
        "uncentred kernel distance from initialisation",
        "1",
        "Fort et al.: 1 - <K_0, K_t> / (|K_0| |K_t|); K_0 is the first dump",
    ),
    "distance_to_previous": (
        "kernel distance to previous dump",
        "1",
        f"1 - CKA(K_prev, K_t), {_CENTRED}; NaN at the first dump",
    ),
    "distance_to_previous_uncentered": (
        "uncentred kernel distance to previous dump",
        "1",
        "Fort et al.: 1 - <K_prev, K_t> / (|K_prev| |K_t|); NaN at the first dump",
    ),
    "velocity": (
        "kernel velocity",
        "1/iteration",
        "distance_to_previous / iterations since the previous dump",
    ),
    "velocity_uncentered": (
        "uncentred kernel velocity",
        "1/iteration",
        "distance_to_previous_uncentered / iterations since the previous dump",
    ),
    "alignment": (
        "kernel-label alignment",
        "1",
        "CKA of the kernel with the one-hot probe labels (column-centred): "
        "y^T K_c y / (|K_c| |y|^2), y = vec(Y_c) logit-major; trace kernels "
        "use the target Gram Y Y^T",
    ),
    "accuracy": ("held-out accuracy", "1", "fraction correct on each task"),
    "forgetting": (
        "forgetting",
        "1",
        "max over dumps s <= t of accuracy_j(s), minus accuracy_j(t)",
    ),
    "train_loss": (
        "training loss",
        "1",
        "cross-entropy of the last minibatch before the dump; NaN at iteration 0",
    ),
}
_RUN_ATTRS = ("run_id", "experiment", "params_json", "status")


def _kernel_kind(ds: xr.Dataset) -> str:
    if "ntk" not in ds:
        raise ValueError(
            "The dataset has no 'ntk' variable; open a kernel archive written by "
            "`ntkcl train` (xr.open_dataset(path, engine='h5netcdf'))."
        )
    kinds = {ds.attrs.get("kernel_kind"), ds["ntk"].attrs.get("kind")} - {None}
    if len(kinds) != 1 or not kinds <= set(_KERNEL_DIMS):
        raise ValueError(
            f"The archive's kernel kind is unclear: attrs give {sorted(kinds)}; "
            f"expected one of {sorted(_KERNEL_DIMS)} in attrs 'kernel_kind' and "
            "ntk.attrs 'kind'."
        )
    kind = kinds.pop()
    expected = {"step", *_KERNEL_DIMS[kind]}
    if set(ds["ntk"].dims) != expected:
        raise ValueError(
            f"A {kind} kernel needs dims {sorted(expected)}, the archive's ntk has "
            f"{ds['ntk'].dims}; the archive is malformed."
        )
    for first, second in (("sample_1", "sample_2"), ("logit_1", "logit_2")):
        if first in ds.coords and second in ds.coords:
            if not np.array_equal(ds[first].values, ds[second].values):
                raise ValueError(
                    f"Coordinates {first} and {second} differ; the kernel must be "
                    "of the probe set with itself."
                )
    return kind


def _probe_labels(ds: xr.Dataset, kind: str) -> np.ndarray:
    labels = ds["probe_label"].values
    if "logit_1" in ds.coords:
        classes = ds["logit_1"].values
    elif kind == "trace":
        classes = np.unique(labels)  # Y Y^T depends only on which labels match
    else:
        raise ValueError(f"A {kind} archive needs a 'logit_1' coordinate (class ids).")
    return metrics.one_hot(labels, classes)


def _dump_metrics(ds: xr.Dataset, kind: str) -> dict[str, np.ndarray]:
    """Kernel metrics of every dump, reading one kernel at a time."""
    steps = ds.sizes["step"]
    num_logits = 1 if kind == "trace" else ds.sizes["logit_1"]
    labels = _probe_labels(ds, kind)
    out = {
        name: np.full(steps, np.nan)
        for name in (
            "max_eigenvalue",
            "kernel_trace",
            "alignment",
            "distance_from_init",
            "distance_from_init_uncentered",
            "distance_to_previous",
            "distance_to_previous_uncentered",
        )
    }
    first = previous = None  # (matrix, centred matrix)
    for index in range(steps):
        # isel before .values: only this dump is read from disk
        kernel = ds["ntk"].isel(step=index).transpose(*_KERNEL_DIMS[kind]).values
        matrix = metrics.kernel_matrix(kernel, kind)
        centred = metrics.center(matrix, num_logits=num_logits)
        current = (matrix, centred)
        first = current if first is None else first

        out["max_eigenvalue"][index] = metrics.max_eigenvalue(matrix)
        out["kernel_trace"][index] = np.trace(matrix)
        out["alignment"][index] = metrics.label_alignment(
            centred, labels, assume_centered=True
        )
        # 1 - CKA and 1 - Fort similarity, reusing each dump's centred matrix
        for suffix, reference in (("from_init", first), ("to_previous", previous)):
            if reference is None:
                continue
            out[f"distance_{suffix}"][index] = 1.0 - metrics.frobenius_cosine(
                reference[1], centred
            )
            out[f"distance_{suffix}_uncentered"][index] = (
                1.0 - metrics.frobenius_cosine(reference[0], matrix)
            )
        previous = current
        logger.debug("dump %d/%d reduced", index + 1, steps)
    step_values = ds["step"].values
    out["velocity"] = metrics.velocity(out["distance_to_previous"], step_values)
    out["velocity_uncentered"] = metrics.velocity(
        out["distance_to_previous_uncentered"], step_values
    )
    return out


def reduce_archive(ds: xr.Dataset) -> xr.Dataset:
    """Reduces one run's kernel archive to per-dump metrics.

    Args:
        ds: the archive as opened by ``xr.open_dataset(path,
            engine="h5netcdf")`` (layout in the README): ``ntk`` over ``step``
            and the probe (and logit) dims, ``probe_label``, ``accuracy``
            ``(step, task)``, ``train_loss``, ``task_start``, coords
            ``active_task``, and the run's root attrs.

    Returns:
        Dataset with dims ``step`` and ``task``; coords ``step`` (iteration),
        ``active_task`` and ``task``; variables ``max_eigenvalue``,
        ``kernel_trace``, ``distance_from_init[_uncentered]``,
        ``distance_to_previous[_uncentered]``, ``velocity[_uncentered]``,
        ``alignment``, ``train_loss`` ``(step,)`` and ``accuracy``,
        ``forgetting`` ``(step, task)``, each with ``long_name``, ``units`` and a
        ``comment`` giving its formula; attrs ``run_id``, ``experiment``,
        ``params_json``, ``task_start``, ``status``, ``diverged_iteration``,
        ``kernel_kind``, ``reference_step`` and ``similarity`` (of the first two
        tasks' class sets; NaN when the run has one task or no ``tasks`` config).
    """
    kind = _kernel_kind(ds)
    missing = [
        name
        for name in ("probe_label", "accuracy", "train_loss", "task_start")
        if name not in ds
    ]
    if missing:
        raise ValueError(f"The archive lacks the variables {missing}; it is malformed.")
    steps = ds["step"].values.astype(np.int64)
    values = _dump_metrics(ds, kind)
    accuracy = ds["accuracy"].transpose("step", "task").values.astype(np.float64)
    values["accuracy"] = accuracy
    values["forgetting"] = metrics.forgetting(accuracy)
    values["train_loss"] = ds["train_loss"].values.astype(np.float64)

    kernel_units = str(ds["ntk"].attrs.get("units", "1"))
    data_vars = {}
    for name, (long_name, units, comment) in _METRICS.items():
        dims = ("step", "task") if name in ("accuracy", "forgetting") else ("step",)
        if units == "kernel":
            units = kernel_units
        elif name == "train_loss":
            units = str(ds["train_loss"].attrs.get("units", units))
        attrs = {"long_name": long_name, "units": units, "comment": comment}
        data_vars[name] = xr.Variable(dims, values[name], attrs)
    coords = {
        name: (dim, ds[name].values.astype(np.int64), {"long_name": text, "units": u})
        for name, dim, text, u in (
            ("step", "step", "training iteration", "iteration"),
            ("active_task", "step", "task being trained", "1"),
            ("task", "task", "task index", "1"),
        )
    }
    attrs = {name: str(ds.attrs.get(name, "")) for name in _RUN_ATTRS}
    attrs["params_json"] = attrs["params_json"] or "{}"
    attrs["diverged_iteration"] = int(ds.attrs.get("diverged_iteration", -1))
    attrs["task_start"] = [int(t) for t in np.atleast_1d(ds["task_start"].values)]
    attrs["kernel_kind"] = kind
    attrs["reference_step"] = int(steps[0]) if steps.size else -1
    attrs["similarity"] = _first_switch_similarity(ds.attrs.get("config_json", "{}"))
    logger.info(
        "reduced run %s: %d dumps of a %s kernel", attrs["run_id"], steps.size, kind
    )
    return xr.Dataset(data_vars, coords, attrs)


def _first_switch_similarity(config_json: str) -> float:
    """Jaccard similarity of the first two tasks' class sets (NaN if undefined)."""
    from ntkcl import tasks  # imports torch: only when reducing

    try:
        config = archive.run_config(config_json or "{}")
    except ValueError as error:
        raise ValueError(
            f"The archive's config_json attribute is not a JSON object ({error}): "
            "its metadata is damaged; delete the archive and rerun its training job."
        ) from error
    tasks_cfg = config.get("tasks")
    if not tasks_cfg:
        return float("nan")
    sequence = tasks.build_tasks(tasks_cfg)
    if len(sequence) < 2:
        return float("nan")
    return tasks.similarity(sequence[0], sequence[1])


def _hashable(value):
    """A parameter value usable as a key: lists (one value per task) become tuples."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


def _coordinate(level: list) -> np.ndarray:
    """A dimension's sorted values as a coordinate; tuples written as in run ids
    (``250x2000``, or ``0x1_2x3`` for one class list per task)."""
    if not any(isinstance(v, tuple) for v in level):
        return np.asarray(level)
    return np.asarray([format_value(v) for v in level])


def _long_name(dim: str, level: list) -> str:
    """A run dimension's long name: the dim, "per task" for one value per task."""
    return f"{dim} per task" if any(isinstance(v, tuple) for v in level) else dim


def _run_key(run: xr.Dataset, dims: Sequence[str]) -> tuple:
    params = json.loads(run.attrs.get("params_json", "{}"))
    absent = [dim for dim in dims if dim not in params]
    if absent:
        raise ValueError(
            f"Run {run.attrs.get('run_id', '?')!r} has no parameter {absent} in "
            f"params_json {params}; aggregate only over parameters every run has."
        )
    return tuple(_hashable(params[dim]) for dim in dims)


def _run_grid(runs: list[xr.Dataset], dims: list[str]) -> tuple[list, list]:
    """Each run's parameter values and the sorted values of each dimension."""
    keys = [_run_key(run, dims) for run in runs]
    seen: dict[tuple, str] = {}
    for key, run in zip(keys, runs, strict=True):
        run_id = str(run.attrs.get("run_id", "?"))
        if key in seen:
            point = dict(zip(dims, key, strict=True))
            raise ValueError(
                f"Runs {seen[key]!r} and {run_id!r} share the grid point {point}: "
                f"no parameter among the run dims {dims} tells them apart. Pass "
                "dims that include every parameter of the runs' params_json (the "
                "default), and aggregate only runs of one experiment and scale."
            )
        seen[key] = run_id
    try:
        levels = [sorted({key[i] for key in keys}) for i in range(len(dims))]
    except TypeError as error:
        raise ValueError(f"Values of one run parameter mix types: {keys}.") from error
    return keys, levels


def aggregate(
    datasets: Iterable[xr.Dataset], dims: Sequence[str] | None = None
) -> xr.Dataset:
    """Combines the reduced runs of one experiment on named run dimensions.

    Args:
        datasets: reduced runs (from :func:`reduce_archive`), one per grid point.
        dims: run parameters to use as dimensions, read from each run's
            ``params_json``; default: the keys of the first run's parameters.

    Returns:
        Dataset over ``(*dims, step)`` and ``(*dims, step, task)``: every metric
        outer-joined on ``step`` and ``task`` and NaN-padded where a run has no
        dump (shorter or diverged runs, grid points without a run);
        ``active_task`` becomes a float coordinate ``(*dims, step)``. Per run:
        ``status`` (``"missing"`` where no run), ``diverged_iteration`` and
        ``run_id``; ``task_start`` ``(*dims, task)`` (NaN where absent). Run
        coordinates are sorted (a list-valued parameter, e.g. iterations per
        task, becomes a string coordinate ``250x2000`` in numeric order). When
        the runs' ``similarity`` attrs differ, a ``similarity`` coordinate over
        the run dims it varies along (e.g. ``shared``). Attrs ``experiment``,
        ``run_dims``, ``kernel_kind``, and ``task_start`` when all runs share it.
    """
    runs = list(datasets)
    if not runs:
        raise ValueError("aggregate() got no datasets; pass the reduced runs.")
    if dims is None:
        dims = list(json.loads(runs[0].attrs.get("params_json", "{}")))
    dims = list(dims)
    if len(set(dims)) != len(dims) or {"step", "task"} & set(dims):
        raise ValueError(f"Run dimensions {dims} must be distinct and not step/task.")
    experiments = {str(run.attrs.get("experiment", "")) for run in runs}
    if len(experiments) > 1:
        raise ValueError(f"Runs come from several experiments {sorted(experiments)}.")

    keys, levels = _run_grid(runs, dims)
    run_shape = tuple(len(level) for level in levels)
    steps = np.unique(np.concatenate([run["step"].values for run in runs]))
    tasks = np.unique(np.concatenate([run["task"].values for run in runs]))
    sizes = {"step": steps.size, "task": tasks.size}

    names = list(dict.fromkeys(name for run in runs for name in run.data_vars))
    arrays, var_dims, var_attrs = {}, {}, {}
    for name in names + ["active_task"]:
        holder = next(run for run in runs if name in run.variables)
        var_dims[name] = holder[name].dims
        if not set(var_dims[name]) <= set(sizes):
            raise ValueError(
                f"Variable {name} has dims {var_dims[name]}; expected "
                "only step and task."
            )
        shape = run_shape + tuple(sizes[d] for d in var_dims[name])
        arrays[name] = np.full(shape, np.nan)
        var_attrs[name] = dict(holder[name].attrs)
    status = np.full(run_shape, "missing", dtype=object)
    run_ids = np.full(run_shape, "", dtype=object)
    diverged = np.full(run_shape, -1, dtype=np.int64)
    task_start = np.full(run_shape + (tasks.size,), np.nan)

    for key, run in zip(keys, runs, strict=True):
        where = tuple(
            level.index(value) for level, value in zip(levels, key, strict=True)
        )
        padded = run.reset_coords("active_task").reindex(step=steps, task=tasks)
        for name in arrays:
            if name in padded:
                arrays[name][where] = padded[name].transpose(*var_dims[name]).values
        status[where] = str(run.attrs.get("status", ""))
        run_ids[where] = str(run.attrs.get("run_id", ""))
        diverged[where] = int(run.attrs.get("diverged_iteration", -1))
        starts = np.atleast_1d(run.attrs.get("task_start", []))
        task_start[where][: starts.size] = starts

    def variable(dims_, data, long_name, units=None):
        attrs = {"long_name": long_name} | ({"units": units} if units else {})
        return (tuple(dims) + dims_, data, attrs)

    data_vars = {
        name: (tuple(dims) + var_dims[name], arrays[name], var_attrs[name])
        for name in names
    }
    data_vars["status"] = variable((), status.astype(str), "run status")
    data_vars["run_id"] = variable((), run_ids.astype(str), "run id")
    data_vars["diverged_iteration"] = variable(
        (), diverged, "iteration of divergence (-1: none)", "iteration"
    )
    data_vars["task_start"] = variable(
        ("task",), task_start, "first iteration of each task", "iteration"
    )
    coords = {
        dim: (dim, _coordinate(level), {"long_name": _long_name(dim, level)})
        for dim, level in zip(dims, levels, strict=True)
    }
    similarity = np.full(run_shape, np.nan)
    for key, run in zip(keys, runs, strict=True):
        where = tuple(
            level.index(value) for level, value in zip(levels, key, strict=True)
        )
        similarity[where] = float(run.attrs.get("similarity", np.nan))
    if np.unique(similarity[np.isfinite(similarity)]).size > 1:
        coords["similarity"] = _varying(similarity, dims) + (
            {
                "long_name": "class similarity of tasks 1 and 2",
                "units": "1",
                "comment": "|C0 ∩ C1| / |C0 ∪ C1| of the first two tasks' classes",
            },
        )
    coords["step"] = ("step", steps, dict(runs[0]["step"].attrs))
    coords["task"] = ("task", tasks, dict(runs[0]["task"].attrs))
    coords["active_task"] = (
        tuple(dims) + ("step",),
        arrays.pop("active_task"),
        var_attrs["active_task"],
    )
    attrs = {"experiment": experiments.pop(), "run_dims": dims}
    kinds = {str(run.attrs.get("kernel_kind", "")) for run in runs}
    attrs["kernel_kind"] = kinds.pop() if len(kinds) == 1 else "mixed"
    starts = {tuple(np.atleast_1d(run.attrs.get("task_start", []))) for run in runs}
    if len(starts) == 1:
        attrs["task_start"] = [int(t) for t in starts.pop()]
    return xr.Dataset(data_vars, coords, attrs)


def _varying(values: np.ndarray, dims: list[str]) -> tuple[tuple, np.ndarray]:
    """``(dims, values)`` without the dims along which ``values`` is constant.

    NaN entries (grid points without a run) count as equal to anything.
    """
    keep = list(dims)
    for axis in reversed(range(values.ndim)):
        finite = np.isfinite(values)
        low = np.where(finite, values, np.inf).min(axis=axis)
        high = np.where(finite, values, -np.inf).max(axis=axis)
        some = finite.any(axis=axis)
        if np.all(~some | (low == high)):
            values = np.where(some, low, np.nan)
            keep.pop(axis)
    return tuple(keep), values


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Writes ``ds`` to NetCDF-4 with h5netcdf, atomically.

    The file is written next to ``path`` under a temporary name and renamed
    with ``os.replace``, so readers never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(handle)
    try:
        ds.to_netcdf(temporary, engine="h5netcdf")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

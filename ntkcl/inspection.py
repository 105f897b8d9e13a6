"""What ``ntkcl inspect`` reports about a kernel archive: summary, checks, spectrum.

All three work on an archive as :func:`ntkcl.archive.open_archive` opens it,
finished or still being written (then they see the whole dumps so far).

* :func:`summary`: the run, its config in brief, dumps, iterations covered,
  tasks and switches, the kernel's kind, shape and storage, file size, status.
* :func:`check`: structure and values, reading each dump once: monotone
  iterations, consistent tasks, finite values, accuracies in [0, 1], and
  symmetric kernels (``trace`` and ``full`` as matrices, ``diagonal`` per
  logit). Returns one sentence per problem.
* :func:`spectrum`: eigenvalues of one dump's kernel as a matrix
  (:func:`ntkcl.metrics.kernel_matrix`), trace and condition number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from . import archive, metrics

# |K - K^T| / max|K| allowed, by storage precision (the engine mirrors one half,
# so real kernels are symmetric to rounding)
_SYMMETRY_TOLERANCE = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-10}


def _config(ds: xr.Dataset) -> dict:
    try:
        return archive.run_config(str(ds.attrs.get("config_json", "{}")))
    except ValueError:  # check() names it
        return {}


def summary(ds: xr.Dataset, path: str | Path) -> dict:
    """A short description of an opened archive (JSON-serialisable)."""
    config = _config(ds)
    model, tasks, optim = (config.get(k, {}) for k in ("model", "tasks", "optim"))
    steps = ds["step"].values
    task_start = [int(s) for s in ds["task_start"].values]
    classes = tasks.get("classes")
    if not (isinstance(classes, list) and len(classes) == len(task_start)):
        classes = [None] * len(task_start)  # another scheme: see config_json
    planned = tasks.get("iterations")
    if isinstance(planned, int):
        planned *= len(task_start)
    elif isinstance(planned, list):
        planned = sum(planned)
    status = str(ds.attrs.get("status", ""))
    ntk = ds["ntk"]
    encoding = ntk.encoding
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "format_version": int(ds.attrs["format_version"]),
        "run_id": ds.attrs.get("run_id"),
        "experiment": ds.attrs.get("experiment"),
        "status": status,
        "complete": status == "complete",
        "status_reason": str(ds.attrs.get("status_reason", "")),
        "diverged_iteration": int(ds.attrs.get("diverged_iteration", -1)),
        "config": {
            "model": " ".join(
                f"{key} {model[key]}" if key in ("depth", "width") else str(model[key])
                for key in ("arch", "depth", "width", "activation")
                if key in model
            ),
            "regime": config.get("regime"),
            "task_scheme": tasks.get("scheme", "split"),
            "learning_rate": _number(ds.attrs.get("learning_rate")),
            "batch_size": optim.get("batch_size"),
            "seed": _number(ds.attrs.get("seed")),
            "device": ds.attrs.get("device"),
            "dataset": ds.attrs.get("dataset"),
            "probe_size": int(ds.sizes["sample_1"]),
            "ntk_every": config.get("ntk", {}).get("every"),
        },
        "dumps": int(steps.size),
        "iterations": [int(steps[0]), int(steps[-1])] if steps.size else [],
        "planned_iterations": planned,
        "tasks": [
            {"task": k, "start": start, "classes": classes[k]}
            for k, start in enumerate(task_start)
        ],
        "switches": task_start[1:],
        "kernel": {
            "kind": ds.attrs.get("kernel_kind"),
            "dims": list(ntk.dims),
            "shape": list(ntk.shape),
            "dtype": str(ntk.dtype),
            "bytes": int(ntk.nbytes),
            "chunks": list(encoding.get("chunksizes") or []),
            "compression": "gzip"
            if encoding.get("zlib")
            else encoding.get("compression") or "none",
            "compression_opts": encoding.get("complevel")
            or encoding.get("compression_opts"),
            "shuffle": bool(encoding.get("shuffle", False)),
            "fletcher32": bool(encoding.get("fletcher32", False)),
            "implementation": ntk.attrs.get("implementation"),
        },
        "versions": {
            "ntkcl": ds.attrs.get("ntkcl_version"),
            "torch": ds.attrs.get("torch_version"),
        },
        "created_at": ds.attrs.get("created_at"),
    }


def _number(value):
    return value.item() if isinstance(value, np.generic) else value


def check(ds: xr.Dataset) -> list[str]:
    """Every problem found in an opened archive, one sentence each (empty: valid).

    Reads each dump's kernel once.
    """
    problems = []
    # every variable read once first (the kernel dump by dump below, the per-dump
    # values with the other checks): a damaged chunk anywhere is named, and the
    # checks below need the small ones
    per_dump = ("ntk", "train_loss", "wall_time", "accuracy", "logits")
    unreadable = [
        name
        for name in map(str, ds.variables)
        if name not in per_dump and _read(ds, name, problems) is None
    ]
    if unreadable:
        return problems
    status = str(ds.attrs.get("status", ""))
    if status not in archive.STATUSES:
        problems.append(f"status is {status!r}, expected one of {archive.STATUSES}")
    try:
        archive.run_config(str(ds.attrs.get("config_json", "")))
    except ValueError as error:
        problems.append(
            "the config_json attribute (the run's configuration) is not a JSON "
            f"object: {error}"
        )
    for first, second in (("sample_1", "sample_2"), ("logit_1", "logit_2")):
        if not np.array_equal(ds[first].values, ds[second].values):
            problems.append(f"coordinates {first} and {second} differ")
    steps = ds["step"].values
    if steps.size and np.any(np.diff(steps) <= 0):
        bad = int(np.argmax(np.diff(steps) <= 0)) + 1
        problems.append(
            f"iterations are not increasing: dump {bad} is iteration "
            f"{steps[bad]} after {steps[bad - 1]}"
        )
    task_start = ds["task_start"].values
    if task_start.size and (task_start[0] != 0 or np.any(np.diff(task_start) <= 0)):
        problems.append(f"task_start {list(task_start)} is not 0 then increasing")
    active = ds["active_task"].values
    if np.any((active < 0) | (active >= task_start.size)) or np.any(
        np.diff(active) < 0
    ):
        problems.append(f"active_task is not a non-decreasing task index: {active}")
    diverged = int(ds.attrs.get("diverged_iteration", -1))
    if status == "diverged" and steps.size and diverged <= steps[-1]:
        problems.append(
            f"diverged at iteration {diverged} but holds dumps up to {steps[-1]}"
        )

    # values along step; train_loss is NaN at iteration 0 (no update yet)
    values = {
        name: _read(ds, name, problems)
        for name in ("train_loss", "wall_time", "accuracy", "logits")
    }
    if values["train_loss"] is not None:
        values["train_loss"] = values["train_loss"][steps > 0]
    for name, array in values.items():
        if array is not None and not np.all(np.isfinite(array)):
            problems.append(
                f"{name} has {np.sum(~np.isfinite(array))} non-finite values"
            )
    accuracy = values["accuracy"]
    if accuracy is not None and np.any((accuracy < 0) | (accuracy > 1)):
        problems.append("accuracy has values outside [0, 1]")

    kind = ds.attrs["kernel_kind"]
    tolerance = _SYMMETRY_TOLERANCE.get(ds["ntk"].dtype, 1e-5)
    for index in range(steps.size):
        where = f"dump {index} (iteration {steps[index]})"
        try:
            kernel = ds["ntk"].isel(step=index).values
        except OSError as error:
            problems.append(f"{where}: ntk cannot be read: {_damaged(error)}")
            continue
        if not np.all(np.isfinite(kernel)):
            count = int(np.sum(~np.isfinite(kernel)))
            problems.append(f"{where}: ntk has {count} non-finite values")
            continue
        matrix = metrics.kernel_matrix(kernel, kind)
        scale = np.max(np.abs(matrix))
        asymmetry = np.max(np.abs(matrix - matrix.T)) / scale if scale else 0.0
        if asymmetry > tolerance:
            problems.append(
                f"{where}: ntk is not symmetric (max |K - K^T| / max |K| = "
                f"{asymmetry:.2g})"
            )
    return problems


def _damaged(error: OSError) -> str:
    return (
        f"{error} (a damaged chunk: its checksum or decompression failed; the other "
        "dumps are intact; to rewrite it, train the run again: delete the archive "
        "and rerun, or `snakemake --forcerun train`, or `ntkcl train --force`)"
    )


def _read(ds: xr.Dataset, name: str, problems: list[str]) -> np.ndarray | None:
    """All of variable ``name``, or None after naming the dumps that cannot be
    read in ``problems``."""
    try:
        return ds[name].values
    except OSError as error:
        variable = ds[name]
        if "step" not in variable.dims:
            problems.append(f"{name} cannot be read: {_damaged(error)}")
            return None
        bad = []
        for index in range(ds.sizes["step"]):
            try:
                variable.isel(step=index).load()
            except OSError:
                bad.append(index)
        problems.append(f"{name} cannot be read at dump(s) {bad}: {_damaged(error)}")
        return None


def spectrum(ds: xr.Dataset, step: int, top: int = 5) -> dict:
    """Eigenvalues of the kernel at iteration ``step``, as one symmetric matrix.

    Returns:
        ``step``, ``dump`` (its index), ``matrix_size``, ``top_eigenvalues``
        (descending), ``min_eigenvalue``, ``trace`` and ``condition_number``
        (largest over smallest eigenvalue; None when the smallest is not
        positive).

    Raises:
        ValueError: no dump at that iteration (the message lists the nearest).
    """
    steps = ds["step"].values
    matches = np.flatnonzero(steps == step)
    if not matches.size:
        nearest = sorted(steps, key=lambda s: abs(int(s) - step))[:3]
        raise ValueError(
            f"no dump at iteration {step}; nearest: {sorted(int(s) for s in nearest)}."
        )
    index = int(matches[0])
    kernel = ds["ntk"].isel(step=index).values
    matrix = metrics.kernel_matrix(kernel, ds.attrs["kernel_kind"])
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)[::-1]
    smallest = float(eigenvalues[-1])
    return {
        "step": int(step),
        "dump": index,
        "matrix_size": int(matrix.shape[0]),
        "top_eigenvalues": [float(v) for v in eigenvalues[:top]],
        "min_eigenvalue": smallest,
        "trace": float(np.trace(matrix)),
        "condition_number": float(eigenvalues[0] / smallest) if smallest > 0 else None,
    }


def _size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def format_text(info: dict) -> str:
    """The ``ntkcl inspect`` report as text (``info`` as in the JSON output)."""
    c, k = info["config"], info["kernel"]
    first_last = info["iterations"]
    covered = f"{first_last[0]} to {first_last[1]}" if first_last else "none"
    if info["planned_iterations"] is not None:
        covered += f" of {info['planned_iterations']}"
    status = info["status"]
    if status == "running":
        status += " (being written, or its run was killed: rerun to resume)"
    elif status == "diverged":
        status += f" at iteration {info['diverged_iteration']}: {info['status_reason']}"
    compression = k["compression"]
    if compression != "none":
        compression += f" {k['compression_opts']}" + (" + shuffle" * k["shuffle"])
    stored = f"{_size(k['bytes'])} uncompressed; chunks {k['chunks']}, {compression}"
    lines = [
        ("file", f"{info['file']} ({_size(info['size_bytes'])})"),
        ("run", f"{info['run_id']} (experiment {info['experiment']})"),
        ("status", status),
        ("model", f"{c['model']}, regime {c['regime']}"),
        (
            "training",
            f"SGD lr {c['learning_rate']:.4g}, batch {c['batch_size']}, "
            f"seed {c['seed']}, on {c['device']}"
            if isinstance(c["learning_rate"], float)
            else "unknown",
        ),
        ("data", f"{c['dataset']}, probe of {c['probe_size']} examples"),
        (
            "tasks",
            "; ".join(
                f"{t['task']}: classes {_classes(t['classes'])} from {t['start']}"
                for t in info["tasks"]
            ),
        ),
        ("switches", ", ".join(str(s) for s in info["switches"]) or "none"),
        ("dumps", f"{info['dumps']}, iterations {covered}, every {c['ntk_every']}"),
        ("kernel", f"{k['kind']} {k['dtype']} {tuple(k['shape'])} {tuple(k['dims'])}"),
        ("stored", stored),
        ("computed", k["implementation"] or "(not recorded)"),
        (
            "written by",
            f"ntkcl {info['versions']['ntkcl']}, torch {info['versions']['torch']}, "
            f"format {info['format_version']}, created {info['created_at']}",
        ),
    ]
    if info.get("spectrum") is None and "spectrum" in info:
        lines.append(("spectrum at", "unreadable dump (see problems)"))
    elif "spectrum" in info:
        s = info["spectrum"]
        cond = s["condition_number"]
        lines += [
            (
                "spectrum at",
                f"iteration {s['step']} (dump {s['dump']}), "
                f"{s['matrix_size']} x {s['matrix_size']}",
            ),
            ("top eigen.", ", ".join(f"{v:.6g}" for v in s["top_eigenvalues"])),
            ("min eigen.", f"{s['min_eigenvalue']:.6g}"),
            ("trace", f"{s['trace']:.6g}"),
            ("condition", f"{cond:.6g}" if cond is not None else "inf (min <= 0)"),
        ]
    if "problems" in info:
        lines.append(("problems", "; ".join(info["problems"]) or "none"))
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:>{width}}: {value}" for key, value in lines)


def _classes(classes) -> str:
    """``0-4`` for a run of class ids, ``0,3,7`` otherwise."""
    if not isinstance(classes, list) or not all(isinstance(c, int) for c in classes):
        return "?" if classes is None else str(classes)
    if len(classes) > 2 and classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(str(c) for c in classes)

"""Figures in the style of the paper's Figure 1, drawn from aggregated metrics.

One figure per experiment: a row of panels per value of ``row`` (e.g. the regime),
one panel per metric (by default the top eigenvalue, the kernel distance from
initialisation, the kernel-label alignment and the kernel velocity, as in the
paper), each against the global training iteration, one line per value of ``line``
(e.g. the width), every task switch marked by a vertical dashed line.

Choices the README documents:

* The line is the mean over seeds; the shaded band is the min-max range over seeds
  (``band="minmax"``, the default: with 2-3 seeds a standard deviation says little,
  and a mean minus one std can fall below zero on a log axis) or ``band="std"``
  (mean +- one standard deviation). The legend says which, and over how many seeds.
* The top eigenvalue and the velocity are drawn on a log y axis (``LOG_SCALE``):
  under the standard parameterisation the eigenvalue grows about linearly with the
  width, so widths 64 to 2048 span more than a decade, and the velocity spike at a
  switch is one to two decades above the within-task level. Distance and alignment
  lie in [0, 1] and stay linear.
* A run that diverged is not dropped: the mean and band use the seeds that are still
  finite at each iteration, its legend entry says "(k/n diverged)", and an ``x``
  marks the divergence (at the run's ``diverged_iteration`` when the dataset has
  that variable, else at its last finite dump) on its last finite value.
* Dimensions of size one are dropped silently; any other dimension besides
  ``line``, ``row``, the seed dimension, ``step`` and ``task`` must be fixed with
  ``select`` or the call raises a ``ValueError`` naming it.
* Variables with a ``task`` dimension (accuracy, forgetting) are shown for the
  first task, the one the probe set is drawn from.
* The x axis is the global training iteration (the paper's "step" is 10 of them).
  Task switches are grey dashed lines; when the switch iteration depends on the
  line value (the training-duration experiment) each line gets its own dashed
  line in its colour. Y labels read ``long_name [units]``, without ``[1]``.

The module never touches pyplot: figures are plain ``matplotlib.figure.Figure``
objects rendered by the Agg canvas, so there is no global state, no window and
nothing to close.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

logger = logging.getLogger(__name__)

DEFAULT_PANELS = ("max_eigenvalue", "distance_from_init", "alignment", "velocity")
"""The paper's four Figure-1 metrics, in its column order."""

LOG_SCALE = frozenset({"max_eigenvalue", "velocity"})
"""Variables drawn on a log y axis (see the module docstring for why)."""

ROW_TITLES = {"regime": {"fl": "feature learning", "lazy": "lazy"}}
"""Readable row titles for known (dimension, value) pairs; others read "dim = value"."""

BANDS = ("minmax", "std", None)

_SWITCH_COLOR = "0.45"
_DIVERGED_MARKER = {"marker": "x", "markersize": 7, "markeredgewidth": 2}


def plot_experiment(
    ds: xr.Dataset,
    *,
    line: str,
    row: str | None = None,
    out_pdf: str | Path,
    out_png: str | Path,
    dpi: int = 150,
    **kwargs,
) -> None:
    """Draw an experiment's figure and write it as PDF and PNG.

    Args:
        ds: aggregated metrics (see ``make_figure``).
        line: dimension with one line per value, e.g. ``"width"``.
        row: dimension with one row of panels per value, e.g. ``"regime"``.
        out_pdf: path of the PDF to write (parent folders are created).
        out_png: path of the PNG to write, at ``dpi`` dots per inch.
        dpi: resolution of the PNG.
        **kwargs: passed on to ``make_figure`` (``select``, ``panels``, ``band``,
            ``title``, ...).

    Raises:
        ValueError: as ``make_figure``.
    """
    fig = make_figure(ds, line=line, row=row, **kwargs)
    for path, options in ((out_pdf, {}), (out_png, {"dpi": dpi})):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, **options)
        logger.info("wrote %s", path)


def make_figure(
    ds: xr.Dataset,
    *,
    line: str,
    row: str | None = None,
    select: Mapping[str, object] | None = None,
    panels: Sequence[str] = DEFAULT_PANELS,
    log_scale: Iterable[str] = LOG_SCALE,
    band: str | None = "minmax",
    average: str = "seed",
    title: str | None = None,
    xlim: tuple[float, float] | None = None,
) -> Figure:
    """Build the Figure-1-style figure of an aggregated metrics dataset.

    Args:
        ds: aggregated metrics with dims ``step`` (coordinate: global iteration),
            optionally ``task``, and one dimension per run parameter (e.g.
            ``width``, ``regime``, ``seed``). Reads the variables named in
            ``panels`` (their ``long_name`` and ``units`` attrs label the y axes),
            ``status`` and ``diverged_iteration`` over the run dims when present,
            and the task starts from a ``task_start`` variable or attr.
        line: dimension drawn as one line per value; a numeric one gets a
            sequential colormap ordered by value.
        row: dimension drawn as one row of panels per value, or None for one row.
        select: ``{dim: value}`` fixing the other run dimensions before plotting.
        panels: variables to draw, one panel each, in order.
        log_scale: variables drawn on a log y axis when they have positive data.
        band: ``"minmax"`` (range over seeds), ``"std"`` (mean +- one std) or None.
        average: the dimension averaged into each line (the seeds); skipped when
            absent or when it is ``line`` or ``row``.
        title: figure title; default the ``experiment`` attr.
        xlim: (first, last) iteration shown; default the whole run.

    Returns:
        The figure, with ``len(panels)`` axes per row.

    Raises:
        ValueError: for an unknown dimension, variable or band, a selection value
            that does not exist, or a dimension of size above one that is neither
            ``line``, ``row``, ``average``, ``step`` nor ``task`` and is not fixed
            by ``select``.
    """
    ds = _select(ds, line=line, row=row, select=select or {}, average=average)
    missing = [name for name in panels if name not in ds.data_vars]
    if missing or not panels:
        raise ValueError(
            f"Cannot plot panels {list(panels)}: {missing or 'none given'} not in the "
            f"dataset, whose variables are {sorted(map(str, ds.data_vars))}; pass "
            "panels= with some of those."
        )
    if band not in BANDS:
        raise ValueError(f"band={band!r} is not one of {BANDS}; pick one of those.")
    seeds = average if average in ds.dims and average not in (line, row) else None
    log_scale = frozenset(log_scale)

    line_values = list(ds[line].values)
    colors = _colors(line_values)
    row_values = list(ds[row].values) if row else [None]
    n_seeds = ds.sizes[seeds] if seeds else 1
    line_specific = _switches_differ(ds, line)

    fig = Figure(
        figsize=(3.2 * len(panels) + 1.6, 2.7 * len(row_values) + 0.7),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(row_values), 1, squeeze=False)[:, 0]
    # one x range for every panel, set once: sharing axes across subfigures makes
    # matplotlib redraw the whole figure on every limit change
    steps = np.asarray(ds["step"].values, dtype=float)
    xlim = xlim if xlim is not None else (steps.min(), steps.max())
    for r, (subfig, row_value) in enumerate(zip(subfigs, row_values, strict=True)):
        axes = subfig.subplots(1, len(panels), squeeze=False)[0]
        if row is not None:
            subfig.suptitle(_row_title(row, row_value), fontweight="bold")
        row_ds = ds.sel({row: row_value}) if row is not None else ds
        for ax, name in zip(axes, panels, strict=True):
            da = row_ds[name].isel(task=0) if "task" in row_ds[name].dims else None
            da = row_ds[name] if da is None else da
            for i, value in enumerate(line_values):
                run_ds = row_ds.sel({line: value})
                _draw_line(ax, da.sel({line: value}), run_ds, seeds, band, colors[i])
                if line_specific:
                    _draw_switches(ax, run_ds, colors[i])
            if not line_specific:
                _draw_switches(ax, row_ds, _SWITCH_COLOR)
            _finish_axes(ax, da, name in log_scale, xlim)
            if r == len(row_values) - 1:
                ax.set_xlabel("training iteration")

    notes = _run_notes(ds, line)
    labels = _line_labels(ds, line)
    handles = [
        Line2D([], [], color=colors[i], lw=2, label=labels[i] + notes[i])
        for i in range(len(line_values))
    ]
    switch = "task switch (in the line's colour)" if line_specific else "task switch"
    extra = [Line2D([], [], color=_SWITCH_COLOR, ls="--", label=switch)]
    if seeds and n_seeds == 1:
        extra.append(Line2D([], [], color="k", lw=1.5, label="line: one seed"))
    elif seeds:
        extra.append(
            Line2D([], [], color="k", lw=1.5, label=f"line: mean over {n_seeds} seeds")
        )
        if band:
            what = "min-max" if band == "minmax" else "mean ± 1 std"
            extra.append(
                Patch(
                    color="0.6", alpha=0.35, label=f"band: {what} over {n_seeds} seeds"
                )
            )
    if any("diverged" in note for note in notes):
        extra.append(
            Line2D(
                [],
                [],
                color="k",
                ls="none",
                **_DIVERGED_MARKER,
                label="run diverged here",
            )
        )
    fig.legend(
        handles=handles + extra,
        loc="outside right center",
        title=_dim_title(ds, line),
        frameon=False,
    )
    fig.suptitle(title if title is not None else str(ds.attrs.get("experiment", "")))
    return fig


def _select(ds, *, line, row, select, average):
    """Apply ``select``, drop size-one dims and reject the remaining extra dims."""
    for dim in (line, row, *select):
        if dim is not None and dim not in ds.dims:
            raise ValueError(
                f"Dimension {dim!r} is not in the dataset, whose dimensions are "
                f"{sorted(map(str, ds.dims))}; pass one of those."
            )
    if line == row or line in ("step", "task") or row in ("step", "task"):
        raise ValueError(
            f"line={line!r} and row={row!r} must be two different run dimensions "
            "(not 'step' or 'task'), e.g. line='width', row='regime'."
        )
    for dim, value in select.items():
        if value not in ds[dim].values:
            raise ValueError(
                f"select={{{dim!r}: {value!r}}} is not a value of {dim!r}, whose "
                f"values are {_values(ds[dim])}; pick one of those."
            )
    ds = ds.sel(dict(select))
    keep = {line, row, average, "step", "task"}
    extra = {d: ds.sizes[d] for d in ds.dims if d not in keep}
    ds = ds.isel({d: 0 for d, size in extra.items() if size == 1})
    extra = {d: _values(ds[d]) for d, size in extra.items() if size > 1}
    if extra:
        raise ValueError(
            f"The dataset has dimensions {sorted(extra)} besides line={line!r}, "
            f"row={row!r} and {average!r}; pass select= to fix each to one value "
            f"(values: {extra}) or draw one of them as line or row."
        )
    return ds


def _reduce_seeds(values: np.ndarray, band: str | None):
    """Mean, lower and upper band of (seed, step) values, ignoring NaN seeds."""
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    ok = count > 0
    zeroed = np.where(finite, values, 0.0)
    mean = np.full(values.shape[1], np.nan)
    mean[ok] = zeroed.sum(axis=0)[ok] / count[ok]
    if band == "std":
        sq = np.where(finite, (values - np.where(ok, mean, 0.0)) ** 2, 0.0)
        std = np.full_like(mean, np.nan)
        std[ok] = np.sqrt(sq.sum(axis=0)[ok] / count[ok])
        return mean, mean - std, mean + std
    low = np.where(ok, np.where(finite, values, np.inf).min(axis=0), np.nan)
    high = np.where(ok, np.where(finite, values, -np.inf).max(axis=0), np.nan)
    return mean, low, high


def _draw_line(ax, da, run_ds, seeds, band, color) -> None:
    """Draw one line of a panel: the seed mean, its band and divergence markers.

    ``da`` has dims ``(seeds, step)`` (or just ``step``); ``run_ds`` is the dataset
    at the same line and row value, read for ``status`` and ``diverged_iteration``.
    """
    steps = np.asarray(da["step"].values, dtype=float)
    dims = (seeds, "step") if seeds else ("step",)
    values = np.asarray(da.transpose(*dims).values, dtype=float).reshape(-1, steps.size)
    mean, low, high = _reduce_seeds(values, band)
    ok = np.isfinite(mean)
    ax.plot(steps[ok], mean[ok], color=color, lw=1.5)
    if band and seeds and values.shape[0] > 1:
        ax.fill_between(steps[ok], low[ok], high[ok], color=color, alpha=0.2, lw=0)

    # one marker per diverged run, at its divergence, on its last finite value
    for k in np.flatnonzero(
        _per_seed(run_ds, "status", seeds).astype(str) == "diverged"
    ):
        at = float(_per_seed(run_ds, "diverged_iteration", seeds, default=-1)[k])
        finite = np.flatnonzero(np.isfinite(values[k]))
        if at >= 0:
            finite = finite[steps[finite] <= at]
        if finite.size:
            x, y, transform = steps[finite[-1]], values[k, finite[-1]], ax.transData
            x = at if at >= 0 else x
        elif at >= 0:  # nothing finite to stand on: mark the bottom of the panel
            x, y, transform = at, 0.02, ax.get_xaxis_transform()
        else:
            continue
        ax.plot(
            [x], [y], color=color, ls="none", transform=transform, **_DIVERGED_MARKER
        )


def _per_seed(run_ds, name, seeds, default=""):
    """Values of run variable ``name`` as a 1-D array over seeds (default if absent)."""
    n = run_ds.sizes[seeds] if seeds else 1
    if name not in run_ds:
        return np.full(n, default, dtype=object)
    da = run_ds[name]
    return np.atleast_1d(da.transpose(seeds).values if seeds else da.values)


def _task_starts(ds: xr.Dataset) -> list[int]:
    """Distinct task-start iterations in ``ds`` (a variable or the attr)."""
    if "task_start" in ds.variables:
        values = np.asarray(ds["task_start"].values, dtype=float).ravel()
    else:
        values = np.asarray(ds.attrs.get("task_start", []), dtype=float).ravel()
    return sorted({int(v) for v in values[np.isfinite(values)]})


def _switches_differ(ds: xr.Dataset, line: str) -> bool:
    """Whether the task starts depend on the line value (e.g. training duration)."""
    if "task_start" not in ds.variables or line not in ds["task_start"].dims:
        return False
    starts = [_task_starts(ds.sel({line: v})) for v in ds[line].values]
    return any(s != starts[0] for s in starts)


def _draw_switches(ax, run_ds, color) -> None:
    """Dashed vertical lines at every switch (every task start after the first)."""
    for start in _task_starts(run_ds)[1:]:
        ax.axvline(start, color=color, ls="--", lw=1.0, zorder=0)


def _finish_axes(ax, da, log, xlim) -> None:
    # the panel's own values decide: the switch lines' and some markers' y are in
    # axes coordinates, positive even when every value is zero (a dead network)
    values = np.asarray(da.values, dtype=float)
    if log and np.any(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    ax.set_ylabel("\n".join(textwrap.wrap(_label(da), 30)))
    ax.grid(alpha=0.3, lw=0.5)
    if xlim[0] < xlim[1]:
        ax.set_xlim(*xlim)


def _label(da: xr.DataArray) -> str:
    """``long_name [units]`` as xarray's ``label_from_attrs``; no ``[1]``."""
    name = str(da.attrs.get("long_name", da.name))
    units = str(da.attrs.get("units", "")).strip()
    return f"{name} [{units}]" if units not in ("", "1") else name


def _colors(values: list) -> list:
    """A sequential colormap ordered by value for numbers, tab10 otherwise."""
    if values and all(isinstance(v, int | float | np.number) for v in values):
        cmap = mpl.colormaps["viridis"]
        order = np.argsort(np.argsort(np.asarray(values, dtype=float)))
        positions = np.linspace(0.0, 0.85, max(len(values), 2))
        return [cmap(positions[o]) for o in order]
    cmap = mpl.colormaps["tab10"]
    return [cmap(i % 10) for i in range(len(values))]


def _value_label(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.3g}"
    return str(value)


def _values(coord: xr.DataArray) -> list:
    """A coordinate's values as plain Python values (for readable messages)."""
    return [v.item() if isinstance(v, np.generic) else v for v in coord.values]


def _line_labels(ds: xr.Dataset, line: str) -> list[str]:
    """Legend labels of the line values, each followed by the values of the other
    coordinates along ``line`` alone (e.g. ``2 (similarity 0.25)`` for ``shared``)."""
    labels = [_value_label(v) for v in ds[line].values]
    for name, coord in ds.coords.items():
        if name != line and coord.dims == (line,):
            for i, value in enumerate(coord.values):
                labels[i] += f" ({name} {_value_label(value)})"
    return labels


def _row_title(dim: str, value) -> str:
    readable = ROW_TITLES.get(dim, {}).get(str(value))
    return readable if readable else f"{dim} = {_value_label(value)}"


def _dim_title(ds: xr.Dataset, dim: str) -> str:
    return str(ds[dim].attrs.get("long_name", dim))


def _run_notes(ds: xr.Dataset, line: str) -> list[str]:
    """Per line value, a legend note on its diverged or missing runs (or "")."""
    notes = [""] * ds.sizes[line]
    if "status" not in ds:
        return notes
    status = ds["status"].astype(str).broadcast_like(ds[line])
    other = [d for d in status.dims if d != line]
    n_runs = int(np.prod([status.sizes[d] for d in other]))
    for word in ("diverged", "missing"):
        counts = (status == word).sum(other) if other else (status == word)
        for i, count in enumerate(counts.transpose(line).values):
            if count:
                notes[i] += f", {int(count)}/{n_runs} {word}"
    return [f" ({note[2:]})" if note else "" for note in notes]

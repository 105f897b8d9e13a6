"""Summaries across runs and experiments: the switch-summary figure and claims table.

* ``plot_switch_summary`` draws, for one experiment, what happens at the first task
  switch against a run parameter: the peak kernel velocity, the spike ratio (peak
  over the pre-switch baseline) and the relative drop of the top eigenvalue, as
  ``ntkcl.claims.switch_measures`` defines them. The class-overlap experiment reads
  them against the class similarity of the two tasks, the class-frequency
  experiment against alpha. One marker per run, a line through the seed means.
* ``combine_claims`` puts the claims tables of every experiment into one table with
  a row per (experiment, claim): how many checks were made, how many hold, and the
  range of the measured values.

``run_rule`` runs the steps of the workflow's ``summary`` and ``claims_table``
rules (the other rules' steps are in ``ntkcl.cli``).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ntkcl import claims

logger = logging.getLogger(__name__)

SUMMARY_PANELS = (
    ("peak_velocity", "peak kernel velocity after the switch [1/iteration]", True),
    ("spike_ratio", "spike ratio: peak / pre-switch median velocity", True),
    ("eigenvalue_drop", "top-eigenvalue drop: 1 - min after / before", False),
)
"""(switch measure, y label, log y axis) of each summary panel, in order."""


def switch_summary(ds: xr.Dataset, switch: int = 1) -> xr.Dataset:
    """The switch measures of every run at one switch, with the run coordinates.

    Args:
        ds: aggregated metrics (``ntkcl.reduce.aggregate``).
        switch: which switch (1: the first, where task 2 starts).

    Returns:
        ``claims.switch_measures(ds)`` at ``switch``, plus the coordinates of ``ds``
        that lie on run dimensions only (e.g. ``similarity`` over ``shared``).
    """
    measures = claims.switch_measures(ds)
    if switch not in measures["switch"].values:
        raise ValueError(
            f"switch={switch} is not a switch of this experiment, whose switches are "
            f"{list(measures['switch'].values)}; pick one of those."
        )
    run_dims = set(claims.run_dims(ds))
    extra = {
        name: coord
        for name, coord in ds.coords.items()
        if name not in ds.dims and coord.dims and set(coord.dims) <= run_dims
    }
    return measures.sel(switch=switch).assign_coords(extra)


def make_summary_figure(
    measures: xr.Dataset,
    x: str,
    *,
    line: str | None = None,
    average: str = claims.SEED,
    title: str | None = None,
) -> Figure:
    """Panels of the switch measures against ``x``, one line per value of ``line``.

    Args:
        measures: one switch's measures over the run dims (``switch_summary``).
        x: a run dimension or a coordinate over run dimensions, e.g. ``alpha`` or
            ``similarity``.
        line: a run dimension drawn as one line per value; default: the one run
            dimension left besides ``x``'s and ``average``, if any.
        average: the dimension whose values are averaged into each line (seeds).
        title: figure title.

    Raises:
        ValueError: ``x`` or ``line`` is not in ``measures``, or more than one run
            dimension is left to draw.
    """
    if x not in measures.coords:
        raise ValueError(
            f"x={x!r} is neither a run dimension nor a coordinate of the switch "
            f"measures, which have {sorted(map(str, measures.coords))}; pick one."
        )
    x_dims = set(measures[x].dims) or {x}
    left = [d for d in measures.dims if d not in x_dims and d != average]
    left = [d for d in left if measures.sizes[d] > 1]
    if line is None and len(left) == 1:
        line = left[0]
    if line is not None and line not in measures.dims:
        raise ValueError(f"line={line!r} is not a run dimension of {x!r}'s measures.")
    if len([d for d in left if d != line]) > 0:
        raise ValueError(
            f"The switch measures vary along {left} besides {x!r}; pass line= with "
            "one of them (and keep the others at a single value)."
        )
    line_values = list(measures[line].values) if line else [None]
    cmap = mpl.colormaps["tab10"]

    fig = Figure(figsize=(3.6 * len(SUMMARY_PANELS) + 1.8, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SUMMARY_PANELS), squeeze=False)[0]
    for ax, (name, label, log) in zip(axes, SUMMARY_PANELS, strict=True):
        for i, value in enumerate(line_values):
            at = measures.sel({line: value}) if line else measures
            xs, ys = _points(at[name], at[x], average)
            color = cmap(i % 10)
            ax.plot(xs.ravel(), ys.ravel(), "o", color=color, alpha=0.45, ms=4)
            order, mean = _seed_mean(xs, ys)
            ax.plot(order, mean, "-", color=color, lw=1.6)
        if log and np.any(np.isfinite(measures[name].values) & (measures[name] > 0)):
            ax.set_yscale("log")
        ax.set_ylabel("\n".join(textwrap.wrap(label, 34)))
        ax.set_xlabel(_x_label(measures[x], x))
        ax.grid(alpha=0.3, lw=0.5)
    handles = [
        Line2D([], [], color=cmap(i % 10), lw=1.6, label=str(v))
        for i, v in enumerate(line_values)
        if line
    ]
    handles += [
        Line2D([], [], color="0.3", ls="none", marker="o", alpha=0.45, label="one run"),
        Line2D([], [], color="0.3", lw=1.6, label=f"mean over {average}s"),
    ]
    fig.legend(
        handles=handles, loc="outside right center", frameon=False, title=line or ""
    )
    iteration = np.nanmax(np.asarray(measures["iteration"].values, dtype=float))
    where = f"at the switch (iteration {iteration:g})"
    if np.unique(measures["iteration"].values).size > 1:
        where = "at the first switch"
    fig.suptitle(f"{title}\n{where}" if title else where)
    return fig


def plot_switch_summary(
    ds: xr.Dataset,
    x: str,
    *,
    out_pdf: str | Path,
    out_png: str | Path,
    title: str | None = None,
    dpi: int = 150,
    **kwargs,
) -> None:
    """Draw the switch summary of aggregated metrics and write it as PDF and PNG.

    Args:
        ds: aggregated metrics.
        x: as ``make_summary_figure``.
        out_pdf, out_png: files to write (parent folders are created).
        title: figure title.
        dpi: resolution of the PNG.
        **kwargs: passed on to ``make_summary_figure`` (``line``, ``average``).
    """
    fig = make_summary_figure(switch_summary(ds), x, title=title, **kwargs)
    for path, options in ((out_pdf, {}), (out_png, {"dpi": dpi})):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, **options)
        logger.info("wrote %s", path)


def combine_claims(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (experiment, claim) over every experiment's claims table.

    Args:
        tables: ``{experiment: table}``, each table as ``claims.check_claims``
            returns it (or read back from its CSV).

    Returns:
        Columns ``experiment``, ``claim``, ``description``, ``checks``, ``hold``,
        ``all_hold``, ``value_min``, ``value_max``, ``comparison``, ``threshold``:
        how many checks were made and held, and the range of the measured values
        next to the threshold they are held against. An experiment with an empty
        table gets no rows.
    """
    rows = []
    for experiment, table in tables.items():
        for claim_id, group in table.groupby("claim", sort=False):
            values = pd.to_numeric(group["value"], errors="coerce")
            holds = group["holds"].astype(str).str.lower() == "true"
            rows.append(
                {
                    "experiment": experiment,
                    "claim": claim_id,
                    "description": group["description"].iloc[0],
                    "checks": len(group),
                    "hold": int(holds.sum()),
                    "all_hold": bool(holds.all()),
                    "value_min": values.min(),
                    "value_max": values.max(),
                    "comparison": group["comparison"].iloc[0],
                    "threshold": group["threshold"].iloc[0],
                }
            )
    columns = [
        "experiment",
        "claim",
        "description",
        "checks",
        "hold",
        "all_hold",
        "value_min",
        "value_max",
        "comparison",
        "threshold",
    ]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------
# workflow steps


def summary_step(metrics_path, out_pdf, out_png, x, title=None) -> None:
    ds = xr.load_dataset(metrics_path, engine="h5netcdf")
    plot_switch_summary(ds, x, out_pdf=out_pdf, out_png=out_png, title=title)


def claims_table_step(csv_paths: Sequence[str], experiments, out_csv) -> None:
    tables = {
        name: pd.read_csv(path)
        for name, path in zip(experiments, csv_paths, strict=True)
    }
    table = combine_claims(tables)
    claims.write_claims(table, out_csv)
    for row in table.itertuples():
        logger.info(
            "%s %s: %d of %d checks hold",
            row.experiment,
            row.claim,
            row.hold,
            row.checks,
        )


STEPS = {
    "summary": lambda smk: summary_step(
        smk.input[0],
        smk.output.pdf,
        smk.output.png,
        smk.params.x,
        title=smk.params.description,
    ),
    "claims_table": lambda smk: claims_table_step(
        list(smk.input), smk.params.experiments, smk.output[0]
    ),
}
"""The rules whose steps this module runs, by rule name."""


def run_rule(smk) -> None:
    """Run the step of the Snakemake rule ``smk.rule`` (one of ``STEPS``).

    Log records (and any error with its traceback) go to the rule's ``log:``.
    """
    from ntkcl.cli import configure_logging

    configure_logging(smk.log[0] if smk.log else None)
    if smk.rule not in STEPS:
        raise ValueError(f"ntkcl.summary has no step for rule {smk.rule!r}.")
    try:
        STEPS[smk.rule](smk)
    except Exception:
        logger.exception("rule %s failed", smk.rule)
        raise


# --- helpers ----------------------------------------------------------------------


def _points(values: xr.DataArray, x: xr.DataArray, average: str):
    """``(x, y)`` arrays of shape ``(points, seeds)`` (one column without seeds)."""
    x = x.broadcast_like(values)
    dims = [d for d in values.dims if d != average]
    if average in values.dims:
        dims.append(average)
    ys = np.asarray(values.transpose(*dims).values, dtype=float)
    xs = np.asarray(x.transpose(*dims).values, dtype=float)
    if average not in values.dims:
        ys, xs = ys[..., None], xs[..., None]
    return xs.reshape(-1, xs.shape[-1]), ys.reshape(-1, ys.shape[-1])


def _seed_mean(xs: np.ndarray, ys: np.ndarray):
    """The mean over the finite seeds at every x, in increasing x."""
    finite = np.isfinite(ys)
    count = finite.sum(axis=1)
    mean = np.where(finite, ys, 0.0).sum(axis=1) / np.maximum(count, 1)
    x = xs[:, 0]
    keep = (count > 0) & np.isfinite(x)
    order = np.argsort(x[keep], kind="stable")
    return x[keep][order], mean[keep][order]


def _x_label(coord: xr.DataArray, name: str) -> str:
    return str(coord.attrs.get("long_name", name))

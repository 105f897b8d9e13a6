"""The paper's checkable claims, measured on an experiment's aggregated metrics.

Two steps. ``switch_measures`` reduces every run and every task switch to a few
numbers (the velocity spike against the pre-switch baseline, the drop and recovery
of the top eigenvalue). ``check_claims`` then judges the claims that apply to the
experiment against the numbers in ``THRESHOLDS``, the one place where every
threshold and window lives, and returns one row per checked (claim, run or group,
switch) with the measured value, the threshold and whether the claim holds.

Definitions (``t_s``: the iteration at which task ``k`` starts, ``t_p`` and ``t_n``
the starts of tasks ``k - 1`` and ``k + 1``; a dump "after the switch" has
``t_s < step <= t_n``, and only dumps where the run has a finite value count):

* velocities measured over a short gap are left out of both the peak and the
  baseline: a dump less than ``velocity_min_gap`` times the run's median gap after
  the previous one (the dump at ``t_s + 1``). Over a single SGD step the kernel
  moves back and forth by more than it drifts, so the per-iteration velocity over
  one iteration is 10 to 30 times that over ten even when nothing changes (the
  class-frequency demo at alpha = 0, where both phases draw from the same
  distribution); the paper's velocity is over steps of 10 iterations.
* peak velocity: max velocity over the first ``spike_window`` dumps after ``t_s``
  (with the default dumps: the first three multiples of ``ntk.every`` after it);
* baseline velocity: median velocity over the dumps with
  ``t_s - baseline_fraction * (t_s - t_p) <= step <= t_s`` (the last fifth of the
  preceding task, including the dump at ``t_s``, whose state predates the switch);
* spike ratio = peak / baseline;
* eigenvalue drop = 1 - min / before, with ``before`` the top eigenvalue at the last
  dump at or before ``t_s`` and ``min`` the least one over the first
  ``drop_window`` dumps after it;
* eigenvalue recovery = (max after that minimum, up to ``t_n`` - min) /
  (before - min): the fraction of the drop won back before the next switch.

Claims judged per run (every seed on its own: a claim "at every width" must hold in
every run, not only on average) are C1, C3, C7 and C11; claims that compare runs
(C2, C6) use the mean over seeds. A run that diverged is kept: its row says so in
``note`` and holds only if its numbers do. A measured value of NaN never holds.

A new claim is one function decorated with ``@claim(id, description, measure)``
that turns ``(ds, measures, thresholds)`` into rows; ``default_claims`` decides
which claims apply to an experiment from its dimensions.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

logger = logging.getLogger(__name__)

VELOCITY = "velocity"
EIGENVALUE = "max_eigenvalue"
SEED = "seed"
NOVELTY_DIMS = ("similarity", "shared")
"""Run dimensions that measure how much task 2 shares with task 1 (C6)."""
FREQUENCY_DIM = "alpha"
"""The run dimension of a class-frequency shift experiment (C7)."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every threshold and window the claims are judged by.

    Attributes:
        spike_window: dumps after a switch searched for the velocity peak.
        baseline_fraction: trailing fraction of the preceding task whose median
            velocity is the baseline.
        min_spike_ratio: C1, C11: peak / baseline must be at least this.
        min_fl_over_lazy: C2: mean peak velocity in feature learning over the one
            in the lazy regime, at matched other parameters, must exceed this.
        drop_window: dumps after a switch searched for the eigenvalue minimum.
        min_eigenvalue_drop: C3: relative drop of the top eigenvalue, at least.
        min_eigenvalue_recovery: C3: fraction of the drop recovered, at least.
        max_novelty_correlation: C6: Spearman correlation between similarity and
            the seed-mean peak velocity (and eigenvalue drop), at most.
        max_frequency_spike_ratio: C7: a frequency shift's spike ratio stays below.
        velocity_min_gap: velocities over fewer iterations than this fraction of
            the run's median gap between dumps are left out of the peak and the
            baseline (see the module docstring); 0 keeps every velocity.
    """

    spike_window: int = 3
    baseline_fraction: float = 0.2
    min_spike_ratio: float = 3.0
    min_fl_over_lazy: float = 1.0
    drop_window: int = 5
    min_eigenvalue_drop: float = 0.05
    min_eigenvalue_recovery: float = 0.5
    max_novelty_correlation: float = -0.8
    max_frequency_spike_ratio: float = 3.0
    velocity_min_gap: float = 0.5


THRESHOLDS = Thresholds()
"""The thresholds used unless a caller passes others."""

COLUMNS = tuple(
    "claim description experiment group switch iteration measure value comparison "
    "threshold holds note".split()
)
_NAN_NOTE = "not measurable: too few finite dumps (or values) in a window"
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class Claim:
    """A checkable claim: ``evaluate(ds, measures, thresholds)`` gives its rows."""

    id: str
    description: str
    measure: str
    evaluate: Callable[[xr.Dataset, xr.Dataset, Thresholds], list[dict]]


CLAIMS: dict[str, Claim] = {}
"""Every known claim by id, in registration order."""


def claim(claim_id: str, description: str, measure: str):
    """Register the decorated function as the evaluator of claim ``claim_id``.

    The function returns a list of dicts with keys ``group`` (a ``{dim: value}``
    dict), ``switch``, ``iteration``, ``value``, ``comparison`` (one of ``>=``,
    ``>``, ``<=``, ``<``), ``threshold`` and optionally ``note``, ``measure``.
    """

    def register(evaluate):
        CLAIMS[claim_id] = Claim(claim_id, description, measure, evaluate)
        return evaluate

    return register


def run_dims(ds: xr.Dataset) -> list[str]:
    """The run-parameter dimensions of an aggregated dataset (all but step, task)."""
    return [str(d) for d in ds.dims if d not in ("step", "task")]


def task_starts(ds: xr.Dataset) -> np.ndarray:
    """Task starts over (*run_dims, task) from a ``task_start`` variable or attr."""
    dims = run_dims(ds)
    shape = tuple(ds.sizes[d] for d in dims)
    if "task_start" in ds.variables:
        da = ds["task_start"].astype(float)
        extra = [d for d in da.dims if d not in dims]
        template = xr.DataArray(np.zeros(shape), {d: ds[d] for d in dims}, dims)
        return da.broadcast_like(template).transpose(*dims, *extra).values
    starts = np.asarray(ds.attrs.get("task_start", [0]), dtype=float).ravel()
    return np.broadcast_to(starts, (*shape, starts.size))


def switch_measures(
    ds: xr.Dataset, thresholds: Thresholds = THRESHOLDS, *, velocity: str = VELOCITY
) -> xr.Dataset:
    """Reduce every run and switch to the numbers the claims are judged on.

    Args:
        ds: aggregated metrics (run dims, ``step``; variables ``velocity`` and
            ``max_eigenvalue``; task starts as a variable or attr).
        thresholds: windows and fractions (see ``Thresholds``).
        velocity: the velocity variable, e.g. ``"velocity_uncentered"``.

    Returns:
        Dataset over (*run_dims, switch), ``switch`` = index of the task that
        starts (1 for the first switch), with variables ``iteration``,
        ``peak_velocity``, ``baseline_velocity``, ``spike_ratio``,
        ``eigenvalue_before``, ``eigenvalue_min``, ``eigenvalue_drop`` and
        ``eigenvalue_recovery``; NaN where a window holds no finite dump.

    Raises:
        ValueError: if a needed variable is missing.
    """
    for name in (velocity, EIGENVALUE):
        if name not in ds.data_vars:
            raise ValueError(
                f"Variable {name!r} is not in the dataset (variables: "
                f"{sorted(map(str, ds.data_vars))}); pass the output of "
                "ntkcl.reduce.aggregate."
            )
    dims = run_dims(ds)
    steps = np.asarray(ds["step"].values, dtype=float)
    vel = ds[velocity].transpose(*dims, "step").values.astype(float)
    lam = ds[EIGENVALUE].transpose(*dims, "step").values.astype(float)
    starts = task_starts(ds)
    n_switch = max(starts.shape[-1] - 1, 0)
    names = _MEASURES
    out = {n: np.full((*vel.shape[:-1], n_switch), np.nan) for n in names}
    for index in np.ndindex(vel.shape[:-1]):
        run_starts = starts[index]
        run_starts = run_starts[np.isfinite(run_starts)]
        for k in range(1, run_starts.size):
            bounds = (run_starts[k - 1], run_starts[k], np.inf)
            if k + 1 < run_starts.size:
                bounds = (*bounds[:2], run_starts[k + 1])
            values = _measure(steps, vel[index], lam[index], bounds, thresholds)
            for n in names:
                out[n][(*index, k - 1)] = values[n]
    coords = {d: ds[d].values for d in dims} | {"switch": np.arange(1, n_switch + 1)}
    return xr.Dataset({n: ((*dims, "switch"), v) for n, v in out.items()}, coords)


_MEASURES = tuple(
    "iteration peak_velocity baseline_velocity spike_ratio eigenvalue_before "
    "eigenvalue_min eigenvalue_drop eigenvalue_recovery".split()
)


def _measure(steps, vel, lam, bounds, th: Thresholds) -> dict[str, float]:
    """The switch numbers of one run; ``bounds`` = (t_p, t_s, t_n)."""
    t_p, t_s, t_n = bounds
    vel = np.where(_regular_gaps(steps, lam, th.velocity_min_gap), vel, np.nan)
    after = (steps > t_s) & (steps <= t_n)
    v_after = vel[after & np.isfinite(vel)][: th.spike_window]
    start = t_s - th.baseline_fraction * (t_s - t_p)
    v_before = vel[(steps >= start) & (steps > t_p) & (steps <= t_s) & np.isfinite(vel)]
    peak = v_after.max() if v_after.size else np.nan
    baseline = np.median(v_before) if v_before.size else np.nan

    lam_before = lam[(steps >= t_p) & (steps <= t_s) & np.isfinite(lam)]
    lam_after = lam[after & np.isfinite(lam)]
    before = lam_before[-1] if lam_before.size else np.nan
    window = lam_after[: th.drop_window]
    low = window.min() if window.size else np.nan
    recovered = np.nan
    if window.size and before > low:
        later = lam_after[int(np.argmin(window)) :]
        recovered = (later.max() - low) / (before - low)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "iteration": t_s,
            "peak_velocity": peak,
            "baseline_velocity": baseline,
            "spike_ratio": np.float64(peak) / np.float64(baseline),
            "eigenvalue_before": before,
            "eigenvalue_min": low,
            "eigenvalue_drop": 1.0 - np.float64(low) / np.float64(before),
            "eigenvalue_recovery": recovered,
        }


def _regular_gaps(steps, lam, min_gap: float) -> np.ndarray:
    """Which dumps of a run follow the previous one by at least ``min_gap`` times
    the run's median gap (its dumps: where it has a top eigenvalue)."""
    dumps = np.flatnonzero(np.isfinite(lam))
    regular = np.ones(steps.shape, dtype=bool)
    if min_gap <= 0 or dumps.size < 2:
        return regular
    gaps = np.diff(steps[dumps])
    regular[dumps[1:]] = gaps >= min_gap * np.median(gaps)
    return regular


def default_claims(ds: xr.Dataset) -> list[str]:
    """The claims that apply to an experiment, read from its dimensions.

    A frequency experiment (an ``alpha`` dimension) gets only C7. Every other gets
    C1 and C3; C2 with a ``regime`` dimension holding ``fl`` and ``lazy``; C11 with
    three tasks or more; C6 with a ``similarity`` or ``shared`` dimension.
    """
    if FREQUENCY_DIM in ds.dims:
        return ["C7"]
    ids = ["C1", "C3"]
    if "regime" in ds.dims and {"fl", "lazy"} <= set(map(str, ds["regime"].values)):
        ids.append("C2")
    if task_starts(ds).shape[-1] >= 3:
        ids.append("C11")
    if any(d in ds.dims for d in NOVELTY_DIMS):
        ids.append("C6")
    return ids


def check_claims(
    ds: xr.Dataset,
    claims: Iterable[str] | None = None,
    thresholds: Thresholds = THRESHOLDS,
    *,
    velocity: str = VELOCITY,
) -> pd.DataFrame:
    """Judge the paper's claims on one experiment's aggregated metrics.

    Args:
        ds: aggregated metrics (see ``switch_measures``).
        claims: claim ids to check; default ``default_claims(ds)``.
        thresholds: the thresholds to judge by; default ``THRESHOLDS``.
        velocity: the velocity variable to use.

    Returns:
        One row per (claim, run or group, switch) with the columns ``COLUMNS``
        followed by one column per run dimension (NaN where the claim pools it).

    Raises:
        ValueError: for an unknown claim id or a missing variable.
    """
    ids = default_claims(ds) if claims is None else list(claims)
    unknown = [i for i in ids if i not in CLAIMS]
    if unknown:
        raise ValueError(
            f"Unknown claim ids {unknown}; the known ones are {list(CLAIMS)}."
        )
    measures = switch_measures(ds, thresholds, velocity=velocity)
    status = ds["status"] if "status" in ds else None
    rows = []
    for claim_id in ids:
        spec = CLAIMS[claim_id]
        for row in spec.evaluate(ds, measures, thresholds):
            group = row.pop("group")
            note = row.pop("note", "")
            if status is not None and set(status.dims) <= set(group):
                if str(_at(status, group).values) == "diverged":
                    note = "; ".join(filter(None, ["run diverged", note]))
            if np.isnan(row["value"]):
                note = "; ".join(filter(None, [note, _NAN_NOTE]))
            rows.append(
                {
                    "claim": claim_id,
                    "description": spec.description,
                    "experiment": ds.attrs.get("experiment", ""),
                    "group": ", ".join(f"{d}={_plain(v)}" for d, v in group.items()),
                    "measure": spec.measure,
                    **row,
                    "holds": _holds(row["value"], row["comparison"], row["threshold"]),
                    "note": note,
                    **{d: _plain(v) for d, v in group.items()},
                }
            )
    extra = [d for d in run_dims(ds) if any(d in r for r in rows)]
    df = pd.DataFrame(rows, columns=[*COLUMNS, *extra])
    for dim in extra:  # integer run values stay integers next to pooled (NA) rows
        if all(isinstance(row[dim], int) for row in rows if dim in row):
            df[dim] = df[dim].astype("Int64")
    logger.info("%d of %d claim checks hold", int(df["holds"].sum()), len(df))
    return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per claim: how many checks were made, how many hold, and whether all do."""
    grouped = df.groupby("claim", sort=False)["holds"]
    out = grouped.agg(checks="size", hold="sum").reset_index()
    out["all_hold"] = out["checks"] == out["hold"]
    return out


def write_claims(df: pd.DataFrame, csv_path: str | Path) -> None:
    """Write a claims table as CSV (parent folders are created)."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, float_format="%.6g")
    logger.info("wrote %s", path)


def _holds(value, comparison: str, threshold: float) -> bool:
    if value is None or np.isnan(value):
        return False
    return bool(_COMPARE[comparison](value, threshold))


def _plain(value):
    """A numpy scalar as a plain Python value (for CSV and group strings)."""
    return value.item() if isinstance(value, np.generic) else value


def _row(group, switch, iteration, value, comparison, threshold, **extra) -> dict:
    """One check: the run or group, the switch, the value and what it must meet."""
    return {
        "group": group,
        "switch": int(switch),
        "iteration": float(iteration),
        "value": float(value),
        "comparison": comparison,
        "threshold": threshold,
        **extra,
    }


def _runs(measures: xr.Dataset, dims: list[str]):
    """Iterate ``({dim: value}, measures at that point)`` over ``dims``."""
    if not dims:
        yield {}, measures
        return
    stacked = measures.stack(_run=dims)
    for i in range(stacked.sizes["_run"]):
        point = stacked.isel(_run=i)
        yield {d: point[d].item() for d in dims}, point


def _at(da: xr.DataArray, group: dict) -> xr.DataArray:
    """``da`` at the run ``group``, ignoring the dimensions it lacks."""
    return da.sel({d: v for d, v in group.items() if d in da.dims})


def _novel_runs(ds: xr.Dataset) -> xr.DataArray | None:
    """False for runs whose next task brings no new class (similarity 1), if known."""
    if "similarity" not in ds.coords or not set(ds["similarity"].dims) <= set(ds.dims):
        return None
    return ds["similarity"] < 1


def _per_run(
    ds, measures, variable, comparison, threshold, *, switches=None, measure=None
) -> list[dict]:
    """One check per run and switch of ``measures[variable]``.

    Runs whose next task brings no new class (a ``similarity`` coordinate equal to
    1) are skipped: no claim says anything changes there.
    """
    novel = _novel_runs(ds)
    extra = {"measure": measure} if measure else {}
    rows = []
    for group, point in _runs(measures, run_dims(ds)):
        if novel is not None and not bool(_at(novel, group)):
            continue
        for k in measures["switch"].values if switches is None else switches:
            at = point.sel(switch=k)
            if np.isfinite(at["iteration"].item()):
                value = at[variable].item()
                row = _row(group, k, at["iteration"], value, comparison, threshold)
                rows.append(row | extra)
    return rows


_SPIKE = "max velocity in the first spike_window dumps after the switch / median "
_SPIKE += "velocity over the last baseline_fraction of the preceding task"


@claim("C1", "kernel velocity spikes at the first task switch, in every run", _SPIKE)
def _c1(ds, measures, th):
    first = [1] if measures.sizes["switch"] else []
    return _per_run(
        ds, measures, "spike_ratio", ">=", th.min_spike_ratio, switches=first
    )


@claim("C11", "kernel velocity spikes at every task switch of a sequence", _SPIKE)
def _c11(ds, measures, th):
    return _per_run(ds, measures, "spike_ratio", ">=", th.min_spike_ratio)


@claim("C7", "a class-frequency shift does not make the kernel velocity spike", _SPIKE)
def _c7(ds, measures, th):
    return _per_run(ds, measures, "spike_ratio", "<", th.max_frequency_spike_ratio)


@claim(
    "C3",
    "the top eigenvalue drops after the switch, then recovers",
    "eigenvalue drop and recovery (see the module docstring)",
)
def _c3(ds, measures, th):
    drop = "1 - min over the first drop_window dumps after the switch / last before"
    recovery = "(max after that minimum - min) / (before - min)"
    return _per_run(
        ds, measures, "eigenvalue_drop", ">=", th.min_eigenvalue_drop, measure=drop
    ) + _per_run(
        ds,
        measures,
        "eigenvalue_recovery",
        ">=",
        th.min_eigenvalue_recovery,
        measure=recovery,
    )


def _seed_mean(da: xr.DataArray) -> xr.DataArray:
    """Mean over ``seed`` ignoring NaN seeds (NaN where every seed is NaN)."""
    if SEED not in da.dims:
        return da
    finite = np.isfinite(da)
    with np.errstate(invalid="ignore", divide="ignore"):
        return da.where(finite, 0.0).sum(SEED) / finite.sum(SEED)


@claim(
    "C2",
    "the velocity spike is larger in feature learning than in the lazy regime",
    "seed-mean peak velocity (fl) / seed-mean peak velocity (lazy), matched runs",
)
def _c2(ds, measures, th):
    peak = _seed_mean(measures["peak_velocity"])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = peak.sel(regime="fl") / peak.sel(regime="lazy")
    iteration = _seed_mean(measures["iteration"]).sel(regime="fl")
    note = "equal peaks: are the regimes identical at this width?"
    rows = []
    dims = [d for d in run_dims(ds) if d not in ("regime", SEED)]
    for group, point in _runs(xr.Dataset({"r": ratio, "i": iteration}), dims):
        for k in point["switch"].values:
            at = point.sel(switch=k)
            value = at["r"].item()
            row = _row(group, k, at["i"], value, ">", th.min_fl_over_lazy)
            rows.append(row | {"note": note if value == 1.0 else ""})
    return rows


@claim(
    "C6",
    "the more task 2 shares with task 1, the smaller the change at the switch",
    "Spearman correlation of similarity with the seed-mean change",
)
def _c6(ds, measures, th):
    dim = next(d for d in NOVELTY_DIMS if d in ds.dims)
    changes = {
        "peak velocity": _seed_mean(measures["peak_velocity"]),
        "eigenvalue drop": _seed_mean(measures["eigenvalue_drop"]),
    }
    rows = []
    dims = [d for d in run_dims(ds) if d not in (dim, SEED)]
    for group, point in _runs(xr.Dataset(changes).sel(switch=1), dims):
        x = np.asarray(point[dim].values, dtype=float)
        for name, da in point.items():
            measure = f"Spearman correlation of {dim} with the seed-mean {name}"
            rho = _spearman(x, da.values)
            limit = th.max_novelty_correlation
            rows.append(_row(group, 1, np.nan, rho, "<=", limit, measure=measure))
    return rows


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of the finite pairs; NaN below 3 pairs or if flat."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return np.nan
    rx = pd.Series(x[ok]).rank().to_numpy()
    ry = pd.Series(y[ok]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return np.nan
    # rounded: with few values rho is a simple fraction (-0.8 for 4 values and
    # one swapped pair) that must compare equal to a threshold of the same value
    return round(float(np.corrcoef(rx, ry)[0, 1]), 12)

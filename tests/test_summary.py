"""Tests of ntkcl.summary: the switch-summary figure and the combined claims table."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from ntkcl import claims, summary

STEPS = np.array(sorted({*range(0, 201, 10), 101}))


def overlap_metrics(shared=(0, 1, 3, 5), seeds=(0, 1), regimes=None) -> xr.Dataset:
    """Aggregated metrics whose spike and eigenvalue dip shrink as ``shared`` grows.

    Task 2 starts at iteration 100; run ``(k, seed)`` spikes by ``20 * (5 - k)``
    and its top eigenvalue dips by ``0.06 * (5 - k)``. A ``similarity``
    coordinate over ``shared`` is ``k / (10 - k)``, as ``reduce.aggregate`` adds.
    """
    run = {"shared": list(shared), "seed": list(seeds)}
    if regimes:
        run = {"regime": list(regimes), **run}
    shape = tuple(len(v) for v in run.values())
    k = np.reshape(shared, (1,) * (len(shape) - 2) + (-1, 1, 1))
    since = np.clip(STEPS - 100, 0, None)
    after = STEPS > 100
    velocity = 1e-3 * (1 + after * 20 * (5 - k) * np.exp(-since / 10))
    eigenvalue = 50 * (1 - after * 0.06 * (5 - k) * np.exp(-np.maximum(since, 1) / 30))
    velocity = np.broadcast_to(velocity, (*shape, STEPS.size)).copy()
    velocity[..., 0] = np.nan
    eigenvalue = np.broadcast_to(eigenvalue, (*shape, STEPS.size))
    dims = (*run, "step")
    similarity = np.asarray(shared) / (10 - np.asarray(shared))
    return xr.Dataset(
        {
            "velocity": (dims, velocity, {"units": "1/iteration"}),
            "max_eigenvalue": (dims, eigenvalue),
            "task_start": ((*run, "task"), np.broadcast_to([0.0, 100.0], (*shape, 2))),
        },
        coords={
            **run,
            "step": STEPS,
            "task": [0, 1],
            "similarity": ("shared", similarity, {"long_name": "class similarity"}),
        },
        attrs={"experiment": "class_overlap", "task_start": [0, 100]},
    )


def test_switch_summary_keeps_run_coordinates():
    measures = summary.switch_summary(overlap_metrics())
    assert set(measures.dims) == {"shared", "seed"}
    assert measures["similarity"].dims == ("shared",)
    peak = measures["peak_velocity"].sel(seed=0).values
    assert np.all(np.diff(peak) < 0)  # less novelty, smaller spike
    with pytest.raises(ValueError, match="not a switch"):
        summary.switch_summary(overlap_metrics(), switch=2)


def test_summary_figure_against_a_coordinate_and_a_dimension():
    ds = overlap_metrics()
    fig = summary.make_summary_figure(summary.switch_summary(ds), "similarity")
    axes = fig.get_axes()
    assert len(axes) == len(summary.SUMMARY_PANELS)
    assert axes[0].get_xlabel() == "class similarity"
    assert axes[0].get_yscale() == "log" and axes[2].get_yscale() == "linear"
    markers, mean = axes[2].get_lines()
    assert len(markers.get_xdata()) == 4 * 2  # one marker per run
    np.testing.assert_allclose(mean.get_xdata(), [0, 1 / 9, 3 / 7, 1])
    drop = 1 - (1 - 0.06 * 5 * np.exp(-1 / 30))
    assert mean.get_ydata()[0] == pytest.approx(drop)

    # against a run dimension, one line per value of the remaining dimension
    ds = overlap_metrics(regimes=("fl", "lazy"))
    fig = summary.make_summary_figure(summary.switch_summary(ds), "shared")
    assert len(fig.get_axes()[0].get_lines()) == 2 * 2
    with pytest.raises(ValueError, match="neither a run dimension"):
        summary.make_summary_figure(summary.switch_summary(ds), "alpha")


def test_plot_switch_summary_writes_files(tmp_path):
    pdf, png = tmp_path / "s.pdf", tmp_path / "s.png"
    summary.plot_switch_summary(
        overlap_metrics(), "similarity", out_pdf=pdf, out_png=png, title="overlap"
    )
    assert pdf.read_bytes().startswith(b"%PDF")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_combine_claims_counts_checks_per_experiment_and_claim(tmp_path):
    table = claims.check_claims(overlap_metrics())
    path = tmp_path / "class_overlap.csv"
    claims.write_claims(table, path)
    combined = summary.combine_claims({"class_overlap": pd.read_csv(path)})
    assert list(combined["claim"]) == ["C1", "C3", "C6"]
    c1 = combined.set_index("claim").loc["C1"]
    # the runs with similarity 1 (shared = 5) bring no new class: not checked
    assert c1["checks"] == 3 * 2 and c1["hold"] == 6 and c1["all_hold"]
    c1_values = table.query("claim == 'C1'")["value"]
    assert c1["value_min"] == pytest.approx(c1_values.min(), rel=1e-5)  # %.6g CSV
    c6 = combined.set_index("claim").loc["C6"]
    assert c6["checks"] == 2 and c6["value_max"] == pytest.approx(-1.0)
    assert summary.combine_claims({}).empty

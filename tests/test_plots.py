"""Tests of ntkcl.plots on small synthetic aggregated metrics."""

import numpy as np
import pytest
import xarray as xr

from ntkcl import plots

WIDTHS = [64, 256, 1024]
REGIMES = ["fl", "lazy"]
SEEDS = [0, 1]
STARTS = [0, 100]
STEPS = np.array(sorted({*range(0, 201, 10), 101}))


def aggregated(extra: dict | None = None, diverged: bool = False) -> xr.Dataset:
    """Aggregated metrics laid out as reduce.aggregate writes them.

    The velocity spikes right after the switch at iteration 100; one run (width
    1024, fl, seed 1) diverges at iteration 150 when ``diverged``.
    """
    extra = extra or {}
    run = {"width": WIDTHS, "regime": REGIMES, "seed": SEEDS} | extra
    shape = tuple(len(v) for v in run.values())
    dims = (*run, "step")
    t = np.broadcast_to(STEPS.astype(float), (*shape, STEPS.size))
    width = np.reshape(WIDTHS, (-1,) + (1,) * len(shape))
    since = np.clip(t - STARTS[1], 0, None)
    spike = (t > STARTS[1]) * 20 * np.exp(-since / 10)
    velocity = 1e-3 * (1 + spike)
    velocity[..., 0] = np.nan
    metrics = {
        "max_eigenvalue": width * (1 - 0.3 * (t > 100) * np.exp(-since / 30)),
        "distance_from_init": np.cumsum(np.nan_to_num(velocity), axis=-1),
        "alignment": 0.5
        + 0.2 * np.tanh(t / 50)
        - 0.3 * (t > 100) * np.exp(-since / 40),
        "velocity": velocity,
    }
    status = np.full(shape, "complete", dtype=object)
    diverged_at = np.full(shape, -1)
    if diverged:
        status[2, 0, 1] = "diverged"
        diverged_at[2, 0, 1] = 150
        for values in metrics.values():
            values[2, 0, 1, STEPS > 150] = np.nan
    units = {"velocity": "1/iteration"}
    data = {
        name: (
            dims,
            values,
            {"long_name": name.replace("_", " "), "units": units.get(name, "1")},
        )
        for name, values in metrics.items()
    }
    accuracy = np.stack([np.tanh(t / 50), np.tanh(np.clip(t - 100, 0, None) / 50)], -1)
    data |= {
        "accuracy": ((*dims, "task"), accuracy, {"long_name": "accuracy"}),
        "status": (tuple(run), status.astype(str)),
        "diverged_iteration": (tuple(run), diverged_at),
        "task_start": ((*run, "task"), np.broadcast_to(STARTS, (*shape, 2)) * 1.0),
    }
    coords = {name: (name, values, {"long_name": name}) for name, values in run.items()}
    coords |= {"step": STEPS, "task": [0, 1]}
    attrs = {"experiment": "width_regime", "task_start": STARTS}
    return xr.Dataset(data, coords, attrs)


def test_plot_experiment_writes_pdf_and_png(tmp_path):
    pdf, png = tmp_path / "fig" / "f.pdf", tmp_path / "fig" / "f.png"
    plots.plot_experiment(
        aggregated(), line="width", row="regime", out_pdf=pdf, out_png=png
    )
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000


def test_figure_has_four_panels_per_row():
    fig = plots.make_figure(aggregated(), line="width", row="regime")
    assert len(fig.axes) == 2 * len(plots.DEFAULT_PANELS) == 8
    one_row = plots.make_figure(aggregated(), line="width", select={"regime": "fl"})
    assert len(one_row.axes) == 4


def test_panels_are_labelled_scaled_and_show_the_switch():
    fig = plots.make_figure(aggregated(), line="width", row="regime")
    by_label = {ax.get_ylabel().replace("\n", " "): ax for ax in fig.axes[:4]}
    assert by_label["velocity [1/iteration]"].get_yscale() == "log"
    assert by_label["max eigenvalue"].get_yscale() == "log"
    assert by_label["distance from init"].get_yscale() == "linear"
    for ax in fig.axes:
        vertical = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [100, 100]]
        assert len(vertical) == 1
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert titles == ["feature learning", "lazy"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["64", "256", "1024"]
    assert "task switch" in legend
    assert "band: min-max over 2 seeds" in legend


def test_diverged_run_is_marked_not_dropped():
    fig = plots.make_figure(aggregated(diverged=True), line="width", row="regime")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "1024 (1/4 diverged)" in legend and "run diverged here" in legend
    markers = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "x"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [150.0]


@pytest.mark.parametrize("value", [0.0, np.nan])
def test_a_log_panel_without_positive_values_stays_linear(value, tmp_path):
    # a dead network's kernel does not move: velocity 0 (or no velocity at all)
    ds = aggregated(diverged=True)
    ds["velocity"][:] = value
    fig = plots.make_figure(ds, line="width", row="regime")
    by_label = {ax.get_ylabel().replace("\n", " "): ax for ax in fig.axes[:4]}
    assert by_label["velocity [1/iteration]"].get_yscale() == "linear"
    assert by_label["max eigenvalue"].get_yscale() == "log"
    fig.savefig(tmp_path / "f.png")  # where a log axis without data used to fail


def test_extra_dimension_raises_unless_selected():
    ds = aggregated(extra={"lr": [0.01, 0.1]})
    with pytest.raises(ValueError, match=r"\['lr'\].*select="):
        plots.make_figure(ds, line="width", row="regime")
    fig = plots.make_figure(ds, line="width", row="regime", select={"lr": 0.1})
    assert len(fig.axes) == 8


def test_size_one_dimension_is_dropped():
    ds = aggregated(extra={"arch": ["mlp"]})
    assert len(plots.make_figure(ds, line="width", row="regime").axes) == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"line": "depth"}, "'depth' is not in the dataset"),
        ({"line": "width", "row": "width"}, "two different run dimensions"),
        ({"line": "width", "row": "regime", "panels": ["nope"]}, "nope"),
        ({"line": "width", "row": "regime", "band": "iqr"}, "band='iqr'"),
        ({"line": "width", "row": "regime", "select": {"seed": 7}}, "not a value"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.make_figure(aggregated(), **kwargs)


def test_std_band_and_task_panel():
    fig = plots.make_figure(
        aggregated(),
        line="regime",
        row="width",
        band="std",
        panels=["accuracy", "velocity"],
    )
    assert len(fig.axes) == 3 * 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "band: mean ± 1 std over 2 seeds" in legend
    assert fig.subfigs[0]._suptitle.get_text() == "width = 64"


def test_switches_drawn_per_line_when_they_differ():
    ds = aggregated(extra={"duration": [60, 100]}).sel(regime="fl", width=64)
    starts = np.zeros((2, 2, 2))
    starts[..., 1] = [[60, 100], [60, 100]]  # (seed, duration, task)
    ds["task_start"] = (("seed", "duration", "task"), starts)
    fig = plots.make_figure(ds, line="duration")
    vertical = [ln for ln in fig.axes[0].get_lines() if len(set(ln.get_xdata())) == 1]
    assert sorted(ln.get_xdata()[0] for ln in vertical) == [60, 100]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "task switch (in the line's colour)" in legend


def test_legend_shows_coordinates_along_the_line_dimension():
    ds = aggregated(extra={"shared": [0, 3]}).sel(regime="fl", width=64)
    ds = ds.assign_coords(similarity=("shared", [0.0, 3 / 7]))
    fig = plots.make_figure(ds, line="shared")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "0 (similarity 0)" in legend and "3 (similarity 0.429)" in legend


def test_one_seed_is_said_and_gets_no_band():
    fig = plots.make_figure(aggregated().isel(seed=[0]), line="width", row="regime")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "line: one seed" in legend
    assert not any(text.startswith("band") for text in legend)

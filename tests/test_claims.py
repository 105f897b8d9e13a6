"""Tests of ntkcl.claims on small synthetic aggregated metrics."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from ntkcl import claims, config

EVERY, TASK = 10, 100


def aggregated(
    spikes=(20.0,), drop=0.3, n_tasks=2, run=None, amplitude=None
) -> xr.Dataset:
    """Aggregated metrics of runs with a velocity spike and an eigenvalue dip.

    Task ``k`` starts at ``k * TASK``; dumps every ``EVERY`` iterations plus one
    right after each switch. Within a task the velocity is a constant 1e-3; after
    switch ``k`` it is 1e-3 * (1 + spikes[k - 1] * exp(-(t - t_s) / 10)) and the
    top eigenvalue dips by ``drop`` and recovers with time constant 30.
    ``amplitude(coords) -> factor`` scales the spike per run.
    """
    run = run or {"width": [64, 256], "regime": ["fl", "lazy"], "seed": [0, 1]}
    starts = [k * TASK for k in range(n_tasks)]
    steps = np.array(
        sorted(
            {*range(0, n_tasks * TASK + 1, EVERY), *starts[1:]}
            | {s + 1 for s in starts[1:]}
        )
    )
    shape = tuple(len(v) for v in run.values())
    velocity = np.full((*shape, steps.size), 1e-3)
    eigenvalue = np.full((*shape, steps.size), 50.0)
    for index in np.ndindex(shape):
        coords = {
            d: values[i] for (d, values), i in zip(run.items(), index, strict=True)
        }
        scale = amplitude(coords) if amplitude else 1.0
        for k, start in enumerate(starts[1:]):
            since = steps - start
            after = since > 0
            spike = spikes[k % len(spikes)] * scale
            velocity[index] *= 1 + after * spike * np.exp(-np.clip(since, 0, None) / 10)
            eigenvalue[index] *= 1 - after * drop * np.exp(
                -np.clip(since, 1, None) / 30
            )
    velocity[..., 0] = np.nan
    dims = (*run, "step")
    return xr.Dataset(
        {
            "velocity": (dims, velocity, {"long_name": "kernel velocity"}),
            "max_eigenvalue": (dims, eigenvalue, {"long_name": "top eigenvalue"}),
            "status": (tuple(run), np.full(shape, "complete")),
            "task_start": (
                (*run, "task"),
                np.broadcast_to(starts, (*shape, n_tasks)) * 1.0,
            ),
        },
        coords={**run, "step": steps, "task": np.arange(n_tasks)},
        attrs={"experiment": "synthetic", "task_start": starts},
    )


def test_claims_hold_on_a_spiking_set():
    lazy_smaller = lambda c: 0.5 if c["regime"] == "lazy" else 1.0  # noqa: E731
    df = claims.check_claims(aggregated(amplitude=lazy_smaller))
    assert list(df["claim"].unique()) == ["C1", "C3", "C2"]
    assert df["holds"].all(), df[~df["holds"]]
    c1 = df[df["claim"] == "C1"]
    assert len(c1) == 2 * 2 * 2 and set(c1["iteration"]) == {100.0}
    assert list(df.columns[: len(claims.COLUMNS)]) == list(claims.COLUMNS)
    assert c1["seed"].dtype == "Int64"


def test_claims_fail_on_a_flat_set():
    df = claims.check_claims(aggregated(spikes=(0.0,), drop=0.0))
    for claim_id in ("C1", "C3"):
        assert not df[df["claim"] == claim_id]["holds"].any()
    assert np.allclose(df[df["claim"] == "C1"]["value"], 1.0)


def test_spike_ratio_and_eigenvalue_numbers_by_hand():
    measures = claims.switch_measures(aggregated(spikes=(4.0,), drop=0.5))
    at = measures.isel(width=0, regime=0, seed=0).sel(switch=1)
    # the peak is the first dump after the switch over a full gap (iteration 110,
    # not 101, one iteration after the switch): 1 + 4 e^{-10/10}
    assert at["spike_ratio"].item() == pytest.approx(1 + 4 * np.exp(-1))
    assert at["baseline_velocity"].item() == pytest.approx(1e-3)
    assert at["eigenvalue_drop"].item() == pytest.approx(0.5 * np.exp(-1 / 30))
    # recovered by iteration 200: 1 - e^{-100/30} of the dip (the dip is e^{-1/30})
    low = 50 * (1 - 0.5 * np.exp(-1 / 30))
    recovered = (50 * (1 - 0.5 * np.exp(-100 / 30)) - low) / (50 - low)
    assert at["eigenvalue_recovery"].item() == pytest.approx(recovered)


def test_thresholds_come_from_one_place():
    df = claims.check_claims(aggregated(spikes=(8.0,)), claims=["C1"])
    assert (df["threshold"] == claims.THRESHOLDS.min_spike_ratio).all()
    assert df["holds"].all()  # 1 + 8 e^{-1} = 3.94 >= 3
    strict = dataclasses.replace(claims.THRESHOLDS, min_spike_ratio=5.0)
    df = claims.check_claims(aggregated(spikes=(8.0,)), ["C1"], strict)
    assert (df["threshold"] == 5.0).all() and not df["holds"].any()
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.THRESHOLDS.min_spike_ratio = 1.0


def test_velocity_over_one_iteration_is_left_out_of_the_spike():
    """Over one SGD step the kernel moves back and forth: the per-iteration
    velocity right after the switch (iteration 101) is high even without a shift."""
    ds = aggregated(spikes=(0.0,), run={"alpha": [0.0], "seed": [0]})
    ds["velocity"].loc[{"step": 101}] = 30e-3  # 30 times the 10-iteration velocity
    at = claims.switch_measures(ds).sel(switch=1).isel(alpha=0, seed=0)
    assert at["spike_ratio"].item() == pytest.approx(1.0)
    assert claims.check_claims(ds)["holds"].all()  # C7: no spike
    keep = dataclasses.replace(claims.THRESHOLDS, velocity_min_gap=0.0)
    at = claims.switch_measures(ds, keep).sel(switch=1).isel(alpha=0, seed=0)
    assert at["spike_ratio"].item() == pytest.approx(30.0)


def test_c2_compares_regimes_on_the_seed_mean():
    lazy_bigger = lambda c: 2.0 if c["regime"] == "lazy" else 1.0  # noqa: E731
    df = claims.check_claims(aggregated(amplitude=lazy_bigger), claims=["C2"])
    assert list(df["group"]) == ["width=64", "width=256"]
    assert not df["holds"].any() and (df["value"] < 1).all()


def test_c11_checks_every_switch_of_a_sequence():
    ds = aggregated(spikes=(20.0, 20.0, 0.0), n_tasks=4)
    assert "C11" in claims.default_claims(ds)
    df = claims.check_claims(ds, claims=["C1", "C11"])
    assert df[df["claim"] == "C1"]["holds"].all()
    c11 = df[df["claim"] == "C11"]
    assert sorted(set(c11["switch"])) == [1, 2, 3]
    assert c11[c11["switch"] < 3]["holds"].all()
    assert not c11[c11["switch"] == 3]["holds"].any()


def test_diverged_run_is_kept_and_fails():
    ds = aggregated()
    ds["status"][0, 0, 1] = "diverged"
    ds["velocity"][0, 0, 1, ds["step"].values > 50] = np.nan
    ds["max_eigenvalue"][0, 0, 1, ds["step"].values > 50] = np.nan
    df = claims.check_claims(ds, claims=["C1"])
    row = df[df["group"] == "width=64, regime=fl, seed=1"].iloc[0]
    assert not row["holds"] and np.isnan(row["value"])
    assert "run diverged" in row["note"] and "not measurable" in row["note"]
    assert df.drop(index=row.name)["holds"].all()


def test_frequency_and_overlap_experiments():
    freq = aggregated(spikes=(0.5,), run={"alpha": [0.0, 0.5, 1.0], "seed": [0]})
    assert claims.default_claims(freq) == ["C7"]
    assert claims.check_claims(freq)["holds"].all()

    run = {"similarity": [0.0, 0.25, 0.667, 1.0], "seed": [0, 1]}
    less_new = lambda c: 1.0 - c["similarity"]  # noqa: E731
    overlap = aggregated(run=run, amplitude=less_new)
    df = claims.check_claims(overlap, claims=["C1", "C6"])
    c1 = df[df["claim"] == "C1"]  # similarity 1 brings no new class: skipped
    assert sorted(set(c1["similarity"])) == [0.0, 0.25, 0.667]
    c6 = df[df["claim"] == "C6"]
    assert len(c6) == 2 and c6.iloc[0]["value"] == pytest.approx(-1.0)
    assert c6.iloc[0]["holds"]


EXPECTED_CLAIMS = {
    "width_regime": ["C1", "C3", "C2"],
    "width_regime_cnn": ["C1", "C3", "C2"],
    "class_overlap": ["C1", "C3", "C6"],
    "class_frequency": ["C7"],
    "learning_rate": ["C1", "C3"],
    "training_duration": ["C1", "C3"],
    "multitask_cifar10": ["C1", "C3", "C2", "C11"],
    "multitask_cifar100": ["C1", "C3", "C2", "C11"],
    "imagenet100": ["C1", "C3", "C2"],
}


def test_every_configured_experiment_gets_the_claims_that_apply(repo):
    """The claims picked from each experiment's run dims and number of tasks."""
    cfg = config.load_config(repo / "config.yaml")
    assert set(cfg["experiments"]) == set(EXPECTED_CLAIMS)
    for name, runs in config.expand_runs(cfg, "paper").items():
        dims = {}  # as reduce.aggregate lays them out: lists read 250x2000
        for dim in runs[0]["params"]:
            values = [run["params"][dim] for run in runs]
            values = [
                "x".join(map(str, v)) if isinstance(v, list) else v for v in values
            ]
            dims[dim] = list(dict.fromkeys(values))
        ds = aggregated(run=dims, n_tasks=len(runs[0]["tasks"]["classes"]))
        assert claims.default_claims(ds) == EXPECTED_CLAIMS[name], name


def test_a_new_claim_plugs_in(monkeypatch):
    monkeypatch.setattr(claims, "CLAIMS", dict(claims.CLAIMS))

    @claims.claim("X1", "the baseline velocity is positive", "median velocity")
    def _x1(ds, measures, th):
        return [
            claims._row(
                group,
                1,
                point.sel(switch=1)["iteration"],
                point.sel(switch=1)["baseline_velocity"],
                ">",
                0.0,
            )
            for group, point in claims._runs(measures, claims.run_dims(ds))
        ]

    df = claims.check_claims(aggregated(), claims=["X1"])
    assert len(df) == 8 and df["holds"].all()
    assert set(df["description"]) == {"the baseline velocity is positive"}


def test_unknown_claim_and_missing_variable_raise():
    with pytest.raises(ValueError, match="Unknown claim ids \\['C99'\\]"):
        claims.check_claims(aggregated(), claims=["C99"])
    with pytest.raises(ValueError, match="'velocity' is not in the dataset"):
        claims.check_claims(aggregated().drop_vars("velocity"))


def test_write_claims_round_trip(tmp_path):
    df = claims.check_claims(aggregated(), claims=["C1", "C3"])
    path = tmp_path / "claims" / "synthetic.csv"
    claims.write_claims(df, path)
    back = pd.read_csv(path)
    assert list(back.columns) == list(df.columns)
    assert back["holds"].tolist() == df["holds"].tolist()
    summary = claims.summarise(df)
    assert summary.set_index("claim")["all_hold"].all()

"""Reduction of kernel archives (built in memory) and aggregation over runs."""

import json
import math

import numpy as np
import pytest
import xarray as xr

from ntkcl import metrics, reduce

N, K, STEPS = 6, 3, np.array([0, 10, 20, 21, 30])
LABELS = np.array([0, 1, 2, 0, 1, 2])
KERNEL_DIMS = {
    "trace": ("sample_1", "sample_2"),
    "diagonal": ("sample_1", "sample_2", "logit_1"),
    "full": ("sample_1", "sample_2", "logit_1", "logit_2"),
}


def full_kernels(steps, seed=0):
    """(T, n, n, K, K) PSD kernels from Jacobians drifting over the dumps."""
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((N, K, 8))
    out = []
    for _ in range(steps):
        jac = jac + 0.3 * rng.standard_normal(jac.shape)
        out.append(np.einsum("iap,jbp->ijab", jac, jac))
    return np.array(out)


def make_archive(kind="full", steps=STEPS, params=None, status="complete", seed=0):
    """An archive Dataset with the layout of the interfaces file."""
    full = full_kernels(len(steps), seed)
    kernel = {
        "trace": np.einsum("tijaa->tij", full),
        "diagonal": np.einsum("tijaa->tija", full),
        "full": full,
    }[kind].astype(np.float32)
    params = params or {"width": 64, "seed": 0}
    accuracy = np.linspace(0.1, 0.9, len(steps) * 2).reshape(len(steps), 2)
    coords = {
        "step": ("step", np.asarray(steps, dtype=np.int64)),
        "sample_1": ("sample_1", np.arange(N) * 3),
        "sample_2": ("sample_2", np.arange(N) * 3),
        "logit_1": ("logit_1", np.arange(K)),
        "logit_2": ("logit_2", np.arange(K)),
        "task": ("task", np.arange(2)),
        "active_task": ("step", (np.asarray(steps) > 20).astype(np.int64)),
        "wall_time": ("step", np.arange(len(steps), dtype=float)),
    }
    data = {
        "ntk": (
            ("step",) + KERNEL_DIMS[kind],
            kernel,
            {"kind": kind, "long_name": "empirical NTK", "units": "1"},
        ),
        "probe_label": ("sample_1", LABELS),
        "logits": (("step", "sample_1", "logit_1"), np.zeros((len(steps), N, K))),
        "accuracy": (("step", "task"), accuracy),
        "train_loss": ("step", np.r_[np.nan, np.ones(len(steps) - 1)]),
        "task_start": ("task", np.array([0, 20])),
    }
    attrs = {
        "format_version": 1,
        "run_id": "-".join(f"{k}{v}" for k, v in params.items()),
        "experiment": "width_regime",
        "params_json": json.dumps(params),
        "config_json": "{}",
        "kernel_kind": kind,
        "seed": 0,
        "status": status,
        "diverged_iteration": -1 if status != "diverged" else int(steps[-1]) + 3,
    }
    return xr.Dataset(data, coords, attrs)


@pytest.mark.parametrize("kind", ["trace", "diagonal", "full"])
def test_reduce_matches_metrics(kind):
    archive = make_archive(kind)
    reduced = reduce.reduce_archive(archive)
    blocks = 1 if kind == "trace" else K
    matrices = [
        metrics.kernel_matrix(archive["ntk"].values[t], kind) for t in range(len(STEPS))
    ]
    labels = metrics.one_hot(LABELS, np.arange(K))
    # independent centring: the explicit I_K ⊗ H matrix
    centring = np.kron(np.eye(blocks), np.eye(N) - np.ones((N, N)) / N)
    for t, matrix in enumerate(matrices):
        row = reduced.isel(step=t)
        assert row["max_eigenvalue"] == pytest.approx(
            np.linalg.eigvalsh(matrix)[-1], rel=1e-10
        )
        assert row["kernel_trace"] == pytest.approx(np.trace(matrix))
        first = centring @ matrices[0] @ centring
        current = centring @ matrix @ centring
        cka = np.sum(first * current) / np.linalg.norm(first) / np.linalg.norm(current)
        assert row["distance_from_init"] == pytest.approx(1 - cka, abs=1e-12)
        assert row["distance_from_init_uncentered"] == pytest.approx(
            metrics.kernel_distance(matrices[0], matrix, centered=False), abs=1e-12
        )
        assert row["alignment"] == pytest.approx(
            metrics.label_alignment(matrix, labels), rel=1e-12
        )
        if t:
            distance = metrics.kernel_distance(
                matrices[t - 1], matrix, num_logits=blocks
            )
            assert row["distance_to_previous"] == pytest.approx(distance, abs=1e-12)
            assert row["velocity"] == pytest.approx(
                distance / (STEPS[t] - STEPS[t - 1]), abs=1e-12
            )
    assert reduced["distance_from_init"][0] == pytest.approx(0, abs=1e-12)
    assert reduced["distance_to_previous"][1:].notnull().all()
    assert (
        reduced["velocity"].isnull()[0] and reduced["velocity_uncentered"].isnull()[0]
    )


def test_reduce_layout_and_attrs():
    archive = make_archive("trace")
    reduced = reduce.reduce_archive(archive)
    assert dict(reduced.sizes) == {"step": len(STEPS), "task": 2}
    assert reduced["accuracy"].dims == ("step", "task")
    np.testing.assert_array_equal(reduced["active_task"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(reduced["step"], STEPS)
    for name, variable in reduced.variables.items():
        assert {"long_name", "units"} <= set(variable.attrs), name
    assert reduced["velocity"].attrs["units"] == "1/iteration"
    assert reduced["distance_from_init"].attrs["units"] == "1"
    assert reduced.attrs["task_start"] == [0, 20]
    assert reduced.attrs["kernel_kind"] == "trace"
    assert reduced.attrs["reference_step"] == 0
    assert json.loads(reduced.attrs["params_json"]) == {"width": 64, "seed": 0}
    for key in ("run_id", "experiment", "status", "diverged_iteration"):
        assert key in reduced.attrs
    np.testing.assert_allclose(
        reduced["forgetting"], metrics.forgetting(archive["accuracy"].values)
    )


def test_reduce_nan_dump_gives_nan_metrics():
    archive = make_archive("full")
    archive["ntk"][3] = np.nan  # e.g. a diverged state
    reduced = reduce.reduce_archive(archive)
    for name in ("max_eigenvalue", "alignment", "distance_from_init", "velocity"):
        assert math.isnan(reduced[name][3]), name
    assert math.isnan(reduced["distance_to_previous"][4])
    assert not math.isnan(reduced["distance_from_init"][4])


def test_reduce_rejects_mismatched_kind():
    archive = make_archive("trace")
    archive.attrs["kernel_kind"] = "full"
    with pytest.raises(ValueError, match="kernel kind is unclear"):
        reduce.reduce_archive(archive)


@pytest.mark.parametrize("text", ["{not json", "[]"])
def test_reduce_rejects_a_damaged_configuration(text):
    archive = make_archive("trace")
    archive.attrs["config_json"] = text
    with pytest.raises(ValueError, match="config_json attribute is not a JSON object"):
        reduce.reduce_archive(archive)


def test_reduce_reads_one_dump_at_a_time(tmp_path):
    path = tmp_path / "run.h5"
    make_archive("diagonal").to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as archive:
        reduced = reduce.reduce_archive(archive)
        assert not archive["ntk"].variable._in_memory  # never loaded whole
    expected = reduce.reduce_archive(make_archive("diagonal"))
    xr.testing.assert_allclose(reduced, expected)


def test_write_netcdf_round_trip(tmp_path):
    reduced = reduce.reduce_archive(make_archive("full"))
    path = tmp_path / "metrics" / "run.nc"
    reduce.write_netcdf(reduced, path)
    reduce.write_netcdf(reduced, path)  # overwriting is fine
    assert [p.name for p in path.parent.iterdir()] == ["run.nc"]
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_allclose(back, reduced)
        for name, variable in back.variables.items():
            assert variable.attrs["long_name"] == reduced[name].attrs["long_name"]
            assert variable.attrs["units"] == reduced[name].attrs["units"]
        assert list(back.attrs["task_start"]) == [0, 20]
        assert back.attrs["params_json"] == reduced.attrs["params_json"]


def test_write_netcdf_failure_leaves_no_file(tmp_path):
    reduced = reduce.reduce_archive(make_archive("trace"))
    reduced.attrs["bad"] = {"a": 1}  # netCDF cannot store a dict
    with pytest.raises(TypeError):
        reduce.write_netcdf(reduced, tmp_path / "run.nc")
    assert list(tmp_path.iterdir()) == []


def reduced_runs():
    return [
        reduce.reduce_archive(make_archive("trace", params={"width": 64, "seed": 0})),
        reduce.reduce_archive(
            make_archive(
                "trace",
                steps=STEPS[:3],
                params={"width": 64, "seed": 1},
                status="diverged",
                seed=1,
            )
        ),
        reduce.reduce_archive(
            make_archive(
                "trace", steps=np.r_[STEPS, 40], params={"width": 128, "seed": 0}
            )
        ),
    ]


def test_aggregate_dims_and_padding(tmp_path):
    runs = reduced_runs()
    combined = reduce.aggregate(runs, ["width", "seed"])
    assert dict(combined.sizes) == {"width": 2, "seed": 2, "step": 6, "task": 2}
    assert combined["velocity"].dims == ("width", "seed", "step")
    assert combined["accuracy"].dims == ("width", "seed", "step", "task")
    np.testing.assert_array_equal(combined["width"], [64, 128])
    np.testing.assert_array_equal(combined["step"], [0, 10, 20, 21, 30, 40])

    # each run sits at its grid point, padded with NaN where it has no dump
    short = combined["max_eigenvalue"].sel(width=64, seed=1)
    np.testing.assert_allclose(short[:3], runs[1]["max_eigenvalue"])
    assert short[3:].isnull().all()
    np.testing.assert_allclose(
        combined["alignment"].sel(width=128, seed=0), runs[2]["alignment"]
    )
    assert combined["max_eigenvalue"].sel(width=128, seed=1).isnull().all()
    assert combined["active_task"].sel(width=64, seed=1).isnull()[3:].all()

    # run bookkeeping over the run dims
    assert combined["status"].sel(width=64, seed=1) == "diverged"
    assert combined["status"].sel(width=128, seed=1) == "missing"
    assert combined["diverged_iteration"].sel(width=64, seed=1) == 23
    assert combined["run_id"].sel(width=64, seed=0) == "width64-seed0"
    np.testing.assert_array_equal(combined["task_start"].sel(width=64, seed=0), [0, 20])
    assert combined["task_start"].sel(width=128, seed=1).isnull().all()
    assert combined.attrs["task_start"] == [0, 20]
    assert combined.attrs["experiment"] == "width_regime"
    assert combined["velocity"].attrs["units"] == "1/iteration"

    path = tmp_path / "width_regime.nc"
    reduce.write_netcdf(combined, path)
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_allclose(
            back.drop_vars(["status", "run_id"]),
            combined.drop_vars(["status", "run_id"]),
        )
        assert back["status"].sel(width=128, seed=1) == "missing"


def test_aggregate_default_dims_from_params():
    combined = reduce.aggregate(reduced_runs())
    assert combined.attrs["run_dims"] == ["width", "seed"]
    assert combined["velocity"].dims == ("width", "seed", "step")


def test_aggregate_rejects_ambiguous_runs():
    with pytest.raises(ValueError, match="tells them apart"):
        reduce.aggregate(reduced_runs(), ["width"])
    with pytest.raises(ValueError, match="no parameter"):
        reduce.aggregate(reduced_runs(), ["width", "lr"])
    with pytest.raises(ValueError, match="no datasets"):
        reduce.aggregate([], ["width"])


def overlap_run(shared, seed):
    """A reduced run of a class-overlap experiment with ``shared`` classes."""
    archive = make_archive("trace", params={"shared": shared, "seed": seed})
    tasks = {"scheme": "overlap", "classes": [[0, 1, 2], [3, 4, 5]], "shared": shared}
    tasks["iterations"] = 10
    archive.attrs["config_json"] = json.dumps({"tasks": tasks})
    return reduce.reduce_archive(archive)


def test_similarity_becomes_a_coordinate_along_the_dims_it_varies_with():
    runs = [overlap_run(k, s) for k in (0, 1, 3) for s in (0, 1)]
    assert runs[2].attrs["similarity"] == pytest.approx(1 / 5)
    combined = reduce.aggregate(runs[:-1])  # (shared=3, seed=1) has no run
    assert combined["similarity"].dims == ("shared",)
    np.testing.assert_allclose(combined["similarity"], [0.0, 0.2, 1.0])
    assert combined["similarity"].attrs["units"] == "1"

    # a property every run shares adds nothing; a run without tasks gives NaN
    assert "similarity" not in reduce.aggregate(runs[:2]).coords
    assert math.isnan(reduced_runs()[0].attrs["similarity"])


def test_list_valued_parameters_become_readable_coordinates_in_order():
    runs = [
        reduce.reduce_archive(
            make_archive("trace", params={"iterations": its, "seed": 0})
        )
        for its in ([1000, 20], [250, 20], [500, 20])
    ]
    combined = reduce.aggregate(runs)
    assert list(combined["iterations"].values) == ["250x20", "500x20", "1000x20"]
    assert combined["iterations"].attrs["long_name"] == "iterations per task"
    np.testing.assert_allclose(
        combined["alignment"].sel(iterations="1000x20", seed=0), runs[0]["alignment"]
    )


def test_nested_list_parameters_keep_their_structure_in_coordinates():
    classes = ([[0, 1], [2, 3]], [[0], [1, 2, 3]], [[0, 1, 2], [3]])
    runs = [
        reduce.reduce_archive(
            make_archive("trace", params={"classes": value, "seed": 0})
        )
        for value in classes
    ]
    combined = reduce.aggregate(runs)
    assert list(combined["classes"].values) == ["0_1x2x3", "0x1_2x3", "0x1x2_3"]
    np.testing.assert_allclose(
        combined["alignment"].sel(classes="0x1_2x3", seed=0), runs[0]["alignment"]
    )


def test_a_probe_seed_dimension_sits_beside_the_run_seed():
    runs = [
        reduce.reduce_archive(
            make_archive("trace", params={"probe_seed": p, "seed": s}, seed=p + s)
        )
        for p in (0, 1)
        for s in (0, 1)
    ]
    combined = reduce.aggregate(runs)
    assert dict(combined.sizes) == {"probe_seed": 2, "seed": 2, "step": 5, "task": 2}

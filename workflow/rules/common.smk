# Helpers shared by the rules: config validation, run expansion and path logic.
# The science lives in the ntkcl package; this file only maps wildcards to runs.

import sys

sys.path.insert(0, workflow.basedir)  # this checkout's ntkcl, whatever is installed

from ntkcl import config as ntkcl_config
from ntkcl.data import dataset_id

# Validate before any job starts: an unknown key, a wrong type or a bad value
# stops the workflow here with every problem named.
try:
    ntkcl_config.validate_config(config, source="config")
except ntkcl_config.ConfigError as error:
    raise WorkflowError(str(error)) from None

SCALE = config.get("scale", "paper")
RUNS = {scale: ntkcl_config.expand_runs(config, scale) for scale in ntkcl_config.SCALES}


wildcard_constraints:
    scale="|".join(ntkcl_config.SCALES),
    experiment="[a-z][a-z0-9_]*",
    run="[^/]+",
    dataset="[^/]+",


def find_run(wildcards):
    """The resolved config of the run that the wildcards name."""
    for run in RUNS[wildcards.scale].get(wildcards.experiment, []):
        if run["run_id"] == wildcards.run:
            return run
    raise WorkflowError(
        f"No run {wildcards.run!r} in experiment {wildcards.experiment!r} at "
        f"{wildcards.scale} scale."
    )


def experiment_runs(wildcards):
    return RUNS[wildcards.scale][wildcards.experiment]


def data_config(wildcards):
    """The data section of any run that uses the dataset the wildcard names."""
    for experiments in RUNS.values():
        for runs in experiments.values():
            for run in runs:
                if dataset_id(run["data"]) == wildcards.dataset:
                    return run["data"]
    raise WorkflowError(f"No run of the config uses dataset {wildcards.dataset!r}.")


def prepared_data(wildcards):
    return f"results/data/{dataset_id(find_run(wildcards)['data'])}.h5"


def run_metrics(wildcards):
    return [
        f"results/{wildcards.scale}/metrics/{wildcards.experiment}/{run['run_id']}.nc"
        for run in experiment_runs(wildcards)
    ]


def run_dims(wildcards):
    """The run dimensions of an experiment's aggregated metrics (grid keys + seed)."""
    return list(experiment_runs(wildcards)[0]["params"])


def figure_layout(wildcards):
    figure = config["experiments"][wildcards.experiment].get("figure", {})
    dims = [d for d in run_dims(wildcards) if d != "seed"]
    line = figure.get("line") or (dims[0] if dims else None)
    row = figure.get("row")
    if row is None and len(dims) > 1:
        row = next(d for d in dims if d != line)
    return {"line": line, "row": row}


def final_outputs():
    return [
        f"results/{SCALE}/{kind}/{experiment}.{ext}"
        for experiment in RUNS[SCALE]
        for kind, ext in [("figures", "pdf"), ("figures", "png"), ("claims", "csv")]
    ]

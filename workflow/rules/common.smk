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

SCALE = ntkcl_config.workflow_setting(config, "scale")
RUNS = {scale: ntkcl_config.expand_runs(config, scale) for scale in ntkcl_config.SCALES}


wildcard_constraints:
    scale="|".join(ntkcl_config.SCALES),
    experiment="[a-z][a-z0-9_]*",
    run="[^/]+",
    dataset="[^/]+",


def find_run(wildcards):
    """The resolved config of the run that the wildcards name."""
    for run in experiment_runs(wildcards):
        if run["run_id"] == wildcards.run:
            return run
    raise WorkflowError(
        f"No run {wildcards.run!r} in experiment {wildcards.experiment!r} at "
        f"{wildcards.scale} scale."
    )


def experiment_runs(wildcards):
    runs = RUNS[wildcards.scale].get(wildcards.experiment)
    if runs is None:
        raise WorkflowError(
            ntkcl_config.unknown_experiment(
                config, wildcards.scale, wildcards.experiment
            )
        )
    return runs


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


def experiment_settings(experiment):
    if experiment not in config["experiments"]:
        raise WorkflowError(ntkcl_config.unknown_experiment(config, SCALE, experiment))
    return config["experiments"][experiment]


def figure_settings(experiment):
    return experiment_settings(experiment).get("figure", {})


def figure_layout(wildcards):
    figure = figure_settings(wildcards.experiment)
    runs = experiment_runs(wildcards)
    dims = [d for d in run_dims(wildcards) if d != "seed"]
    sizes = {d: len({repr(run["params"][d]) for run in runs}) for d in dims}
    return ntkcl_config.figure_layout(figure, sizes)


def experiment_description(wildcards):
    experiment = experiment_settings(wildcards.experiment)
    return experiment.get("description", wildcards.experiment)


def seeds_phrase(wildcards):
    seeds = {run["seed"] for run in experiment_runs(wildcards)}
    if len(seeds) == 1:
        return "one seed"
    return f"mean over {len(seeds)} seeds with a min-max band"


def figure_caption(wildcards):
    """The one-sentence report caption of an experiment's figure."""
    layout = figure_layout(wildcards)
    rows = f" and one row per {layout['row']}" if layout["row"] else ""
    return (
        "top eigenvalue, distance from initialisation, kernel-label alignment and "
        "velocity of the first task's empirical NTK against training iteration, "
        f"one line per {layout['line']}{rows}, {seeds_phrase(wildcards)}, every "
        "task switch dashed."
    )


def summary_x(wildcards):
    summary = figure_settings(wildcards.experiment).get("summary")
    if not summary:
        raise WorkflowError(
            f"Experiment {wildcards.experiment!r} has no summary figure (its "
            "`figure.summary` is not set); its figure is "
            f"results/{wildcards.scale}/figures/{wildcards.experiment}.png."
        )
    return summary


def summary_caption(wildcards):
    """The one-sentence report caption of an experiment's switch summary."""
    return (
        "at the first task switch, the peak kernel velocity, its ratio to the "
        "median velocity before the switch and the relative drop of the top "
        f"eigenvalue against {summary_x(wildcards)}, one marker per run and a line "
        "through the seed means."
    )


def has_summary(experiment):
    return bool(figure_settings(experiment).get("summary"))


def selected_experiments(scale):
    """The experiments run at ``scale`` (demo leaves some out), or those of `only`;
    `only` naming one without runs at the scale stops the workflow (rule all asks
    for this when the Snakefile loads)."""
    try:
        return ntkcl_config.select_experiments(config, RUNS[scale], scale)
    except ntkcl_config.ConfigError as error:
        raise WorkflowError(str(error)) from None


def scale_experiments(wildcards):
    return selected_experiments(wildcards.scale)


def experiment_claims(wildcards):
    return [
        f"results/{wildcards.scale}/claims/{experiment}.csv"
        for experiment in scale_experiments(wildcards)
    ]


def final_outputs():
    outputs = []
    for experiment in selected_experiments(SCALE):
        outputs += [
            f"results/{SCALE}/figures/{experiment}.pdf",
            f"results/{SCALE}/figures/{experiment}.png",
            f"results/{SCALE}/claims/{experiment}.csv",
        ]
        if has_summary(experiment):
            outputs += [
                f"results/{SCALE}/figures/{experiment}-summary.pdf",
                f"results/{SCALE}/figures/{experiment}-summary.png",
            ]
    return outputs + [f"results/{SCALE}/claims.csv"]

"""Load and validate the configuration; expand experiments into runs.

``config.yaml`` holds ``defaults`` (settings shared by every run), a ``demo``
block applied when ``scale`` is ``demo``, and named ``experiments``. A run's
resolved config is, merged in this order (later wins):

1. the defaults written in the schema (``workflow/schemas/config.schema.yaml``),
2. ``defaults``, 3. the experiment's ``overrides``,
4. at demo scale: the top-level ``demo`` block, then the experiment's
   ``demo.overrides``,
5. the grid point (dotted keys such as ``model.width``) and the seed.

At demo scale an experiment's ``demo.grid`` entries replace the grid entries of
the same key, and ``demo.seeds`` replaces ``seeds``; an experiment with
``demo: false`` has no demo version and expands to no runs (it is absent from
``expand_runs(config, "demo")``).
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = (
    Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
)
SCALES = ("paper", "demo")

# How grid keys appear in run ids: a prefix before the value, or the bare value.
_ID_PREFIX = {
    "model.width": "w",
    "model.depth": "d",
    "optim.lr": "lr",
    "optim.batch_size": "b",
    "tasks.shared": "k",
    "tasks.alpha": "a",
    "tasks.iterations": "it",
    "probe.size": "p",
    "regime": "",
    "model.arch": "",
    "model.activation": "",
    "data.name": "",
}


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""


@functools.cache
def load_schema() -> dict:
    """The config schema, read once (callers must not modify it)."""
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it (raises :class:`ConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    validate_config(config, source=str(path))
    return config


def _schema_defaults(node: dict, schema: dict) -> Any:
    node = _deref(node, schema)
    if node.get("type") == "object" and "properties" in node:
        return {k: _schema_defaults(v, schema) for k, v in node["properties"].items()}
    return copy.deepcopy(node.get("default"))


def _deref(node: dict, schema: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def run_defaults(schema: dict | None = None) -> dict:
    """Every run setting at the default its schema entry declares."""
    schema = schema or load_schema()
    return _schema_defaults(schema["$defs"]["run"], schema)


def workflow_setting(config: dict, key: str) -> Any:
    """A top-level setting of ``config`` (e.g. ``checkpoint_seconds``), or the
    default its schema entry declares."""
    if key in config:
        return config[key]
    return copy.deepcopy(load_schema()["properties"][key].get("default"))


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: nested dicts merge, others replace."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    cfg[leaf] = value


def _leaf_paths(node: dict, schema: dict, prefix: str = "") -> set[str]:
    node = _deref(node, schema)
    if node.get("type") == "object" and "properties" in node:
        paths: set[str] = set()
        for key, sub in node["properties"].items():
            paths |= _leaf_paths(sub, schema, f"{prefix}{key}.")
        return paths
    return {prefix.rstrip(".")}


def _format_error(error: jsonschema.ValidationError, where: str) -> str:
    location = ".".join(str(p) for p in error.absolute_path)
    location = f"{where}.{location}" if location else where
    message = error.message
    if error.validator == "additionalProperties" and "properties" in error.schema:
        allowed = ", ".join(sorted(error.schema["properties"]))
        message += f"; allowed keys here: {allowed}"
    elif error.validator == "oneOf" and "description" in error.schema:
        message += f" ({error.schema['description'].strip()})"
    elif error.validator_value == "array" and isinstance(error.instance, str):
        message += f"; write a list, e.g. [{error.instance}]"
    if _is_typed_text(error):
        message += f" (it is the text {error.instance!r}; {_TEXT_NOTE_MARK})"
    return f"{location}: {message}"


_TEXT_NOTE_MARK = "see the note on --config below"
_TEXT_NOTE = (
    "Note on --config: Snakemake converts only top-level `--config` values "
    "(scale=demo, only=[...]); a value nested in one, as in "
    "\"defaults={'optim': {'lr': 0.1}}\", arrives as text ('0.1') and fails the "
    "checks above. Put nested settings in a YAML file (defaults: {optim: {lr: 0.1}}) "
    "and pass it with `--configfile my-settings.yaml`: it is merged over config.yaml."
)


def _is_typed_text(error: jsonschema.ValidationError) -> bool:
    """Is the failing value a string that YAML would read as a number, boolean,
    null or list, the way Snakemake leaves values nested in ``--config``?"""
    if error.validator not in ("type", "oneOf", "anyOf"):
        return False
    if not isinstance(error.instance, str):
        return False
    try:
        value = yaml.safe_load(error.instance)
    except yaml.YAMLError:
        return False
    return not isinstance(value, str | dict)


def _schema_errors(instance: Any, schema: dict, where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    errors = [e for error in validator.iter_errors(instance) for e in _specific(error)]
    errors.sort(key=lambda e: [str(p) for p in e.absolute_path])
    return [_format_error(e, where) for e in errors]


def _specific(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors inside the one alternative of a failed oneOf/anyOf that the value's
    type fits (``demo: {grid: {...}}`` against "an object or false"), so a typo deep
    inside is named with its key and allowed keys; else the error itself."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        return [error]
    branches: dict[int, list[jsonschema.ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    if len(branches) != len(error.validator_value):  # an alternative matched
        return [error]
    mismatched = ("type", "const", "enum")
    fitting = [
        subs
        for subs in branches.values()
        if not any(s.validator in mismatched and not s.relative_path for s in subs)
    ]
    if len(fitting) != 1:
        return [error]
    return [e for sub in fitting[0] for e in _specific(sub)]


def validate_config(config: dict, source: str = "config") -> None:
    """Check the whole config and every run it expands to; raise on any problem.

    The error names each offending key (``experiments.width_regime.grid.model.widht``)
    and what is allowed there.
    """
    schema = load_schema()
    problems = _schema_errors(config, schema, source)
    if not problems:
        leaves = _leaf_paths(schema["$defs"]["run"], schema)
        unknown_keys = set()  # experiments whose grids name unknown settings
        for name, experiment in config["experiments"].items():
            demo = experiment.get("demo") or {}
            grids = {"grid": experiment.get("grid"), "demo.grid": demo.get("grid")}
            for at, grid in grids.items():
                for key in grid or {}:
                    if key not in leaves:
                        unknown_keys.add(name)
                        problems.append(
                            f"{source}.experiments.{name}.{at}: unknown setting "
                            f"{key!r}; grid keys are dotted run settings, one of: "
                            f"{', '.join(sorted(leaves))} (seeds go in `seeds`)"
                        )
        for name, experiment in config["experiments"].items():
            if name in unknown_keys:  # its figure checks would only repeat the typo
                continue
            try:
                experiment_dimensions(experiment)
            except ConfigError as error:
                problems.append(f"{source}.experiments.{name}.grid: {error}")
                continue
            figure = _figure_problems(name, experiment, source)
            problems += figure or _layout_problems(name, experiment, source)
        for name in config.get("only", []):
            if name not in config["experiments"]:
                why = unknown_experiment(config, "", name)
                problems.append(f"{source}.only: {why}")
    if not problems:
        run_schema = dict(schema["$defs"]["run"], **{"$defs": schema["$defs"]})
        for scale in SCALES:
            for runs in expand_runs(config, scale).values():
                for run in runs:
                    settings = {k: v for k, v in run.items() if k not in _RUN_META}
                    where = (
                        f"{source} ({scale} run {run['experiment']}/{run['run_id']})"
                    )
                    problems += _schema_errors(settings, run_schema, where)
    if not problems:
        # the task sequence of every run (the checks that need no data)
        from .tasks import build_tasks

        failing: dict[str, list[str]] = {}  # one line per message, not per run
        for scale in SCALES:
            for runs in expand_runs(config, scale).values():
                for run in runs:
                    try:
                        build_tasks(run["tasks"])
                    except ValueError as error:
                        where = f"{scale} run {run['experiment']}/{run['run_id']}"
                        failing.setdefault(str(error), []).append(where)
        for message, where in failing.items():
            more = f" and {len(where) - 1} other run(s)" if len(where) > 1 else ""
            problems.append(f"{source} ({where[0]}{more}): {message}")
    if any(_TEXT_NOTE_MARK in problem for problem in problems):
        problems.append(_TEXT_NOTE)
    if problems:
        listing = "\n  - ".join(dict.fromkeys(problems))
        raise ConfigError(f"Invalid configuration:\n  - {listing}")


_RUN_META = ("run_id", "experiment", "params", "seed", "scale")
DERIVED_COORDINATES = ("similarity",)
"""Run coordinates that ``ntkcl.reduce.aggregate`` derives from the runs' configs."""


def _figure_problems(name: str, experiment: dict, source: str) -> list[str]:
    """``figure`` entries that name no dimension of the experiment's runs."""
    dims = [*experiment_dimensions(experiment).values(), "seed"]
    figure = experiment.get("figure", {})
    allowed = {"line": dims, "row": dims, "summary": dims + list(DERIVED_COORDINATES)}
    return [
        f"{source}.experiments.{name}.figure.{entry}: {figure[entry]!r} is not a "
        f"run dimension of this experiment; use one of {allowed[entry]}"
        for entry in ("line", "row", "summary")
        if figure.get(entry) is not None and figure[entry] not in allowed[entry]
    ]


def figure_layout(figure: dict, sizes: dict[str, int]) -> dict[str, str | None]:
    """The ``line`` and ``row`` of an experiment's figure (the workflow's plot rule
    draws this layout).

    ``sizes`` maps the run dimensions other than ``seed``, in grid order, to their
    number of values. Unset, the line is the first dimension with several values
    (else the first, else ``seed``), and the row the next one with several values
    (else none: a dimension with one value needs no place).
    """
    several = [d for d, n in sizes.items() if n > 1]
    line = figure.get("line") or next(iter(several or sizes), "seed")
    row = figure.get("row")
    if row is None:
        row = next((d for d in several if d != line), None)
    return {"line": line, "row": row}


def _layout_problems(name: str, experiment: dict, source: str) -> list[str]:
    """Figure layouts the plot would reject after every run has trained: line and
    row on one dimension, or a run dimension with several values in neither."""
    names = experiment_dimensions(experiment)
    demo = experiment.get("demo")
    grids = {"paper": dict(experiment.get("grid", {}))}
    if demo is not False:
        grids["demo"] = {**grids["paper"], **(demo or {}).get("grid", {})}
    found: dict[str, list[str]] = {}  # problem -> the scales it occurs at
    for scale, grid in grids.items():
        dims = [names[key] for key in grid]
        sizes = {names[key]: len(values) for key, values in grid.items()}
        layout = figure_layout(experiment.get("figure", {}), sizes)
        line, row = layout["line"], layout["row"]
        left = {
            names[key]: values
            for key, values in grid.items()
            if names[key] not in (line, row) and len(values) > 1
        }
        if line == row:
            problem = (
                f"line and row are both {line!r}; draw two different run "
                f"dimensions (of {[*dims, 'seed']})"
            )
        elif left:  # (row is set: figure_layout fills it when there is another)
            problem = (
                f"the figure draws one line per {line} and one row per {row}, which "
                f"leaves no place for {left}; a figure shows two run dimensions "
                "besides the averaged seeds, so grid over fewer settings"
            )
        else:
            continue
        found.setdefault(problem, []).append(scale)
    where = f"{source}.experiments.{name}.figure"
    return [
        f"{where} ({' and '.join(scales)} scale): {problem}"
        for problem, scales in found.items()
    ]


def param_name(key: str) -> str:
    """The short name of a grid key: its last part (``model.width`` -> width)."""
    return key.rsplit(".", 1)[-1]


RESERVED_DIMS = ("seed", "step", "task", *DERIVED_COORDINATES)
"""Names a grid dimension cannot take: the run seed, the metrics' own dims and the
coordinates that ``ntkcl.reduce.aggregate`` derives."""


def dimension_names(keys: Iterable[str]) -> dict[str, str]:
    """The run dimension of each grid key, as in run params, metrics and figures.

    A key is named by its last part (``model.width`` -> width) unless that name is
    reserved (:data:`RESERVED_DIMS`) or shared with another of ``keys``; then by the
    whole key with ``_`` for ``.`` (``probe.seed`` -> probe_seed, as the run seed
    is ``seed``). ``keys`` are all the grid keys of one experiment (with those of its
    demo grid), so a key has the same name at both scales.

    Raises:
        ConfigError: two keys would still share a name.
    """
    keys = list(dict.fromkeys(keys))
    counts = Counter(param_name(key) for key in keys)
    names = {}
    for key in keys:
        short = param_name(key)
        clash = counts[short] > 1 or short in RESERVED_DIMS
        names[key] = key.replace(".", "_") if clash else short
    taken = Counter(names.values())
    clashes = sorted(
        key for key, name in names.items() if taken[name] > 1 or name in RESERVED_DIMS
    )
    if clashes:
        named = ", ".join(f"{key} -> {names[key]}" for key in clashes)
        raise ConfigError(
            f"Grid keys get no distinct run dimension names ({named}; "
            f"{list(RESERVED_DIMS)} are taken); grid over one of them only."
        )
    return names


def experiment_dimensions(experiment: dict) -> dict[str, str]:
    """:func:`dimension_names` of an experiment's grid keys, demo grid included."""
    demo = experiment.get("demo") or {}
    return dimension_names([*experiment.get("grid", {}), *demo.get("grid", {})])


def format_value(value: Any) -> str:
    """A grid value as written in run ids and in string coordinates.

    Floats keep 6 significant digits (``0.25``, ``1e-05``); a list of numbers joins
    with ``x`` (``[250, 2000]`` -> ``250x2000``); a list of lists joins its lists
    with ``_`` (``[[0, 1], [2, 3]]`` -> ``0x1_2x3``), one more ``_`` per further
    level of nesting, so the task boundaries of ``tasks.classes`` stay visible.
    """
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        depth = _nesting(value)
        separator = "x" if depth <= 1 else "_" * (depth - 1)
        return separator.join(format_value(v) for v in value)
    return str(value)


def _nesting(value: Any) -> int:
    """How deeply lists nest in ``value`` (0 for a scalar, 1 for a flat list)."""
    if isinstance(value, list | tuple):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 0


def make_run_id(
    point: dict[str, Any], seed: int, names: dict[str, str] | None = None
) -> str:
    """A readable id from a grid point, e.g. ``{"model.width": 1024, "regime": "lazy"}``
    with seed 0 gives ``w1024-lazy-s0``.

    Each value follows its key's prefix (``w``, ``lr``, ... or none), or else its
    dimension name from ``names`` (default :func:`dimension_names` of the point's
    keys), e.g. ``probe_seed1-s0``; values are written by :func:`format_value`.
    """
    names = names or dimension_names(point)
    parts = []
    for key, value in point.items():
        prefix = _ID_PREFIX.get(key, names[key])
        parts.append(f"{prefix}{format_value(value)}")
    parts.append(f"s{seed}")
    return "-".join(parts).replace("/", "_")


def expand_runs(config: dict, scale: str | None = None) -> dict[str, list[dict]]:
    """Every experiment's runs as resolved run configs, in grid order.

    Returns:
        ``{experiment: [run_config, ...]}``, without the experiments that have
        ``demo: false`` when ``scale`` is ``demo``; each run config holds every setting
        plus ``run_id``, ``experiment``, ``scale``, ``seed`` and ``params`` (the grid
        point keyed by dimension name, with the seed).
    """
    scale = scale or config.get("scale", "paper")
    if scale not in SCALES:
        raise ConfigError(f"Unknown scale {scale!r}; expected one of {list(SCALES)}.")
    base = deep_merge(run_defaults(), config.get("defaults", {}))
    runs: dict[str, list[dict]] = {}
    for name, experiment in config["experiments"].items():
        settings = deep_merge(base, experiment.get("overrides", {}))
        grid = dict(experiment.get("grid", {}))
        seeds = experiment.get("seeds", [0])
        if scale == "demo":
            demo = experiment.get("demo", {})
            if demo is False:  # no demo version: the experiment is left out
                continue
            settings = deep_merge(settings, config.get("demo", {}))
            settings = deep_merge(settings, demo.get("overrides", {}))
            grid.update(demo.get("grid", {}))
            seeds = demo.get("seeds", seeds)
        names = experiment_dimensions(experiment)
        runs[name] = []
        points: dict[str, dict] = {}  # run id -> grid point, to explain a clash
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values, strict=True))
            for seed in seeds:
                run = copy.deepcopy(settings)
                for key, value in point.items():
                    set_dotted(run, key, value)
                run_id = make_run_id(point, seed, names)
                if run_id in points:
                    raise ConfigError(
                        _duplicate_id(name, run_id, points[run_id], point)
                    )
                points[run_id] = point
                params = {names[k]: v for k, v in point.items()}
                run.update(
                    run_id=run_id,
                    experiment=name,
                    scale=scale,
                    seed=seed,
                    params={**params, "seed": seed},
                )
                runs[name].append(run)
    return runs


def _duplicate_id(experiment: str, run_id: str, first: dict, second: dict) -> str:
    """Why two grid points of ``experiment`` get the same run id, and the fix."""
    if first == second:
        why = f"its grid lists the point {second} twice; remove the repeated value"
    else:
        why = (
            f"the grid points {first} and {second} are written alike (run ids keep "
            "6 significant digits of a float and write '/' as '_'); use grid values "
            "that stay distinct when written so"
        )
    return f"Experiment {experiment!r} gives two runs the id {run_id!r}: {why}."


def unknown_experiment(config: dict, scale: str, experiment: str) -> str:
    """Why ``experiment`` has no runs at ``scale``, and what to ask for instead."""
    names = sorted(config["experiments"])
    if experiment in config["experiments"]:
        demo_names = [
            name for name in names if config["experiments"][name].get("demo", True)
        ]
        return (
            f"Experiment {experiment!r} has no demo version (`demo: false` in the "
            f"config: it needs data that is not bundled); run it with scale=paper, "
            f"or pick a demo experiment: {demo_names}."
        )
    close = difflib.get_close_matches(experiment, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"No experiment {experiment!r} in the config; have {names}.{hint}"


def select_experiments(config: dict, runs: dict, scale: str) -> list[str]:
    """The experiments of ``runs`` (:func:`expand_runs` at ``scale``) to run: those
    that the top-level ``only`` names, or all when it is empty.

    Raises:
        ConfigError: ``only`` names an experiment without runs at ``scale``.
    """
    only = workflow_setting(config, "only")
    for name in only:
        if name not in runs:
            raise ConfigError(f"only: {unknown_experiment(config, scale, name)}")
    return [name for name in runs if not only or name in only]


def find_run(config: dict, scale: str, experiment: str, run_id: str) -> dict:
    """The resolved config of one run (raises :class:`ConfigError` if absent)."""
    runs = expand_runs(config, scale).get(experiment)
    if runs is None:
        raise ConfigError(unknown_experiment(config, scale, experiment))
    for run in runs:
        if run["run_id"] == run_id:
            return run
    raise ConfigError(
        f"Experiment {experiment!r} has no run {run_id!r} at {scale} scale; "
        f"its runs are {[r['run_id'] for r in runs]}."
    )


def dumps(run: dict) -> str:
    """The canonical JSON form of a run config (sorted keys), as archived."""
    return json.dumps(run, sort_keys=True)

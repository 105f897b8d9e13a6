"""Command line and workflow entry points: ``ntkcl <command>`` and ``run_rule``.

Every Snakemake rule calls :func:`run_rule` (through
``workflow/scripts/ntkcl_rule.py``); the same steps are available by hand:

    ntkcl check-config config.yaml
    ntkcl prepare config.yaml --scale demo
    ntkcl train config.yaml width_regime w64-fl-s0 --scale demo
    ntkcl reduce results/demo/runs/width_regime/w64-fl-s0.h5 -o metrics.nc
    ntkcl inspect results/demo/runs/width_regime/w64-fl-s0.h5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("ntkcl")

# Errors that describe bad input: reported as one message, without a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def configure_logging(log_file: str | Path | None = None, level=logging.INFO) -> None:
    """Send ntkcl's log records to ``log_file`` (or stderr), one line each."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode="a")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("ntkcl")
    warnings_logger = logging.getLogger("py.warnings")
    for old in {*root.handlers, *warnings_logger.handlers}:
        old.close()  # a FileHandler of an earlier call keeps its file open
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings_logger.handlers[:] = [handler]


# ----------------------------------------------------------------------------
# steps (each used by a rule and by a subcommand)


def prepare(data_cfg: dict, out: str | Path) -> None:
    from . import data

    data.prepare(data_cfg, out)


def train(
    run: dict, data_path, out, work_dir, checkpoint_interval=60.0, fresh=False
) -> str:
    from .train import RunLockedError, train_run

    try:
        return train_run(
            run,
            data_path,
            out,
            work_dir,
            checkpoint_interval=checkpoint_interval,
            fresh=fresh,
        )
    except RunLockedError as error:  # a user's situation, not a bug: no traceback
        raise ValueError(str(error)) from None


def reduce(archive_path, out) -> None:
    import numpy as np

    from . import archive, reduce

    with _reading(archive_path), archive.open_archive(archive_path) as ds:
        if ds.attrs.get("status") == "running":
            log.warning("%s is still being written (status running)", archive_path)
        metrics = reduce.reduce_archive(ds)
    # a kernel with a non-finite value gives NaN metrics (ntkcl.metrics); ntkcl
    # train never archives one, so the archive is damaged
    damaged = np.flatnonzero(np.isnan(metrics["max_eigenvalue"].values))
    if damaged.size:
        steps = metrics["step"].values[damaged]
        raise archive.ArchiveError(
            f"{archive_path}: non-finite kernel values in {damaged.size} dump(s), "
            f"first dump {damaged[0]} (iteration {steps[0]}); `ntkcl inspect "
            f"{archive_path}` lists every problem."
        )
    reduce.write_netcdf(metrics, out)


@contextlib.contextmanager
def _reading(archive_path):
    """Turn a failure while reading an archive into one error naming the file."""
    from .archive import ArchiveError

    try:
        yield
    except ArchiveError:
        raise
    except (ValueError, OSError, RuntimeError) as error:  # h5py: OSError, ...
        hint = ""
        if "filter returned failure" in str(error):
            hint = (
                " (a damaged chunk: its checksum or decompression failed; "
                f"`ntkcl inspect {archive_path}` names the dumps it hits)"
            )
        raise ArchiveError(f"{archive_path}: {error}{hint}") from error


def aggregate(paths, dims, out) -> None:
    import xarray as xr

    from . import reduce

    datasets = [xr.load_dataset(p, engine="h5netcdf") for p in paths]
    reduce.write_netcdf(reduce.aggregate(datasets, dims), out)


def plot(metrics_path, out_pdf, out_png, line, row=None, title=None) -> None:
    import xarray as xr

    from . import plots

    ds = xr.load_dataset(metrics_path, engine="h5netcdf")
    plots.plot_experiment(
        ds, line=line, row=row, out_pdf=out_pdf, out_png=out_png, title=title
    )


def claims(metrics_path, out_csv) -> None:
    import xarray as xr

    from . import claims

    ds = xr.load_dataset(metrics_path, engine="h5netcdf")
    table = claims.check_claims(ds)
    claims.write_claims(table, out_csv)
    for row in table.itertuples():
        log.info("%s %s: %s", row.claim, row.group, "holds" if row.holds else "FAILS")


# ----------------------------------------------------------------------------
# Snakemake


def run_rule(smk) -> None:
    """Run the step of the Snakemake rule ``smk.rule`` with the job's files.

    Log records go to the rule's ``log:``. Bad input (:data:`_USER_ERRORS`, e.g. a
    broken archive) ends the job with one message naming the file and the problem
    (SystemExit); anything else is logged with its traceback and re-raised.
    """
    configure_logging(smk.log[0] if smk.log else None)
    import torch

    torch.set_num_threads(max(1, int(smk.threads)))
    from . import config

    steps = {
        "prepare_data": lambda: prepare(smk.params.data, smk.output[0]),
        "train": lambda: train(
            smk.params.run,
            smk.input.data,
            smk.output.archive,
            smk.params.work_dir,
            # from the config, not a rule param: a changed param reruns the job
            config.workflow_setting(smk.config, "checkpoint_seconds"),
        ),
        "reduce": lambda: reduce(smk.input.archive, smk.output[0]),
        "aggregate": lambda: aggregate(list(smk.input), smk.params.dims, smk.output[0]),
        "plot": lambda: plot(
            smk.input[0],
            smk.output.pdf,
            smk.output.png,
            title=smk.params.description,
            **smk.params.layout,
        ),
        "claims": lambda: claims(smk.input[0], smk.output[0]),
    }
    if smk.rule not in steps:
        raise ValueError(f"ntkcl has no step for rule {smk.rule!r}.")
    try:
        steps[smk.rule]()
    except _USER_ERRORS as error:
        # bad input (a broken archive, a missing dataset): one line, no traceback
        log.error("rule %s failed: %s", smk.rule, error)
        raise SystemExit(f"ntkcl {smk.rule}: error: {error}") from None
    except Exception:
        log.exception("rule %s failed", smk.rule)
        raise


# ----------------------------------------------------------------------------
# command line


def _runs(args) -> dict:
    from . import config

    cfg = config.load_config(args.config)
    scale = args.scale or config.workflow_setting(cfg, "scale")
    runs = config.expand_runs(cfg, scale)
    return {name: runs[name] for name in config.select_experiments(cfg, runs, scale)}


def _cmd_check_config(args) -> None:
    runs = _runs(args)
    for experiment, items in runs.items():
        print(f"{experiment}: {len(items)} runs ({items[0]['run_id']}, ...)")


def _cmd_prepare(args) -> None:
    from .data import dataset_id

    seen = {}
    for items in _runs(args).values():
        for run in items:
            seen[dataset_id(run["data"])] = run["data"]
    for name, data_cfg in seen.items():
        out = Path(args.out_dir) / f"{name}.h5"
        if out.exists():
            print(f"{out} exists")
            continue
        prepare(data_cfg, out)
        print(f"wrote {out}")


def _cmd_train(args) -> None:
    from . import config
    from .data import dataset_id

    cfg = config.load_config(args.config)
    scale = args.scale or cfg.get("scale", "paper")
    run = config.find_run(cfg, scale, args.experiment, args.run)
    data_path = Path(args.data or f"results/data/{dataset_id(run['data'])}.h5")
    if not data_path.exists():
        prepare(run["data"], data_path)
    base = Path("results") / scale
    out = Path(args.out or base / "runs" / args.experiment / f"{args.run}.h5")
    work = base / "work" / args.experiment / args.run
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the archive's file name, for example "
            f"{out / (args.run + '.h5')}."
        )
    if out.exists() and not args.force:
        from . import archive

        status, stored = archive.read_status(out)
        if status in archive.STATUSES and status != "running":
            same = stored == config.dumps(run)
            print(
                f"{out} exists ({status}"
                + ("" if same else ", trained with other settings")
                + "); nothing to do. Add --force to train it again."
            )
            return
    import torch

    torch.set_num_threads(args.threads)
    status = train(run, data_path, out, work, args.checkpoint_interval, args.force)
    print(f"{status}: {out}")


def _cmd_reduce(args) -> None:
    reduce(args.archive, args.output)
    print(f"wrote {args.output}")


def _cmd_inspect(args) -> int:
    from . import archive, inspection

    with _reading(args.archive), archive.open_archive(args.archive) as ds:
        problems = inspection.check(ds)
        info = None
        if not args.validate:
            try:
                info = inspection.summary(ds, args.archive)
            except OSError:  # a damaged variable, already among the problems
                args.validate = True
        if info is None:
            info = {"file": str(args.archive), "dumps": ds.sizes["step"]}
        info["problems"] = problems
        if args.step is not None:
            try:
                info["spectrum"] = inspection.spectrum(ds, args.step)
            except OSError:  # a damaged dump, already among the problems
                info["spectrum"] = None
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.validate:
        for problem in problems:
            print(f"{args.archive}: {problem}")
        if not problems:
            print(f"{args.archive}: valid ({info['dumps']} dumps checked)")
    else:
        print(inspection.format_text(info))
    if problems and not args.json:
        print(
            f"ntkcl inspect: {len(problems)} problem(s) in {args.archive}",
            file=sys.stderr,
        )
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkcl", description="Empirical NTK dynamics under task shifts."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="config file, e.g. config.yaml")
        p.add_argument("--scale", choices=["paper", "demo"], help="default: config's")
        return p

    p = with_config(sub.add_parser("check-config", help="validate a config, list runs"))
    p.set_defaults(func=_cmd_check_config)

    p = with_config(sub.add_parser("prepare", help="prepare the config's datasets"))
    p.add_argument("--out-dir", default="results/data")
    p.set_defaults(func=_cmd_prepare)

    p = with_config(sub.add_parser("train", help="train one run of an experiment"))
    p.add_argument("experiment")
    p.add_argument("run", help="run id, e.g. w64-fl-s0 (see check-config)")
    p.add_argument("--data", help="prepared dataset (default: results/data/<id>.h5)")
    p.add_argument(
        "--out",
        help="archive path (default: the workflow's); the run still trains in the "
        "workflow's work folder, results/<scale>/work/<experiment>/<run>/",
    )
    p.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="S")
    p.add_argument(
        "--force",
        action="store_true",
        help="train again from the start, even when the archive at --out is "
        "finished or a killed attempt left a checkpoint",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="CPU threads (default 1, as the workflow's train jobs: a run is "
        "bit-identical only at the same thread count)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("reduce", help="reduce an archive to metrics (NetCDF)")
    p.add_argument("archive")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_reduce)

    p = sub.add_parser(
        "inspect",
        help="summarise and check a kernel archive (also one being written)",
        description="Summarise a kernel archive and check it, reading each dump "
        "once; exits 1 when a check fails, 2 when the file cannot be read.",
    )
    p.add_argument("archive")
    p.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="add the spectrum of the dump at iteration N",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--validate",
        action="store_true",
        help="only check: structure, monotone iterations, finite values, kernel "
        "symmetry; print each problem",
    )
    p.set_defaults(func=_cmd_inspect)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    if getattr(args, "validate", False) and args.step is not None:
        parser.error(
            "--validate checks every dump and --step shows one dump's spectrum: "
            "use one of them (the summary without --validate includes the checks)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    configure_logging(None, logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args) or 0
    except _USER_ERRORS as error:
        print(f"ntkcl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader closed the pipe early (`ntkcl inspect --json | head`): not an
        # error; point stdout at /dev/null so the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The continual training loop with periodic NTK dumps, checkpoints and resume.

One run trains one network with plain SGD and cross-entropy on a sequence of
tasks. The empirical NTK on a fixed probe set from the first task is dumped at
iteration 0, every ``ntk.every`` iterations, right before every task switch
(the state after the last update on the old task), right after it (after the
first update on the new task) and at the end, together with the probe logits
and the accuracy on every task's held-out examples.

The archive and a checkpoint live in a work folder while the run trains; the
finished archive is moved to its output path in one atomic step. Resume after a
kill (SIGKILL included; tests/test_resume.py kills at every stage):

* the checkpoint (model, optimizer, the batch generator's state, iteration,
  number of dumps) is written after a dump, once the archive is fsynced, to a
  temporary file that is fsynced and renamed: it is never ahead of the archive;
* a rerun keeps the archive's first dumps up to the checkpoint's count (copied
  into a fresh file, :func:`ntkcl.archive.truncate`: a killed writer may have
  left half a dump) and continues from the checkpoint; on the CPU the finished
  archive equals an uninterrupted run's in every kernel, logit and accuracy;
* without a usable checkpoint (none yet, unreadable, or ahead of the archive) it
  starts afresh; a finished archive not yet moved is just moved.

A loss, kernel or logit that stops being finite ends the run as ``diverged``:
the archive keeps the dumps before it and records the iteration and reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__, archive, data, models, tasks
from .ntk import empirical_ntk, plan_ntk

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes the GPU when PyTorch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device: cuda was asked for, but PyTorch sees no GPU; "
            "set device: auto or cpu."
        )
    return torch.device(name)


def dump_schedule(task_iterations: list[int], every: int) -> list[int]:
    """The iterations after which the NTK is dumped (0 is the initial state)."""
    starts = np.cumsum([0, *task_iterations])
    total = int(starts[-1])
    points = set(range(0, total + 1, every)) | {total}
    for start in starts[1:-1]:
        points |= {int(start), int(start) + 1}
    return sorted(p for p in points if p <= total)


@dataclass
class _Probe:
    x: torch.Tensor
    indices: np.ndarray
    labels: np.ndarray


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / max(len(x), 1)


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write, fsync and rename: a kill or a node failure leaves the old or the new."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _load_checkpoint(path: Path, device, config_json: str, run_id: str) -> dict | None:
    """The checkpoint of a killed attempt, or None if there is none or it is broken."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # a damaged file: pickle, zip and torch errors
        log.warning("cannot read %s (%s); starting afresh", path, error)
        return None
    if state["config_json"] != config_json:
        raise ValueError(
            f"{path} belongs to a different configuration of run {run_id}; delete "
            f"{path.parent} to start this run afresh."
        )
    return state


def train_run(
    run: dict,
    data_path: str | Path,
    out_path: str | Path,
    work_dir: str | Path,
    *,
    progress: bool | None = None,
    checkpoint_interval: float = 60.0,
    fresh: bool = False,
) -> str:
    """Train one run and write its kernel archive to ``out_path``.

    Args:
        run: the resolved run config (see :mod:`ntkcl.config`).
        data_path: the prepared dataset file (``results/data/<id>.h5``).
        out_path: where the finished archive goes.
        work_dir: folder for the in-progress archive and the checkpoint; kept
            when the job fails so that a rerun resumes.
        progress: show a progress bar (default: when stderr is a terminal).
        checkpoint_interval: seconds between checkpoints (0: after every dump).
        fresh: start from the beginning, discarding what a killed attempt left in
            ``work_dir``.

    Returns:
        The run's status: ``complete`` or ``diverged``.

    Raises:
        RunLockedError: another process is training this run in ``work_dir``.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with _work_dir_lock(work_dir, run["run_id"]):
        return _train(
            run, data_path, out_path, work_dir, progress, checkpoint_interval, fresh
        )


class RunLockedError(RuntimeError):
    """Another process holds the run's work folder."""


@contextlib.contextmanager
def _work_dir_lock(work_dir: Path, run_id: str):
    """Hold ``work_dir/lock`` (an exclusive ``flock``) while the run trains, so that
    a second writer (an orphaned job and its resubmission) fails instead of mixing
    dumps into the same archive. The kernel drops the lock when the process dies."""
    path = work_dir / "lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunLockedError(
                f"run {run_id} is already being trained in {work_dir} by another "
                f"process ({holder}); wait for it to end or stop it, then rerun."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


def _train(
    run, data_path, out_path, work_dir: Path, progress, checkpoint_interval, fresh
):
    work_archive = work_dir / "archive.h5"
    checkpoint_path = work_dir / "checkpoint.pt"
    device = pick_device(run["device"])
    config_json = json.dumps(run, sort_keys=True)

    # data, tasks and the probe set
    dataset = data.load(data_path)
    tasks.validate_tasks(run["tasks"], dataset.num_classes)
    task_list = tasks.build_tasks(run["tasks"])
    train_x, train_y = dataset.train_x.to(device), dataset.train_y.to(device)
    probe_idx = tasks.probe_indices(
        dataset.train_y.numpy(),
        tasks.probe_classes(run["tasks"]),
        run["probe"]["size"],
        run["probe"]["seed"],
    )
    probe = _Probe(
        train_x[torch.as_tensor(probe_idx, device=device)],
        probe_idx,
        dataset.train_y.numpy()[probe_idx],
    )
    heldout = []
    for task in task_list:
        idx = tasks.heldout_indices(
            dataset.test_y.numpy(),
            task.classes,
            run["eval"]["max_examples"],
            run["probe"]["seed"],
        )
        idx = torch.as_tensor(idx, device=device)
        heldout.append((dataset.test_x.to(device)[idx], dataset.test_y.to(device)[idx]))

    # model and optimiser; initialised on the CPU so every device starts alike
    torch.manual_seed(run["seed"])
    model = models.build_model(run["model"], dataset.input_shape, dataset.num_classes)
    model.to(device)
    lr = models.learning_rate(run["regime"], run["optim"], run["model"]["width"])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(run["seed"])
    samplers = [
        tasks.BatchSampler(
            dataset.train_y.numpy(), task, run["optim"]["batch_size"], generator
        )
        for task in task_list
    ]
    iterations = [task.iterations for task in task_list]
    task_start = [int(s) for s in np.cumsum([0, *iterations[:-1]])]
    total = sum(iterations)
    schedule = dump_schedule(iterations, run["ntk"]["every"])
    ntk_options = dict(  # the same kernel for the recorded plan and every dump
        kind=run["ntk"]["kind"],
        dtype=getattr(torch, run["ntk"]["dtype"]),
        implementation=run["ntk"]["implementation"],
        memory_budget=run["ntk"]["memory_budget_mb"] * 2**20,
    )

    # a killed attempt may have left: a finished archive not yet published, or an
    # archive with a checkpoint to resume from (the archive may hold more dumps
    # than the checkpoint, or half a dump), or an archive without a checkpoint
    checkpoint_path.with_suffix(".tmp").unlink(missing_ok=True)
    if fresh:  # asked to start again: what a killed attempt left goes
        checkpoint_path.unlink(missing_ok=True)
        work_archive.unlink(missing_ok=True)
    if work_archive.exists():
        try:
            finished, stored_config = archive.read_status(work_archive)
        except archive.ArchiveError:
            finished, stored_config = "running", ""
        if finished != "running" and stored_config == config_json:
            log.info("run %s finished before it was killed; publishing", run["run_id"])
            archive.publish(work_archive, out_path)
            checkpoint_path.unlink(missing_ok=True)
            return finished
    state = _load_checkpoint(checkpoint_path, device, config_json, run["run_id"])
    start, elapsed_before, loss_value = 0, 0.0, math.nan
    writer = None
    if state is not None and work_archive.exists():
        try:
            writer = archive.Writer(work_archive, keep=state["dumps"])
        except archive.ArchiveError as error:
            log.warning("cannot resume from %s: %s; starting afresh", work_dir, error)
    if writer is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, elapsed_before = state["iteration"], state["elapsed"]
        loss_value = state["loss"]
        log.info(
            "resuming %s at iteration %d (%d dumps kept)",
            run["run_id"],
            start,
            writer.count,
        )
        threads = state.get("threads", torch.get_num_threads())
        if threads != torch.get_num_threads() and device.type == "cpu":
            log.warning(
                "the killed attempt trained with %d CPU thread(s), this one with %d: "
                "from iteration %d on the results can differ in the last bits from "
                "an uninterrupted run",
                threads,
                torch.get_num_threads(),
                start,
            )
    else:
        checkpoint_path.unlink(missing_ok=True)
        work_archive.unlink(missing_ok=True)
        plan = plan_ntk(model, probe.x, **ntk_options)
        archive.create(
            work_archive,
            kind=run["ntk"]["kind"],
            dtype=run["ntk"]["dtype"],
            probe_indices=probe.indices,
            probe_labels=probe.labels,
            num_classes=dataset.num_classes,
            task_start=task_start,
            attrs=dict(
                run_id=run["run_id"],
                experiment=run["experiment"],
                params_json=json.dumps(run["params"], sort_keys=True),
                config_json=config_json,
                seed=run["seed"],
                learning_rate=lr,
                device=str(device),
                torch_threads=torch.get_num_threads(),
                dataset=dataset.name,
                ntkcl_version=__version__,
                torch_version=str(torch.__version__),
                python_version=platform.python_version(),
                source=f"ntkcl {__version__}",
            ),
            kernel_attrs=dict(
                implementation=f"{plan.method} ({plan.reason})",
                requested_implementation=run["ntk"]["implementation"],
                compute_dtype=run["ntk"]["dtype"],
                num_parameters=plan.num_parameters,
                probe="probe examples sample_1 with themselves (sample_2)",
            ),
        )
        writer = archive.Writer(work_archive)
    log.info(
        "run %s: %s, lr %.4g, %d iterations over %d tasks, %d dumps on %s",
        run["run_id"],
        run["model"],
        lr,
        total,
        len(task_list),
        len(schedule),
        device,
    )

    def task_of(iteration: int) -> int:
        """The task of the update that produced the state after ``iteration``."""
        return max(k for k, s in enumerate(task_start) if s < iteration or k == 0)

    def dump(iteration: int, loss: float) -> str:
        """Compute and append one dump; a reason instead if it is not finite."""
        t0 = time.perf_counter()
        kernel = empirical_ntk(model, probe.x, **ntk_options)
        seconds = time.perf_counter() - t0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(probe.x)
            accuracy = [_accuracy(model, x, y) for x, y in heldout]
        model.train(was_training)
        for name, values in (("NTK", kernel), ("probe logits", logits)):
            if not torch.isfinite(values).all():
                return f"the {name} became non-finite at iteration {iteration}"
        writer.append(
            iteration=iteration,
            active_task=task_of(iteration),
            wall_time=elapsed_before + time.perf_counter() - started,
            train_loss=loss,
            accuracy=np.asarray(accuracy),
            logits=logits.float().cpu().numpy(),
            ntk=kernel.cpu().numpy(),
        )
        log.info(
            "dump %d/%d iteration %d task %d loss %.4f accuracy %s ntk %.3fs",
            writer.count,
            len(schedule),
            iteration,
            task_of(iteration),
            loss,
            "[" + ", ".join(f"{a:.3f}" for a in accuracy) + "]",
            seconds,
        )
        return ""

    started = time.perf_counter()
    last_checkpoint = time.monotonic()
    reason, iteration = "", start
    bar = tqdm(
        total=total,
        initial=start,
        desc=run["run_id"],
        unit="it",
        disable=not (progress if progress is not None else sys.stderr.isatty()),
    )
    try:
        if start == 0:
            reason = dump(0, math.nan)
        model.train()
        while not reason and iteration < total:
            iteration += 1

            # forward backward update on the current task's minibatch
            task = task_of(iteration)
            batch = samplers[task].sample().to(device)
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            bar.update()
            if not math.isfinite(loss_value):
                reason = f"training loss became {loss_value} at iteration {iteration}"
                break

            # dump, then checkpoint: the checkpoint is never ahead of the archive
            if iteration not in schedule:
                continue
            reason = dump(iteration, loss_value)
            if not reason and time.monotonic() - last_checkpoint >= checkpoint_interval:
                writer.sync()
                _save_checkpoint(
                    checkpoint_path,
                    dict(
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        generator=generator.get_state(),
                        iteration=iteration,
                        dumps=writer.count,
                        loss=loss_value,
                        elapsed=elapsed_before + time.perf_counter() - started,
                        config_json=config_json,
                        threads=torch.get_num_threads(),
                    ),
                )
                last_checkpoint = time.monotonic()
    finally:
        bar.close()
        writer.close()

    status, diverged_at = ("diverged", iteration) if reason else ("complete", -1)
    if reason:
        log.error(
            "run %s diverged: %s (lr %.4g); the archive keeps the dumps so far and "
            "is marked diverged",
            run["run_id"],
            reason,
            lr,
        )
    archive.finish(work_archive, status, reason, diverged_at)
    archive.publish(work_archive, out_path)
    checkpoint_path.unlink(missing_ok=True)
    log.info("run %s %s: %s", run["run_id"], status, out_path)
    return status

"""Task sequences, the probe set and minibatch sampling.

A run trains on a sequence of tasks; each task is a set of classes (one shared
output head over all of the dataset's classes) and, optionally, class proportions.
Schemes (``tasks.scheme``):

- ``split``: one task per entry of ``tasks.classes``, trained on its classes with
  their natural frequencies (examples drawn uniformly).
- ``overlap`` (paper E2): ``classes`` holds two disjoint lists A and B. Task 1 is A;
  task 2 is the first ``shared`` classes of A followed by the first
  ``len(B) - shared`` classes of B, so it keeps ``len(B)`` classes. For 5-class
  lists, ``similarity(A, task 2) = k / (10 - k)`` with ``k = shared``.
- ``frequency`` (paper E3, our reconstruction): ``classes`` holds two disjoint lists
  A and B, and both phases train on all classes of A and B. D0 puts ``majority``
  of the mass on A (uniform within A) and the rest on B (uniform within B); D1 is
  its mirror image. Phase 1 draws from D0, phase 2 from
  ``D_alpha = (1 - alpha) D0 + alpha D1``. ``Task.class_weights`` hold the
  per-class masses.

The probe set is a class-balanced subset of the first task's training examples
(``probe_classes``), chosen only by the probe seed, so every run of an experiment
probes the same examples.
"""

import logging
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

SCHEMES = ("split", "overlap", "frequency")
DEFAULTS = {"scheme": "split", "shared": 0, "alpha": 0.5, "majority": 0.9}


@dataclass(frozen=True)
class Task:
    """One task of a sequence.

    Attributes:
        index: position in the sequence, from 0.
        classes: the class ids that can appear, in a fixed order.
        class_weights: probability of drawing each class (same order as
            ``classes``, summing to 1), or None to draw examples uniformly from all
            examples of ``classes`` (natural class frequencies).
        iterations: SGD iterations spent on this task.
    """

    index: int
    classes: tuple[int, ...]
    class_weights: tuple[float, ...] | None
    iterations: int


def build_tasks(tasks_cfg: dict) -> list[Task]:
    """The task sequence of a ``tasks`` config (see the module docstring).

    Args:
        tasks_cfg: ``scheme``, ``classes`` (list of class lists), ``shared``,
            ``alpha``, ``majority``, ``iterations`` (an int for every task, or a
            list with one per task).

    Raises:
        ValueError: a malformed or inconsistent config; the message names the key.
    """
    cfg = {**DEFAULTS, **tasks_cfg}
    scheme, classes = cfg["scheme"], _class_lists(cfg.get("classes"))
    if scheme not in SCHEMES:
        raise ValueError(f"tasks.scheme is {scheme!r}; expected one of {SCHEMES}.")

    if scheme == "split":
        sets, weights = [tuple(c) for c in classes], [None] * len(classes)
    else:
        a, b = _two_disjoint(classes, scheme)
        if scheme == "overlap":
            shared = cfg["shared"]
            if not _is_int(shared) or not 0 <= shared <= min(len(a), len(b)):
                raise ValueError(
                    f"tasks.shared is {shared!r}; expected an integer from 0 to "
                    f"{min(len(a), len(b))} (the number of task-2 classes taken from "
                    "task 1, at most the size of either class list)."
                )
            sets = [tuple(a), tuple(a[:shared] + b[: len(b) - shared])]
            weights = [None, None]
        else:
            alpha, majority = cfg["alpha"], cfg["majority"]
            if not _is_real(alpha) or not 0 <= alpha <= 1:
                raise ValueError(
                    f"tasks.alpha is {alpha!r}; expected a number in [0, 1] (phase 2 "
                    "draws from (1 - alpha) D0 + alpha D1)."
                )
            if not _is_real(majority) or not 0 < majority <= 1:
                raise ValueError(
                    f"tasks.majority is {majority!r}; expected a number in (0, 1] "
                    "(the share of D0's mass on the first class list), e.g. 0.9."
                )
            d0 = [majority / len(a)] * len(a) + [(1 - majority) / len(b)] * len(b)
            d1 = [(1 - majority) / len(a)] * len(a) + [majority / len(b)] * len(b)
            mix = [(1 - alpha) * p + alpha * q for p, q in zip(d0, d1, strict=True)]
            sets = [tuple(a + b)] * 2
            weights = [tuple(d0), tuple(mix)]

    iterations = cfg.get("iterations")
    if _is_int(iterations):
        iterations = [iterations] * len(sets)
    if (
        not isinstance(iterations, list | tuple)
        or len(iterations) != len(sets)
        or not all(_is_int(n) and n >= 1 for n in iterations)
    ):
        raise ValueError(
            f"tasks.iterations is {iterations!r}; expected a positive integer, or a "
            f"list of {len(sets)} positive integers (one per task of the "
            f"{scheme!r} scheme, which has {len(sets)} tasks)."
        )
    return [
        Task(i, s, w, int(n))
        for i, (s, w, n) in enumerate(zip(sets, weights, iterations, strict=True))
    ]


def validate_tasks(tasks_cfg: dict, num_classes: int) -> list[Task]:
    """Check a ``tasks`` config against a dataset with ``num_classes`` classes.

    Returns:
        The task sequence, as ``build_tasks`` gives it.

    Raises:
        ValueError: a malformed config, or a class id outside ``0..num_classes-1``.
    """
    task_list = build_tasks(tasks_cfg)
    for i, group in enumerate(_class_lists(tasks_cfg.get("classes"))):
        bad = [c for c in group if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f"tasks.classes[{i}] has class ids {bad}, but the dataset has "
                f"{num_classes} classes (ids 0 to {num_classes - 1}); pick ids in "
                "that range or another dataset."
            )
    return task_list


def probe_classes(tasks_cfg: dict) -> tuple[int, ...]:
    """The probe's classes: those of the first task, ``tasks.classes[0]``."""
    return tuple(int(c) for c in _class_lists(tasks_cfg.get("classes"))[0])


def probe_indices(train_labels, classes: Iterable[int], size: int, seed: int):
    """A class-balanced, seeded choice of ``size`` examples of ``classes``.

    Each class gets ``size // len(classes)`` examples; the remainder goes one each
    to the first classes in the order of ``classes``. A class with too few
    examples gives all it has and the rest is spread over the others in the same
    way. Class ``c``'s examples are a random permutation of its indices drawn from
    ``numpy.random.default_rng([seed, c])``: the choice depends on nothing but the
    labels, the seed and the quota (not on a run's seed), and a larger quota picks
    a superset.

    Args:
        train_labels: ``(N,)`` integer labels (numpy array or tensor).
        classes: class ids to draw from.
        size: number of examples.
        seed: non-negative integer.

    Returns:
        ``(size,)`` int64 indices into ``train_labels``, grouped by class in the
        order of ``classes``, ascending within each class.

    Raises:
        ValueError: ``size`` is not positive or exceeds the available examples.
    """
    labels, classes = _labels(train_labels), [int(c) for c in classes]
    available = int(np.isin(labels, classes).sum())
    if not _is_int(size) or not 0 < size <= available:
        raise ValueError(
            f"probe size is {size!r}; expected a positive integer of at most "
            f"{available}, the number of examples of classes {classes}."
        )
    return _balanced(labels, classes, size, seed)


def heldout_indices(test_labels, classes, max_examples: int | None, seed: int):
    """Held-out examples of ``classes`` for accuracy, at most ``max_examples``.

    All of them when there are no more than ``max_examples`` (or it is None);
    otherwise a class-balanced choice exactly as in ``probe_indices``.

    Returns:
        int64 indices into ``test_labels``, grouped by class in the order of
        ``classes``, ascending within each class.
    """
    labels, classes = _labels(test_labels), [int(c) for c in classes]
    available = int(np.isin(labels, classes).sum())
    size = available if max_examples is None else min(int(max_examples), available)
    if size <= 0:
        raise ValueError(
            f"No held-out examples: {available} test examples of classes {classes}, "
            f"max_examples={max_examples!r} (expected a positive integer or None)."
        )
    if size == available:  # every example, no choice to make
        return np.concatenate([np.flatnonzero(labels == c) for c in classes])
    return _balanced(labels, classes, size, seed)


def similarity(a, b) -> float:
    """Jaccard similarity ``|A ∩ B| / |A ∪ B|`` of two class sets (or Tasks)."""
    a, b = (set(getattr(x, "classes", x)) for x in (a, b))
    if not a | b:
        raise ValueError("similarity of two empty class sets is undefined.")
    return len(a & b) / len(a | b)


def split_classes(num_classes: int, num_tasks: int) -> list[list[int]]:
    """Consecutive equal blocks of ``0..num_classes-1``, e.g. CIFAR-100 as 10 x 10."""
    if num_tasks < 1 or num_classes % num_tasks:
        raise ValueError(
            f"Cannot split {num_classes} classes into {num_tasks} equal tasks; "
            "choose a number of tasks that divides the number of classes."
        )
    per = num_classes // num_tasks
    return [list(range(i * per, (i + 1) * per)) for i in range(num_tasks)]


class BatchSampler:
    """Draws minibatch indices for one task, with replacement.

    With ``task.class_weights`` None: examples uniformly from all examples of the
    task's classes. Otherwise a class by its weight (inverse CDF of one uniform
    draw), then an example uniformly within that class.

    The sampler keeps no state of its own: every draw comes from ``generator``
    (a CPU ``torch.Generator``), so a seed gives the same stream on every machine,
    and restoring the generator's state resumes the stream exactly.

    Args:
        labels: ``(N,)`` integer labels of the training set.
        task: the task to draw for.
        batch_size: indices per call of ``sample``.
        generator: CPU generator shared by the run.

    Raises:
        ValueError: a class with positive weight (or every class of an unweighted
            task) has no examples, or a CUDA generator.
    """

    def __init__(self, labels, task: Task, batch_size: int, generator: torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"BatchSampler needs a CPU torch.Generator, got one on "
                f"{generator.device}; CPU draws are the same on every machine."
            )
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(
                f"batch_size is {batch_size!r}; expected a positive integer."
            )
        labels = _labels(labels)
        self.task, self.batch_size, self.generator = task, int(batch_size), generator
        pools = [np.flatnonzero(labels == c) for c in task.classes]
        self._sizes = torch.tensor([len(p) for p in pools], dtype=torch.float64)
        self._offsets = torch.tensor(np.cumsum([0] + [len(p) for p in pools[:-1]]))
        if task.class_weights is None:
            pools = [np.sort(np.concatenate(pools))]
            empty = [] if len(pools[0]) else list(task.classes)
        else:
            empty = [
                c
                for c, w, p in zip(task.classes, task.class_weights, pools, strict=True)
                if w > 0 and len(p) == 0
            ]
            cdf = torch.tensor(np.cumsum(task.class_weights), dtype=torch.float64)
            self._cdf = cdf / cdf[-1]
        if empty:
            raise ValueError(
                f"Task {task.index} draws classes {empty}, which have no training "
                "examples; check tasks.classes against the dataset."
            )
        self._pool = torch.from_numpy(np.concatenate(pools).astype(np.int64))

    def sample(self) -> torch.Tensor:
        """``(batch_size,)`` int64 indices into ``labels``."""
        g, n = self.generator, self.batch_size
        if self.task.class_weights is None:
            return self._pool[torch.randint(len(self._pool), (n,), generator=g)]
        u = torch.rand(n, generator=g, dtype=torch.float64)
        which = torch.searchsorted(self._cdf, u, right=True).clamp_(
            max=len(self._cdf) - 1
        )
        v = torch.rand(n, generator=g, dtype=torch.float64)
        sizes = self._sizes[which]
        within = torch.minimum((v * sizes).long(), sizes.long() - 1)
        return self._pool[self._offsets[which] + within]


# --- helpers ----------------------------------------------------------------------


def _balanced(labels: np.ndarray, classes: list[int], size: int, seed: int):
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed is {seed!r}; expected a non-negative integer.")
    pools = [np.flatnonzero(labels == c) for c in classes]

    # quotas: equal shares, remainder to the first classes, refill from the scarce
    quota, left = [0] * len(classes), size
    while left > 0:
        open_ = [i for i, p in enumerate(pools) if quota[i] < len(p)]
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            give = min(share + (rank < extra), len(pools[i]) - quota[i])
            quota[i], left = quota[i] + give, left - give
    if any(q < size // len(classes) for q in quota):
        log.warning("classes %s are short of examples; quotas %s", classes, quota)

    chosen = []
    for c, pool, q in zip(classes, pools, quota, strict=True):
        order = np.random.default_rng([seed, c]).permutation(len(pool))[:q]
        chosen.append(pool[np.sort(order)])
    return np.concatenate(chosen).astype(np.int64)


def _labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).astype(np.int64, copy=False)


def _class_lists(classes) -> list[list[int]]:
    if (
        not isinstance(classes, list | tuple)
        or not classes
        or not all(isinstance(g, list | tuple) and g for g in classes)
        or not all(_is_int(c) and c >= 0 for g in classes for c in g)
    ):
        raise ValueError(
            f"tasks.classes is {classes!r}; expected a non-empty list of non-empty "
            "lists of class ids, e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]."
        )
    for i, g in enumerate(classes):
        if len(set(g)) != len(g):
            raise ValueError(f"tasks.classes[{i}] = {list(g)} repeats a class id.")
    return [[int(c) for c in g] for g in classes]


def _two_disjoint(classes: list[list[int]], scheme: str):
    if len(classes) != 2 or set(classes[0]) & set(classes[1]):
        raise ValueError(
            f"tasks.classes is {classes}; the {scheme!r} scheme needs exactly two "
            "disjoint class lists, e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]."
        )
    return classes


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)

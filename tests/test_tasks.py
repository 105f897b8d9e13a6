"""Task sequences, probe and held-out selection, and the minibatch sampler."""

import numpy as np
import pytest
import torch

from ntkcl import tasks

A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def cfg(**overrides):
    return {"scheme": "split", "classes": [A, B], "iterations": 100, **overrides}


def labels_of(counts):
    """Labels with ``counts[c]`` examples of class c, interleaved."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(123).permutation(labels)


# --- build_tasks ------------------------------------------------------------------


def test_split_gives_one_task_per_class_list():
    task_list = tasks.build_tasks(cfg(classes=[[0, 1], [2, 3], [4, 5]]))
    assert [t.classes for t in task_list] == [(0, 1), (2, 3), (4, 5)]
    assert [t.index for t in task_list] == [0, 1, 2]
    assert all(t.class_weights is None and t.iterations == 100 for t in task_list)


def test_iterations_per_task_list():
    task_list = tasks.build_tasks(cfg(iterations=[300, 50]))
    assert [t.iterations for t in task_list] == [300, 50]


@pytest.mark.parametrize("iterations", [[100], [100, 100, 100], 0, [100, 0], "5"])
def test_bad_iterations_are_refused(iterations):
    with pytest.raises(ValueError, match="tasks.iterations"):
        tasks.build_tasks(cfg(iterations=iterations))


@pytest.mark.parametrize("shared", range(6))
def test_overlap_shares_k_classes_and_keeps_five(shared):
    first, second = tasks.build_tasks(cfg(scheme="overlap", shared=shared))
    assert first.classes == tuple(A)
    assert second.classes == tuple(A[:shared] + B[: 5 - shared])
    assert len(second.classes) == 5
    assert tasks.similarity(first, second) == pytest.approx(shared / (10 - shared))


def test_overlap_similarity_grid_of_the_paper():
    values = [
        tasks.similarity(*tasks.build_tasks(cfg(scheme="overlap", shared=k)))
        for k in range(6)
    ]
    assert values == pytest.approx([0, 1 / 9, 0.25, 3 / 7, 2 / 3, 1])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"scheme": "overlap", "shared": 6}, "tasks.shared"),
        ({"scheme": "overlap", "shared": -1}, "tasks.shared"),
        ({"scheme": "overlap", "classes": [A, B, [10]]}, "exactly two"),
        ({"scheme": "overlap", "classes": [A, [4, 5]]}, "disjoint"),
        ({"scheme": "frequency", "alpha": 1.5}, "tasks.alpha"),
        ({"scheme": "frequency", "alpha": -0.1}, "tasks.alpha"),
        ({"scheme": "frequency", "majority": 0}, "tasks.majority"),
        ({"scheme": "frequency", "classes": [A]}, "exactly two"),
        ({"scheme": "shuffle"}, "tasks.scheme"),
        ({"classes": []}, "tasks.classes"),
        ({"classes": [[0, 1], []]}, "tasks.classes"),
        ({"classes": [[0, 0, 1]]}, "repeats"),
        ({"classes": [[0, -1]]}, "tasks.classes"),
    ],
)
def test_bad_task_configs_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        tasks.build_tasks(cfg(**overrides))


def test_frequency_weights_mix_the_two_phases():
    first, second = tasks.build_tasks(cfg(scheme="frequency", majority=0.9, alpha=0.25))
    assert first.classes == second.classes == tuple(A + B)
    assert first.class_weights == pytest.approx([0.18] * 5 + [0.02] * 5)
    # D_0.25 = 0.75 D0 + 0.25 D1: mass on A = 0.75 * 0.9 + 0.25 * 0.1 = 0.7
    assert second.class_weights == pytest.approx([0.14] * 5 + [0.06] * 5)
    assert sum(second.class_weights) == pytest.approx(1)
    assert tasks.similarity(first, second) == 1


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_frequency_alpha_end_points(alpha):
    first, second = tasks.build_tasks(cfg(scheme="frequency", alpha=alpha))
    mass_a = sum(second.class_weights[:5])
    assert mass_a == pytest.approx(0.9 * (1 - alpha) + 0.1 * alpha)
    assert first.class_weights == pytest.approx(
        tasks.build_tasks(cfg(scheme="frequency", alpha=0.0))[1].class_weights
    )


def test_validate_tasks_checks_class_range():
    assert len(tasks.validate_tasks(cfg(), 10)) == 2
    with pytest.raises(ValueError, match=r"class ids \[10\].*10 classes"):
        tasks.validate_tasks(cfg(classes=[A, [8, 9, 10]]), 10)


def test_probe_classes_are_the_first_tasks():
    assert tasks.probe_classes(cfg()) == (0, 1, 2, 3, 4)


def test_split_classes():
    assert tasks.split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(tasks.split_classes(100, 10)[9]) == 10
    with pytest.raises(ValueError, match="equal tasks"):
        tasks.split_classes(10, 3)


def test_similarity_of_plain_sets():
    assert tasks.similarity([0, 1, 2], [2, 3]) == 0.25
    with pytest.raises(ValueError, match="empty"):
        tasks.similarity([], [])


# --- probe and held-out selection -------------------------------------------------


def test_probe_is_balanced_grouped_and_deterministic():
    labels = labels_of([30] * 10)
    probe = tasks.probe_indices(labels, A, 20, seed=0)
    assert probe.dtype == np.int64 and len(probe) == 20
    assert list(labels[probe]) == [c for c in A for _ in range(4)]  # grouped by class
    for c in A:
        block = probe[labels[probe] == c]
        assert (np.diff(block) > 0).all()  # ascending within a class
    assert np.array_equal(probe, tasks.probe_indices(labels, A, 20, seed=0))
    assert np.array_equal(probe, tasks.probe_indices(torch.tensor(labels), A, 20, 0))
    assert not np.array_equal(probe, tasks.probe_indices(labels, A, 20, seed=1))


def test_probe_ignores_the_global_random_state():
    labels = labels_of([30] * 10)
    torch.manual_seed(1)
    np.random.seed(1)
    first = tasks.probe_indices(labels, A, 10, seed=3)
    torch.manual_seed(2)
    np.random.seed(2)
    assert np.array_equal(first, tasks.probe_indices(labels, A, 10, seed=3))


def test_probe_remainder_goes_to_the_first_classes():
    labels = labels_of([30] * 10)
    probe = tasks.probe_indices(labels, [4, 2, 0], 11, seed=0)
    counts = [int((labels[probe] == c).sum()) for c in (4, 2, 0)]
    assert counts == [4, 4, 3]


def test_probe_refills_from_other_classes_when_one_is_short():
    labels = labels_of([2, 30, 30])
    probe = tasks.probe_indices(labels, [0, 1, 2], 12, seed=0)
    assert [int((labels[probe] == c).sum()) for c in range(3)] == [2, 5, 5]


def test_probe_grows_as_a_superset():
    labels = labels_of([30] * 10)
    small = set(tasks.probe_indices(labels, A, 10, seed=0))
    assert small <= set(tasks.probe_indices(labels, A, 20, seed=0))


def test_probe_too_large_is_refused():
    labels = labels_of([3] * 10)
    with pytest.raises(ValueError, match="at most 15"):
        tasks.probe_indices(labels, A, 16, seed=0)


def test_heldout_takes_all_or_a_balanced_subset():
    labels = labels_of([6] * 10)
    everything = tasks.heldout_indices(labels, B, None, seed=0)
    assert sorted(everything) == sorted(np.flatnonzero(labels >= 5))
    assert len(tasks.heldout_indices(labels, B, 1000, seed=0)) == 30
    subset = tasks.heldout_indices(labels, B, 10, seed=0)
    assert sorted(labels[subset]) == [c for c in B for _ in range(2)]


# --- BatchSampler -----------------------------------------------------------------


def draw(labels, task, seed, batches=1, batch_size=64):
    sampler = tasks.BatchSampler(
        labels, task, batch_size, torch.Generator().manual_seed(seed)
    )
    return torch.cat([sampler.sample() for _ in range(batches)])


def test_sampler_is_reproducible_and_stays_in_the_task():
    labels = labels_of([20] * 10)
    task = tasks.build_tasks(cfg())[1]
    first = draw(labels, task, seed=0, batches=5)
    assert first.dtype == torch.int64 and first.shape == (320,)
    assert torch.equal(first, draw(labels, task, seed=0, batches=5))
    assert not torch.equal(first, draw(labels, task, seed=1, batches=5))
    assert set(labels[first.numpy()]) <= set(B)


def test_sampler_resumes_from_the_generator_state():
    labels = labels_of([20] * 10)
    task = tasks.build_tasks(cfg(scheme="frequency"))[1]
    generator = torch.Generator().manual_seed(0)
    sampler = tasks.BatchSampler(labels, task, 8, generator)
    sampler.sample()
    state = generator.get_state()
    expected = sampler.sample()
    fresh = torch.Generator()
    fresh.set_state(state)
    assert torch.equal(tasks.BatchSampler(labels, task, 8, fresh).sample(), expected)


def test_uniform_sampler_follows_natural_frequencies():
    labels = labels_of([100, 300, 50, 50, 50, 50, 50, 50, 50, 50])
    drawn = labels[draw(labels, tasks.build_tasks(cfg())[0], 0, batches=80).numpy()]
    share_of_1 = (drawn == 1).mean()  # 300 of the task's 550 examples
    assert share_of_1 == pytest.approx(300 / 550, abs=0.03)


def test_frequency_sampler_matches_class_weights():
    # unequal class sizes: weights, not example counts, must set the proportions
    labels = labels_of([5, 50, 10, 20, 40, 7, 30, 9, 12, 60])
    first, second = tasks.build_tasks(cfg(scheme="frequency", majority=0.9, alpha=0.5))
    drawn = labels[draw(labels, first, 0, batches=160).numpy()]  # 10240 draws
    assert np.isin(drawn, A).mean() == pytest.approx(0.9, abs=0.015)
    for c in A:
        assert (drawn == c).mean() == pytest.approx(0.18, abs=0.015)
    drawn = labels[draw(labels, second, 0, batches=160).numpy()]
    assert np.isin(drawn, A).mean() == pytest.approx(0.5, abs=0.02)


def test_frequency_sampler_covers_each_class_uniformly():
    labels = labels_of([4] * 10)
    first, _ = tasks.build_tasks(cfg(scheme="frequency", majority=0.5))
    drawn = draw(labels, first, 0, batches=100).numpy()
    counts = np.bincount(drawn, minlength=len(labels))
    assert counts.min() > 0.5 * counts.mean()  # every example of a class is drawn


def test_zero_weight_classes_are_never_drawn_and_may_be_empty():
    labels = labels_of([10] * 5 + [0] * 5)  # no examples of classes 5..9
    first, _ = tasks.build_tasks(cfg(scheme="frequency", majority=1.0))
    assert set(labels[draw(labels, first, 0, batches=20).numpy()]) <= set(A)


def test_sampler_refuses_classes_without_examples():
    labels = labels_of([10] * 5)
    second = tasks.build_tasks(cfg())[1]
    with pytest.raises(ValueError, match="no training examples"):
        tasks.BatchSampler(labels, second, 8, torch.Generator())

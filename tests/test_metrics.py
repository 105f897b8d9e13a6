"""Kernel metrics against hand-worked values and independent numpy computations."""

import math

import numpy as np
import pytest

from ntkcl import metrics

# --- independent reference implementations (explicit loops, kron matrices) ---


def loop_matrix(kernel, kind):
    """Logit-major matrix built entry by entry."""
    if kind == "trace":
        return np.array(kernel, dtype=float)
    n, k = kernel.shape[0], kernel.shape[2]
    out = np.zeros((n * k, n * k))
    for a in range(k):
        for b in range(k):
            for i in range(n):
                for j in range(n):
                    if kind == "full":
                        out[a * n + i, b * n + j] = kernel[i, j, a, b]
                    elif a == b:
                        out[a * n + i, b * n + j] = kernel[i, j, a]
    return out


def centring_matrix(n, k):
    """I_K ⊗ H with H = I - 11ᵀ/n."""
    return np.kron(np.eye(k), np.eye(n) - np.ones((n, n)) / n)


def reference_cka(a, b, n, k):
    c = centring_matrix(n, k)
    a_c, b_c = c @ a @ c, c @ b @ c
    return np.trace(a_c @ b_c.T) / math.sqrt(
        np.trace(a_c @ a_c.T) * np.trace(b_c @ b_c.T)
    )


def reference_fort(a, b):
    return np.trace(a @ b.T) / math.sqrt(np.trace(a @ a.T) * np.trace(b @ b.T))


def random_full(n, k, params=7, seed=0):
    """Full PSD kernel Θ[i, j, a, b] = Σ_p J[i, a, p] J[j, b, p]."""
    jac = np.random.default_rng(seed).standard_normal((n, k, params))
    return np.einsum("iap,jbp->ijab", jac, jac)


def traced(full):
    return np.einsum("ijaa->ij", full)


def diagonal(full):
    return np.einsum("ijaa->ija", full)


LABELS = np.array([0, 1, 2, 0, 1, 2, 0])
CLASSES = np.array([0, 1, 2])

# --- kernel_matrix ---


@pytest.mark.parametrize("kind", ["trace", "diagonal", "full"])
def test_kernel_matrix_matches_loops(kind):
    full = random_full(4, 3)
    kernel = {"trace": traced(full), "diagonal": diagonal(full), "full": full}[kind]
    matrix = metrics.kernel_matrix(kernel, kind)
    np.testing.assert_array_equal(matrix, loop_matrix(kernel, kind))
    assert matrix.dtype == np.float64
    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-12, atol=1e-12)


def test_kernel_matrix_casts_float32_to_float64():
    kernel = np.eye(3, dtype=np.float32)
    assert metrics.kernel_matrix(kernel, "trace").dtype == np.float64


@pytest.mark.parametrize(
    ("shape", "kind"), [((3, 3, 2), "trace"), ((3, 4), "trace"), ((3, 3, 2, 1), "full")]
)
def test_kernel_matrix_rejects_bad_shapes(shape, kind):
    with pytest.raises(ValueError, match="must have shape"):
        metrics.kernel_matrix(np.zeros(shape), kind)


def test_kernel_matrix_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Unknown kernel kind"):
        metrics.kernel_matrix(np.eye(2), "block")


# --- centring ---


@pytest.mark.parametrize("k", [1, 3])
def test_center_equals_kron_centring(k):
    n = 5
    matrix = metrics.kernel_matrix(random_full(n, k), "full")
    c = centring_matrix(n, k)
    np.testing.assert_allclose(
        metrics.center(matrix, num_logits=k), c @ matrix @ c, atol=1e-12
    )


def test_center_by_hand():
    # n = 2: H K H = (a + d - 2b) / 4 * [[1, -1], [-1, 1]]
    centred = metrics.center(np.array([[3.0, 1.0], [1.0, 2.0]]), num_logits=1)
    np.testing.assert_allclose(centred, 0.75 * np.array([[1, -1], [-1, 1]]))


def test_center_rejects_non_dividing_num_logits():
    with pytest.raises(ValueError, match="does not divide"):
        metrics.center(np.eye(5), num_logits=2)


# --- CKA and distances ---


def test_cka_by_hand():
    # n = 3: H diag(1,0,0) H = u uᵀ, u = (2, -1, -1)/3; likewise v for diag(0,1,0).
    # CKA = (uᵀv)² / (|u|² |v|²) = (1/9) / (4/9) = 1/4; Fort: <A, B> = 0 -> 1.
    a, b = np.diag([1.0, 0.0, 0.0]), np.diag([0.0, 1.0, 0.0])
    assert metrics.cka(a, b, num_logits=1) == pytest.approx(0.25, abs=1e-15)
    assert metrics.kernel_distance(a, b, num_logits=1) == pytest.approx(0.75)
    assert metrics.kernel_distance(a, b, centered=False) == pytest.approx(1.0)


def test_cka_of_2x2_kernels_is_one():
    # every centred 2x2 kernel is a multiple of [[1, -1], [-1, 1]]
    a, b = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[5.0, -1.0], [-1.0, 1.0]])
    assert metrics.cka(a, b, num_logits=1) == pytest.approx(1.0)


def test_fort_distance_by_hand():
    # <A, I> = 4, |A|² = 10, |I|² = 2: similarity 4 / sqrt(20) = 2 / sqrt(5)
    a = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert metrics.uncentered_similarity(a, np.eye(2)) == pytest.approx(2 / 5**0.5)
    assert metrics.kernel_distance(a, np.eye(2), centered=False) == pytest.approx(
        1 - 2 / 5**0.5
    )


@pytest.mark.parametrize("k", [1, 3])
def test_cka_self_and_scaled_copy_is_one(k):
    matrix = metrics.kernel_matrix(random_full(6, k), "full")
    assert metrics.cka(matrix, matrix, num_logits=k) == pytest.approx(1.0)
    assert metrics.cka(matrix, 37.5 * matrix, num_logits=k) == pytest.approx(1.0)
    assert metrics.kernel_distance(matrix, 0.01 * matrix, num_logits=k) <= 1e-12
    assert metrics.kernel_distance(matrix, 3 * matrix, centered=False) <= 1e-12


@pytest.mark.parametrize("kind", ["trace", "diagonal", "full"])
def test_similarities_match_reference(kind):
    n, k = 6, 3
    first, second = random_full(n, k, seed=1), random_full(n, k, seed=2)
    convert = {"trace": traced, "diagonal": diagonal, "full": lambda x: x}[kind]
    a = loop_matrix(convert(first), kind)
    b = loop_matrix(convert(second), kind)
    blocks = 1 if kind == "trace" else k
    expected = reference_cka(a, b, n, blocks)
    assert 0 < expected < 1
    assert metrics.cka(a, b, num_logits=blocks) == pytest.approx(expected, rel=1e-12)
    assert metrics.uncentered_similarity(a, b) == pytest.approx(
        reference_fort(a, b), rel=1e-12
    )


def test_centred_distance_needs_num_logits():
    with pytest.raises(ValueError, match="num_logits"):
        metrics.kernel_distance(np.eye(2), np.eye(2))


def test_similarity_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        metrics.uncentered_similarity(np.eye(2), np.eye(3))


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 3)), np.ones((3, 3)), np.full((3, 3), np.nan)]
)
def test_degenerate_kernels_give_nan_quietly(bad):
    # pytest turns any warning into an error (filterwarnings = error)
    good = np.diag([1.0, 2.0, 3.0])
    assert math.isnan(metrics.cka(bad, good, num_logits=1))
    assert math.isnan(metrics.label_alignment(bad, metrics.one_hot([0, 1, 1], [0, 1])))


def test_zero_and_nonfinite_kernels_uncentred():
    good = np.eye(3)
    assert math.isnan(metrics.uncentered_similarity(np.zeros((3, 3)), good))
    inf = np.eye(3)
    inf[0, 0] = np.inf
    assert math.isnan(metrics.uncentered_similarity(inf, good))
    assert math.isnan(metrics.cka(inf, good, num_logits=1))
    assert math.isnan(metrics.max_eigenvalue(inf))


# --- top eigenvalue ---


def test_max_eigenvalue_by_hand():
    assert metrics.max_eigenvalue(np.array([[2.0, 1.0], [1.0, 2.0]])) == 3.0
    block = metrics.kernel_matrix(
        np.stack([np.array([[2.0, 1.0], [1.0, 2.0]]), 5 * np.eye(2)], axis=2),
        "diagonal",
    )
    assert metrics.max_eigenvalue(block) == pytest.approx(5.0)


@pytest.mark.parametrize("dense_max_size", [0, 256])
def test_max_eigenvalue_matches_eigvalsh(dense_max_size):
    # 10 examples x 4 logits = 40 rows; dense_max_size=0 forces Lanczos
    matrix = metrics.kernel_matrix(random_full(10, 4, params=60), "full")
    value = metrics.max_eigenvalue(matrix, dense_max_size=dense_max_size)
    assert value == pytest.approx(np.linalg.eigvalsh(matrix)[-1], rel=1e-10)


def test_max_eigenvalue_degenerate():
    assert metrics.max_eigenvalue(np.zeros((4, 4))) == 0.0
    assert math.isnan(metrics.max_eigenvalue(np.full((4, 4), np.nan)))


# --- alignment ---


def test_alignment_by_hand():
    # labels (0, 0, 1): Y_c = [[1, -1], [1, -1], [-2, 2]] / 3, |Y_c|² = 4/3,
    # |Y_cᵀY_c| = 4/3. Trace kernel I_3: K_c = H, |H| = sqrt(2), Tr(Y_cᵀ H Y_c) = 4/3
    # -> 1/sqrt(2). Full kernel I_6 (δ_ij δ_ab): |I_2 ⊗ H| = 2 -> (4/3)/(2 4/3) = 1/2.
    labels = metrics.one_hot(np.array([0, 0, 1]), np.array([0, 1]))
    assert metrics.label_alignment(np.eye(3), labels) == pytest.approx(2**-0.5)
    assert metrics.label_alignment(np.eye(6), labels) == pytest.approx(0.5)


def test_ideal_kernels_align_perfectly():
    labels = metrics.one_hot(LABELS, CLASSES)
    ideal_trace = labels @ labels.T  # Y Yᵀ
    assert metrics.label_alignment(ideal_trace, labels) == pytest.approx(1.0)
    ideal_full = np.einsum("ia,jb->ijab", labels, labels)  # vec(Y) vec(Y)ᵀ
    matrix = metrics.kernel_matrix(ideal_full, "full")
    assert metrics.label_alignment(matrix, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["trace", "diagonal", "full"])
def test_alignment_matches_reference(kind):
    n, k = len(LABELS), len(CLASSES)
    full = random_full(n, k, seed=3)
    kernel = {"trace": traced(full), "diagonal": diagonal(full), "full": full}[kind]
    matrix = loop_matrix(kernel, kind)
    labels = metrics.one_hot(LABELS, CLASSES)
    if kind == "trace":
        target = labels @ labels.T
        expected = reference_cka(matrix, target, n, 1)
    else:
        y = labels.T.reshape(-1)  # vec(Y), logit-major (centring does the rest)
        expected = reference_cka(matrix, np.outer(y, y), n, k)
    assert metrics.label_alignment(matrix, labels) == pytest.approx(expected, rel=1e-12)
    centred = metrics.center(matrix, num_logits=1 if kind == "trace" else k)
    assert metrics.label_alignment(
        centred, labels, assume_centered=True
    ) == pytest.approx(expected, rel=1e-12)


def test_alignment_single_class_is_nan():
    labels = metrics.one_hot(np.zeros(4, dtype=int), np.array([0, 1]))
    assert math.isnan(metrics.label_alignment(np.eye(4), labels))
    assert math.isnan(metrics.label_alignment(np.eye(8), labels))


def test_alignment_rejects_wrong_size():
    with pytest.raises(ValueError, match="fits neither"):
        metrics.label_alignment(np.eye(5), metrics.one_hot(LABELS, CLASSES))


def test_one_hot_rejects_unknown_labels():
    np.testing.assert_array_equal(metrics.one_hot([1, 0], [0, 1]), [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"Labels \[7\]"):
        metrics.one_hot([0, 7], [0, 1])


# --- consistency between kinds ---


def all_kinds(full):
    k = full.shape[2]
    return {
        "trace": (metrics.kernel_matrix(traced(full), "trace"), 1),
        "diagonal": (metrics.kernel_matrix(diagonal(full), "diagonal"), k),
        "full": (metrics.kernel_matrix(full, "full"), k),
    }


def test_trace_is_the_same_for_every_kind():
    # Tr M = Σ_i Σ_a Θ(x_i, x_i)_aa whichever way the kernel is stored
    traces = [np.trace(m) for m, _ in all_kinds(random_full(5, 3)).values()]
    np.testing.assert_allclose(traces, traces[0], rtol=1e-13)


def test_single_logit_kinds_agree_exactly():
    # K = 1: full, diagonal and trace are one and the same kernel
    labels = metrics.one_hot(np.array([0, 0, 0, 0, 0]), np.array([0]))
    first, second = all_kinds(random_full(5, 1, seed=4)), all_kinds(random_full(5, 1))
    for kind in ("diagonal", "full"):
        (a, k), (b, _) = first[kind], second[kind]
        (a_t, _), (b_t, _) = first["trace"], second["trace"]
        np.testing.assert_array_equal(a, a_t)
        assert metrics.cka(a, b, num_logits=k) == metrics.cka(a_t, b_t, num_logits=1)
        assert metrics.max_eigenvalue(a) == metrics.max_eigenvalue(a_t)
    assert math.isnan(metrics.label_alignment(first["full"][0], labels))


def test_isotropic_kernels_relate_across_kinds():
    # Θ = k(x, x') δ_ab (the infinite-width structure): full = diagonal = I_K ⊗ k,
    # trace = K k. Distances agree across kinds, λ_max(trace) = K λ_max(full), and
    # A_full = A_trace |Y_cᵀY_c| / (sqrt(K) |Y_c|²).
    n, k = len(LABELS), len(CLASSES)
    rng = np.random.default_rng(5)
    grams = [x @ x.T for x in rng.standard_normal((2, n, 4))]
    kinds = [all_kinds(np.einsum("ij,ab->ijab", g, np.eye(k))) for g in grams]
    for kind in ("diagonal", "full"):
        (a, blocks), (b, _) = kinds[0][kind], kinds[1][kind]
        (a_t, _), (b_t, _) = kinds[0]["trace"], kinds[1]["trace"]
        assert metrics.cka(a, b, num_logits=blocks) == pytest.approx(
            metrics.cka(a_t, b_t, num_logits=1), rel=1e-12
        )
        assert metrics.uncentered_similarity(a, b) == pytest.approx(
            metrics.uncentered_similarity(a_t, b_t), rel=1e-12
        )
        assert k * metrics.max_eigenvalue(a) == pytest.approx(
            metrics.max_eigenvalue(a_t), rel=1e-12
        )
        labels = metrics.one_hot(LABELS, CLASSES)
        centred = labels - labels.mean(axis=0)
        ratio = np.linalg.norm(centred.T @ centred) / (k**0.5 * np.sum(centred**2))
        assert metrics.label_alignment(a, labels) == pytest.approx(
            ratio * metrics.label_alignment(a_t, labels), rel=1e-12
        )


def test_diagonal_equals_full_when_logits_decouple():
    # a full kernel with zero cross-logit blocks stores nothing the diagonal lacks
    full = random_full(5, 3, seed=6) * np.eye(3)[None, None]
    np.testing.assert_array_equal(
        metrics.kernel_matrix(full, "full"),
        metrics.kernel_matrix(diagonal(full), "diagonal"),
    )


# --- velocity and forgetting ---


def test_velocity_uneven_spacing():
    distance = np.array([np.nan, 0.2, 0.1, 0.3])
    steps = np.array([0, 10, 11, 20])
    np.testing.assert_allclose(
        metrics.velocity(distance, steps), [np.nan, 0.02, 0.1, 0.3 / 9]
    )
    assert metrics.velocity(np.array([]), np.array([], dtype=int)).shape == (0,)


@pytest.mark.parametrize("steps", [[0, 10, 10], [0, 20, 10]])
def test_velocity_rejects_unsorted_steps(steps):
    with pytest.raises(ValueError, match="increase strictly"):
        metrics.velocity(np.zeros(3), np.array(steps))


def test_forgetting_hand_sequence():
    accuracy = np.array(
        [[0.2, 0.0], [0.9, 0.0], [0.8, 0.3], [0.95, 0.2], [0.5, np.nan]]
    )
    expected = np.array(
        [[0.0, 0.0], [0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.45, np.nan]]
    )
    np.testing.assert_allclose(metrics.forgetting(accuracy), expected, atol=1e-15)


def test_forgetting_skips_leading_nan():
    accuracy = np.array([[np.nan], [0.5], [0.25]])
    np.testing.assert_allclose(metrics.forgetting(accuracy), [[np.nan], [0], [0.25]])

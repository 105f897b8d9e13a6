"""Kernel metrics as pure functions on numpy arrays, computed in float64.

Conventions shared by every function (the README repeats them):

* A kernel of ``n`` probe examples and ``K`` logits becomes one ``(nK, nK)``
  matrix in **logit-major** order: row ``a * n + i`` is logit ``a`` of example
  ``i``. A trace kernel (summed over logits) stays ``(n, n)``, i.e. ``K = 1``.
* **Centring** is ``C = I_K ⊗ H`` with ``H = I_n - 1 1ᵀ / n``: every
  ``(n, n)`` logit-pair block is centred over examples, never across logits
  (Baratin et al. 2021, nngeometry). ``K_c = C K C``.
* **Labels** are one-hot ``Y`` of shape ``(n, K)`` over the logits, centred per
  column, ``Y_c = H Y``. Full and diagonal kernels use ``y = vec(Y_c)`` in the
  same logit-major order; trace kernels use the ``(n, n)`` target Gram ``Y Yᵀ``.
* Inner products and norms are Frobenius: ``<A, B> = Σ_uv A_uv B_uv``.
* Degenerate inputs give NaN, silently: a kernel with a non-finite entry, or a
  similarity whose denominator is zero (a zero or constant kernel).

Nothing here imports the rest of ntkcl.
"""

import logging

import numpy as np
import scipy.sparse.linalg

logger = logging.getLogger(__name__)

KINDS = ("trace", "diagonal", "full")


def kernel_matrix(kernel: np.ndarray, kind: str) -> np.ndarray:
    """Lays a kernel of any kind out as one symmetric 2-D matrix (float64).

    ``M[a*n + i, b*n + j] = Θ(x_i, x_j)_{ab}``: full ``(n, n, K, K)`` goes to
    ``(nK, nK)``; diagonal ``(n, n, K)`` to the block-diagonal ``(nK, nK)`` with
    block ``a`` = ``Θ[:, :, a]`` (zero off-diagonal blocks); trace ``(n, n)`` is
    returned as is.

    Args:
        kernel: ``(n, n)``, ``(n, n, K)`` or ``(n, n, K, K)`` as ``kind`` says.
        kind: ``"trace"``, ``"diagonal"`` or ``"full"``.

    Returns:
        ``(n, n)`` for trace, ``(n*K, n*K)`` otherwise, float64.

    Raises:
        ValueError: for an unknown kind or a shape that does not fit it.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    ndim = {"trace": 2, "diagonal": 3, "full": 4}.get(kind)
    if ndim is None:
        raise ValueError(f"Unknown kernel kind {kind!r}; expected one of {KINDS}.")
    shape = kernel.shape
    square = len(shape) == ndim and shape[0] == shape[1]
    if kind == "full":
        square = square and shape[2] == shape[3]
    if not square:
        expected = {"trace": "(n, n)", "diagonal": "(n, n, K)", "full": "(n, n, K, K)"}
        raise ValueError(
            f"A {kind} kernel must have shape {expected[kind]} over one probe set, "
            f"got {shape}; pass the kernel of the probe set with itself."
        )
    if kind == "trace":
        return kernel
    n, k = shape[0], shape[2]
    if kind == "full":
        return kernel.transpose(2, 0, 3, 1).reshape(k * n, k * n)
    blocks = np.zeros((k, n, k, n))
    logits = np.arange(k)
    blocks[logits, :, logits, :] = kernel.transpose(2, 0, 1)
    return blocks.reshape(k * n, k * n)


def _square(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"Expected a square 2-D kernel matrix, got shape {matrix.shape}; "
            "build one with kernel_matrix(kernel, kind)."
        )
    return matrix


def center(matrix: np.ndarray, *, num_logits: int) -> np.ndarray:
    """Centres a kernel matrix over examples within every logit pair.

    ``K_c = (I_K ⊗ H) K (I_K ⊗ H)`` with ``H = I_n - 1 1ᵀ / n``; for each block
    ``B = K[a*n:(a+1)*n, b*n:(b+1)*n]`` this is ``B - row means - column means +
    grand mean``. With ``num_logits = 1`` it is the usual ``H K H``.

    Args:
        matrix: ``(nK, nK)`` kernel matrix in logit-major order.
        num_logits: ``K``, the number of logit blocks (1 for a trace kernel).

    Returns:
        The centred ``(nK, nK)`` matrix (a new array).
    """
    matrix = _square(matrix)
    size = matrix.shape[0]
    if num_logits < 1 or size % num_logits:
        raise ValueError(
            f"num_logits={num_logits} does not divide the kernel size {size}; pass "
            "the number of logits K of an (nK, nK) matrix (1 for a trace kernel)."
        )
    n = size // num_logits
    blocks = matrix.reshape(num_logits, n, num_logits, n)
    with np.errstate(invalid="ignore"):  # inf entries become NaN, quietly
        blocks = blocks - blocks.mean(axis=1, keepdims=True)
        blocks = blocks - blocks.mean(axis=3, keepdims=True)
    return blocks.reshape(size, size)


def frobenius_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two matrices, ``<A, B> / (‖A‖ ‖B‖)``.

    Clipped to ``[-1, 1]`` against rounding. NaN when an entry is not finite or
    either norm is zero.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"Both kernels must have the same shape, got {a.shape} and {b.shape}; "
            "compare kernels of the same probe set and kind."
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0.0:
        return float("nan")
    return float(np.clip(np.vdot(a.ravel(), b.ravel()) / norms, -1.0, 1.0))


def cka(a: np.ndarray, b: np.ndarray, *, num_logits: int) -> float:
    """Centred kernel alignment (Cortes, Mohri & Rostamizadeh 2012).

    ``CKA(A, B) = <A_c, B_c> / (‖A_c‖ ‖B_c‖)``, ``A_c = (I_K ⊗ H) A (I_K ⊗ H)``.
    Invariant to scaling either kernel; in ``[0, 1]`` for PSD kernels.

    Args:
        a: ``(nK, nK)`` kernel matrix.
        b: ``(nK, nK)`` kernel matrix of the same probe set and kind.
        num_logits: ``K`` (1 for trace kernels), see :func:`center`.

    Returns:
        The CKA; NaN if either centred kernel is zero (e.g. a constant kernel).
    """
    return frobenius_cosine(
        center(a, num_logits=num_logits), center(b, num_logits=num_logits)
    )


def uncentered_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Fort et al. (2020) kernel similarity: the uncentred cosine.

    ``Tr(A Bᵀ) / sqrt(Tr(A Aᵀ) Tr(B Bᵀ)) = <A, B> / (‖A‖ ‖B‖)``.
    """
    return frobenius_cosine(a, b)


def kernel_distance(
    a: np.ndarray,
    b: np.ndarray,
    *,
    centered: bool = True,
    num_logits: int | None = None,
) -> float:
    """Kernel distance, centred ``1 - CKA(A, B)`` or uncentred (Fort et al.).

    ``S(A, B) = 1 - <A', B'> / (‖A'‖ ‖B'‖)`` with ``A' = A_c`` (centred, needs
    ``num_logits``) or ``A' = A`` (``centered=False``, Fort's definition
    ``1 - Tr(A Bᵀ) / sqrt(Tr(A Aᵀ) Tr(B Bᵀ))``). In ``[0, 1]`` for PSD kernels.
    """
    if not centered:
        return 1.0 - uncentered_similarity(a, b)
    if num_logits is None:
        raise ValueError(
            "The centred kernel distance needs num_logits (K of an (nK, nK) "
            "matrix, 1 for a trace kernel); pass it or set centered=False."
        )
    return 1.0 - cka(a, b, num_logits=num_logits)


def max_eigenvalue(matrix: np.ndarray, *, dense_max_size: int = 256) -> float:
    """Largest eigenvalue ``λ_max(K)`` of a symmetric kernel matrix.

    The matrix is symmetrised, ``(K + Kᵀ) / 2``. Up to ``dense_max_size`` rows
    it uses dense ``numpy.linalg.eigvalsh``; above, Lanczos
    (``scipy.sparse.linalg.eigsh``, ``k=1``, largest algebraic, a fixed start
    vector so that results repeat), falling back to dense if it does not
    converge. A zero matrix gives 0, a non-finite entry NaN.

    Args:
        matrix: ``(m, m)`` symmetric (PSD) kernel matrix.
        dense_max_size: largest ``m`` solved densely.

    Returns:
        ``λ_max`` in the kernel's units.
    """
    matrix = _square(matrix)
    if matrix.size == 0 or not np.isfinite(matrix).all():
        return float("nan")
    if not matrix.any():
        return 0.0
    matrix = 0.5 * (matrix + matrix.T)
    size = matrix.shape[0]
    if size > max(dense_max_size, 2):
        start = np.random.default_rng(0).standard_normal(size)
        try:
            top = scipy.sparse.linalg.eigsh(
                matrix, k=1, which="LA", v0=start, return_eigenvectors=False
            )
            return float(top[0])
        except scipy.sparse.linalg.ArpackNoConvergence:
            logger.warning("eigsh did not converge on a %dx%d kernel", size, size)
    return float(np.linalg.eigvalsh(matrix)[-1])


def one_hot(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One-hot encodes labels over an ordered list of classes (the logits).

    Args:
        labels: ``(n,)`` class ids.
        classes: ``(K,)`` class id of each logit, in logit order.

    Returns:
        ``(n, K)`` float64, ``Y[i, a] = 1`` if ``labels[i] == classes[a]``.
    """
    labels = np.asarray(labels)
    classes = np.asarray(classes)
    onehot = labels[:, None] == classes[None, :]
    missing = labels[~onehot.any(axis=1)]
    if missing.size:
        raise ValueError(
            f"Labels {sorted(set(missing.tolist()))} are not among the logits' "
            f"classes {classes.tolist()}; pass every class the network outputs."
        )
    return onehot.astype(np.float64)


def label_alignment(
    matrix: np.ndarray, labels: np.ndarray, *, assume_centered: bool = False
) -> float:
    """Centred kernel-label alignment, ``CKA(K, target)``.

    With ``Y_c = H Y`` (one-hot labels, column-centred):

    * full or diagonal ``(nK, nK)`` matrix, ``y = vec(Y_c)`` logit-major
      (Baratin et al. 2021): ``A = yᵀ K_c y / (‖K_c‖ ‖y‖²)``;
    * trace ``(n, n)`` matrix, target Gram ``Y Yᵀ``:
      ``A = Tr(Y_cᵀ K_c Y_c) / (‖K_c‖ ‖Y_cᵀ Y_c‖)``.

    Both equal ``CKA(K, target)``; the ideal kernel (``y yᵀ``, resp. ``Y Yᵀ``)
    scores 1. As ``y`` is centred, ``yᵀ K_c y = yᵀ K y``. NaN when all probe
    examples share one class or the centred kernel is zero.

    Args:
        matrix: ``(n, n)`` trace or ``(nK, nK)`` kernel matrix.
        labels: ``(n, K)`` one-hot labels (see :func:`one_hot`).
        assume_centered: ``matrix`` is already centred; skip centring.

    Returns:
        The alignment, in ``[-1, 1]`` (``[0, 1]`` for a PSD kernel).
    """
    matrix = _square(matrix)
    labels = np.asarray(labels, dtype=np.float64)
    n, k = labels.shape
    centred_labels = labels - labels.mean(axis=0)
    if matrix.shape[0] == n:
        blocks = 1
        target_norm = np.linalg.norm(centred_labels.T @ centred_labels)
    elif matrix.shape[0] == n * k:
        blocks = k
        centred_labels = centred_labels.T.reshape(-1, 1)  # vec(Y_c), logit-major
        target_norm = float(np.sum(centred_labels**2))
    else:
        raise ValueError(
            f"A kernel matrix of size {matrix.shape[0]} fits neither n={n} (trace) "
            f"nor n*K={n * k} (diagonal, full) for labels of shape {labels.shape}."
        )
    centred = matrix if assume_centered else center(matrix, num_logits=blocks)
    if not np.isfinite(centred).all():
        return float("nan")
    denominator = np.linalg.norm(centred) * target_norm
    if denominator == 0.0:
        return float("nan")
    numerator = np.vdot(centred_labels, centred @ centred_labels)
    return float(np.clip(numerator / denominator, -1.0, 1.0))


def velocity(distance_to_previous: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Kernel velocity per iteration, for unevenly spaced dumps.

    ``v(t_i) = S(Θ_{t_{i-1}}, Θ_{t_i}) / (t_i - t_{i-1})``, ``v(t_0) = NaN``.

    Args:
        distance_to_previous: ``(T,)`` distance of each dump to the one before
            (entry 0 is ignored).
        steps: ``(T,)`` strictly increasing training iteration of each dump.

    Returns:
        ``(T,)`` float64 in distance units per iteration (``1/iteration``).
    """
    distance = np.asarray(distance_to_previous, dtype=np.float64)
    steps = np.asarray(steps)
    if distance.shape != steps.shape or steps.ndim != 1:
        raise ValueError(
            f"distance_to_previous {distance.shape} and steps {steps.shape} must be "
            "1-D arrays of the same length, one entry per dump."
        )
    gaps = np.diff(steps).astype(np.float64)
    if (gaps <= 0).any():
        raise ValueError(
            f"Dump iterations must increase strictly, got {steps.tolist()}; "
            "sort the dumps and drop duplicates."
        )
    out = np.full(distance.shape, np.nan)
    out[1:] = distance[1:] / gaps
    return out


def forgetting(accuracy: np.ndarray) -> np.ndarray:
    """Forgetting of every task at every dump, as a drop from its best.

    ``F_j(t) = max_{s <= t} acc_j(s) - acc_j(t)`` over the dumps ``s`` up to
    ``t`` (all of them, including those before task ``j`` was trained). It is
    0 while accuracy is at its running best and never negative; NaN where
    ``acc_j(t)`` is NaN (NaN entries are skipped in the running maximum).

    Args:
        accuracy: ``(T, J)`` accuracy of each task at each dump, in dump order.

    Returns:
        ``(T, J)`` float64, same units as ``accuracy``.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.ndim != 2:
        raise ValueError(
            f"accuracy must be (dumps, tasks), got shape {accuracy.shape}."
        )
    if accuracy.shape[0] == 0:
        return accuracy.copy()
    best = np.fmax.accumulate(accuracy, axis=0)
    return best - accuracy

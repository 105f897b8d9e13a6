"""Blocked contraction of per-example NTK factors (private helper of ``ntkcl.ntk``).

Both implementations reduce the kernel to a sum over *factors*: for every layer (or
every parameter tensor) and every example ``i`` and logit ``a`` a feature vector
``g[i, a]``, optionally paired with an input vector ``u[i]`` shared by all logits.
One factor contributes

    theta[i, j, a, b] += <u[i], u[j]> * <g[i, a], g[j, b]>

(without the first term when there are no inputs). For a Linear layer on flat inputs
``u`` are its inputs (with a column of ones when the bias is trainable) and ``g`` the
cotangents at its outputs; otherwise ``g`` are per-example, per-logit gradients.

This module owns the loops over blocks of examples and logits, the symmetric
shortcut (x2 is None: only the upper block triangle is computed, then mirrored) and
the layouts. Internal kernel layouts, converted once at the end by :func:`finish`:
``full`` is ``(n1, K, n2, K)``, ``diagonal`` ``(K, n1, n2)``, ``trace`` ``(n1, n2)``.
Features are held example-major ``(b, k, P)`` for ``full`` (a block of rows is then a
contiguous matrix), logit-major ``(k, b, P)`` for ``diagonal`` (one batched matmul),
and for ``trace`` as the implementation computes them (structured: logit-major, as
the backward pass returns them; jacobian: example-major), since a transposed copy
of the features costs more than the layout saves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Factor:
    """Per-example factors of one kernel term.

    Attributes:
        features: per-example, per-logit vectors, ``(b, k, P)``, or ``(k, b, P)``
            when ``logit_major``.
        inputs: ``(b, Q)`` per-example vectors whose Gram multiplies the feature
            Gram elementwise, or None for a plain feature Gram.
        logit_major: layout of ``features``.
        onehot: set when ``features[i, a]`` is the unit vector of logit
            ``onehot + a`` (the cotangents at the logits themselves): the feature
            Gram is then ``[a == b]`` and needs no matmul.
        ones: whether the inputs carry an implicit last entry 1 (a trainable
            bias): their Gram is then ``inputs @ inputs.T + 1``, without copying
            the inputs to append a column of ones.
    """

    features: Tensor
    inputs: Tensor | None = None
    logit_major: bool = False
    onehot: int | None = None
    ones: bool = False

    @property
    def num_logits(self) -> int:
        return self.features.shape[0 if self.logit_major else 1]

    @property
    def num_examples(self) -> int:
        return self.features.shape[1 if self.logit_major else 0]

    def rows(self, sl: slice) -> Factor:
        feats = self.features[:, sl] if self.logit_major else self.features[sl]
        inputs = None if self.inputs is None else self.inputs[sl]
        return dataclasses.replace(self, features=feats, inputs=inputs)

    def to_layout(self, logit_major: bool | None) -> Factor:
        """The factor in the given layout (None: as it is)."""
        if logit_major is None or logit_major == self.logit_major:
            return self
        feats = self.features.transpose(0, 1).contiguous()
        return dataclasses.replace(self, features=feats, logit_major=logit_major)


# one call computes the factors of a block of examples for a range of logits
ComputeFn = Callable[[Tensor, slice, object], list[Factor | None]]


@dataclass(frozen=True)
class Blocking:
    """How the examples and logits are cut into blocks.

    Attributes:
        examples: examples per block when factors are computed.
        logits: logits per block when factors are computed.
        cached: whether the factors of all examples are computed once and held, in
            which case ``rows`` sets the rows per contraction block; otherwise the
            factors of the column blocks are recomputed for every row block.
        rows: rows per contraction block (cached mode only).
    """

    examples: int
    logits: int
    cached: bool
    rows: int


def new_kernel(kind: str, n1: int, n2: int, num_logits: int, dtype, device) -> Tensor:
    """Allocate a zero kernel in the internal layout of ``kind``."""
    shape = {
        "full": (n1, num_logits, n2, num_logits),
        "diagonal": (num_logits, n1, n2),
        "trace": (n1, n2),
    }[kind]
    return torch.zeros(shape, dtype=dtype, device=device)


def finish(kind: str, out: Tensor, row_blocks: list[slice] | None) -> Tensor:
    """Mirror a symmetric kernel and return ``(n1, n2, K, K)``, ``(n1, n2, K)`` or
    ``(n1, n2)``.

    Args:
        kind: the kernel kind.
        out: the kernel in its internal layout.
        row_blocks: for a symmetric kernel, the row blocks whose upper triangle
            (block ``rows`` against columns ``rows.start:``) was computed; else None.
    """
    if kind != "full":
        if row_blocks is not None:
            _mirror(out, kind, row_blocks)
        return out.permute(1, 2, 0).contiguous() if kind == "diagonal" else out
    if row_blocks is None:
        return out.permute(0, 2, 1, 3).contiguous()
    # one pass: the upper blocks permuted, the lower ones from their transposes
    n = out.shape[0]
    public = out.new_empty((n, n) + tuple(out.shape[1::2]))
    for rows in row_blocks:
        public[rows, rows.start :] = out[rows, :, rows.start :].permute(0, 2, 1, 3)
        diag = public[rows, rows]
        diag.copy_((diag + diag.permute(1, 0, 3, 2)).mul_(0.5))
        public[rows.stop :, rows] = out[rows, :, rows.stop :].permute(2, 0, 3, 1)
    return public


def _block(out: Tensor, kind: str, rows: slice, cols: slice, la: slice, lb: slice):
    if kind == "full":
        return out[rows, la, cols, lb]
    if kind == "diagonal":
        return out[la, rows, cols]
    return out[rows, cols]


def accumulate(out_block: Tensor, kind: str, f1: Factor, f2: Factor) -> None:
    """Add one factor pair's contribution to a kernel block (internal layout).

    Args:
        out_block: ``(b1, k1, b2, k2)`` (full), ``(k, b1, b2)`` (diagonal) or
            ``(b1, b2)`` (trace) view of the kernel.
        kind: ``"full"``, ``"diagonal"`` or ``"trace"``; for the last two both
            factors cover the same logits. For ``full`` and ``trace`` the factors
            are example-major; for ``trace`` either, the same for both.
        f1: factors of the row examples.
        f2: factors of the column examples.
    """
    p = f1.features.shape[-1]
    gram_in = None
    if f1.inputs is not None:
        gram_in = f1.inputs @ f2.inputs.T  # (b1, b2)
        if f1.ones:
            gram_in += 1
    if f1.onehot is not None and f2.onehot is not None:
        _accumulate_onehot(out_block, kind, f1, f2, gram_in)
        return

    if kind == "full":
        b1, k1, _ = f1.features.shape
        b2, k2, _ = f2.features.shape
        c = f1.features.reshape(b1 * k1, p) @ f2.features.reshape(b2 * k2, p).T
        c = c.view(b1, k1, b2, k2)
        gram_in = None if gram_in is None else gram_in[:, None, :, None]
    elif kind == "trace" and f1.logit_major:
        # one product per logit, summed
        c = torch.bmm(f1.features, f2.features.transpose(1, 2)).sum(0)
    elif kind == "trace":
        # the sum over logits folds into the contraction: (b1, k P) @ (k P, b2)
        b1, k1, _ = f1.features.shape
        b2 = f2.features.shape[0]
        c = f1.features.reshape(b1, k1 * p) @ f2.features.reshape(b2, k1 * p).T
    else:
        a1 = f1.features if f1.logit_major else f1.features.transpose(0, 1)
        a2 = f2.features if f2.logit_major else f2.features.transpose(0, 1)
        c = torch.bmm(a1, a2.transpose(1, 2))  # (k, b1, b2)
        gram_in = None if gram_in is None else gram_in[None]
    if gram_in is None:
        out_block.add_(c)
    else:
        out_block.addcmul_(c, gram_in)


def _accumulate_onehot(out_block, kind, f1: Factor, f2: Factor, gram) -> None:
    if gram is None:  # no inputs: an all-ones input Gram
        gram = f1.features.new_ones((f1.num_examples, f2.num_examples))
    if kind == "trace":
        out_block.add_(gram, alpha=f1.num_logits)
    elif kind == "diagonal":
        out_block.add_(gram[None])
    else:
        for a in range(f1.num_logits):
            b = f1.onehot + a - f2.onehot
            if 0 <= b < f2.num_logits:
                out_block[:, a, :, b].add_(gram)


def _gather(compute: ComputeFn, x: Tensor, group, blocking: Blocking, k: int, major):
    """Factors of every example of ``x`` for all ``k`` logits, in one tensor each
    (``major``: True logit-major, False example-major, None as computed)."""
    n = x.shape[0]
    if blocking.examples >= n and blocking.logits >= k:
        return [
            None if f is None else f.to_layout(major)
            for f in compute(x, slice(0, k), group)
        ]
    held: list[Factor | None] | None = None
    # with all logits in one block a factor may hold fewer rows of features than
    # logits (the trace kind's collapsed ones): it is then stored as it comes
    whole = blocking.logits >= k
    for rows in _chunks(n, blocking.examples):
        for la in _chunks(k, blocking.logits):
            factors = compute(x[rows], la, group)
            if held is None:
                held = [_allocate(f, n, None if whole else k, major) for f in factors]
            dst_logits = slice(None) if whole else la
            for dst, src in zip(held, factors, strict=True):
                if src is None:
                    continue
                src = src.to_layout(dst.logit_major)
                if dst.logit_major:
                    dst.features[dst_logits, rows] = src.features
                else:
                    dst.features[rows, dst_logits] = src.features
                if src.inputs is not None:
                    dst.inputs[rows] = src.inputs
    return held


def _allocate(f: Factor | None, n: int, k: int | None, major) -> Factor | None:
    """Room for ``n`` examples' factors of ``k`` logits (None: as many as ``f``
    holds, when it covers all logits)."""
    if f is None:
        return None
    major = f.logit_major if major is None else major
    ft = f.features
    k = f.num_logits if k is None else k
    lead = (k, n) if major else (n, k)
    inputs = None
    if f.inputs is not None:
        inputs = f.inputs.new_empty((n,) + tuple(f.inputs.shape[1:]))
    onehot = None if f.onehot is None else 0
    features = ft.new_empty(lead + tuple(ft.shape[2:]))
    return Factor(features, inputs, major, onehot, f.ones)


def _accumulate_all(blk: Tensor, kind: str, fs1, fs2) -> None:
    for f1, f2 in zip(fs1, fs2, strict=True):
        if f1 is not None and f2 is not None:
            accumulate(blk, kind, f1, f2)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def contract(
    compute: ComputeFn,
    groups: Sequence[object],
    x1: Tensor,
    x2: Tensor | None,
    kind: str,
    num_logits: int,
    blocking: Blocking,
    out: Tensor,
) -> list[slice] | None:
    """Fill ``out`` (internal layout, zeros on entry) with the kernel.

    Args:
        compute: ``compute(x_block, logit_slice, group)`` returns the list of factors
            of those examples and logits (None entries for terms that vanish).
        groups: parameter groups; their contributions add up.
        x1: ``(n1, ...)`` row inputs.
        x2: ``(n2, ...)`` column inputs, or None for the symmetric kernel of x1.
        kind: ``"full"``, ``"diagonal"`` or ``"trace"``.
        num_logits: K.
        blocking: block sizes, see :class:`Blocking`.
        out: kernel in the internal layout of ``kind``.

    Returns:
        For a symmetric kernel (x2 None), the row blocks whose upper triangle was
        filled, to be mirrored by :func:`finish`; else None.
    """
    symmetric = x2 is None
    xs2 = x1 if symmetric else x2
    n1, n2 = x1.shape[0], xs2.shape[0]
    major = {"full": False, "diagonal": True, "trace": None}[kind]
    logit_blocks = _chunks(num_logits, blocking.logits)
    everything = slice(0, num_logits)
    row_size = blocking.rows if blocking.cached else blocking.examples

    def factors(x, la, group):
        return [
            None if f is None else f.to_layout(major) for f in compute(x, la, group)
        ]

    for group in groups:
        if blocking.cached:
            # every example's factors once; rows against all (or later) columns
            fs1 = _gather(compute, x1, group, blocking, num_logits, major)
            fs2 = fs1
            if not symmetric:
                fs2 = _gather(compute, x2, group, blocking, num_logits, major)
            for rows in _chunks(n1, row_size):
                cols = slice(rows.start if symmetric else 0, n2)
                part1 = [None if f is None else f.rows(rows) for f in fs1]
                part2 = [None if f is None else f.rows(cols) for f in fs2]
                blk = _block(out, kind, rows, cols, everything, everything)
                _accumulate_all(blk, kind, part1, part2)
            del fs1, fs2
            continue

        # streaming: hold one row block, recompute the column blocks
        for rows in _chunks(n1, blocking.examples):
            for la in logit_blocks:
                fs1 = factors(x1[rows], la, group)
                col_blocks = _chunks(n2, blocking.examples)
                if symmetric:
                    col_blocks = [c for c in col_blocks if c.start >= rows.start]
                for cols in col_blocks:
                    for lb in logit_blocks if kind == "full" else [la]:
                        if symmetric and cols == rows and lb == la:
                            fs2 = fs1
                        else:
                            fs2 = factors(xs2[cols], lb, group)
                        blk = _block(out, kind, rows, cols, la, lb)
                        _accumulate_all(blk, kind, fs1, fs2)

    return _chunks(n1, row_size) if symmetric else None


def _mirror(out: Tensor, kind: str, row_blocks: list[slice]) -> None:
    """Copy the upper block triangle to the lower one (diagonal and trace kinds)."""
    n = out.shape[-1]
    everything = slice(None)
    for rows in row_blocks:
        below = slice(rows.stop, n)
        diag = _block(out, kind, rows, rows, everything, everything)
        diag.copy_((diag + diag.transpose(-1, -2)).mul_(0.5))
        if rows.stop < n:
            upper = _block(out, kind, rows, below, everything, everything)
            lower = _block(out, kind, below, rows, everything, everything)
            lower.copy_(upper.transpose(-1, -2))

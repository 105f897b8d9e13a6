"""Generic NTK factors from torch.func Jacobians (private helper of ``ntkcl.ntk``).

Exact for any network whose examples are independent in eval mode: per-example,
per-logit Jacobians ``vmap(jacrev(...))`` with respect to one group of trainable
parameters at a time, then their Gram. Tied parameters count once (torch.func ties
them), frozen parameters and buffers are constants.

``jacrev`` batches the logits' cotangents with a second ``vmap`` inside the one over
examples. Some of PyTorch's batching rules get that nesting wrong: PReLU's backward
(PyTorch 2.14) raises when the two batch sizes differ and returns wrong values when
they are equal. Others fail under any ``vmap`` (RNN modules, full backward hooks,
RReLU, Python control flow on tensor values), and ``functional_call`` cannot see a
parameter that the model reaches through a reference of its own (a
``functools.partial`` or a list holding the weight). :meth:`Jacobian.check` compares
each way of taking the Jacobians of a few examples with plain autograd on the
model's own parameters and keeps the fastest that agrees: the nested ``vmap``,
``vmap`` one logit at a time, or that plain autograd, example by example and logit
by logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ntkcl._ntk_blocks import Factor

# the ways of taking per-example Jacobians, fastest first; the last is the reference
MODES = ("nested vmap", "vmap logit by logit", "per-example autograd")


class Jacobian:
    """Computes per-example Jacobian factors of blocks of examples.

    Args:
        model: the network in eval mode, in the compute dtype.
        num_logits: K.
        act_elems: elements saved for backward per example.
        forward_flops: estimated forward flops per example.
    """

    def __init__(
        self, model: nn.Module, num_logits: int, act_elems: int, forward_flops
    ):
        self.model = model
        self.num_logits = num_logits
        self.act_elems = act_elems
        self._forward_flops = forward_flops
        # named_parameters() lists a tied parameter once
        self.leaves = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.params = {n: p.detach() for n, p in self.leaves.items()}
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.groups: list[tuple[str, ...]] = [tuple(self.params)] if self.params else []
        self.mode = MODES[0]  # how Jacobians are taken; check() may change it

    def split(self, max_params: int) -> None:
        """Cut the parameters into groups of at most ``max_params`` (one tensor each
        at least), in registration order."""
        groups, current, size = [], [], 0
        for name, n in self.sizes.items():
            if current and size + n > max_params:
                groups.append(tuple(current))
                current, size = [], 0
            current.append(name)
            size += n
        if current:
            groups.append(tuple(current))
        self.groups = groups

    # cost model (elements and flops), for planning
    def group_params(self, group) -> int:
        names = self.params if group is None else group
        return sum(self.sizes[n] for n in names)

    def factor_elems(self, b: int, k: int, group=None) -> int:
        return b * k * self.group_params(group)

    def work_elems(self, b: int, k: int, group=None) -> int:
        return b * self.act_elems + b * k * (
            2 * self.act_elems + self.group_params(group)
        )

    def forward_flops(self) -> int:
        return self._forward_flops

    def logit_flops(self) -> int:
        return 2 * self._forward_flops

    def gram_flops(self, example_pairs: float, pairs: float, group=None) -> float:
        return 2.0 * pairs * self.group_params(group)

    # the factors
    def compute(self, x: Tensor, logits: slice, group) -> list[Factor]:
        jac = self._jacobians(x, logits, group, self.mode)
        b, k = x.shape[0], logits.stop - logits.start
        return [Factor(jac[n].reshape(b, k, -1)) for n in group]

    def _jacobians(self, x, logits: slice, group, mode: str) -> dict[str, Tensor]:
        """``{name: (b, k, *shape)}`` Jacobians of the group's parameters."""
        x = x.clone()  # a model that changes its input in place changes a copy
        if mode == MODES[-1]:
            leaves = {n: self.leaves[n] for n in group}
            return _autograd_jacobians(self.model, leaves, x, logits)
        constants = {n: t for n, t in self.params.items() if n not in group}
        model = self.model

        def logits_of(params, example):
            out = functional_call(model, (params, constants), (example.unsqueeze(0),))
            return out[0, logits]

        # chunk_size=1: jacrev loops over the logits instead of a nested vmap
        chunk = 1 if mode == "vmap logit by logit" else None

        def per_example(params, example):
            return jacrev(logits_of, chunk_size=chunk)(params, example)

        variables = {n: self.params[n] for n in group}
        return vmap(per_example, in_dims=(None, 0))(variables, x)

    def check(self, x: Tensor, logits: slice) -> str | None:
        """Take the Jacobians of the examples ``x`` and ``logits`` in every mode,
        parameter group by group, against plain autograd; keep in :attr:`mode` the
        fastest that agrees everywhere and return why faster ones were dropped.

        Pass at least two examples and a number of logits that differs from it:
        a batching rule that confuses the two batch dimensions then raises or
        gives wrong values, where equal or unit sizes could hide it.

        Raises:
            whatever the model raises under plain autograd.
        """
        dropped = []
        for group in self.groups:
            if self.mode == MODES[-1]:
                break  # nothing faster left to compare with the reference
            expected = self._jacobians(x, logits, group, MODES[-1])
            for mode in MODES[MODES.index(self.mode) : -1]:
                try:
                    got = self._jacobians(x, logits, group, mode)
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 (any failure of torch.func)
                    dropped.append(f"{mode}: {type(exc).__name__}: {exc}")
                    continue
                wrong = [n for n in group if not _agree(got[n], expected[n])]
                if not wrong:
                    break
                dropped.append(f"{mode}: the Jacobian of {wrong[0]!r} is wrong")
            else:
                mode = MODES[-1]
            self.mode = mode
        return "; ".join(dropped) or None


def _autograd_jacobians(model, leaves: dict[str, Tensor], x: Tensor, logits: slice):
    """Jacobians by plain autograd on the model's own parameters ``leaves``, one
    example and one logit at a time (``.grad`` fields are left alone)."""
    tensors = list(leaves.values())
    rows: list[list[Tensor]] = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0, logits]
        for j in range(out.shape[0]):
            grads = [None] * len(tensors)  # the group does not reach the logits
            if out.requires_grad:
                grads = torch.autograd.grad(
                    out[j],
                    tensors,
                    retain_graph=j + 1 < out.shape[0],
                    allow_unused=True,
                )
            rows.append(
                [
                    torch.zeros_like(t) if g is None else g
                    for g, t in zip(grads, tensors, strict=True)
                ]
            )
    b = x.shape[0]
    return {
        n: torch.stack([row[i] for row in rows]).reshape(b, -1, *t.shape)
        for i, (n, t) in enumerate(leaves.items())
    }


def _agree(actual: Tensor, expected: Tensor) -> bool:
    """Equal up to rounding (relative to the largest entry)."""
    tol = 1000 * torch.finfo(expected.dtype).eps
    scale = expected.nan_to_num(0.0, 0.0, 0.0).abs().max()
    return torch.allclose(actual, expected, rtol=0.0, atol=tol * scale, equal_nan=True)

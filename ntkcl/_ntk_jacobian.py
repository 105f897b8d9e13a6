"""Generic NTK factors from torch.func Jacobians (private helper of ``ntkcl.ntk``).

Exact for any network whose examples are independent in eval mode: per-example,
per-logit Jacobians ``vmap(jacrev(...))`` with respect to one group of trainable
parameters at a time, then their Gram. Tied parameters count once (torch.func ties
them), frozen parameters and buffers are constants.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ntkcl._ntk_blocks import Factor


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
        self.params = {
            n: p.detach() for n, p in model.named_parameters() if p.requires_grad
        }
        self.sizes = {n: p.numel() for n, p in self.params.items()}
        self.groups: list[tuple[str, ...]] = [tuple(self.params)] if self.params else []

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
        constants = {n: t for n, t in self.params.items() if n not in group}
        model = self.model

        def logits_of(params, example):
            out = functional_call(model, (params, constants), (example.unsqueeze(0),))
            return out[0, logits]

        def per_example(params, example):
            return jacrev(logits_of)(params, example)

        variables = {n: self.params[n] for n in group}
        jac = vmap(per_example, in_dims=(None, 0))(variables, x)
        b, k = x.shape[0], logits.stop - logits.start
        return [Factor(jac[n].reshape(b, k, -1)) for n in group]

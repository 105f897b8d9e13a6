"""Structured NTK factors for Linear/Conv2d networks (private helper of ``ntkcl.ntk``).

For a layer ``z = W u + b`` applied at ``L`` positions (L = 1 for a Linear layer on
flat inputs, the output pixels for Conv2d), the Jacobian of logit ``a`` at example
``i`` with respect to ``W`` is ``sum_p g[i, a, :, p] u[i, :, p]^T``, where ``g`` is
the cotangent at the layer output. Hence

* L = 1: the kernel term is ``<u_i, u_j> * <g_ia, g_jb>``, a Gram of the layer
  inputs times a Gram of the cotangents (a column of ones in ``u`` adds the bias);
* L > 1: per-example, per-logit gradients ``g_ia u_i^T`` (batched matmuls over
  unfolded patches: one per logit, or one for all logits when the cotangents are
  no larger than the gradients) and their Gram; per-example gradients of a layer
  take ``b * k * (layer parameters)`` elements, bounded by the caller's blocking.

For a plain chain (an ``nn.Sequential`` of Linear layers, elementwise activations,
identities and a leading Flatten: every MLP) the cotangents are propagated by hand,
``g <- (g @ W) * act'(z)``, for all logits at once and without an autograd graph;
the readout's cotangent at its input is its weight row, the same for every
example; for a trace kernel the layer under the readout needs only one feature
vector per example (see ``_chain_factors``). For other networks of flat Linear
layers the cotangents of all logits
come from one batched backward pass (``is_grads_batched``: the backward matmuls
take all logits at once); with Conv2d layers, whose batched backward runs logit
by logit anyway, one pass per logit is turned into per-example gradients before
the next. The path is exact only when every trainable parameter sits in a Linear
or Conv2d layer called once and nothing modifies a layer's input or output in
place; ``_ntk_analysis`` detects everything else (a chain is exact by
construction), and the caller then falls back to the generic path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkcl._ntk_analysis import (
    LayerSpec,
    Probe,
    Unsupported,
    check_call,
    has_hooks,
    patched_class,
    record,
    replaced_on_instance,
)
from ntkcl._ntk_blocks import Factor

# modules a chain may hold between its Linear layers: elementwise functions (the
# derivative of ReLU is its mask, the others' comes from autograd, once per block)
# and modules that are the identity in eval mode
_ELEMENTWISE = (
    nn.CELU, nn.ELU, nn.GELU, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh,
    nn.LeakyReLU, nn.LogSigmoid, nn.Mish, nn.ReLU, nn.ReLU6, nn.SELU, nn.SiLU,
    nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Tanh, nn.Tanhshrink,
)  # fmt: skip
_IDENTITY = (nn.Identity, nn.Dropout)


def _sequential_modules(module: nn.Module) -> list[nn.Module] | None:
    """The modules an ``nn.Sequential`` applies, nested ones unpacked (None for a
    module that is not a plain Sequential or has hooks)."""
    cls = type(module)
    plain = (
        isinstance(module, nn.Sequential)
        and cls.forward is nn.Sequential.forward
        and not patched_class(cls)
        and cls.__call__ is nn.Module.__call__
        and not has_hooks(module)
        and not replaced_on_instance(module)
    )
    if not plain:
        return None
    mods = []
    for child in module:
        inner = _sequential_modules(child) if isinstance(child, nn.Sequential) else None
        if inner is None and isinstance(child, nn.Sequential):
            return None
        mods += [child] if inner is None else inner
    return mods


def chain_of(model: nn.Module, input_dim: int) -> list[nn.Module] | None:
    """The modules of ``model`` when it is a chain whose cotangents
    :class:`Structured` can propagate by hand, else None.

    A chain is a plain ``nn.Sequential`` (nested ones included) of ``nn.Linear``
    layers, the elementwise activations above and identities, ending in a Linear
    layer; the inputs of its Linear layers are flat because the examples are
    (``input_dim == 2``) or an ``nn.Flatten()`` comes before the first of them.
    Types must match exactly (a subclass may change ``forward``), their ``forward``
    must be torch's own (not patched on the class) and no module may have hooks, or
    a ``forward``, parameter or buffer replaced on the instance.
    """
    mods = _sequential_modules(model)
    if not mods or type(mods[-1]) is not nn.Linear:
        return None
    flat, linear = input_dim == 2, False
    for m in mods:
        cls = type(m)
        if has_hooks(m) or replaced_on_instance(m) or patched_class(cls):
            return None
        if cls is nn.Linear:
            if not flat:
                return None
            linear = True
        elif cls is nn.Flatten:
            if linear or (m.start_dim, m.end_dim) != (1, -1):
                return None
            flat = True
        elif cls not in _ELEMENTWISE + _IDENTITY:
            return None
    return mods


def _unfold(mod: nn.Conv2d, inp: Tensor) -> Tensor:
    """Patches ``(b, C_in * kh * kw, L)`` exactly as the convolution sees them."""
    padding = mod.padding
    if isinstance(padding, str):
        if padding == "same":
            pads = []
            for d, k in zip(
                reversed(mod.dilation), reversed(mod.kernel_size), strict=True
            ):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            inp = F.pad(inp, pads)
        padding = 0
    return F.unfold(inp, mod.kernel_size, mod.dilation, padding, mod.stride)


def chain_probe(chain: list[nn.Module], specs: list[LayerSpec], x: Tensor):
    """What :func:`~ntkcl._ntk_analysis.probe` would find for a chain, without a
    forward pass: fills the specs and returns the probe, or None when the layer
    sizes do not fit each other (the probe's forward then raises PyTorch's own
    error).

    Raises:
        ValueError: the examples do not fit the first Linear layer.
    """
    spec_of = {id(s.module): s for s in specs}
    width = x.shape[-1]  # flat examples, or a Flatten comes first (chain_of)
    saved, grad, first = 0, False, True
    for i, m in enumerate(chain):
        if type(m) is nn.Flatten:
            width = x[0].numel()
        elif type(m) is nn.Linear:
            out_features, in_features = m.weight.shape
            if in_features != width and first:
                raise ValueError(
                    f"the model's first Linear layer takes {in_features} features "
                    f"per example, but an example of x1 (shape "
                    f"{tuple(x.shape[1:])}) has {width}; pass inputs of shape "
                    f"(n, {in_features}) or the network that fits them."
                )
            if in_features != width:
                return None
            first = False
            saved += width
            width = out_features
            spec = spec_of.get(id(m))
            if spec is not None:
                spec.called = spec.used = spec.outer = True
                spec.in_features, spec.out_features = in_features, out_features
                spec.positions, spec.out_numel = 1, out_features
                spec.input_grad, spec.readout = grad, i == len(chain) - 1
                grad = True
            grad = grad or any(p.requires_grad for p in m.parameters())
        elif type(m) in _ELEMENTWISE:
            saved += width
    return Probe(num_logits=width, act_elems=saved)


class Structured:
    """Computes structured factors of blocks of examples.

    Args:
        model: the network in eval mode, in the compute dtype.
        specs: checked layer specs (:func:`check_probe`).
        num_logits: K.
        act_elems: elements saved for backward per example.
        chain: the modules of a chain (:func:`chain_of`), whose cotangents are
            then propagated by hand, or None for autograd.
    """

    def __init__(
        self,
        model,
        specs: list[LayerSpec],
        num_logits: int,
        act_elems: int,
        chain: list[nn.Module] | None = None,
    ):
        self.model = model
        self.specs = specs
        self.num_logits = num_logits
        self.act_elems = act_elems
        self.used = [s for s in specs if s.used]
        self.chain = chain if all(s.outer for s in self.used) else None
        # set by the planner for a trace kernel whose logits are not split: the
        # chain's layer under the readout then gives one feature vector per example
        self.collapse_trace = False
        head = self.chain or []
        head = head[: next((i for i, m in enumerate(head) if type(m) is nn.Linear), 0)]
        self._inplace_head = any(getattr(m, "inplace", False) for m in head)
        self.per_logit = any(not s.outer for s in self.used)
        self.groups = [None]
        # per-example sizes of the cost model, summed over layers once
        used = self.used
        self._inputs = sum(s.in_aug for s in used if s.outer and s.weight)
        self._per_logit = sum(s.out_features if s.outer else s.num_params for s in used)
        self._patches = sum(s.in_aug * s.positions for s in used if not s.outer)
        self._backward = act_elems + sum(s.out_numel for s in used)
        self._cotangents = sum(s.out_numel for s in used if s.batched_logits)

    # cost model (elements and flops), for planning
    def factor_elems(self, b: int, k: int, group=None) -> int:
        return b * self._inputs + b * k * self._per_logit

    def work_elems(self, b: int, k: int, group=None) -> int:
        """Graph, patches, backward buffers and the block's own factors."""
        passes = 1 if self.per_logit else k  # logits in flight in one backward
        own = self.factor_elems(b, k) + b * k * self._cotangents
        return b * (self.act_elems + self._patches) + b * passes * self._backward + own

    def forward_flops(self) -> int:
        return sum(s.forward_flops for s in self.specs if s.called)

    def logit_flops(self) -> int:
        """Backward and factor flops per example and logit."""
        backward = sum(s.forward_flops for s in self.specs if s.called and s.input_grad)
        pe = sum(2 * s.num_params * s.positions for s in self.used if not s.outer)
        return backward + pe

    def gram_flops(self, example_pairs: float, pairs: float, group=None) -> float:
        flops = 0.0
        for s in self.used:
            if s.outer:
                flops += 2 * example_pairs * (s.in_aug if s.weight else 0)
                flops += 2 * pairs * s.out_features
            else:
                flops += 2 * pairs * s.num_params
        return flops

    # the factors
    def compute(self, x: Tensor, logits: slice, group=None) -> list[Factor | None]:
        # a model that changes its input in place changes a copy; in a chain only
        # an in-place module before the first Linear layer can
        if self.chain is None or self._inplace_head:
            x = x.clone()
        if self.chain is not None:
            return self._chain_factors(x, logits)
        b = x.shape[0]
        out, calls = record(self.model, self.specs, x)
        if not isinstance(out, Tensor) or tuple(out.shape) != (b, self.num_logits):
            raise Unsupported("the output shape changed between blocks")
        for spec, spec_calls in zip(self.specs, calls, strict=True):
            if len(spec_calls) != int(spec.called):
                raise Unsupported(
                    f"{spec.name!r} is called {len(spec_calls)} times on a batch of "
                    f"{b} examples and {int(spec.called)} on the plan's probe (the "
                    "structured path needs each layer called once per batch)"
                )
            if spec.called:
                check_call(spec, spec_calls[0], b)
                if spec.readout and spec_calls[0].out is not out:
                    raise Unsupported(f"{spec.name!r} stopped giving the logits")
        active = [(s, c[0]) for s, c in zip(self.specs, calls, strict=True) if s.used]
        if not active:
            return []

        k = logits.stop - logits.start
        zs = [c.out for _, c in active]
        terms = [_Terms(spec, call.inp.detach(), logits, b) for spec, call in active]
        if not self.per_logit:
            # flat Linear layers only: every logit's cotangents in one batched
            # backward pass (vmap over the cotangents, i.e. big matmuls)
            cot = out.new_zeros((k, b, self.num_logits))
            idx = torch.arange(k, device=out.device)
            cot[idx, :, idx + logits.start] = 1
            grads = torch.autograd.grad(
                out, zs, cot, is_grads_batched=True, allow_unused=True
            )
            for t, g in zip(terms, grads, strict=True):
                t.add(slice(0, k), g)
        else:
            # with Conv2d (whose batched backward runs per logit anyway): one pass
            # per logit, turned into per-example gradients before the next
            for a in range(k):
                cot = out.new_zeros((b, self.num_logits))
                cot[:, logits.start + a] = 1
                grads = torch.autograd.grad(
                    out, zs, cot, retain_graph=a < k - 1, allow_unused=True
                )
                for t, g in zip(terms, grads, strict=True):
                    t.add(slice(a, a + 1), None if g is None else g.unsqueeze(0))
        return [f for t in terms for f in t.factors()]

    def _chain_factors(self, x: Tensor, logits: slice) -> list[Factor]:
        """The factors of a chain, example-major ``(b, k, out)``, by hand."""
        b, k = x.shape[0], logits.stop - logits.start
        if not self.used:  # nothing trainable: the kernel is zero
            return []
        spec_of = {id(s.module): s for s in self.used}
        lowest = min(i for i, m in enumerate(self.chain) if id(m) in spec_of)
        # forward: each Linear's input, the derivative of each activation above
        # the lowest trainable layer
        saved: list[Tensor | None] = []
        h = x
        with torch.no_grad():
            for i, m in enumerate(self.chain):
                cls = type(m)
                saved.append(h if cls is nn.Linear else None)
                if i < lowest or cls not in _ELEMENTWISE:
                    h = m(h)
                elif cls is nn.ReLU:
                    saved[-1] = (h > 0).to(h.dtype)
                    expected = h.clamp(min=0)
                    h = m(h)
                    # the mask is ReLU's derivative only if the module computes
                    # max(x, 0): F.relu or torch.relu may be patched
                    if not ((h == expected) | h.isnan()).all():
                        raise Unsupported(
                            f"ReLU {i} of the chain does not compute max(x, 0) "
                            "(torch.relu or F.relu patched?)"
                        )
                else:
                    with torch.enable_grad():
                        z = h.detach().requires_grad_()
                        y = m(z.clone() if getattr(m, "inplace", False) else z)
                        (saved[-1],) = torch.autograd.grad(y, z, torch.ones_like(y))
                    h = y.detach()
        if tuple(h.shape) != (b, self.num_logits):
            raise Unsupported("the output shape changed between blocks")

        # backward: g is the cotangent (b, k, features) at the current module's
        # output; at the logits it is one-hot, below the readout W its rows times
        # the activations' derivatives d. For the trace kind the layer under the
        # readout needs only sum_a g[i, a] . g[i', a] = sum_j s_j d[i, j] d[i', j]
        # with s = sum_a W[a]^2: one feature vector sqrt(s) * d per example
        # (`collapsed`, until the first matmul) instead of one per logit
        factors: dict[int, Factor] = {}
        top = len(self.chain) - 1
        g, owned, collapsed = None, False, None
        with torch.no_grad():
            for i in range(top, lowest - 1, -1):
                m, keep = self.chain[i], saved[i]
                if type(m) is nn.Linear:
                    spec = spec_of.get(id(m))
                    if spec is not None:
                        features = g if collapsed is None else collapsed
                        factors[id(m)] = _chain_factor(spec, features, keep, logits, b)
                    if i == lowest:
                        break
                    if g is None:  # a view, copied by the first product
                        g = m.weight[logits].unsqueeze(0).expand(b, k, -1)
                        owned = False
                        if self.collapse_trace:
                            scale = m.weight[logits].square().sum(0).sqrt()
                            collapsed = scale.expand(b, 1, -1)
                    else:
                        g, owned, collapsed = torch.matmul(g, m.weight), True, None
                elif keep is not None:
                    keep = keep.unsqueeze(1)
                    g, owned = (g.mul_(keep) if owned else g * keep), True
                    collapsed = None if collapsed is None else collapsed * keep
        return [factors[id(s.module)] for s in self.used]


def _chain_factor(spec: LayerSpec, g, inputs, logits: slice, b: int) -> Factor:
    """One Linear layer's factor in a chain (``g`` None: the readout's one-hot)."""
    inputs = inputs if spec.weight else None
    ones = spec.bias and inputs is not None
    if g is None:
        k = logits.stop - logits.start
        w = spec.module.weight
        eye = torch.eye(spec.out_features, dtype=w.dtype, device=w.device)
        onehot = eye[logits].unsqueeze(0).expand(b, k, -1)
        return Factor(onehot, inputs, False, logits.start, ones)
    return Factor(g, inputs, False, None, ones)


class _Terms:
    """The factors of one layer for a block of examples, filled logit by logit.

    Args:
        spec: the layer.
        inp: ``(b, ...)`` its input in this forward pass.
        logits: the logits of the block.
        b: examples in the block.
    """

    def __init__(self, spec: LayerSpec, inp: Tensor, logits: slice, b: int):
        self.spec, self.logits, self.b = spec, logits, b
        self.k = logits.stop - logits.start
        self.inputs = self.rows = None
        if spec.outer and spec.weight:
            self.inputs = inp  # with a bias: an implicit column of ones (Factor)
        elif spec.weight and spec.conv:
            self.rows = _unfold(spec.module, inp).transpose(1, 2)  # (b, L, Q)
        elif spec.weight:
            self.rows = inp.reshape(b, -1, spec.in_features)  # (b, L, Q)
        self.feats = self.jac = self.bias = self.cotangents = None

    def add(self, logits: slice, g: Tensor | None) -> None:
        """Take the cotangents ``g`` ``(k', b, ...)`` of the block's ``logits``."""
        if g is None:
            return
        spec, b, c = self.spec, self.b, self.spec.out_features
        kk = logits.stop - logits.start
        if spec.outer:
            g = g.reshape(kk, b, c)  # logit-major, as autograd returns it
            if kk == self.k:
                self.feats = g
            else:
                if self.feats is None:
                    self.feats = g.new_empty((self.k, b, c))
                self.feats[logits] = g
            return

        # per-example gradients contracted over the L positions; the bias
        # gradient (the sum over positions) is a factor of its own
        if spec.conv:
            g = g.reshape(kk, b, c, -1)  # (k', b, C, L)
        else:
            g = g.reshape(kk, b, -1, c).transpose(2, 3)  # (k', b, W, L)
        if self.rows is not None:
            if self.rows.shape[1] != g.shape[-1]:
                raise Unsupported(f"patches of {spec.name!r} do not match its output")
            if spec.batched_logits:  # kept, example-major, for one product
                if self.cotangents is None:
                    self.cotangents = g.new_empty((b, self.k, c, g.shape[-1]))
                self.cotangents[:, logits] = g.transpose(0, 1)
            else:
                if self.jac is None:
                    self.jac = g.new_empty((self.k, b, c, self.rows.shape[-1]))
                for i in range(kk):  # one batched matmul over the examples per logit
                    torch.bmm(g[i], self.rows, out=self.jac[logits.start + i])
        if spec.bias:
            if self.bias is None:
                self.bias = g.new_empty((self.k, b, c))
            self.bias[logits] = g.sum(-1)

    def factors(self) -> list[Factor | None]:
        spec = self.spec
        if self.cotangents is not None:  # every logit's gradients in one product
            b, k, c, positions = self.cotangents.shape
            cots = self.cotangents.view(b, k * c, positions)
            self.jac, self.cotangents = torch.bmm(cots, self.rows), None
        if self.feats is None and self.jac is None and self.bias is None:
            return [None] * spec.num_factors  # the layer does not reach the logits
        if spec.outer:
            onehot = self.logits.start if spec.readout else None
            ones = spec.bias and self.inputs is not None
            return [Factor(self.feats, self.inputs, True, onehot, ones)]
        terms = []
        if self.jac is not None and spec.batched_logits:
            terms.append(Factor(self.jac.view(self.b, self.k, -1), None, False))
        elif self.jac is not None:
            terms.append(Factor(self.jac.view(self.k, self.b, -1), None, True))
        if spec.bias:
            terms.append(Factor(self.bias, None, True))
        return terms

"""Which networks the structured NTK path computes exactly (private, ``ntkcl.ntk``).

:func:`analyse` checks the module tree (every trainable parameter the weight or bias
of an ``nn.Linear`` or ``nn.Conv2d`` without hooks, no parameter listed twice);
:func:`probe` runs the first two examples through the network recording every layer
call, the autograd edges into each parameter and the memory saved for backward;
:func:`check_probe` then requires each layer to be called at most once, each of its
parameters to enter the graph exactly once (so not also outside the layer), and no
layer input or output to be modified in place afterwards (version counters).
Anything else raises :class:`Unsupported`, and the caller uses the generic path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

_SUPPORTED = (nn.Linear, nn.Conv2d)


class Unsupported(Exception):
    """The structured path cannot compute this network exactly (message says why)."""


@dataclass
class LayerSpec:
    """One Linear or Conv2d layer holding trainable parameters.

    Shapes are filled in by :func:`check_probe` from one forward pass.
    """

    name: str
    module: nn.Module
    conv: bool
    weight: bool = False  # weight trainable
    bias: bool = False  # bias trainable
    called: bool = False
    used: bool = False  # its output reaches the logits
    outer: bool = False  # Linear on flat inputs: the Gram factorises
    in_features: int = 0  # per position (Conv2d: C_in * kh * kw)
    out_features: int = 0  # per position (Conv2d: C_out)
    positions: int = 1  # L
    out_numel: int = 0  # per example
    input_grad: bool = False  # backward passes through to its input
    readout: bool = False  # its output is the model output: one-hot cotangents

    @property
    def in_aug(self) -> int:
        """Length of the (augmented) input vector: weight inputs plus a bias one."""
        return (self.in_features if self.weight else 0) + int(self.bias)

    @property
    def num_factors(self) -> int:
        """Kernel terms: one, or weight and bias apart when summed over positions."""
        return 1 if self.outer else int(self.weight) + int(self.bias)

    @property
    def batched_logits(self) -> bool:
        """Whether the per-example gradients of all logits come from one batched
        product over the examples, with the cotangents ``(b, k, C, L)`` held
        first, rather than one product per logit: when the cotangents are no
        larger than the gradients (``L <= in_features``), for the larger
        products."""
        return not self.outer and self.weight and self.positions <= self.in_features

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_aug

    @property
    def forward_flops(self) -> int:
        return 2 * self.in_features * self.out_features * self.positions


@dataclass
class _Call:
    inp: Tensor
    out: Tensor
    in_version: int
    out_version: int
    is_output: bool = False  # the layer's output is the model's output


@dataclass
class Probe:
    """What one forward pass on a small batch (one or two examples) shows."""

    num_logits: int
    act_elems: int  # elements saved for backward per example (parameters excluded)
    param_uses: dict[int, int] = field(default_factory=dict)  # id(param) -> edges
    calls: list[list[_Call]] = field(default_factory=list)
    examples: int = 1  # the batch the probe ran on


def has_hooks(mod: nn.Module) -> bool:
    return bool(
        mod._forward_hooks
        or mod._forward_pre_hooks
        or mod._backward_hooks
        or getattr(mod, "_backward_pre_hooks", None)
    )


def replaced_on_instance(mod: nn.Module) -> str | None:
    """``forward`` or a registered parameter or buffer that an attribute assigned
    on the instance hides (a patch the type check cannot see), or None."""
    names = ("forward", *mod._parameters, *mod._buffers)
    return next((name for name in names if name in vars(mod)), None)


_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def patched_class(cls: type) -> str | None:
    """A method of a torch layer class (or the function it calls) that something
    replaced on the class or in ``torch.nn.functional`` (a patch for every
    instance), or None. The structured path computes what torch's own forward
    computes, so such a layer must go to the generic path."""
    methods = ["forward"] + (["_conv_forward"] if issubclass(cls, nn.Conv2d) else [])
    for name in methods:
        # the code's file, not __module__, which functools.wraps copies over
        code = getattr(getattr(cls, name, None), "__code__", None)
        if code is None or not os.path.abspath(code.co_filename).startswith(_TORCH):
            return f"{cls.__name__}.{name}"
    if cls is nn.Linear and F.linear is not torch._C._nn.linear:
        return "torch.nn.functional.linear"
    if cls is nn.Conv2d and F.conv2d is not torch.conv2d:
        return "torch.nn.functional.conv2d"
    return None


def _global_hooks() -> bool:
    names = ("_global_forward_hooks", "_global_forward_pre_hooks")
    names += ("_global_backward_hooks", "_global_backward_pre_hooks")
    return any(getattr(_module_globals, n, None) for n in names)


def analyse(model: nn.Module) -> tuple[list[LayerSpec], str | None]:
    """Static check: which layers hold trainable parameters, and can we handle them.

    Returns:
        The layer specs and None, or an empty list and the reason the structured
        path does not apply.
    """
    if _global_hooks():
        return [], "global module hooks are registered"
    owners: dict[int, str] = {}
    specs: dict[int, LayerSpec] = {}
    for full_name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in owners:
            return [], (
                f"parameter {full_name!r} is the same tensor as {owners[id(p)]!r} "
                "(tied weights or a shared module)"
            )
        owners[id(p)] = full_name
        mod_name, _, pname = full_name.rpartition(".")
        mod = model.get_submodule(mod_name)
        kind = type(mod).__name__
        if type(mod) not in _SUPPORTED:
            return [], f"parameter {full_name!r} belongs to a layer of type {kind}"
        if pname not in ("weight", "bias"):
            return [], f"parameter {full_name!r} of a {kind} is reparametrised"
        if has_hooks(mod):
            return [], f"module {mod_name!r} has hooks registered"
        if replaced := replaced_on_instance(mod):
            return [], f"module {mod_name!r} has {replaced!r} replaced on the instance"
        if patched := patched_class(type(mod)):
            return [], f"{patched} is not torch's own (patched)"
        if isinstance(mod, nn.Conv2d) and (
            mod.groups != 1 or mod.padding_mode != "zeros"
        ):
            return [], (
                f"Conv2d {mod_name!r} has groups={mod.groups}, "
                f"padding_mode={mod.padding_mode!r} (only groups=1, zeros)"
            )
        spec = specs.setdefault(
            id(mod), LayerSpec(mod_name, mod, isinstance(mod, nn.Conv2d))
        )
        setattr(spec, pname, True)
    return list(specs.values()), None


def record(model: nn.Module, specs: list[LayerSpec], x: Tensor):
    """Forward ``x`` with hooks on the layers; returns (output, calls per layer)."""
    calls: list[list[_Call]] = [[] for _ in specs]

    def hook(index):
        def fn(module, args, out):
            inp = args[0] if args and isinstance(args[0], Tensor) else None
            if inp is None or not isinstance(out, Tensor):
                calls[index].append(None)
            else:
                calls[index].append(_Call(inp, out, inp._version, out._version))

        return fn

    handles = [s.module.register_forward_hook(hook(i)) for i, s in enumerate(specs)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def param_uses(out: Tensor) -> dict[int, int]:
    """Count autograd edges into every leaf reachable from ``out``, by id(leaf)."""
    uses: dict[int, int] = {}
    seen = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            stack.append(nxt)
    return uses


def probe(model: nn.Module, x: Tensor, specs: list[LayerSpec]) -> tuple[Tensor, Probe]:
    """One forward pass on ``x`` (a few examples) recording layer calls and memory.

    Two examples rather than one catch a model that runs a layer once per example
    (a Python loop over the batch): the layer then runs twice.
    """
    fixed = {
        t.untyped_storage().data_ptr()
        for t in chain(model.parameters(), model.buffers())
    }
    saved = [0]

    def pack(t: Tensor):
        try:
            if t.untyped_storage().data_ptr() not in fixed:
                saved[0] += t.numel()
        except (RuntimeError, NotImplementedError):
            saved[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, calls = record(model, specs, x)
    for call in chain.from_iterable(calls):
        if call is not None:
            call.is_output = call.out is out
    uses = param_uses(out) if isinstance(out, Tensor) and out.grad_fn else {}
    num_logits = out.shape[-1] if isinstance(out, Tensor) and out.dim() == 2 else -1
    b = max(1, x.shape[0])
    return out, Probe(num_logits, saved[0] // b, uses, calls, b)


def check_call(spec: LayerSpec, call: _Call | None, batch: int) -> None:
    if call is None:
        raise Unsupported(f"{spec.name!r} is called without a tensor input or output")
    if call.inp._version != call.in_version or call.out._version != call.out_version:
        raise Unsupported(
            f"the input or output of {spec.name!r} is modified in place after the "
            "layer runs (for example ReLU(inplace=True))"
        )
    dims = call.inp.dim()
    if (spec.conv and dims != 4) or dims < 2 or call.inp.shape[0] != batch:
        raise Unsupported(
            f"{spec.name!r} receives input of shape {tuple(call.inp.shape)} for a "
            f"batch of {batch}; its first axis must be the examples"
        )


def check_probe(specs: list[LayerSpec], pr: Probe) -> None:
    """Fill the specs' shapes and raise :class:`Unsupported` where not exact.

    Every trainable parameter belongs to a spec (:func:`analyse`); here each one must
    enter the graph exactly once, inside its layer's single call, or (layer not
    called, or its output unused) not at all.

    Args:
        specs: from :func:`analyse`.
        pr: from :func:`probe`.
    """
    for spec, calls in zip(specs, pr.calls, strict=True):
        own = [p for n, p in spec.module.named_parameters() if p.requires_grad]
        uses = {pr.param_uses.get(id(p), 0) for p in own}
        if len(calls) > 1:
            raise Unsupported(
                f"{spec.name!r} is called {len(calls)} times on a batch of "
                f"{pr.examples} example(s)"
            )
        spec.called = len(calls) == 1
        if not spec.called:
            if uses != {0}:
                raise Unsupported(f"a parameter of {spec.name!r} is used outside it")
            continue
        if len(uses) != 1 or uses.pop() > 1:
            raise Unsupported(f"a parameter of {spec.name!r} is used more than once")
        call = calls[0]
        check_call(spec, call, pr.examples)
        spec.used = pr.param_uses.get(id(own[0]), 0) == 1
        mod = spec.module
        if spec.conv:
            spec.in_features = mod.in_channels * math.prod(mod.kernel_size)
            spec.out_features = mod.out_channels
            spec.positions = call.out.shape[-1] * call.out.shape[-2]
        else:
            spec.out_features, spec.in_features = mod.weight.shape
            spec.positions = call.inp[0].numel() // mod.in_features
            spec.outer = call.inp.dim() == 2
        spec.out_numel = call.out[0].numel()
        spec.input_grad = call.inp.requires_grad
        spec.readout = call.is_output and spec.outer

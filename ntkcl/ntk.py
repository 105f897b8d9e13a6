"""The empirical neural tangent kernel, exact and memory-bounded.

For a network ``f`` with trainable parameters ``theta`` and K logits, the empirical
NTK between examples ``x1[i]`` and ``x2[j]`` is the ``K x K`` matrix

    Theta[i, j, a, b] = sum_p  d f_a(x1[i]) / d theta_p  *  d f_b(x2[j]) / d theta_p.

:func:`empirical_ntk` returns it in one of three kinds: ``full`` ``(n1, n2, K, K)``,
``diagonal`` ``(n1, n2, K)`` (the ``a == b`` blocks) or ``trace`` ``(n1, n2)``, the
SUM over logits (neural-tangents' ``trace_axes=(-1,)`` gives the mean instead).

Two exact implementations:

* ``structured``, for networks whose trainable parameters all sit in ``nn.Linear``
  and ``nn.Conv2d`` layers joined by parameter-free operations (activations, pooling,
  flattening, reshapes, residual additions, eval-mode normalisation without
  trainable affine parameters). Per layer it multiplies a Gram of the layer inputs
  by a Gram of the cotangents at its outputs (Conv2d and Linear layers on
  sequences: a Gram of per-example gradients built from unfolded patches). It never
  forms a Jacobian with respect to all parameters. The cotangents of all logits come
  from one batched autograd backward pass or, for a plain ``nn.Sequential`` of
  Linear layers and elementwise activations (an MLP), are propagated by hand.
* ``jacobian``, for anything else: per-example Jacobians from ``torch.func``
  (``vmap`` over ``jacrev``) and their Gram, processed in blocks of examples, logits
  and parameters. A check on a few examples compares them with plain autograd;
  where PyTorch's batching rules get the nested ``vmap`` wrong (PReLU) the blocks
  are taken one logit at a time, and where ``vmap`` fails altogether (RNN modules,
  full backward hooks) by autograd, example by example (slower; shown in
  :attr:`NTKPlan.method`).

The structured path refuses, and ``auto`` then takes ``jacobian``, whenever it could
be wrong: a trainable parameter outside Linear/Conv2d (norm layers, embeddings,
Conv1d, attention), a module or parameter used twice (tied weights), a parameter
also used outside its layer, a Conv2d with groups > 1 or a non-zero padding mode, a
layer with hooks or with ``forward`` assigned on the instance, or an in-place
operation that changes a layer's input or output after it ran
(``ReLU(inplace=True)``; detected by version counters).

``auto`` takes ``structured`` whenever the network qualifies and its estimated cost
(forward, backward and Gram flops for the given n, K and kind) is lower, which in
practice is always: its Grams are smaller, and its per-example gradients of Conv2d
layers cost what the generic path's do. :func:`plan_ntk` shows which path runs,
why, the blocking and the estimates; each call also logs it at DEBUG level on the
``ntkcl.ntk`` logger.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 3))
    >>> empirical_ntk(net, torch.randn(5, 4), kind="full").shape
    torch.Size([5, 5, 3, 3])
"""

from __future__ import annotations

import copy
import logging
import numbers
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ntkcl._ntk_analysis import Unsupported, param_uses
from ntkcl._ntk_blocks import Blocking, contract, finish, new_kernel
from ntkcl._ntk_plan import NTKPlan, make_plan, structured_refusal

__all__ = ["KINDS", "IMPLEMENTATIONS", "NTKPlan", "empirical_ntk", "plan_ntk"]

logger = logging.getLogger(__name__)

KINDS = ("full", "diagonal", "trace")
IMPLEMENTATIONS = ("auto", "structured", "jacobian")


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    kind: str = "trace",
    dtype: torch.dtype | None = None,
    implementation: str = "auto",
    memory_budget: int = 2**30,
) -> Tensor:
    """The exact empirical NTK of ``model`` with respect to its trainable parameters.

    The model is evaluated in eval mode (BatchNorm uses its running statistics,
    Dropout is off); every module's training flag is restored afterwards and the
    parameters, buffers and ``.grad`` fields are left untouched. Parameters with
    ``requires_grad=False`` are constants; a parameter shared between modules counts
    once. Examples must be independent of each other in eval mode.

    Args:
        model: maps a batch ``(n, ...)`` to logits ``(n, K)``.
        x1: ``(n1, ...)`` inputs; moved to the model's device and, if floating,
            cast to the compute dtype.
        x2: ``(n2, ...)`` inputs, or None (or ``x1`` itself) for the kernel of
            ``x1`` with itself (symmetric; only about half of it is computed).
        kind: ``"full"`` ``(n1, n2, K, K)``, ``"diagonal"`` ``(n1, n2, K)`` or
            ``"trace"`` ``(n1, n2)``, the sum over logits.
        dtype: compute dtype; None keeps the model's. Another dtype (e.g.
            ``torch.float64``) computes on a converted copy of the model; a
            model whose hooks or closures hold its own parameters cannot be
            copied so (ValueError: convert it yourself).
        implementation: ``"auto"``, ``"structured"`` (raises ValueError for a
            network it cannot compute exactly) or ``"jacobian"``.
        memory_budget: bytes of working memory (factors, Jacobian blocks,
            activations) to stay within, beyond the model and the returned kernel.

    Returns:
        The kernel on the model's device in the compute dtype, shaped as ``kind``
        says.

    Raises:
        TypeError: for a model that is not a Module or inputs that are not tensors.
        ValueError: for an unknown kind or implementation, inputs of mismatched
            shapes or that the model cannot take, a model that does not return
            floating-point ``(n, K)`` logits, or ``implementation="structured"`` on
            a network it does not cover.

    Warning:
        ``trace`` sums over logits; divide by K for neural-tangents' default.
    """
    _validate(model, x1, x2, kind, dtype, implementation, memory_budget)
    x2 = None if x2 is x1 else x2  # the same batch: compute half, mirror
    with _prepared(model, x1, x2, dtype) as (net, x1c, x2c, cdtype):
        args = (net, x1c, x2c, kind, cdtype, memory_budget)
        plan, provider, blocking = make_plan(*args, implementation)
        logger.debug("empirical NTK: %s", plan.describe())
        try:
            return _run(provider, blocking, x1c, x2c, kind, plan)
        except Unsupported as exc:
            if implementation == "structured":
                raise ValueError(structured_refusal(str(exc))) from exc
            logger.info("structured NTK path gave up (%s); using jacobian", exc)
            plan, provider, blocking = make_plan(*args, "jacobian")
            logger.debug("empirical NTK: %s", plan.describe())
            return _run(provider, blocking, x1c, x2c, kind, plan)


def plan_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    kind: str = "trace",
    dtype: torch.dtype | None = None,
    implementation: str = "auto",
    memory_budget: int = 2**30,
) -> NTKPlan:
    """The plan :func:`empirical_ntk` would follow for these arguments.

    Runs one forward pass on the first two examples of ``x1`` (in eval mode,
    restored after) and, on the jacobian path, the Jacobians of up to 3 examples
    (the check that picks how that path takes them).
    Arguments as for :func:`empirical_ntk`.

    Returns:
        The path that would run, why, its block sizes and the cost estimates.
    """
    _validate(model, x1, x2, kind, dtype, implementation, memory_budget)
    x2 = None if x2 is x1 else x2  # the same batch: compute half, mirror
    with _prepared(model, x1, x2, dtype) as (net, x1c, x2c, cdtype):
        return make_plan(net, x1c, x2c, kind, cdtype, memory_budget, implementation)[0]


def _validate(model, x1, x2, kind, dtype, implementation, memory_budget) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if kind not in KINDS:
        raise ValueError(
            f"kind must be 'full', 'diagonal' or 'trace', got {kind!r}; use 'trace' "
            "for the (n1, n2) kernel summed over logits."
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be 'auto', 'structured' or 'jacobian', got "
            f"{implementation!r}; 'auto' picks the faster exact one."
        )
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it "
                f"with torch.as_tensor({name})."
            )
        if x.dim() < 1 or x.shape[0] < 1:
            shape = tuple(x.shape)
            raise ValueError(
                f"{name} must be a tensor of shape (n, ...) holding at least one "
                f"example, got {shape}; add a batch axis with x.unsqueeze(0)."
            )
    if x2 is not None and x2.is_floating_point() != x1.is_floating_point():
        raise ValueError(
            f"x1 and x2 must both be floating or both not (e.g. token ids), got "
            f"{x1.dtype} and {x2.dtype}; convert one with .to(other.dtype)."
        )
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x2 must have the same example shape as x1, got {tuple(x2.shape)} "
            f"against {tuple(x1.shape)}; only the first (example) axis may differ."
        )
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        raise ValueError(
            f"dtype must be None or a floating torch.dtype, got {dtype!r}; for example "
            "torch.float64."
        )
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, numbers.Integral)
        or memory_budget <= 0
    ):
        raise ValueError(
            f"memory_budget must be a positive integer number of bytes, got "
            f"{memory_budget!r}; for example 2**30 for 1 GiB."
        )


def _model_dtype_device(model: nn.Module, x: Tensor):
    tensors = list(model.parameters()) + list(model.buffers())
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    device = tensors[0].device if tensors else x.device
    return dtype, device


def _as_input(x: Tensor | None, device, dtype) -> Tensor | None:
    if x is None:
        return None
    x = x.detach().to(device=device, dtype=dtype if x.is_floating_point() else None)
    return x.clone() if x.is_inference() else x


@contextmanager
def _prepared(model: nn.Module, x1: Tensor, x2: Tensor | None, dtype):
    """Eval mode (restored on exit), the compute-dtype model and inputs, grad on."""
    # torch.compile's wrapper: the module it wraps holds the same parameters, and
    # the engine's hooks and transforms would make dynamo recompile on every call
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    model_dtype, device = _model_dtype_device(model, x1)
    compute_dtype = dtype or model_dtype
    modes = [(m, m.training) for m in model.modules()]
    # torch.func's functional_call can leave its own tensors in a module that is
    # registered under two names (self.b = self.a); put the originals back
    slots = [
        (store, name, tensor)
        for m in model.modules(remove_duplicate=False)
        for store in (m._parameters, m._buffers)
        for name, tensor in store.items()
    ]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            net = model
            x1c = _as_input(x1, device, compute_dtype)
            if compute_dtype != model_dtype:
                try:
                    net = copy.deepcopy(model).to(compute_dtype)
                except RuntimeError as exc:  # e.g. nn.utils.weight_norm's hook
                    raise ValueError(
                        f"dtype={dtype} needs a converted copy of the model, and the "
                        f"model cannot be copied ({exc}); convert the model yourself "
                        "(e.g. model.double()) and pass dtype=None."
                    ) from exc
                _check_copy(model, net, _as_input(x1, device, model_dtype), x1c)
            yield net, x1c, _as_input(x2, device, compute_dtype), compute_dtype
    finally:
        for m, training in modes:
            m.training = training
        for store, name, tensor in slots:
            if store.get(name) is not tensor:
                store[name] = tensor


def _check_copy(model: nn.Module, copied: nn.Module, x1: Tensor, x1c: Tensor) -> None:
    # x1: the inputs in the model's own dtype, x1c: in the copy's
    """Refuse a converted copy that still reads the original model's parameters.

    ``dtype=`` computes on ``copy.deepcopy(model).to(dtype)``; a hook or closure
    that holds one of the model's parameters (or layers) keeps pointing at the
    original, so the copy's kernel would miss that dependency or fail on mixed
    dtypes. One forward of the copy on the first two examples shows it: such a
    parameter is a leaf of the copy's graph. Conversion in place is no way out: it
    loses hooks on the parameters' gradient accumulators and fails for inference
    tensors.
    """
    fix = (
        "a copy does not follow references the model holds itself (hooks, closures, "
        "functools.partial); convert the model yourself (e.g. model.double()) and "
        "pass dtype=None"
    )
    try:
        out = copied(x1c[:2].clone())
    except (RuntimeError, IndexError, TypeError) as exc:
        try:  # a model that fails in its own dtype too: the plan's probe says why
            with torch.no_grad():
                model(x1[:2].clone())
        except Exception:
            return
        raise ValueError(
            f"the model runs in its own dtype but fails on a converted copy of "
            f"itself ({exc}): {fix}."
        ) from exc
    leaves = param_uses(out) if isinstance(out, Tensor) and out.grad_fn else {}
    foreign = [name for name, p in model.named_parameters() if id(p) in leaves]
    if foreign:
        raise ValueError(
            f"the converted copy of the model still uses the original's parameters "
            f"{foreign}: {fix}."
        )


def _run(provider, blocking: Blocking, x1, x2, kind: str, plan: NTKPlan) -> Tensor:
    n1, n2 = plan.num_examples
    k = plan.num_logits
    out = new_kernel(kind, n1, n2, k, plan.dtype, x1.device)
    blocks = contract(provider.compute, provider.groups, x1, x2, kind, k, blocking, out)
    return finish(kind, out, blocks)

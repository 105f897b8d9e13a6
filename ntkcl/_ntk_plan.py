"""Planning of an empirical NTK computation (private helper of ``ntkcl.ntk``).

Probes the network with two examples, decides whether the structured path applies,
sizes the blocks of examples, logits and parameters of both paths so that the
working set stays within the memory budget, estimates their floating-point
operations and picks one.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ntkcl._ntk_analysis import Unsupported, analyse, check_probe, probe
from ntkcl._ntk_blocks import Blocking
from ntkcl._ntk_jacobian import Jacobian
from ntkcl._ntk_structured import Structured, chain_of, chain_probe

logger = logging.getLogger("ntkcl.ntk")


@dataclass(frozen=True)
class NTKPlan:
    """How :func:`empirical_ntk` computes a kernel.

    Attributes:
        implementation: ``"structured"`` or ``"jacobian"``, the path that runs.
        reason: why that path was chosen, as a sentence fragment.
        kind: the kernel kind.
        dtype: the compute dtype.
        num_examples: ``(n1, n2)``.
        num_logits: K.
        num_parameters: trainable parameters (tied ones counted once).
        structured_unsupported: why the structured path does not apply to this
            network, or None when it does.
        cotangents: how the structured path gets the cotangents at the layer
            outputs: ``"chain"`` (propagated by hand through an ``nn.Sequential``
            of Linear layers and elementwise activations, without autograd) or
            ``"autograd"`` (a batched backward pass); None on the jacobian path.
        jacobians: how the jacobian path takes per-example Jacobians:
            ``"nested vmap"`` (torch.func, all logits of a block batched inside
            the vmap over examples), ``"vmap logit by logit"`` or ``"per-example
            autograd"``, the fastest that a check on a few examples against plain
            autograd found right for this network; None on the structured path.
        flops: estimated floating-point operations per implementation (None for
            ``structured`` when it does not apply).
        examples_per_block: examples per block when factors are computed.
        logits_per_block: logits per block when factors are computed.
        parameter_groups: parameter groups (jacobian path; 1 for structured).
        cached: whether the factors of all examples are held at once (otherwise
            the column blocks are recomputed for every row block).
        estimated_peak_bytes: estimated working memory, excluding the model and
            the returned kernel.
        output_bytes: size of the returned kernel.
    """

    implementation: str
    reason: str
    kind: str
    dtype: torch.dtype
    num_examples: tuple[int, int]
    num_logits: int
    num_parameters: int
    structured_unsupported: str | None
    cotangents: str | None
    jacobians: str | None
    flops: dict[str, float | None]
    examples_per_block: int
    logits_per_block: int
    parameter_groups: int
    cached: bool
    estimated_peak_bytes: int
    output_bytes: int

    @property
    def method(self) -> str:
        """The path and how it works, e.g. ``"structured, chain cotangents"`` or
        ``"jacobian, nested vmap"``."""
        how = f"{self.cotangents} cotangents" if self.cotangents else self.jacobians
        return f"{self.implementation}, {how}"

    def describe(self) -> str:
        """One line for logs."""
        n1, n2 = self.num_examples
        mode = "cached" if self.cached else "streamed"
        return (
            f"{self.method} ({self.reason}); {self.kind} kernel of "
            f"{n1}x{n2} examples, K={self.num_logits}, {self.num_parameters} "
            f"parameters, {self.dtype}; blocks of {self.examples_per_block} examples "
            f"x {self.logits_per_block} logits x {self.parameter_groups} parameter "
            f"group(s), {mode}; ~{self.flops[self.implementation]:.3g} flop, "
            f"~{format_bytes(self.estimated_peak_bytes)} working memory"
        )


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``, ``1000`` -> ``"1000 B"``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def structured_refusal(reason: str) -> str:
    return (
        f"implementation='structured' cannot compute this network exactly: {reason}. "
        "Use implementation='jacobian' or 'auto'."
    )


# the fixed cost of one call that computes factors (Python, autograd, small
# kernels), in flops at a typical CPU rate: about 1 ms
CALL_FLOPS = 1e8


def _fit(ok, high: int) -> int:
    """Largest b in [1, high] with ok(b) (ok monotone decreasing), or 0."""
    if high < 1 or not ok(1):
        return 0
    lo, hi = 1, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _pair_elems(kind: str, b1: int, b2: int, k: int) -> int:
    return b1 * b2 * {"full": k * k, "diagonal": k, "trace": 1}[kind]


def _cached_blocking(p, group, n1, n2, num_logits, kind, symmetric, budget):
    """Every example's factors held once and contracted in row blocks, or None."""
    n_max = n1 if symmetric else max(n1, n2)
    held = p.factor_elems(n1 + (0 if symmetric else n2), num_logits, group)
    room = budget - held
    if room <= 0:
        return None
    k = num_logits
    b = _fit(lambda b: p.work_elems(b, k, group) <= room, n_max)
    if b == 0:
        k = _fit(lambda k: p.work_elems(1, k, group) <= room, num_logits)
        b = int(k > 0)
    rows = _fit(lambda r: 2 * _pair_elems(kind, r, n2, num_logits) <= room, n1)
    if not (b and rows):
        return None
    if symmetric:  # row blocks let most of the lower triangle be skipped
        rows = min(rows, max(64, math.ceil(n1 / 8)))
    return Blocking(b, k, True, rows)


def _streamed_blocking(p, group, n1, n2, num_logits, kind, symmetric, budget):
    """One row block's factors held, column blocks recomputed, or None."""
    n_max = n1 if symmetric else max(n1, n2)
    k = num_logits
    while True:

        def ok(b, k=k):
            held = 2 * p.factor_elems(b, k, group) + 2 * _pair_elems(kind, b, b, k)
            return held + p.work_elems(b, k, group) <= budget

        b = _fit(ok, n_max)
        if b:
            return Blocking(b, k, False, b)
        if k == 1:
            return None
        k = math.ceil(k / 2)


def _blocking(p, group, n1, n2, num_logits, kind, symmetric, budget) -> Blocking | None:
    """The cheaper of the cached and streamed blockings that keep the working set
    of ``p`` within ``budget`` elements (None when neither does)."""
    dims = (n1, n2, num_logits, kind, symmetric)
    cached = _cached_blocking(p, group, *dims, budget)
    n_max = n1 if symmetric else max(n1, n2)
    if cached and cached.examples >= n_max and cached.logits == num_logits:
        return cached  # every factor from one call: nothing can be cheaper
    options = [cached, _streamed_blocking(p, group, *dims, budget)]
    options = [blk for blk in options if blk is not None]
    return min(options, key=lambda blk: _flops(p, blk, *dims), default=None)


def _peak_elems(p, group, blk: Blocking, n1, n2, num_logits, kind, symmetric) -> int:
    if blk.cached:
        held = p.factor_elems(n1 + (0 if symmetric else n2), num_logits, group)
        temps = 2 * _pair_elems(kind, blk.rows, n2, num_logits)
        return held + max(p.work_elems(blk.examples, blk.logits, group), temps)
    b, k = blk.examples, blk.logits
    return (
        2 * p.factor_elems(b, k, group)
        + 2 * _pair_elems(kind, b, b, k)
        + p.work_elems(b, k, group)
    )


def _flops(p, blk: Blocking, n1, n2, num_logits, kind, symmetric) -> float:
    rows = blk.rows if blk.cached else blk.examples
    blocks = math.ceil(n1 / rows)
    share = (blocks + 1) / (2 * blocks) if symmetric else 1.0
    example_pairs = n1 * n2 * share
    logit_pairs = num_logits**2 if kind == "full" else num_logits
    gram = sum(
        p.gram_flops(example_pairs, example_pairs * logit_pairs, g) for g in p.groups
    )
    fwd, per_logit = p.forward_flops(), p.logit_flops()
    logit_blocks = math.ceil(num_logits / blk.logits)

    def cost(examples, passes, logits):
        return examples * (passes * fwd + logits * per_logit)

    if blk.cached:
        examples = n1 + (0 if symmetric else n2)
        compute = cost(examples, logit_blocks, num_logits)
        calls = math.ceil(examples / blk.examples) * logit_blocks
    else:
        compute = cost(n1, logit_blocks, num_logits)
        units = math.ceil(n1 / blk.examples) * logit_blocks
        cols = n2 * share
        col_calls = math.ceil(cols / blk.examples)
        if kind == "full":
            compute += units * cost(cols, logit_blocks, num_logits)
            col_calls *= logit_blocks
        else:
            compute += units * cost(cols, 1, blk.logits)
        calls = units * (1 + col_calls)
    compute += calls * CALL_FLOPS
    return gram + max(1, len(p.groups)) * compute


def _cotangents(provider, structured: Structured | None) -> str | None:
    if provider is not structured:
        return None
    return "autograd" if structured.chain is None else "chain"


def _distinct(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` to 3 significant digits, or as many more as tell them
    apart (nearly equal estimates of small networks)."""
    for digits in range(3, 16):
        texts = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if texts[0] != texts[1]:
            break
    return texts


def _check_sample(x1: Tensor, x2: Tensor | None, blk: Blocking):
    """Examples and logits for :meth:`Jacobian.check`: at most as many as one
    block holds, and, where the block allows, two sizes that differ and exceed 1."""
    b = min(3, blk.examples)
    k = min(2, blk.logits)
    if b == k > 1:
        k = 1
    x = x1 if x2 is None or x1.shape[0] >= b else torch.cat([x1, x2])
    return x[:b], slice(0, k)


def _probe(net, x1: Tensor, specs):
    """:func:`probe` on the first two examples, with errors that say what to fix."""
    batch = x1[:2]
    b = batch.shape[0]
    what = "the first example" if b == 1 else f"the first {b} examples"
    shape = tuple(batch.shape)
    try:
        out, pr = probe(net, batch.clone(), specs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError) as exc:
        hint = " (x1 is 1-D: for one example pass x1.unsqueeze(0))" * (x1.dim() == 1)
        raise ValueError(
            f"the model failed on {what} of x1 (a batch of shape {shape}): {exc}. "
            f"Check that x1 is a batch (n, ...) of examples that the model "
            f"takes{hint} and that the model runs on such a batch."
        ) from exc
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != b:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model must return logits of shape (n, K); for {what} of x1 (a batch "
            f"of shape {shape}) it returned {got}. Wrap it so that it returns a "
            "2-D tensor, or pass inputs shaped as it expects."
        )
    if not out.is_floating_point():
        raise ValueError(
            f"model must return floating-point logits, it returned {out.dtype}; "
            "the NTK differentiates them (return the scores, not e.g. an argmax)."
        )
    if b == 2:
        _check_independent(net, batch, out.detach())
    return out, pr


def _check_independent(net, batch: Tensor, out: Tensor) -> None:
    """Warn when the first example's logits change with the rest of its batch.

    The engine computes the kernel in blocks of examples, so a model whose
    examples interact in eval mode (batch statistics: BatchNorm with
    ``track_running_stats=False``, or a forward that centres over the batch)
    would give a kernel that depends on the blocking.
    """
    fix = (
        "use running statistics (e.g. BatchNorm's defaults) or nothing that mixes "
        "the examples of a batch"
    )
    try:
        with torch.no_grad():
            alone = net(batch[:1].clone())
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"the model runs on two examples but fails on one ({exc}); the engine "
            "computes in blocks of examples, down to one, and needs examples that "
            f"are independent in eval mode: {fix}."
        ) from exc
    if not isinstance(alone, Tensor) or alone.shape != out[:1].shape:
        got = tuple(alone.shape) if isinstance(alone, Tensor) else type(alone).__name__
        raise ValueError(
            f"model must return logits of shape (n, K); for one example it returned "
            f"{got}, for two {tuple(out.shape)}."
        )
    if not (out[0].isfinite().all() and alone[0].isfinite().all()):
        return  # e.g. a diverged model: nothing to compare
    scale = out[0].abs().max().item() or 1.0
    diff = (alone[0] - out[0]).abs().max().item() / scale
    if diff > torch.finfo(out.dtype).eps ** 0.5:
        warnings.warn(
            "the model's examples are not independent in eval mode: the first "
            "example's logits alone differ from those in a batch of two by "
            f"{diff:.2g} (relative). The empirical NTK treats each example on its "
            "own and computes in blocks of examples, so this kernel depends on the "
            f"blocking; {fix}.",
            stacklevel=4,
        )


def make_plan(net, x1, x2, kind, dtype, memory_budget, implementation):
    """Probe the network, size the blocks of both paths, choose one."""
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    specs, unsupported = analyse(net)
    # a chain takes floating inputs; anything else gets the probe's errors
    floating = x1.is_floating_point()
    chain = chain_of(net, x1.dim()) if unsupported is None and floating else None
    # a chain's layer sizes say what a probe would find; anything else is probed
    pr = None if chain is None else chain_probe(chain, specs, x1)
    if pr is None:
        chain = None
        out, pr = _probe(net, x1, specs)
        del out
    num_logits = pr.num_logits
    structured = None
    if unsupported is None:
        try:
            if chain is None:
                check_probe(specs, pr)
            structured = Structured(net, specs, num_logits, pr.act_elems, chain)
        except Unsupported as exc:
            unsupported = str(exc)
    num_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if num_params == 0:
        logger.warning(
            "the model has no trainable parameters (requires_grad=True): its "
            "empirical NTK is zero"
        )
    fwd = structured.forward_flops() if structured else 2 * num_params
    jacobian = Jacobian(net, num_logits, pr.act_elems, fwd)

    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = int(memory_budget) // itemsize
    dims = (n1, n2, num_logits, kind, symmetric)
    candidates, fits = {}, {}
    if structured is not None:
        blk = _blocking(structured, None, *dims, budget)
        fits["structured"] = blk is not None
        candidates["structured"] = (structured, blk or Blocking(1, 1, False, 1))
    blk = _blocking(jacobian, None, *dims, budget)
    cap = num_params
    while blk is None and cap > 1:  # smaller parameter groups
        cap = math.ceil(cap / 2)
        jacobian.split(cap)
        largest = max(jacobian.groups, key=jacobian.group_params)
        blk = _blocking(jacobian, largest, *dims, budget)
    fits["jacobian"] = blk is not None
    candidates["jacobian"] = (jacobian, blk or Blocking(1, 1, False, 1))
    flops = {name: _flops(p, b, *dims) for name, (p, b) in candidates.items()}
    flops.setdefault("structured", None)

    if implementation == "structured" and structured is None:
        raise ValueError(structured_refusal(unsupported))
    if implementation != "auto":
        choice, reason = implementation, "requested"
    elif structured is None:
        choice, reason = "jacobian", f"structured does not apply: {unsupported}"
    elif fits["jacobian"] and not fits["structured"]:
        choice = "jacobian"
        reason = "only jacobian, in parameter groups, fits the memory budget"
    else:
        cheaper = flops["structured"] <= flops["jacobian"]
        choice, other = ("structured", "jacobian")
        if not cheaper:
            choice, other = other, choice
        reason = "estimated {} flop against {}".format(
            *_distinct(flops[choice], flops[other])
        )
    provider, blk = candidates[choice]
    if provider is structured:
        structured.collapse_trace = kind == "trace" and blk.logits == num_logits
    group = None
    if provider is jacobian and jacobian.groups:
        why = jacobian.check(*_check_sample(x1, x2, blk))
        if why:
            logger.debug("jacobian path: %s; using %s", why, jacobian.mode)
        group = max(jacobian.groups, key=jacobian.group_params)
    peak = _peak_elems(provider, group, blk, *dims)
    if peak > budget:
        warnings.warn(
            f"NTK memory budget of {format_bytes(memory_budget)} too small: the "
            f"{choice} path needs about {format_bytes(peak * itemsize)} even in its "
            "smallest blocks, and uses that; raise memory_budget to silence this.",
            stacklevel=3,
        )
    out_elems = (
        n1 * n2 * {"full": num_logits**2, "diagonal": num_logits, "trace": 1}[kind]
    )
    plan = NTKPlan(
        implementation=choice,
        reason=reason,
        kind=kind,
        dtype=dtype,
        num_examples=(n1, n2),
        num_logits=num_logits,
        num_parameters=num_params,
        structured_unsupported=unsupported,
        cotangents=_cotangents(provider, structured),
        jacobians=jacobian.mode if provider is jacobian else None,
        flops=flops,
        examples_per_block=blk.examples,
        logits_per_block=blk.logits,
        parameter_groups=len(provider.groups),
        cached=blk.cached,
        estimated_peak_bytes=peak * itemsize,
        output_bytes=out_elems * itemsize,
    )
    return plan, provider, blk

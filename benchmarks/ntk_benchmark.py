"""Benchmark ntkcl's empirical NTK engine against torch.func and neural-tangents.

Run from the repository root:

    .venv/bin/python benchmarks/ntk_benchmark.py             # the whole table
    .venv/bin/python benchmarks/ntk_benchmark.py --quick --no-nt   # seconds
    .venv/bin/python benchmarks/ntk_benchmark.py --cases mlp-w256,cnn --repeats 5

It measures, on this machine and in one run:

0. the large float32 matmul throughput (median of several 4096 x 4096 products);
1. ``ntkcl.ntk.empirical_ntk`` with ``implementation="auto"`` and each explicit
   implementation;
2. torch.func Jacobian contraction and NTK-vector products, written as in
   PyTorch's NTK tutorial (``vmap(jacrev)`` + ``einsum``; nested ``vmap`` of
   ``vjp``/``jvp``);
3. neural-tangents 0.6.5 ``empirical_ntk_fn`` with each implementation, in its
   own virtual environment (``benchmarks/setup_nt_env.sh``), through
   ``benchmarks/nt_worker.py``.

Every (network, n) group runs in fresh worker processes (one for torch, one for
neural-tangents) on the same weights and inputs, passed as a ``.npz``. Peak memory
is the resident set's high-water mark (``VmHWM``), reset before each method
through ``/proc/self/clear_refs``. Kernels are compared with a float64 kernel from
ntkcl (or, where ntkcl is unavailable and memory allows, from the tutorial's
Jacobian contraction in float64). The Markdown table is printed and written,
with a JSON file of all measurements, to ``benchmarks/out/``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
TORCH_METHODS = (
    "ntkcl-auto",
    "ntkcl-structured",
    "ntkcl-jacobian",
    "torch.func-jac",
    "torch.func-ntvp",
)
NT_METHODS = ("nt-jac", "nt-ntvp", "nt-struct")
FULL_NAME = {
    "ntkcl-auto": "ntkcl auto",
    "ntkcl-structured": "ntkcl structured",
    "ntkcl-jacobian": "ntkcl jacobian",
    "torch.func-jac": "(a) torch.func Jacobian contraction",
    "torch.func-ntvp": "(b) torch.func NTK-vector products",
    "nt-jac": "(c) NT JACOBIAN_CONTRACTION",
    "nt-ntvp": "(c) NT NTK_VECTOR_PRODUCTS",
    "nt-struct": "(c) NT STRUCTURED_DERIVATIVES",
}


# ----------------------------------------------------------------------------
# networks: a layer list is the one description shared with nt_worker.py
# ----------------------------------------------------------------------------


def mlp_net(in_features: int, width: int, depth: int = 3) -> nn.Sequential:
    """Flatten, ``depth`` x (Linear(width), ReLU), Linear(10); biases everywhere."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, NUM_CLASSES))
    return nn.Sequential(*layers)


def cnn_net(channels: int, side: int, width: int, depth: int = 3) -> nn.Sequential:
    """``ntkcl.models.cnn``: depth x (Conv3x3 pad 1, ReLU, AvgPool2 while side > 4).

    On 3x32x32 inputs with width 64: 32 -> 16 -> 8 -> 4, then Flatten (1024) and
    Linear(1024, 10); 85,898 parameters.
    """
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
        if side > 4:
            layers.append(nn.AvgPool2d(2))
            side //= 2
    layers += [nn.Flatten(), nn.Linear(channels * side * side, NUM_CLASSES)]
    return nn.Sequential(*layers)


def layer_list(model: nn.Sequential) -> list[dict]:
    """Describe a Sequential of supported layers (parameters by state-dict key)."""
    spec = []
    for name, m in model.named_children():
        bias = f"{name}.bias" if getattr(m, "bias", None) is not None else None
        if isinstance(m, nn.Flatten):
            spec.append({"type": "flatten"})
        elif isinstance(m, nn.ReLU):
            spec.append({"type": "relu"})
        elif isinstance(m, nn.Linear):
            spec.append({"type": "linear", "weight": f"{name}.weight", "bias": bias})
        elif isinstance(m, nn.Conv2d):
            spec.append(
                {
                    "type": "conv",
                    "weight": f"{name}.weight",
                    "bias": bias,
                    "stride": list(m.stride),
                    "padding": list(m.padding),
                }
            )
        elif isinstance(m, nn.AvgPool2d):
            spec.append({"type": "avgpool", "kernel": int(m.kernel_size)})
        else:
            raise ValueError(f"Layer {name} ({type(m).__name__}) is not supported.")
    return spec


def build_from_spec(spec: list[dict], state: dict[str, np.ndarray]) -> nn.Sequential:
    """Rebuild the torch network described by ``layer_list`` and load its weights."""
    layers: list[nn.Module] = []
    for entry in spec:
        t = entry["type"]
        if t == "flatten":
            layers.append(nn.Flatten())
        elif t == "relu":
            layers.append(nn.ReLU())
        elif t == "avgpool":
            layers.append(nn.AvgPool2d(entry["kernel"]))
        elif t == "linear":
            out_f, in_f = state[entry["weight"]].shape
            layers.append(nn.Linear(in_f, out_f, bias=entry["bias"] is not None))
        elif t == "conv":
            out_c, in_c, kh, _ = state[entry["weight"]].shape
            layers.append(
                nn.Conv2d(
                    in_c,
                    out_c,
                    kh,
                    stride=tuple(entry["stride"]),
                    padding=tuple(entry["padding"]),
                    bias=entry["bias"] is not None,
                )
            )
    model = nn.Sequential(*layers)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


def network_stats(spec, state, input_shape, n, kind) -> dict:
    """Parameters, forward FLOPs per example and the structured path's FLOP count.

    The count (``structured_flops``) is the structured contraction with general
    (not symmetric) products, for x2 = x1 with n examples and K logits:

    * forward: ``2 n d_in d_out`` per Linear, ``2 n C_out C_in k^2 HW`` per Conv2d;
    * backward of all K logits at once: ``2 n K d_in d_out`` (input cotangents) per
      layer above the first; for a Conv2d also ``2 n K C_out C_in k^2 HW`` for the
      per-example, per-logit weight gradients from unfolded patches;
    * Linear: the input Gram ``2 n^2 d_in`` and the cotangent Gram
      ``2 n^2 K^2 d_out`` (full) or ``2 n^2 K d_out`` (trace);
    * Conv2d: the Gram of per-example gradients ``2 (nK)^2 p`` (full) or
      ``2 n^2 K p`` (trace), ``p`` the layer's parameters;
    * combining the two Grams: ``2 n^2 K^2`` (full) or ``2 n^2 K`` (trace) per layer.

    ``structured_flops_symmetric`` counts every n^2 term as n (n + 1) / 2, for an
    implementation that computes only one triangle of a symmetric kernel.
    """
    k_out = NUM_CLASSES
    shape = list(input_shape)
    params = fwd = flops = gram = 0  # gram: the coefficient of n^2
    first = True
    pair = k_out * k_out if kind == "full" else k_out
    for entry in spec:
        t = entry["type"]
        if t == "flatten":
            shape = [math.prod(shape)]
        elif t == "avgpool":
            shape = [shape[0], shape[1] // entry["kernel"], shape[2] // entry["kernel"]]
        elif t == "linear":
            d_out, d_in = state[entry["weight"]].shape
            p = d_out * d_in + (d_out if entry["bias"] else 0)
            params += p
            fwd += 2 * d_in * d_out
            flops += 2 * n * d_in * d_out
            flops += 0 if first else 2 * n * k_out * d_in * d_out
            gram += 2 * d_in + 2 * pair * d_out + 2 * pair
            shape = [d_out]
            first = False
        elif t == "conv":
            c_out, c_in, kh, kw = state[entry["weight"]].shape
            sh, sw = entry["stride"]
            ph, pw = entry["padding"]
            h = (shape[1] + 2 * ph - kh) // sh + 1
            w = (shape[2] + 2 * pw - kw) // sw + 1
            p = c_out * c_in * kh * kw + (c_out if entry["bias"] else 0)
            mac = c_out * c_in * kh * kw * h * w
            params += p
            fwd += 2 * mac
            flops += 2 * n * mac + 2 * n * k_out * mac
            flops += 0 if first else 2 * n * k_out * mac
            gram += 2 * pair * p + 2 * pair
            shape = [c_out, h, w]
            first = False
    return {
        "params": params,
        "forward_flops": fwd,
        "structured_flops": flops + gram * n * n,
        "structured_flops_symmetric": flops + gram * n * (n + 1) // 2,
    }


# ----------------------------------------------------------------------------
# measurement helpers (used in the worker processes)
# ----------------------------------------------------------------------------


def set_threads(threads: int) -> None:
    """Pin this process to ``threads`` CPUs and use as many intra-op threads."""
    try:
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass
    torch.set_num_threads(threads)


def proc_status_mb(field: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MB (NaN if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    """Reset the RSS high-water mark; return the current RSS in MB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return proc_status_mb("VmRSS")


def keep_timing(times: list[float], repeats: int, time_cap: float, min_s: float):
    """Whether to time another call: ``repeats`` calls unless they pass ``time_cap``
    seconds, and more (up to 100) while they add up to less than ``min_s`` seconds,
    so that the median of a call of milliseconds is not one of three."""
    if not times:
        return True
    if len(times) < repeats:
        return sum(times) < time_cap
    return len(times) < MAX_CALLS and sum(times) < min_s


MAX_CALLS = 100


def timed_calls(fn, repeats: int, time_cap: float, min_s: float = 0.0):
    """Call ``fn`` as :func:`keep_timing` says; the times and the last result."""
    times, result = [], None
    while keep_timing(times, repeats, time_cap, min_s):
        result = None
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def fit_linear_quadratic(b1, t1, b2, t2, n):
    """Extrapolate ``T(b) = alpha b + beta b^2`` through two block timings to n."""
    if b1 == b2:
        return t2 * (n / b2) ** 2
    beta = (t2 / b2 - t1 / b1) / (b2 - b1)
    alpha = t1 / b1 - beta * b1
    if beta < 0:
        alpha, beta = t2 / b2, 0.0
    elif alpha < 0:
        alpha, beta = 0.0, t2 / b2**2
    return alpha * n + beta * n * n


# ----------------------------------------------------------------------------
# torch.func methods, as in PyTorch's NTK tutorial
# ----------------------------------------------------------------------------


def tutorial_fnet(model):
    """``fnet_single`` and detached parameters, as in the tutorial."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        return torch.func.functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return fnet_single, params


def tutorial_jacobians(fnet_single, params, x):
    """Per-example Jacobians, one (n, K, p) block per parameter tensor."""
    jac = torch.func.vmap(torch.func.jacrev(fnet_single), (None, 0))(params, x)
    return [j.flatten(2) for j in jac.values()]


def tutorial_contract(jac1, jac2, kind):
    """``einsum`` of the Jacobians, summed over parameter tensors."""
    expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}[kind]
    return torch.stack(
        [torch.einsum(expr, a, b) for a, b in zip(jac1, jac2, strict=True)]
    ).sum(0)


def tutorial_ntk_vps(fnet_single, params, x1, x2, kind):
    """The tutorial's NTK-vector products: nested vmap over pairs of examples."""

    def get_ntk(x1, x2):
        def func_x1(params):
            return fnet_single(params, x1)

        def func_x2(params):
            return fnet_single(params, x2)

        output, vjp_fn = torch.func.vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = torch.func.jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
        return torch.func.vmap(get_ntk_slice)(basis)

    result = torch.func.vmap(torch.func.vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
    if kind == "trace":
        return torch.einsum("NMKK->NM", result)
    return result


# ----------------------------------------------------------------------------
# the torch worker: one (network, n) group, all kinds and torch methods
# ----------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _ntkcl_path(messages: list[str]) -> str | None:
    """Which path ntkcl logged as run ("empirical NTK: <path> (...)")."""
    for message in reversed(messages):
        match = re.match(r"empirical NTK: (\w+)", message)
        if match:
            return match.group(1)
    return None


class TorchCase:
    """What every torch method of one (network, n) group needs."""

    def __init__(self, spec: dict):
        self.spec = spec
        state = dict(np.load(spec["npz"]))
        self.x = torch.from_numpy(state.pop("__x__"))
        self.model = build_from_spec(spec["layers"], state)
        self.n = self.x.shape[0]
        self.stats = {
            k: network_stats(spec["layers"], state, spec["input_shape"], self.n, k)
            for k in ("full", "trace")
        }
        self.params = self.stats["full"]["params"]
        self.fwd = self.stats["full"]["forward_flops"]
        self.rate = spec["matmul_gflops"] * 1e9 * 0.3  # pessimistic, for block sizes
        self.repeats, self.cap = spec["repeats"], spec["time_cap"]
        self.min_s = spec["min_seconds"]
        self.budget = spec["slow_budget_mb"] * 2**20
        self.jac_bytes = NUM_CLASSES * self.params * 4  # one example's Jacobian

    def timed(self, fn, blocked=False):
        """Timed calls: --repeats on all n, --slow-repeats on an extrapolated block."""
        repeats = self.spec["slow_repeats"] if blocked else self.repeats
        return timed_calls(fn, repeats, self.cap, 0.0 if blocked else self.min_s)

    def jc_seconds(self, kind):
        """Estimated seconds of a Jacobian contraction on b examples."""
        pair = NUM_CLASSES**2 if kind == "full" else NUM_CLASSES
        return lambda b: (
            (3 * NUM_CLASSES * self.fwd * b + 2 * b * b * pair * self.params)
            / self.rate
        )

    def block(self, kind, per_example_bytes, quadratic, est) -> int:
        """All n if it fits the budget and time, else a block of examples."""
        n, spec = self.n, self.spec
        mem = per_example_bytes * (n * n if quadratic else n)
        if mem <= self.budget and est(n) <= spec["full_seconds"]:
            return n
        b = n
        while b > 1:
            mem = per_example_bytes * (b * b if quadratic else b)
            if mem <= self.budget and est(b) <= spec["block_seconds"]:
                break
            b = max(1, int(b * 0.7))
        return b


def method_ntkcl(case: TorchCase, kind: str, impl: str, empirical_ntk, capture):
    """ntkcl's engine; a slow Jacobian path is timed on blocks and extrapolated."""
    x, n = case.x, case.n

    def call(m):
        return empirical_ntk(
            case.model,
            x[:m],
            kind=kind,
            implementation=impl,
            memory_budget=case.spec["memory_budget"],
        )

    call(min(n, 4))  # warm-up: same code path, small input
    capture.messages.clear()
    row = {"rss0": reset_peak()}
    block = n
    if impl == "jacobian":
        # probe on n/8 examples; time all n only if that takes under full_seconds
        probe = max(2, n // 8)
        t0 = time.perf_counter()
        call(probe)
        if (time.perf_counter() - t0) * (n / probe) ** 2 > case.spec["full_seconds"]:
            block = probe
    if block >= n:
        times, kernel = case.timed(lambda: call(n))
        row["seconds"] = statistics.median(times)
    else:
        b1 = max(1, block // 2)
        t1, _ = case.timed(lambda: call(b1), blocked=True)
        times, kernel = case.timed(lambda: call(block), blocked=True)
        row["seconds"] = fit_linear_quadratic(
            b1, statistics.median(t1), block, statistics.median(times), n
        )
        row["extrapolated_from"] = f"n={b1},{block} (a n + b n^2)"
    row["ntkcl_path"] = _ntkcl_path(capture.messages)
    try:
        from ntkcl.ntk import plan_ntk

        plan = plan_ntk(
            case.model,
            x,
            kind=kind,
            implementation=impl,
            memory_budget=case.spec["memory_budget"],
        )
        row["plan"] = plan.describe()
    except Exception as err:  # noqa: BLE001 - the plan is informative only
        row["plan"] = f"plan_ntk failed: {err}"
    row["log"] = capture.messages[-3:]
    return row, times, kernel


def method_jac(case: TorchCase, kind: str):
    """(a) the tutorial's Jacobian contraction, Jacobians and einsum timed apart."""
    x, n = case.x, case.n
    fnet, p = tutorial_fnet(case.model)
    block = case.block(kind, 2 * case.jac_bytes, False, case.jc_seconds(kind))
    if 2 * case.jac_bytes * block > case.budget:
        raise MemoryError(
            f"one example's Jacobians need {2 * case.jac_bytes / 2**20:.0f} MB"
        )
    xb = x[:block]
    warm = tutorial_jacobians(fnet, p, x[:2])
    tutorial_contract(warm, warm, kind)
    del warm
    row = {"rss0": reset_peak()}
    t_jac, jac = case.timed(lambda: tutorial_jacobians(fnet, p, xb), block < n)
    t_con, kernel = case.timed(lambda: tutorial_contract(jac, jac, kind), block < n)
    tj, tc = statistics.median(t_jac), statistics.median(t_con)
    row["seconds"] = tj * n / block + tc * (n / block) ** 2
    row["parts"] = {"jacobians_s": tj, "contraction_s": tc, "block": block}
    if block < n:
        row["extrapolated_from"] = f"n={block} (n/b jac + (n/b)^2 einsum)"
    times = [a + b for a, b in zip(t_jac, t_con, strict=False)]
    return row, times, kernel


def method_ntvp(case: TorchCase, kind: str):
    """(b) the tutorial's NTK-vector products, timed on a block of pairs."""
    x, n = case.x, case.n
    fnet, p = tutorial_fnet(case.model)
    per_pair = 3 * case.jac_bytes  # tangents of K logits and the jvp's activations

    def est(b):
        return 4 * NUM_CLASSES * case.fwd * b * b / case.rate

    block = case.block(kind, per_pair, True, est)
    if per_pair > 2 * case.budget:
        raise MemoryError(f"one pair's tangents need {per_pair / 2**20:.0f} MB")
    xb = x[:block]
    tutorial_ntk_vps(fnet, p, x[:1], x[:1], kind)
    row = {"rss0": reset_peak()}
    times, kernel = case.timed(
        lambda: tutorial_ntk_vps(fnet, p, xb, xb, kind), block < n
    )
    row["seconds"] = statistics.median(times) * (n / block) ** 2
    row["unblocked_gb"] = per_pair * n * n / 2**30
    if block < n:
        row["extrapolated_from"] = f"n={block} ((n/b)^2 t)"
    return row, times, kernel


def relu_flips(model: nn.Sequential, x: torch.Tensor) -> list[int]:
    """Examples with a pre-activation whose sign differs in float32 and float64.

    Such a unit sits within rounding of a ReLU kink: float32 methods may disagree
    with the float64 reference (and with each other) on that example's row.
    """
    model64 = copy.deepcopy(model).double()
    flips: set[int] = set()
    h32, h64 = x, x.double()
    with torch.no_grad():
        for layer, layer64 in zip(model, model64, strict=True):
            h32, h64 = layer(h32), layer64(h64)
            if isinstance(layer, nn.Linear | nn.Conv2d):
                differ = (h32 > 0) != (h64 > 0)
                flips.update(differ.flatten(1).any(1).nonzero().flatten().tolist())
    return sorted(flips)


def reference_kernel(case: TorchCase, empirical_ntk, ref: dict):
    """The float64 full kernel: ntkcl if it works, else the tutorial's contraction."""
    x64 = case.x[: case.spec["ref_examples"]].double()
    ref["relu_flips"] = relu_flips(case.model, case.x[: case.spec["ref_examples"]])
    try:
        if empirical_ntk is None:
            raise RuntimeError("ntkcl.ntk is not importable")
        m64 = copy.deepcopy(case.model).double()
        kernel = empirical_ntk(m64, x64, kind="full", dtype=torch.float64)
        ref["source"] = "ntkcl float64"
        return kernel
    except Exception as err:  # noqa: BLE001 - reported in the table
        ref["ntkcl_error"] = f"{type(err).__name__}: {err}"[:300]
    if 4 * case.jac_bytes * x64.shape[0] > case.budget:
        ref["error"] = "no float64 reference: ntkcl failed and Jacobians are too large"
        return None
    fnet, p = tutorial_fnet(copy.deepcopy(case.model).double())
    jac = tutorial_jacobians(fnet, p, x64)
    ref["source"] = "torch.func Jacobian contraction float64 (ntkcl failed)"
    return tutorial_contract(jac, jac, "full")


def run_torch_group(spec: dict) -> dict:
    """Run every torch method of one (network, n) group; return the measurements."""
    set_threads(spec["threads"])
    torch.manual_seed(0)
    case = TorchCase(spec)
    workdir = Path(spec["workdir"])
    try:
        from ntkcl.ntk import empirical_ntk
    except Exception as err:  # noqa: BLE001 - any import failure is reported
        empirical_ntk = None
        ntkcl_error = f"ntkcl.ntk not importable: {type(err).__name__}: {err}"
    capture = _Capture()
    ntk_logger = logging.getLogger("ntkcl")
    ntk_logger.addHandler(capture)
    ntk_logger.setLevel(logging.DEBUG)

    def save(kernel, tag):
        path = workdir / f"{spec['group']}-{tag}.npy"
        m = spec["ref_examples"]  # only this block is compared
        np.save(path, kernel[:m, :m].detach().cpu().numpy())
        return str(path)

    rows = []
    for kind in spec["kinds"]:
        auto_path = None
        for method in spec["methods"]:
            row = {"group": spec["group"], "kind": kind, "method": method, "n": case.n}
            impl = method.split("-")[1] if method.startswith("ntkcl-") else None
            if impl is not None and impl == auto_path:
                row["skipped"] = f"same as auto (auto ran {auto_path})"
            elif (
                impl == "jacobian"
                and auto_path == "structured"
                and spec["arch"] == "mlp"
            ):
                row["skipped"] = "not relevant: auto runs structured on MLPs"
            if "skipped" in row:
                rows.append(row)
                continue
            try:
                if method.startswith("ntkcl"):
                    if empirical_ntk is None:
                        raise RuntimeError(ntkcl_error)
                    out = method_ntkcl(case, kind, impl, empirical_ntk, capture)
                    if impl == "auto":
                        auto_path = out[0].get("ntkcl_path")
                elif method == "torch.func-jac":
                    out = method_jac(case, kind)
                elif method == "torch.func-ntvp":
                    out = method_ntvp(case, kind)
                else:
                    raise ValueError(f"unknown method {method}")
                extra, times, kernel = out
                row.update(extra)
                row["peak_rss_mb"] = proc_status_mb("VmHWM")
                row["delta_rss_mb"] = row["peak_rss_mb"] - row.pop("rss0")
                row["times"] = times
                row["repeats"] = len(times)
                row["kernel"] = save(kernel, f"{kind}-{method}")
                del kernel, out
            except Exception as err:  # noqa: BLE001 - every failure is a table note
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            gc.collect()

    ref = {"group": spec["group"]}
    t0 = time.perf_counter()
    kernel = reference_kernel(case, empirical_ntk, ref)
    if kernel is not None:
        ref["kernel"] = save(kernel, "reference")
        ref["seconds"] = time.perf_counter() - t0
    ntk_logger.removeHandler(capture)
    return {"rows": rows, "reference": ref, "stats": case.stats}


# ----------------------------------------------------------------------------
# the orchestrator
# ----------------------------------------------------------------------------


def matmul_gflops(size: int, repeats: int) -> dict:
    """Median float32 throughput of ``size x size`` matmuls (one warm-up excluded)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return {
        "size": size,
        "repeats": repeats,
        "seconds": statistics.median(times),
        "gflops": 2 * size**3 / statistics.median(times) / 1e9,
    }


# the share of NTK dumps in training: the demo's default run and a CIFAR-sized one
DUMP_SHARE_RUNS = (
    dict(name="demo (digits 8x8, width 256, probe 50, batch 32)", d_in=64,
         width=256, probe=50, batch=32, every=10),
    dict(name="CIFAR-sized MLP (3072 inputs, width 1024, probe 100, batch 128)",
         d_in=3072, width=1024, probe=100, batch=128, every=10),
)  # fmt: skip


def dump_share(quick: bool, steps: int = 50) -> list[dict]:
    """Share of a training run's wall time spent in NTK dumps, from timed parts.

    One SGD iteration (forward, cross-entropy, backward, step on a batch) and one
    dump (``empirical_ntk(kind="trace")`` on the probe set plus the probe logits)
    are timed on the depth-3 ReLU MLP of each run; the share is
    ``dump / (every * iteration + dump)``. Accuracy evaluation and archive writes,
    which the training loop also does at each dump, are not included.
    """
    from ntkcl.ntk import empirical_ntk

    out = []
    for run in DUMP_SHARE_RUNS:
        name, d_in, width, every = run["name"], run["d_in"], run["width"], run["every"]
        probe, batch = run["probe"], run["batch"]
        if quick:
            d_in, width, probe, batch, steps = 16, 8, 6, 8, 3
            name += " [--quick: tiny sizes]"
        torch.manual_seed(0)
        model = mlp_net(d_in, width)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        xb, yb = torch.randn(batch, d_in), torch.randint(0, NUM_CLASSES, (batch,))
        xp = torch.randn(probe, d_in)

        def step(model=model, opt=opt, xb=xb, yb=yb):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        def dump(model=model, xp=xp):
            empirical_ntk(model, xp, kind="trace")
            with torch.no_grad():
                model(xp)

        step(), dump()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        t_step = (time.perf_counter() - t0) / steps
        t_dump = statistics.median(timed_calls(dump, 5, 10.0)[0])
        share = t_dump / (every * t_step + t_dump)
        out.append(
            {
                "run": name,
                "iteration_s": t_step,
                "dump_s": t_dump,
                "every": every,
                "share": share,
            }
        )
    return out


def build_groups(quick: bool) -> list[dict]:
    """The benchmark's (network, n) groups; each runs the kinds full and trace."""
    groups = []
    if quick:
        mlps, mlp_ns, mlp_in = [16], [6], (48,)
        cnn_width, cnn_ns, cnn_in = 4, [5], (3, 8, 8)
    else:
        mlps, mlp_ns, mlp_in = [256, 1024, 2048], [100, 512], (3072,)
        cnn_width, cnn_ns, cnn_in = 64, [100, 256], (3, 32, 32)
    for width in mlps:
        for n in mlp_ns:
            groups.append(
                {
                    "group": f"mlp-w{width}-n{n}",
                    "arch": "mlp",
                    "width": width,
                    "n": n,
                    "input_shape": list(mlp_in),
                    "network": f"MLP 3x{width} ReLU, {math.prod(mlp_in)} inputs",
                }
            )
    for n in cnn_ns:
        groups.append(
            {
                "group": f"cnn-c{cnn_width}-n{n}",
                "arch": "cnn",
                "width": cnn_width,
                "n": n,
                "input_shape": list(cnn_in),
                "network": f"CNN 3x{cnn_width}ch, {'x'.join(map(str, cnn_in))} inputs",
            }
        )
    return groups


def make_group_data(group: dict, path: Path) -> list[dict]:
    """Seeded weights (PyTorch default init) and Gaussian inputs, saved as .npz."""
    torch.manual_seed(1234 + group["width"] + group["n"])
    if group["arch"] == "mlp":
        model = mlp_net(group["input_shape"][0], group["width"])
    else:
        c, side, _ = group["input_shape"]
        model = cnn_net(c, side, group["width"])
    x = torch.randn(group["n"], *group["input_shape"])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.savez(path, __x__=x.numpy(), **state)
    return layer_list(model)


def nt_python(args) -> Path:
    venv = Path(args.nt_venv or os.environ.get("NTKCL_NT_VENV") or HERE / ".nt-venv")
    return venv / "bin" / "python"


def run_subprocess(cmd: list[str], spec: dict, workdir: Path, label: str) -> dict:
    """Run a worker on a JSON spec; return the JSON it writes (or an error)."""
    spec_path = workdir / f"{label}.spec.json"
    out_path = workdir / f"{label}.out.json"
    spec = dict(spec, result=str(out_path))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    log_path = workdir / f"{label}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [*cmd, str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=spec["group_timeout"],
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"a timeout after {spec['group_timeout']} s"
    if code != 0 or not out_path.exists():
        tail = log_path.read_text()[-2000:]
        return {"error": f"{label} exited with {code}: {tail}"}
    return json.loads(out_path.read_text())


def compare(rows: list[dict], reference: dict) -> None:
    """Add ``max_rel_diff``: max |K - K_ref| / max |K_ref| on the common block."""
    if "kernel" not in reference:
        return
    ref_full = np.load(reference["kernel"])
    refs = {"full": ref_full, "trace": np.einsum("ijaa->ij", ref_full)}
    for row in rows:
        if "kernel" not in row:
            continue
        kernel = np.load(row["kernel"]).astype(np.float64)
        m = min(kernel.shape[0], ref_full.shape[0])
        kernel, ref = kernel[:m, :m], refs[row["kind"]][:m, :m]
        row["compared_examples"] = m
        row["max_rel_diff"] = float(np.abs(kernel - ref).max() / np.abs(ref).max())
        os.remove(row["kernel"])
        del row["kernel"]
    os.remove(reference["kernel"])


def run_group(group, args, matmul, workdir) -> tuple[list[dict], dict]:
    npz = workdir / f"{group['group']}.npz"
    layers = make_group_data(group, npz)
    state = dict(np.load(npz))
    stats = network_stats(layers, state, group["input_shape"], group["n"], "full")
    del state
    common = {
        "group": group["group"],
        "arch": group["arch"],
        "npz": str(npz),
        "layers": layers,
        "params": stats["params"],
        "forward_flops": stats["forward_flops"],
        "input_shape": group["input_shape"],
        "kinds": [
            k for k in ("full", "trace") if f"{group['group']}-{k}" in group["cases"]
        ],
        "threads": args.threads,
        "repeats": args.repeats,
        "time_cap": args.time_cap,
        "min_seconds": args.min_seconds,
        "full_seconds": args.full_seconds,
        "block_seconds": args.block_seconds,
        "slow_budget_mb": args.slow_budget_mb,
        "ref_examples": args.ref_examples,
        "group_timeout": args.group_timeout,
        "slow_repeats": args.slow_repeats,
        "memory_budget": args.memory_budget_mb * 2**20,
        "matmul_gflops": matmul["gflops"],
        "workdir": str(workdir),
    }
    spec = dict(common, methods=list(TORCH_METHODS))
    if args.quick:
        result = run_torch_group(spec)
    else:
        result = run_subprocess(
            [sys.executable, __file__, "--worker"],
            spec,
            workdir,
            group["group"] + "-torch",
        )
    rows = result.get("rows", [])
    if "error" in result:
        rows = [
            {
                "group": group["group"],
                "kind": k,
                "method": "torch worker",
                "error": result["error"],
            }
            for k in common["kinds"]
        ]
    if args.no_nt:
        for kind in common["kinds"]:
            for method in NT_METHODS:
                rows.append(
                    {
                        "group": group["group"],
                        "kind": kind,
                        "method": method,
                        "skipped": "--no-nt",
                    }
                )
    else:
        nt = run_subprocess(
            [str(nt_python(args)), str(HERE / "nt_worker.py")],
            dict(common, methods=list(NT_METHODS)),
            workdir,
            group["group"] + "-nt",
        )
        if "error" in nt:
            rows += [
                {
                    "group": group["group"],
                    "kind": k,
                    "method": "nt worker",
                    "error": nt["error"],
                }
                for k in common["kinds"]
            ]
        else:
            rows += nt["rows"]
            result.setdefault("versions", {}).update(nt.get("versions", {}))
    compare(rows, result.get("reference", {}))
    for row in rows:
        kind_stats = result.get("stats", {}).get(row["kind"])
        row["case"] = f"{group['group']}-{row['kind']}"
        if kind_stats and row["method"].startswith("ntkcl") and "seconds" in row:
            row["gflops"] = kind_stats["structured_flops"] / row["seconds"] / 1e9
            row["gflops_symmetric"] = (
                kind_stats["structured_flops_symmetric"] / row["seconds"] / 1e9
            )
    order = {m: i for i, m in enumerate(TORCH_METHODS + NT_METHODS)}
    rows.sort(key=lambda r: (r["kind"] != "full", order.get(r["method"], 99)))
    os.remove(npz)
    return rows, {
        "group": group["group"],
        "network": group["network"],
        "versions": result.get("versions", {}),
        "stats": result.get("stats"),
        "reference": {
            k: v for k, v in result.get("reference", {}).items() if k != "kernel"
        },
    }


# ----------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------


def _fmt(value, spec="{:.3g}", missing=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return spec.format(value)


def _note(row) -> str:
    if "error" in row:
        return "failed: " + row["error"].splitlines()[0][:120]
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    notes = []
    if row.get("ntkcl_path"):
        notes.append(f"ran {row['ntkcl_path']}")
    if row.get("unblocked_gb", 0) > 1:
        notes.append(f"unblocked: {row['unblocked_gb']:.0f} GB of tangents")
    if row.get("nt_kernel_scale"):
        notes.append(row["nt_kernel_scale"])
    return "; ".join(notes)


def render(rows, groups_info, meta, shares=()) -> str:
    lines = [
        "# ntkcl empirical NTK benchmark",
        "",
        f"- date: {meta['date']}; wall time of this run: {meta['wall_seconds']:.0f} s",
        f"- machine: {meta['cpu']} ({meta['cpus']} CPUs), {meta['threads']} threads "
        "for every method (torch, JAX)",
        f"- load average (1 min) at the start and the end: {meta['load'][0]:.1f}, "
        f"{meta['load'][1]:.1f} on {meta['cpus']} CPUs"
        + (
            " (**the machine was busy: timings are noisy**)"
            # the end's load includes this run's own threads
            if max(meta["load"][0], meta["load"][1] - meta["threads"]) > 0.5
            else ""
        ),
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; "
        f"ntkcl engine sources sha256 {meta['engine'][0]}"
        + (
            f" (**changed during the run**, now {meta['engine'][1]})"
            if meta["engine"][0] != meta["engine"][1]
            else ""
        ),
        f"- float32 matmul throughput: **{meta['matmul_gflops']:.1f} GFLOP/s**, the "
        f"larger of {meta['matmul']['gflops']:.1f} at the start and "
        f"{meta['matmul_end']['gflops']:.1f} at the end of the run (each the median "
        f"of {meta['matmul']['repeats']} {meta['matmul']['size']}^2 products); "
        "`% matmul` is relative to it",
        f"- command: `{meta['command']}`",
        f"- timings: median of {meta['repeats']} calls after a warm-up, fewer "
        f"when the calls exceed {meta['time_cap']:.0f} s, more (up to {MAX_CALLS}) "
        f"while they add up to less than {meta['min_seconds']:g} s (column `reps`); "
        "JAX compile time excluded (column `compile s`)",
        "",
        "| case | method | median s | reps | extrapolated from | x ntkcl | compile s "
        "| peak RSS MB | delta RSS MB | GFLOP/s | % matmul | % matmul (triangle) "
        "| max rel diff | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {
        r["case"]: r["seconds"]
        for r in rows
        if r["method"] == "ntkcl-auto" and "seconds" in r
    }
    for r in rows:
        ratio = (
            r["seconds"] / base[r["case"]]
            if "seconds" in r and r["case"] in base
            else None
        )
        pct = r.get("matmul_fraction")
        pct_sym = r.get("matmul_fraction_symmetric")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["case"],
                    FULL_NAME.get(r["method"], r["method"]),
                    _fmt(r.get("seconds"), "{:.4g}", "-"),
                    _fmt(r.get("repeats"), "{}"),
                    r.get("extrapolated_from", ""),
                    _fmt(ratio, "{:.3g}"),
                    _fmt(r.get("compile_seconds"), "{:.2f}"),
                    _fmt(r.get("peak_rss_mb"), "{:.0f}"),
                    _fmt(r.get("delta_rss_mb"), "{:.0f}"),
                    _fmt(r.get("gflops"), "{:.1f}"),
                    _fmt(None if pct is None else 100 * pct, "{:.0f}%"),
                    _fmt(None if pct_sym is None else 100 * pct_sym, "{:.0f}%"),
                    _fmt(r.get("max_rel_diff"), "{:.1e}"),
                    _note(r),
                ]
            )
            + " |"
        )
    lines += ["", "## Targets (issue 3)", ""]
    lines += [
        "| case | ntkcl s | best NT | x NT (>= 1.3) | x torch.func Jacobian (>= 100) "
        "| % matmul (>= 50%) | fastest competitor | x fastest (CNN: >= 1) | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        case_rows = {
            r["method"]: r for r in rows if r["case"] == case and "seconds" in r
        }
        auto = case_rows.get("ntkcl-auto")
        if auto is None:
            lines.append(f"| {case} | - | | | | | | | ntkcl failed |")
            continue
        t = auto["seconds"]
        nt = [r for m, r in case_rows.items() if m.startswith("nt-")]
        best_nt = min(nt, key=lambda r: r["seconds"]) if nt else None
        comps = [r for m, r in case_rows.items() if not m.startswith("ntkcl")]
        fastest = min(comps, key=lambda r: r["seconds"]) if comps else None
        jac = case_rows.get("torch.func-jac")
        checks = []
        if case.startswith("mlp"):
            checks.append(best_nt is not None and best_nt["seconds"] / t >= 1.3)
            checks.append(jac is not None and jac["seconds"] / t >= 100)
            checks.append(auto.get("matmul_fraction", 0) >= 0.5)
        else:
            checks.append(fastest is not None and fastest["seconds"] / t >= 1)
        lines.append(
            "| "
            + " | ".join(
                [
                    case,
                    f"{t:.4g}",
                    f"{FULL_NAME[best_nt['method']][4:]} {best_nt['seconds']:.4g} s"
                    if best_nt
                    else "-",
                    _fmt(best_nt and best_nt["seconds"] / t, "{:.2f}", "-"),
                    _fmt(jac and jac["seconds"] / t, "{:.0f}", "-"),
                    _fmt(100 * auto["matmul_fraction"], "{:.0f}%", "-")
                    if "matmul_fraction" in auto
                    else "-",
                    f"{FULL_NAME[fastest['method']]} {fastest['seconds']:.4g} s"
                    if fastest
                    else "-",
                    _fmt(fastest and fastest["seconds"] / t, "{:.2f}", "-"),
                    "yes" if all(checks) else "**no**",
                ]
            )
            + " |"
        )
    if shares:
        lines += [
            "",
            "## NTK dumps in a training run",
            "",
            "Timed parts (see `dump_share` in the script): one SGD iteration and one "
            "trace-kernel dump (ntkcl auto + probe logits); share = dump / (every x "
            "iteration + dump). Accuracy evaluation and archive writes are excluded.",
            "",
            "| run | iteration s | dump s | dump every | share of wall time |",
            "|---|---|---|---|---|",
        ]
        for sh in shares:
            if "error" in sh:
                lines.append(f"| {sh['run']} | | | | failed: {sh['error'][:120]} |")
                continue
            lines.append(
                f"| {sh['run']} | {sh['iteration_s']:.4f} | {sh['dump_s']:.4f} "
                f"| {sh['every']} | {100 * sh['share']:.1f}% |"
            )
    lines += ["", "## Networks, references and FLOP counts", ""]
    for g in groups_info:
        st = g.get("stats") or {}
        ref = g.get("reference", {})
        flops = ", ".join(
            f"{k} {v['structured_flops'] / 1e9:.1f} GFLOP" for k, v in st.items()
        )
        params = next(iter(st.values()))["params"] if st else "?"
        ref_text = ref.get("source", ref.get("error", "none"))
        if ref.get("relu_flips"):
            ref_text += (
                f"; float32 flips the sign of a pre-activation of example(s) "
                f"{ref['relu_flips']} (a unit within rounding of the ReLU kink: "
                "float32 kernels may differ from float64 by up to ~1e-2 there)"
            )
        lines.append(
            f"- {g['group']}: {g['network']}; {params} parameters; structured FLOP "
            f"count {flops}; reference: {ref_text}"
        )
    lines += ["", METHOD_NOTES]
    return "\n".join(lines) + "\n"


METHOD_NOTES = """\
## How to read this table

- Networks: MLP = Flatten, 3 x (Linear(width) + ReLU), Linear(10), biases
  everywhere, on 3072-dimensional Gaussian inputs. CNN = `ntkcl.models.cnn` with
  depth 3 and 64 channels: 3 x (Conv2d 3x3, padding 1, + ReLU + AvgPool2d(2)),
  32 -> 16 -> 8 -> 4, then Flatten (64 x 4 x 4 = 1024) and Linear(1024, 10), on
  Gaussian 3x32x32 inputs. PyTorch's default initialisation, float32, 10 logits;
  every kernel is of the inputs with themselves (x2 = None).
- Kinds: `full` is (n, n, K, K); `trace` is (n, n), the SUM over the K logits.
  neural-tangents' traced kernel (`trace_axes=(-1,)`) is the MEAN over logits: its
  output is multiplied by K before comparing (the time of that product is not
  included); its full kernel uses `trace_axes=()`.
- `x ntkcl`: the method's time divided by ntkcl auto's (above 1: ntkcl faster).
- Extrapolated rows are timed on the first b examples: torch.func Jacobian
  contraction as (n/b) x (time of the Jacobians) + (n/b)^2 x (time of the
  contraction), reusing the Jacobians for x2 = x1 (the tutorial computes them
  twice); NTK-vector products as (n/b)^2 x the block's time (every pair is
  independent); the other methods by fitting a n + b n^2 through two block sizes
  (b/2 and b). Blocks are sized from a memory budget (`--slow-budget-mb`) and a
  time target (`--block-seconds`), and timed `--slow-repeats` times each (`reps`).
  A method runs on all n when it fits the memory budget and its estimated time
  is under `--full-seconds`; neural-tangents' Jacobian contraction runs on all n
  whenever its Jacobians fit; ntkcl's jacobian path is first timed on n/8
  examples and run on all n when (n/8 time) x 64 is under `--full-seconds`.
  ntkcl's explicit implementations are skipped when auto ran the same path, and
  its jacobian path on MLPs, where auto runs the structured one.
- Memory: `peak RSS` is the process's resident high-water mark during the timed
  calls (reset through /proc/self/clear_refs before each method; it includes the
  interpreter, torch or JAX + TensorFlow, the inputs and kernels of the group);
  `delta RSS` is that peak minus the resident size just before the method.
- GFLOP/s and % matmul (ntkcl rows): the structured FLOP count of the case (see
  `network_stats` in the script: forward, one backward pass with all K logits'
  cotangents, the per-layer Grams and their product; general products, no use of
  symmetry) divided by the median time, and that rate as a share of the matmul
  throughput above. For a path that is not the structured one this is only an
  effective rate.
- max rel diff: max |K - K_ref| / max |K_ref| against the float64 reference,
  on the kernel of the first min(n, b, `--ref-examples`) examples (b: the block
  the method computed); the reference is computed for those examples only.
  float32 kernels differ from float64 at about 1e-7 to 1e-6; a ReLU pre-activation
  within rounding of zero can flip and give a larger difference for one example's
  row, and a long float32 sum can lose more.
"""


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def _engine_hash() -> str:
    """sha256 (12 hex digits) of ntkcl's NTK engine sources, to tell versions apart."""
    digest = hashlib.sha256()
    for path in sorted((HERE.parent / "ntkcl").glob("*ntk*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument(
        "--cases",
        default="",
        help="comma-separated substrings of case names to run, e.g. "
        "'mlp-w256,cnn' or 'n100-full' (default: all)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls (default 3)")
    p.add_argument(
        "--slow-repeats",
        type=int,
        default=1,
        help="timed calls per block of a method that is extrapolated (default 1)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="time more calls (up to 100) while they add up to less than this "
        "(default 1; not for extrapolated blocks)",
    )
    p.add_argument(
        "--time-cap",
        type=float,
        default=20.0,
        help="stop repeating a method after this many seconds (default 20)",
    )
    p.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    p.add_argument(
        "--nt-venv",
        default=None,
        help="neural-tangents venv (default $NTKCL_NT_VENV or benchmarks/.nt-venv)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads for every method (default: all CPUs of this process)",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=int,
        default=1024,
        help="ntkcl's memory_budget in MB (default 1024, its default)",
    )
    p.add_argument(
        "--slow-budget-mb",
        type=int,
        default=3072,
        help="memory for the block of a slow competitor (default 3072)",
    )
    p.add_argument(
        "--full-seconds",
        type=float,
        default=60.0,
        help="run a slow method on all n when its estimated time is below this "
        "many seconds (default 60)",
    )
    p.add_argument(
        "--block-seconds",
        type=float,
        default=1.5,
        help="otherwise time it on a block of about this many seconds (default 1.5)",
    )
    p.add_argument(
        "--ref-examples",
        type=int,
        default=128,
        help="compare kernels on the first this many examples (default 128)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/out); --quick writes *_quick files",
    )
    p.add_argument(
        "--group-timeout",
        type=float,
        default=1800.0,
        help="seconds before a worker process of one (network, n) group is "
        "stopped (default 1800)",
    )
    p.add_argument(
        "--no-dump-share",
        action="store_true",
        help="skip the share of NTK dumps in a training run",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch.func.jvp's decompositions still call torch.jit.script (torch 2.14)
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = run_torch_group(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    engine_start = _engine_hash()
    set_threads(args.threads)
    if not args.no_nt and not nt_python(args).exists():
        print(
            f"neural-tangents venv not found ({nt_python(args)}): run "
            "benchmarks/setup_nt_env.sh, set NTKCL_NT_VENV, or pass --no-nt.",
            file=sys.stderr,
        )
        return 2
    if args.no_nt:
        print("neural-tangents skipped (--no-nt).", file=sys.stderr)

    size = 512 if args.quick else 4096
    matmul = matmul_gflops(size, 3 if args.quick else 7)
    print(f"float32 matmul {size}^2: {matmul['gflops']:.1f} GFLOP/s", file=sys.stderr)
    filters = [f for f in args.cases.split(",") if f]
    groups = []
    for group in build_groups(args.quick):
        cases = [
            f"{group['group']}-{k}"
            for k in ("full", "trace")
            if not filters or any(f in f"{group['group']}-{k}" for f in filters)
        ]
        if cases:
            groups.append(dict(group, cases=cases))

    rows, info, versions = [], [], {"torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="ntk-bench-") as tmp:
        for group in groups:
            t0 = time.perf_counter()
            print(f"{group['group']}: {', '.join(group['cases'])} ...", file=sys.stderr)
            group_rows, group_info = run_group(group, args, matmul, Path(tmp))
            rows += group_rows
            info.append(group_info)
            print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            versions.update(group_info.pop("versions", {}))
    matmul_end = matmul_gflops(size, 3 if args.quick else 7)
    best = max(matmul["gflops"], matmul_end["gflops"])
    for row in rows:
        if "gflops" in row:
            row["matmul_fraction"] = row["gflops"] / best
            row["matmul_fraction_symmetric"] = row["gflops_symmetric"] / best
    shares = []
    if not args.no_dump_share:
        print("dump share ...", file=sys.stderr)
        try:
            shares = dump_share(args.quick)
        except Exception as err:  # noqa: BLE001 - reported in the table
            shares = [{"run": "all", "error": f"{type(err).__name__}: {err}"}]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": time.perf_counter() - t_start,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "load": [load_start[0], os.getloadavg()[0]],
        "engine": [engine_start, _engine_hash()],
        "threads": args.threads,
        "versions": versions,
        "matmul": matmul,
        "matmul_end": matmul_end,
        "matmul_gflops": best,
        "command": " ".join(["python", "benchmarks/ntk_benchmark.py", *sys.argv[1:]]),
        "repeats": args.repeats,
        "time_cap": args.time_cap,
        "min_seconds": args.min_seconds,
    }
    table = render(rows, info, meta, shares)
    print(table)
    out = Path(args.out) if args.out else HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    stem = "ntk_benchmark_quick" if args.quick else "ntk_benchmark"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {"meta": meta, "groups": info, "rows": rows, "dump_share": shares},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""neural-tangents side of ``ntk_benchmark.py``; runs in the venv of setup_nt_env.sh.

Usage (by ntk_benchmark.py, not by hand): ``python nt_worker.py SPEC.json``.

The spec names a ``.npz`` with the network's weights (PyTorch state-dict keys) and
the inputs (``__x__``), the layer list, the kinds, the implementations and the
timing rules. For each (kind, implementation) the worker builds
``nt.empirical_ntk_fn(apply_fn, trace_axes=..., vmap_axes=0, implementation=...)``,
jits it, compiles it ahead of time for the input shape (timed as compile time),
runs it once as a warm-up and then times it. ``apply_fn`` uses
``lax.dot_general`` and ``lax.conv_general_dilated`` (neural-tangents' structured
derivatives are about 355 times slower on ``h @ W.T``). Slow implementations are
timed on blocks of examples and extrapolated as in the torch worker. Kernels are
saved as float32 ``.npy`` (the traced kernel multiplied by K: neural-tangents
averages over logits) and the measurements are written as JSON to
``spec["result"]``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

SPEC = json.loads(Path(sys.argv[1]).read_text())

# pin the threads before JAX starts its thread pool (XLA sizes it by affinity)
try:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: SPEC["threads"]])
except (AttributeError, OSError):
    pass
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

NUM_CLASSES = 10
IMPLEMENTATIONS = {
    "nt-jac": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    "nt-ntvp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
    "nt-struct": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
}


def keep_timing(times: list[float], repeats: int, time_cap: float, min_s: float):
    """ntk_benchmark.keep_timing's rule (this venv cannot import torch): ``repeats``
    calls unless they pass ``time_cap`` s, more (up to 100) below ``min_s`` s."""
    if not times:
        return True
    if len(times) < repeats:
        return sum(times) < time_cap
    return len(times) < 100 and sum(times) < min_s


def proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return proc_status_mb("VmRSS")


def make_apply(layers):
    """The network of the layer list as ``apply_fn(params, x)``; params per layer."""

    def apply_fn(params, x):
        h, i = x, 0
        for layer in layers:
            t = layer["type"]
            if t == "flatten":
                h = h.reshape(h.shape[0], -1)
            elif t == "relu":
                h = jnp.maximum(h, 0.0)
            elif t == "avgpool":
                k = layer["kernel"]
                n, c, hh, ww = h.shape
                h = h.reshape(n, c, hh // k, k, ww // k, k).mean(axis=(3, 5))
            elif t == "linear":
                w, b = params[i]
                i += 1
                h = lax.dot_general(h, w, (((1,), (1,)), ((), ())))
                if b is not None:
                    h = h + b
            elif t == "conv":
                w, b = params[i]
                i += 1
                h = lax.conv_general_dilated(
                    h,
                    w,
                    window_strides=tuple(layer["stride"]),
                    padding=[(p, p) for p in layer["padding"]],
                    dimension_numbers=("NCHW", "OIHW", "NCHW"),
                )
                if b is not None:
                    h = h + b[None, :, None, None]
        return h

    return apply_fn


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


def main() -> None:
    spec = SPEC
    data = dict(np.load(spec["npz"]))
    x = jnp.asarray(data.pop("__x__"))
    n = x.shape[0]
    params = []
    for layer in spec["layers"]:
        if layer["type"] in ("linear", "conv"):
            b = layer["bias"]
            params.append(
                (
                    jnp.asarray(data[layer["weight"]]),
                    None if b is None else jnp.asarray(data[b]),
                )
            )
    apply_fn = make_apply(spec["layers"])
    num_params, fwd = spec["params"], spec["forward_flops"]
    rate = spec["matmul_gflops"] * 1e9 * 0.3
    budget = spec["slow_budget_mb"] * 2**20
    jac_bytes = NUM_CLASSES * num_params * 4
    repeats, cap = spec["repeats"], spec["time_cap"]
    workdir = Path(spec["workdir"])
    rows = []

    def block_size(kind, method):
        """All n where memory and time allow, else a block (as the torch worker).

        Memory per example: Jacobian contraction holds the Jacobians (K P floats
        each, x2 for the copy and the transposes); NTK-vector products hold the
        K P tangents of the vjp and the jvp's activations.
        """
        if method == "nt-struct":
            return n
        pair = NUM_CLASSES**2 if kind == "full" else NUM_CLASSES
        mem_per = 2 * jac_bytes

        def est(b):
            if method == "nt-jac":
                return (
                    3 * NUM_CLASSES * fwd * b + 2 * b * b * pair * num_params
                ) / rate
            return 4 * NUM_CLASSES * fwd * b * b / rate

        if mem_per * n <= budget and (
            method == "nt-jac" or est(n) <= spec["full_seconds"]
        ):
            return n  # Jacobian contraction: all n whenever the Jacobians fit
        b = n
        while b > 1 and (mem_per * b > budget or est(b) > spec["block_seconds"]):
            b = max(1, int(b * 0.7))
        return b

    for kind in spec["kinds"]:
        for method in spec["methods"]:
            row = {"group": spec["group"], "kind": kind, "method": method, "n": n}
            try:
                fn = nt.empirical_ntk_fn(
                    apply_fn,
                    trace_axes=() if kind == "full" else (-1,),
                    vmap_axes=0,
                    implementation=IMPLEMENTATIONS[method],
                )
                jitted = jax.jit(fn)
                block = block_size(kind, method)
                sizes = [n] if block >= n else [max(1, block // 2), block]
                if block < n and block < 2:
                    raise MemoryError("a block of 2 examples exceeds the budget")
                medians, compile_s = [], 0.0
                for m in sizes:
                    xb = x[:m]
                    t0 = time.perf_counter()
                    compiled = jitted.lower(xb, None, params).compile()
                    compile_s = time.perf_counter() - t0
                    compiled(xb, None, params).block_until_ready()  # warm-up
                    rss0 = reset_peak()
                    times = []
                    whole = len(sizes) == 1
                    reps = repeats if whole else spec["slow_repeats"]
                    min_s = spec["min_seconds"] if whole else 0.0
                    while keep_timing(times, reps, cap, min_s):
                        kernel = None
                        t0 = time.perf_counter()
                        kernel = compiled(xb, None, params).block_until_ready()
                        times.append(time.perf_counter() - t0)
                    medians.append(statistics.median(times))
                row["peak_rss_mb"] = proc_status_mb("VmHWM")
                row["delta_rss_mb"] = row["peak_rss_mb"] - rss0
                row["compile_seconds"] = compile_s
                row["times"] = times
                row["repeats"] = len(times)
                if len(sizes) == 1:
                    row["seconds"] = medians[0]
                else:
                    row["seconds"] = fit_linear_quadratic(
                        sizes[0], medians[0], sizes[1], medians[1], n
                    )
                    row["extrapolated_from"] = f"n={sizes[0]},{sizes[1]} (a n + b n^2)"
                out = np.asarray(kernel, dtype=np.float32)
                if kind == "trace":
                    out = out * NUM_CLASSES
                    row["nt_kernel_scale"] = "NT trace x K"
                expected = (sizes[-1],) * 2 + (
                    (NUM_CLASSES,) * 2 if kind == "full" else ()
                )
                if out.shape != expected:
                    raise ValueError(f"kernel shape {out.shape}, expected {expected}")
                path = workdir / f"{spec['group']}-{kind}-{method}.npy"
                m = spec["ref_examples"]  # only this block is compared
                np.save(path, out[:m, :m])
                row["kernel"] = str(path)
                del kernel, out, compiled
            except Exception as err:  # noqa: BLE001 - every failure is a table note
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            jax.clear_caches()
            gc.collect()

    versions = {
        "jax": jax.__version__,
        "neural-tangents": getattr(nt, "__version__", "?"),
    }
    Path(spec["result"]).write_text(json.dumps({"rows": rows, "versions": versions}))


if __name__ == "__main__":
    main()

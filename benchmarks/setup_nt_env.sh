#!/usr/bin/env bash
# Create the virtual environment in which benchmarks/nt_worker.py runs
# neural-tangents for benchmarks/ntk_benchmark.py.
#
#   bash benchmarks/setup_nt_env.sh            # -> benchmarks/.nt-venv
#   NTKCL_NT_VENV=/path/to/venv bash benchmarks/setup_nt_env.sh
#
# neural-tangents 0.6.5 imports only beside jax/jaxlib 0.4.23, numpy < 2,
# TensorFlow 2.15 (imported at import time) and tf2jax 0.3.5, so it cannot share
# the project's environment (numpy 2). Both neural-tangents and tf2jax require the
# `tensorflow` distribution itself; tensorflow-cpu would be installed beside it,
# not instead of it, so it is not used. Needs Python 3.9-3.11 and PyPI; about
# 2 GB on disk, a few minutes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${NTKCL_NT_VENV:-$here/.nt-venv}"
python="${PYTHON:-python3.11}"

if ! command -v "$python" >/dev/null; then
    echo "error: $python not found; set PYTHON to a Python 3.9-3.11 interpreter" >&2
    exit 1
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet \
    "neural-tangents==0.6.5" \
    "jax==0.4.23" \
    "jaxlib==0.4.23" \
    "numpy<2" \
    "tensorflow==2.15.*" \
    "tf2jax==0.3.5"

# check that the stack imports and computes a kernel
TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" - <<'PY'
import jax.numpy as jnp
import neural_tangents as nt

fn = nt.empirical_ntk_fn(lambda p, x: x @ p, trace_axes=(), vmap_axes=0)
k = fn(jnp.ones((2, 3)), None, jnp.ones((3, 4)))
assert k.shape == (2, 2, 4, 4), k.shape
print("neural-tangents", nt.__version__, "ready")
PY
echo "venv: $venv"

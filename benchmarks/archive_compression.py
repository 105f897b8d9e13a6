"""Compression of real archived kernels: ratio and time per dump, by HDF5 filter.

Reads every kernel of the given archives, writes them again one dump per chunk
(as ntkcl.archive does: resize, write, flush; fletcher32 on) with each filter,
a ``full`` archive's logit diagonal also as a ``diagonal`` kernel, and prints one
table row per kernel and filter: the compression ratio (uncompressed / stored
bytes) and the write and read time per dump (median of three passes). The
choice in ntkcl/archive.py (KERNEL_COMPRESSION) and the README rest on it.

    python benchmarks/archive_compression.py                # the demo's archives
    python benchmarks/archive_compression.py a.h5 b.h5      # any archives

Make the demo's archives with `make demo`; a `full` one with, e.g., a copy of
config.yaml with `ntk.kind: full` and `ntkcl train that.yaml width_regime
w256-fl-s0 --scale demo --out full.h5`.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

DEMO = [
    "results/demo/runs/width_regime/w256-fl-s0.h5",
    "results/demo/runs/width_regime/w256-lazy-s0.h5",
]
FILTERS = {
    "none": {},
    "gzip 1": {"compression": "gzip", "compression_opts": 1},
    "gzip 4": {"compression": "gzip", "compression_opts": 4},
    "shuffle + gzip 1": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "shuffle + gzip 4": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
}


def measure(kernels: np.ndarray, options: dict, folder: Path) -> dict:
    """Write ``kernels`` (dumps, ...) dump by dump with ``options``, read back."""
    writes, reads, stored = [], [], 0
    for attempt in range(3):
        path = folder / f"k{attempt}.h5"
        with h5py.File(path, "w", libver="latest") as f:
            dataset = f.create_dataset(
                "ntk",
                shape=(0, *kernels.shape[1:]),
                maxshape=(None, *kernels.shape[1:]),
                dtype=kernels.dtype,
                chunks=(1, *kernels.shape[1:]),
                fletcher32=True,
                **options,
            )
            f.swmr_mode = True
            t0 = time.perf_counter()
            for i, kernel in enumerate(kernels):
                dataset.resize(i + 1, axis=0)
                dataset[i] = kernel
                f.flush()
            writes.append((time.perf_counter() - t0) / len(kernels))
            stored = dataset.id.get_storage_size()
        with h5py.File(path, "r") as f:
            t0 = time.perf_counter()
            for i in range(len(kernels)):
                np.testing.assert_array_equal(f["ntk"][i], kernels[i])
            reads.append((time.perf_counter() - t0) / len(kernels))
        path.unlink()
    return {
        "ratio": kernels.nbytes / stored,
        "write_ms": 1e3 * statistics.median(writes),
        "read_ms": 1e3 * statistics.median(reads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archives", nargs="*", default=DEMO)
    args = parser.parse_args()
    print(
        "| archive | kind | dump | filter | ratio | write ms/dump | read ms/dump |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: |"
    )
    with tempfile.TemporaryDirectory() as folder:
        for path in args.archives:
            with h5py.File(path, "r") as f:
                kernels = {str(f.attrs["kernel_kind"]): f["ntk"][()]}
            if "full" in kernels:  # its logit diagonal is the diagonal kernel
                kernels["diagonal"] = np.einsum("sijaa->sija", kernels["full"])
            for kind, values in kernels.items():
                dump = f"{values[0].nbytes / 1e3:.0f} kB {values.dtype}"
                for name, options in FILTERS.items():
                    row = measure(values, options, Path(folder))
                    print(
                        f"| {Path(path).name} | {kind} | {dump} | {name} | "
                        f"{row['ratio']:.2f} | {row['write_ms']:.2f} | "
                        f"{row['read_ms']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

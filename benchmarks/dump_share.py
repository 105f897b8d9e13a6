"""How much of a training run's wall time goes into NTK dumps.

Runs two real training runs through ``ntkcl.train.train_run`` and times every
call of the NTK engine inside them:

* ``demo``: the demo's widest run (digits, MLP width 1024, the demo config);
* ``cifar``: a CIFAR-sized MLP run (3x32x32 inputs, 10 classes, width 1024,
  depth 3, probe 100, a dump every 10 iterations, batch 128). CIFAR-10 cannot be
  downloaded on machines without network, so the images are random with
  CIFAR-10's shape and size (50,000 train, 10,000 test); the timings do not
  depend on pixel values.

Usage:
    python benchmarks/dump_share.py [--iterations 200] [--threads 2]

Prints a table and writes it to benchmarks/out/dump_share.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from ntkcl import __version__, config, data, tasks, train

REPO = Path(__file__).resolve().parents[1]


def fake_cifar(path: Path) -> None:
    """A prepared-data file with CIFAR-10's shapes and random pixels."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for split, n in (("train", 50_000), ("test", 10_000)):
            f[f"{split}/images"] = rng.integers(0, 256, (n, 3, 32, 32), np.uint8)
            f[f"{split}/labels"] = np.arange(n, dtype=np.int64) % 10
        f.attrs.update(
            name="CIFAR10",
            dataset_id="fake-cifar10",
            class_names=json.dumps([str(i) for i in range(10)]),
            value_max=255,
            mean=[0.5] * 3,
            std=[0.29] * 3,
            source="random pixels with CIFAR-10's shapes (benchmark only)",
            format_version=data.FORMAT_VERSION,
            ntkcl_version=__version__,
        )


def timed_run(run: dict, data_path: Path, workdir: Path) -> dict:
    seconds = []
    engine = train.empirical_ntk

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = engine(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    train.empirical_ntk = timed
    try:
        start = time.perf_counter()
        train.train_run(run, data_path, workdir / "out.h5", workdir / "work")
        total = time.perf_counter() - start
    finally:
        train.empirical_ntk = engine
    return {
        "iterations": sum(t.iterations for t in tasks.build_tasks(run["tasks"])),
        "dumps": len(seconds),
        "total_s": total,
        "ntk_s": sum(seconds),
        "share": sum(seconds) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--iterations",
        type=int,
        default=200,
        help="iterations per task of the CIFAR-sized run (default 200)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with open(REPO / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_run = config.find_run(cfg, "demo", "width_regime", "w1024-fl-s0")
        digits = tmp / "digits.h5"
        data.prepare(demo_run["data"], digits)
        rows.append(
            ("demo (digits, MLP w1024)", timed_run(demo_run, digits, tmp / "a"))
        )

        cifar_run = config.deep_merge(
            demo_run,
            {
                "device": "auto",
                "tasks": {"iterations": args.iterations},
                "probe": {"size": 100},
                "model": {"width": 1024, "depth": 3},
                "optim": {"batch_size": 128},
                "ntk": {"every": 10},
            },
        )
        fake = tmp / "cifar.h5"
        fake_cifar(fake)
        rows.append(
            ("CIFAR-sized (3x32x32, MLP w1024)", timed_run(cifar_run, fake, tmp / "b"))
        )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"NTK dumps' share of training wall time (ntkcl {__version__}, torch "
        f"{torch.__version__}, {device}, {args.threads} threads)",
        "",
        "| run | iterations | dumps | total s | in NTK s | NTK share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['iterations']} | {r['dumps']} | {r['total_s']:.1f} | "
            f"{r['ntk_s']:.1f} | {100 * r['share']:.0f}% |"
        )
    text = "\n".join(lines)
    print(text)
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dump_share.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Tiny raw datasets written in the real on-disk formats, for tests that never download.

- CIFAR-10 / CIFAR-100: the "python version" pickles as published (a Python 2
  protocol-2 pickle: byte-string keys and names, a numpy uint8 ``data`` array of
  shape (N, 3072), plain int label lists) in ``cifar-10-batches-py/`` or
  ``cifar-100-python/``.
- MNIST-style: big-endian IDX files (magic 0x0803 images, 0x0801 labels) in
  ``<root>/<Name>/raw/``, unpacked or gzipped as published.
- ImageFolder: a tree of PNG files ``<root>/<split>/<class>/<n>.png`` of mixed sizes.
"""

import gzip
import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as CIFAR's
    pickles do: they load as ``str`` with ``encoding="latin1"`` (torchvision) and as
    ``bytes`` with ``encoding="bytes"`` (the CIFAR web page's recipe)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj, path: Path) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # numpy 2 names its pickling helper numpy._core; the published files (numpy 1)
    # name numpy.core, which numpy 2 still resolves
    data = buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")
    path.write_bytes(data)


def _images(rng, n: int, channels: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, channels, height, width), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 10, seed: int = 0):
    """Write a CIFAR-10 tree; returns {"train": (x, y), "test": (x, y)} as written.

    Labels cycle over the ten classes so every class appears in every split.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {"train": ([], []), "test": ([], [])}
    for i, name in enumerate(batches):
        n = n_test if name == "test_batch" else per_batch
        x = _images(rng, n, 3, 32, 32)
        y = [int(c) for c in (np.arange(n) + i) % 10]
        split = "test" if name == "test_batch" else "train"
        written[split][0].append(x)
        written[split][1].extend(y)
        label = (
            b"testing batch 1 of 1"
            if split == "test"
            else f"training batch {i + 1} of 5".encode()
        )
        entry = {
            b"batch_label": label,
            b"labels": y,
            b"data": x.reshape(n, 3072),  # row-major: 1024 red, 1024 green, 1024 blue
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        _py2_pickle(entry, folder / name)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [n.encode() for n in CIFAR10_NAMES],
        b"num_vis": 3072,
    }
    _py2_pickle(meta, folder / "batches.meta")
    return {s: (np.concatenate(xs), np.asarray(ys)) for s, (xs, ys) in written.items()}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0):
    """Write a CIFAR-100 tree (``train``, ``test``, ``meta``); returns the data."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32, 32)
        fine = [int(c) for c in np.arange(n) % 100]
        entry = {
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [c // 5 for c in fine],
            b"data": x.reshape(n, 3072),
        }
        _py2_pickle(entry, folder / name)
        written[name] = (x, np.asarray(fine))
    meta = {
        b"fine_label_names": [f"fine{c:02d}".encode() for c in range(100)],
        b"coarse_label_names": [f"coarse{c:02d}".encode() for c in range(20)],
    }
    _py2_pickle(meta, folder / "meta")
    return written


def md5_lists(cls, root: Path) -> dict:
    """Class attributes of a torchvision CIFAR class with the fixture files' md5s.

    torchvision's CIFAR10/CIFAR100 check every file's md5 against the published
    archive's (``_check_integrity``) and refuse anything else, so a real-format
    fixture only loads once the class's ``train_list``, ``test_list`` and ``meta``
    carry the fixture's own checksums (set them with ``monkeypatch.setattr``).
    """
    folder = Path(root) / cls.base_folder

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    return {
        "train_list": [[name, md5(name)] for name, _ in cls.train_list],
        "test_list": [[name, md5(name)] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": md5(cls.meta["filename"])},
    }


def _idx(array: np.ndarray) -> bytes:
    """IDX bytes: 0, 0, type 0x08 (ubyte), ndim; big-endian int32 dims; the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_mnist(
    root: Path, name: str = "MNIST", n_train=20, n_test=10, gz=False, seed=0
):
    """Write ``<root>/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", x), ("labels-idx1", y)):
            path = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(_idx(array))
            else:
                path.write_bytes(_idx(array))
        written[split] = (x[:, None], y.astype(np.int64))
    return written


def write_image_folder(root: Path, classes, splits=("train", "val"), per_class=3):
    """PNG tree ``<root>/<split>/<class>/<n>.png``, RGB, sizes varying (wider/taller).

    Every pixel of class ``c``'s images has the value ``10 * (c + 1)`` in all
    channels, so a resized image still tells its class.
    """
    from PIL import Image

    for split in splits:
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                height, width = (12, 16) if j % 2 else (18, 10)
                value = np.full((height, width, 3), 10 * (c + 1), dtype=np.uint8)
                Image.fromarray(value).save(folder / f"{j}.png")

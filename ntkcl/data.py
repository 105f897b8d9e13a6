"""Datasets: read a raw dataset once, write it as one HDF5 file, load it normalised.

``prepare`` writes ``results/data/<dataset_id>.h5``: ``/train/images`` and
``/test/images`` (uint8, ``(N, C, H, W)``, raw pixel values), ``/train/labels`` and
``/test/labels`` (int64), and the root attributes ``name``, ``dataset_id``,
``class_names`` (JSON list), ``value_max`` (255, or 16 for digits), ``mean`` and
``std`` (per channel, of ``images / value_max`` over the train split), ``source``
and ``format_version``.

Datasets (``data.name``):

- ``digits``: scikit-learn's bundled handwritten digits (8x8, one channel, values
  0..16, 1797 images). It has no official split: ``test_fraction`` is held out,
  stratified by class, with the fixed seed ``DIGITS_SPLIT_SEED``; both splits keep
  the original order of the examples.
- a torchvision classification dataset by class name (``CIFAR10``, ``CIFAR100``,
  ``MNIST``, ``FashionMNIST``, ``KMNIST``, ...) in torchvision's layout under
  ``root``, split by ``train=True/False`` (or ``split="train"/"test"``); torchvision
  downloads it only when ``data.download`` is true. MNIST-style ``.gz`` files in
  ``root/<Name>/raw/`` are accepted too (unpacked to a scratch copy; ``root`` is
  never written to unless torchvision downloads).
- ``ImageFolder``: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``
  (``root/test/`` when there is no ``val/``), read as RGB. ``class_list`` (a text
  file, one class folder per line, ``#`` comments; a relative path is tried from
  the working directory, then under ``root``) selects the classes, and their ids
  follow its line order. Without it: every folder of ``train/``, sorted.

``image_size``: the shorter side is resized to it (bilinear, antialiased), then the
image is centre-cropped to a square. Needed for ImageFolder trees of mixed sizes.

Dataset ids (the prepared file's stem, and what a run's archive records as
``dataset``) name everything that decides the prepared content, so two runs share
a prepared file only when it would hold the same data:

- ``digits``, or ``digits-test0.3`` for a non-default ``test_fraction``;
- ``<Name>-<hash>`` for torchvision data: ``CIFAR10-a4a42510`` for ``root: data``;
- ``ImageFolder-<label>-<hash>``, ``<label>`` being the class list's file stem, or
  the root folder's name when there is none.

``-<size>px`` goes before the hash whenever ``image_size`` is set:
``ImageFolder-imagenet100-32px-<hash>``. ``<hash>`` is the first 8 hex digits of
the SHA-256 of a compact, key-sorted JSON object (``_source_key``): ``root`` as
written, normalised (``posixpath.normpath``, ``/`` on every platform) but not
resolved (all jobs of a workflow share one working directory, and a study folder
can move without its ids changing), and for ImageFolder the class list's class
names in order (comments and blank lines do not count; while the file is not
found, its path as written).
So one config always gets one id, while another ``root`` or an edited class list
gets a new id and is prepared anew. Not hashed: the images themselves (nor,
without a class list, the set of class folders); after changing a tree in place,
delete its prepared file. Two spellings of one folder (``data/x`` and its
absolute path) get two ids and are prepared twice.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch, torchvision, h5py and scikit-learn are imported where they are needed, so
# that the Snakefile imports dataset_id without paying seconds for them
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DIGITS_SPLIT_SEED = 0
DEFAULT_TEST_FRACTION = 0.2
SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """The raw dataset is not under ``root`` and could not be downloaded."""


@dataclass
class Dataset:
    """A prepared dataset in memory.

    Attributes:
        train_x: ``(N, C, H, W)`` float32, ``(x / value_max - mean) / std`` with the
            train split's per-channel mean and std.
        train_y: ``(N,)`` int64 class ids.
        test_x: ``(M, C, H, W)`` float32, normalised with the train statistics.
        test_y: ``(M,)`` int64.
        class_names: one name per class id.
        name: the dataset id (the prepared file's stem).
        mean: per-channel mean of the train split, in ``[0, 1]`` units.
        std: per-channel standard deviation of the train split, in ``[0, 1]`` units.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    name: str = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one example."""
        return tuple(self.train_x.shape[1:])


@dataclass
class _Raw:
    splits: dict  # "train"/"test" -> (images (N, C, H, W) uint8, labels (N,) int64)
    class_names: list[str]
    value_max: int
    source: str


def dataset_id(data_cfg: dict) -> str:
    """The prepared file's stem for a ``data`` config (see the module docstring)."""
    name = data_cfg["name"]
    parts = [name]
    if name == "digits":
        fraction = data_cfg.get("test_fraction", DEFAULT_TEST_FRACTION)
        if fraction != DEFAULT_TEST_FRACTION:
            parts.append(f"test{fraction:g}")
    elif name == "ImageFolder":
        class_list = data_cfg.get("class_list")
        label = Path(class_list).stem if class_list else Path(data_cfg["root"]).name
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-"))
    size = data_cfg.get("image_size")
    if size:
        parts.append(f"{size}px")
    if name != "digits":  # bundled with scikit-learn: no root
        key = json.dumps(_source_key(data_cfg), sort_keys=True, separators=(",", ":"))
        parts.append(hashlib.sha256(key.encode()).hexdigest()[:8])
    return "-".join(p for p in parts if p)


def _source_key(data_cfg: dict) -> dict:
    """What a dataset id hashes: where the raw data is read from, and for
    ImageFolder which classes in which order (see the module docstring)."""
    root = str(data_cfg.get("root") or ".")
    key: dict = {"root": _portable(root)}
    if data_cfg["name"] == "ImageFolder" and data_cfg.get("class_list"):
        given = str(data_cfg["class_list"])
        found = _find_class_list(Path(root), given)  # as prepare looks for it
        if found is None:
            key["class_list"] = _portable(given)
        else:
            key["classes"] = _read_class_list(found)
    return key


def _portable(path: str) -> str:
    """``path`` normalised with ``/`` on every platform, so ids do not depend on it."""
    return posixpath.normpath(path.replace(os.sep, "/"))


def _find_class_list(root: Path, given: str) -> Path | None:
    """The class list file: ``given`` from the working directory, else under root."""
    return next((p for p in (Path(given), root / given) if p.is_file()), None)


def _read_class_list(path: Path) -> list[str]:
    """One class folder name per line; blank lines and ``#`` comments skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [c for c in lines if c and not c.startswith("#")]


def prepare(data_cfg: dict, out: str | Path) -> Path:
    """Read the raw dataset and write it as one HDF5 file, atomically.

    Args:
        data_cfg: the run config's ``data`` section (``name``, ``root``,
            ``download``, ``image_size``, ``class_list``, ``test_fraction``).
        out: the file to write, conventionally ``results/data/<dataset_id>.h5``.

    Returns:
        ``out`` as a Path. The file is written under a temporary name in the same
        folder and renamed at the end, so a killed job never leaves half a file.

    Raises:
        DatasetNotFoundError: the raw data is missing and could not be downloaded;
            the message lists the expected files and how to get them.
        ValueError: an unknown dataset name, a bad option or unusable images.
    """
    name, size = data_cfg.get("name"), data_cfg.get("image_size")
    if size is not None and (type(size) is not int or size < 1):
        raise ValueError(
            f"data.image_size is {size!r}; expected a positive integer side length "
            "in pixels, or null to keep the images' own size."
        )
    if name == "digits":
        raw = _read_digits(data_cfg)
    elif name == "ImageFolder":
        raw = _read_image_folder(data_cfg)  # resizes image by image
    else:
        raw = _read_torchvision(data_cfg)
    if size is not None and name != "ImageFolder":
        raw.splits = {s: (_resize(x, size), y) for s, (x, y) in raw.splits.items()}
        raw.source += f"; resized to {size} px (shorter side), centre-cropped"
    for split, (_, labels) in raw.splits.items():
        if labels.size and not 0 <= labels.min() <= labels.max() < len(raw.class_names):
            raise ValueError(
                f"The {split} labels of {name} span {labels.min()}..{labels.max()}, "
                f"outside the {len(raw.class_names)} class names; the raw data is "
                "inconsistent."
            )

    mean, std = _channel_stats(raw.splits["train"][0], raw.value_max)
    attrs = {
        "name": name,
        "dataset_id": dataset_id(data_cfg),
        "class_names": json.dumps(raw.class_names),
        "value_max": raw.value_max,
        "mean": mean,
        "std": std,
        "source": raw.source,
        "format_version": FORMAT_VERSION,
        "ntkcl_version": _version("ntkcl"),
    }
    out = Path(out)
    _write_atomic(out, raw.splits, attrs)
    train_x = raw.splits["train"][0]
    log.info(
        "prepared %s: %d train and %d test images of shape %s, %d classes -> %s",
        attrs["dataset_id"],
        len(train_x),
        len(raw.splits["test"][0]),
        tuple(train_x.shape[1:]),
        len(raw.class_names),
        out,
    )
    return out


def load(path: str | Path) -> Dataset:
    """Load a prepared file, with float32 images normalised per channel.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a prepared dataset of this format version.
    """
    import h5py
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Prepared dataset {path} does not exist; run the workflow's prepare_data "
            "rule (or ntkcl.data.prepare) first."
        )
    with h5py.File(path, "r") as f:
        version = f.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {version}, expected {FORMAT_VERSION}: "
                "it is not a dataset prepared by this version of ntkcl. Delete it and "
                "prepare it again."
            )
        value_max = float(f.attrs["value_max"])
        mean = np.asarray(f.attrs["mean"], dtype=np.float64)
        std = np.asarray(f.attrs["std"], dtype=np.float64)
        arrays = [(f[f"{s}/images"][...], f[f"{s}/labels"][...]) for s in SPLITS]
        class_names = json.loads(f.attrs["class_names"])
        name = str(f.attrs.get("dataset_id", path.stem))

    # normalise in float32; a constant channel (std 0) is only centred
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32).view(shape)
    tensors = []
    for images, labels in arrays:
        x = torch.from_numpy(images).to(torch.float32).div_(value_max)
        tensors += [x.sub_(mean_t).div_(std_t), torch.from_numpy(labels)]
    return Dataset(
        *tensors,
        class_names=class_names,
        name=name,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


# --- readers ----------------------------------------------------------------------


def _read_digits(cfg: dict) -> _Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    fraction = cfg.get("test_fraction", DEFAULT_TEST_FRACTION)
    if not 0 < fraction < 1:
        raise ValueError(
            f"data.test_fraction is {fraction!r}; expected a number strictly between "
            "0 and 1 (the held-out share of the digits data), e.g. 0.2."
        )
    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=fraction,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    train, test = np.sort(train), np.sort(test)
    splits = {
        "train": (images[train], labels[train]),
        "test": (images[test], labels[test]),
    }
    source = (
        f"sklearn.datasets.load_digits (scikit-learn {_version('scikit-learn')}); "
        f"stratified split, test_fraction={fraction:g}, "
        f"random_state={DIGITS_SPLIT_SEED}"
    )
    return _Raw(splits, [str(c) for c in digits.target_names], 16, source)


def _read_torchvision(cfg: dict) -> _Raw:
    import torch
    import torchvision
    from torchvision import datasets
    from torchvision.transforms import v2

    name, root, download = cfg.get("name"), Path(cfg["root"]), bool(cfg.get("download"))
    cls = getattr(datasets, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, datasets.VisionDataset)):
        raise ValueError(
            f"data.name is {name!r}; expected 'digits', 'ImageFolder' or the class "
            "name of a torchvision dataset such as CIFAR10, CIFAR100, MNIST, "
            "FashionMNIST or KMNIST (case matters)."
        )
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        split_args = {"train": {"train": True}, "test": {"train": False}}
    elif "split" in params:
        split_args = {s: {"split": s} for s in SPLITS}
    else:
        raise ValueError(
            f"torchvision's {name} has neither a `train` nor a `split` argument, so "
            "its train and test splits cannot be told apart; use ImageFolder instead."
        )

    splits = {}
    with tempfile.TemporaryDirectory(prefix="ntkcl-") as scratch:
        read_root = _unpack_gz(cls, root, Path(scratch))
        for split, kwargs in split_args.items():
            try:
                ds = cls(
                    read_root, download=download, transform=v2.PILToTensor(), **kwargs
                )
            except Exception as err:  # torchvision's own messages say too little
                if download or isinstance(err, (RuntimeError, OSError)):
                    message = _missing_message(cls, root, download, err)
                    raise DatasetNotFoundError(message) from err
                raise
            if isinstance(ds, datasets.CIFAR10):  # and CIFAR100; data is (N, H, W, C)
                x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
                splits[split] = x, np.asarray(ds.targets, dtype=np.int64)
            elif isinstance(ds, datasets.MNIST) and ds.data.dtype == torch.uint8:
                splits[split] = (
                    ds.data.numpy()[:, None],
                    ds.targets.numpy().astype(np.int64),
                )
            else:
                splits[split] = _iterate(ds)
    class_names = [str(c) for c in getattr(ds, "classes", [])]
    if not class_names:
        highest = max(int(y.max()) for _, y in splits.values())
        class_names = [str(c) for c in range(highest + 1)]
    source = f"torchvision.datasets.{name} ({torchvision.__version__}) from {root}"
    return _Raw(splits, class_names, 255, source)


def _unpack_gz(cls, root: Path, scratch: Path) -> Path:
    """``root``, or a scratch root with an MNIST-style set's ``.gz`` files unpacked.

    torchvision reads only the unpacked IDX files of ``root/<Name>/raw/``.
    """
    if not (hasattr(cls, "resources") and hasattr(cls, "raw_folder")):
        return root
    raw, copy = root / cls.__name__ / "raw", scratch / cls.__name__ / "raw"
    names = [Path(str(url)).name.removesuffix(".gz") for url, _ in cls.resources]
    have = {n: (raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in names}
    if all((raw / n).is_file() for n in names) or not all(have.values()):
        return root
    copy.mkdir(parents=True)
    for n in names:
        if (raw / n).is_file():
            shutil.copyfile(raw / n, copy / n)
            continue
        with gzip.open(raw / f"{n}.gz", "rb") as src, open(copy / n, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return scratch


def _read_image_folder(cfg: dict) -> _Raw:
    import torchvision
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    from torchvision.transforms import v2

    root, size, given = Path(cfg["root"]), cfg.get("image_size"), cfg.get("class_list")
    dirs = ("train", "val" if (root / "val").is_dir() else "test")
    class_list = _find_class_list(root, given) if given else None
    missing = [f"{root / d}/" for d in dirs if not (root / d).is_dir()]
    if dirs[1] == "test" and f"{root / 'test'}/" in missing:  # neither val/ nor test/
        missing[missing.index(f"{root / 'test'}/")] = f"{root / 'val'}/ (or test/)"
    if given and class_list is None:
        missing.append(f"{given} (the class list file; also looked for under {root}/)")
    classes = []
    if not missing:
        if class_list is not None:
            classes = _read_class_list(class_list)
        else:
            classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        missing = [
            f"{root / d / c}/"
            for d in dirs
            for c in classes
            if not (root / d / c).is_dir()
        ]
    if missing or not classes:
        raise DatasetNotFoundError(
            f"ImageFolder dataset under {root}/ is incomplete: expected "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ "
            "instead of val/), one folder per class of the class list. Missing:\n  "
            + "\n  ".join(missing[:20] or ["any class folder"])
            + "\nImageFolder trees are never downloaded: arrange the images yourself "
            "(for ImageNet-100: the ILSVRC2012 train and val images of the 100 "
            "classes, val sorted into one folder per class) and set data.root to it."
        )

    steps = [v2.PILToTensor()]
    if size is not None:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    ids = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, d in zip(SPLITS, dirs, strict=True):
        try:
            samples = make_dataset(root / d, ids, extensions=IMG_EXTENSIONS)
            samples.sort(key=lambda sample: sample[1])  # by class id, then file name
        except FileNotFoundError as err:  # a class folder without images
            raise DatasetNotFoundError(f"ImageFolder under {root}/: {err}") from err
        splits[split] = _iterate(_Images(root / d, samples, v2.Compose(steps)))
    source = (
        f"torchvision.datasets.folder images (torchvision {torchvision.__version__}) "
        f"from {root}/{dirs[0]} and {root}/{dirs[1]}, {len(classes)} classes"
        + (f" listed in {class_list}" if class_list else "")
        + (f"; resized to {size} px (shorter side), centre-cropped" if size else "")
    )
    return _Raw(splits, classes, 255, source)


class _Images:
    """Image files with labels, read as RGB and passed through ``transform``."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], transform):
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        return self.transform(default_loader(path)), label


def _iterate(ds) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a dataset whose transform yields uint8 ``(C, H, W)``."""
    import torch

    workers = 0 if len(ds) < 4096 else min(8, len(os.sched_getaffinity(0)))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=256, num_workers=workers, collate_fn=_as_list
    )
    pairs = [(torch.as_tensor(x), int(y)) for batch in loader for x, y in batch]
    shapes = sorted({tuple(x.shape) for x, _ in pairs})
    if len(shapes) > 1 or any(x.dtype != torch.uint8 for x, _ in pairs[:1]):
        raise ValueError(
            f"The images under {ds.root} are not all uint8 of one shape (shapes "
            f"{shapes[:4]}); set data.image_size to resize them to one square size."
        )
    images = torch.stack([x for x, _ in pairs]).numpy()
    return images, np.asarray([y for _, y in pairs], dtype=np.int64)


def _as_list(batch):
    return batch


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Shorter side of ``(N, C, H, W)`` uint8 images to ``size``, centre-crop."""
    import torch
    from torchvision.transforms.v2 import functional as F

    x = F.resize(torch.from_numpy(images), [size], antialias=True)
    return F.center_crop(x, [size, size]).contiguous().numpy()


def _missing_message(cls, root: Path, download: bool, err: Exception) -> str:
    """Which files torchvision expects under ``root``, and how to get them."""
    from torchvision.datasets.utils import check_integrity

    name, lines, urls = cls.__name__, [], [getattr(cls, "url", None)]
    if hasattr(cls, "base_folder") and hasattr(cls, "train_list"):  # CIFAR layout
        meta = [cls.meta["filename"], cls.meta["md5"]]
        for filename, md5 in [*cls.train_list, *cls.test_list, meta]:
            path = root / cls.base_folder / filename
            state = "missing" if not path.is_file() else "present"
            if path.is_file() and not check_integrity(path, md5):
                state = "present, but its md5 is not torchvision's: corrupted?"
            lines.append(f"{path} ({state})")
        unpack = f"unpack it under {root}/ (it creates {cls.base_folder}/)"
    elif hasattr(cls, "resources") and hasattr(cls, "mirrors"):  # MNIST layout
        raw = root / name / "raw"
        for filename, _ in cls.resources:
            plain = filename.removesuffix(".gz")
            found = (raw / plain).is_file() or (raw / filename).is_file()
            lines.append(
                f"{raw / plain} or {filename} ({'present' if found else 'missing'})"
            )
        urls = [f"{cls.mirrors[0]}{filename}" for filename, _ in cls.resources]
        unpack = f"put them into {raw}/ (gzipped or not)"
    else:
        lines.append(f"the files torchvision.datasets.{name} expects under {root}/")
        unpack = f"unpack it under {root}/ as torchvision's documentation says"
    how = "set data.download: true and prepare the data on a machine with network"
    if any(urls):
        how += f", or download {' and '.join(u for u in urls if u)} and {unpack}"
    return (
        f"Dataset {name} not found under {root}/ "
        f"({'downloading failed' if download else 'download is off'}). Expected:\n  "
        + "\n  ".join(lines)
        + f"\nTo get it: {how}.\n(torchvision said: {type(err).__name__}: {err})"
    )


# --- statistics and writing -------------------------------------------------------


def _channel_stats(images: np.ndarray, value_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``images / value_max``, summed in float64."""
    total, squares = np.zeros(images.shape[1]), np.zeros(images.shape[1])
    for start in range(0, len(images), 4096):
        x = images[start : start + 4096].astype(np.float64) / value_max
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
    count = images.size / images.shape[1]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


def _write_atomic(out: Path, splits: dict, attrs: dict) -> None:
    """Write under a temporary name in ``out``'s folder, then rename onto ``out``."""
    import h5py

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with h5py.File(tmp, "w-") as f:
            for split, (images, labels) in splits.items():
                group = f.create_group(split)
                x = group.create_dataset("images", data=images, track_times=False)
                x.attrs["axes"] = "example, channel, height, width"
                group.create_dataset("labels", data=labels, track_times=False)
            f.attrs.update(attrs)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

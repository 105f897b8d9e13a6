"""prepare -> load round trips on tiny files in each real on-disk format."""

import json
import pickle
import re
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fixtures import (
    CIFAR10_NAMES,
    md5_lists,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_mnist,
)
from test_workflow import TINY, snakemake, write_config
from torchvision import datasets

from ntkcl import data

HASH = "[0-9a-f]{8}"


def patch_md5(monkeypatch, cls, root):
    for name, value in md5_lists(cls, root).items():
        monkeypatch.setattr(cls, name, value)


def check_file(path, written, class_names, value_max=255):
    """The prepared file holds the raw images and labels as written."""
    with h5py.File(path, "r") as f:
        for split, (x, y) in written.items():
            assert f[f"{split}/images"].dtype == np.uint8
            assert f[f"{split}/labels"].dtype == np.int64
            np.testing.assert_array_equal(f[f"{split}/images"][...], x)
            np.testing.assert_array_equal(f[f"{split}/labels"][...], y)
        assert json.loads(f.attrs["class_names"]) == class_names
        assert f.attrs["value_max"] == value_max
        assert f.attrs["format_version"] == data.FORMAT_VERSION
        train = written["train"][0].astype(np.float64) / value_max
        np.testing.assert_allclose(f.attrs["mean"], train.mean(axis=(0, 2, 3)))
        np.testing.assert_allclose(f.attrs["std"], train.std(axis=(0, 2, 3)))


def check_normalised(dataset):
    assert dataset.train_x.dtype == dataset.test_x.dtype == torch.float32
    assert dataset.train_y.dtype == dataset.test_y.dtype == torch.int64
    mean = dataset.train_x.double().mean(dim=(0, 2, 3))
    std = dataset.train_x.double().std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


def test_digits_round_trip(tmp_path):
    out = data.prepare({"name": "digits", "test_fraction": 0.2}, tmp_path / "d.h5")
    dataset = data.load(out)
    assert dataset.input_shape == (1, 8, 8) and dataset.num_classes == 10
    assert len(dataset.train_y) + len(dataset.test_y) == 1797
    assert len(dataset.test_y) == 360
    # stratified: every class is about a fifth held out
    shares = torch.bincount(dataset.test_y) / (
        torch.bincount(dataset.test_y) + torch.bincount(dataset.train_y)
    )
    assert shares.min() > 0.17 and shares.max() < 0.23
    check_normalised(dataset)
    with h5py.File(out, "r") as f:
        assert f.attrs["value_max"] == 16 and f["train/images"][...].max() == 16
        assert "load_digits" in f.attrs["source"]
        assert f.attrs["dataset_id"] == "digits"
    # the same config writes the same arrays
    again = data.load(data.prepare({"name": "digits"}, tmp_path / "e.h5"))
    assert torch.equal(again.train_x, dataset.train_x)
    assert torch.equal(again.test_y, dataset.test_y)


def test_cifar10_real_format_round_trip(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    written = write_cifar10(root)
    # the fixture pickles look like the published ones to pickle itself
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert {b"data", b"labels", b"batch_label", b"filenames"} <= set(entry)
    patch_md5(monkeypatch, datasets.CIFAR10, root)

    out = data.prepare({"name": "CIFAR10", "root": str(root)}, tmp_path / "c.h5")
    check_file(out, written, CIFAR10_NAMES)
    dataset = data.load(out)
    assert dataset.input_shape == (3, 32, 32) and len(dataset.train_y) == 20
    assert dataset.class_names == CIFAR10_NAMES
    check_normalised(dataset)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    written = write_cifar100(root)
    patch_md5(monkeypatch, datasets.CIFAR100, root)
    out = data.prepare({"name": "CIFAR100", "root": str(root)}, tmp_path / "c.h5")
    check_file(out, written, [f"fine{c:02d}" for c in range(100)])
    assert data.load(out).num_classes == 100


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST", "KMNIST"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_style_idx_files(tmp_path, name, gz):
    root = tmp_path / "raw"
    written = write_mnist(root, name, gz=gz)
    before = sorted(p.name for p in (root / name / "raw").iterdir())
    out = data.prepare({"name": name, "root": str(root)}, tmp_path / "m.h5")
    check_file(out, written, list(getattr(datasets, name).classes))
    assert data.load(out).input_shape == (1, 28, 28)
    assert sorted(p.name for p in (root / name / "raw").iterdir()) == before


def test_image_size_resizes_torchvision_data(tmp_path):
    root = tmp_path / "raw"
    write_mnist(root)
    cfg = {"name": "MNIST", "root": str(root), "image_size": 14}
    assert re.fullmatch(f"MNIST-14px-{HASH}", data.dataset_id(cfg))
    dataset = data.load(data.prepare(cfg, tmp_path / "m.h5"))
    assert dataset.input_shape == (1, 14, 14)


def test_image_folder_with_class_list(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    write_image_folder(root, ["n01", "n02", "n03", "n04"])
    (tmp_path / "imagenet100.txt").write_text("# wnids\nn03\nn01\n\nn04\n")
    monkeypatch.chdir(tmp_path)
    cfg = {
        "name": "ImageFolder",
        "root": "imagenet",
        "class_list": "imagenet100.txt",
        "image_size": 8,
    }
    assert re.fullmatch(f"ImageFolder-imagenet100-8px-{HASH}", data.dataset_id(cfg))
    out = data.prepare(cfg, tmp_path / "results" / "i.h5")
    dataset = data.load(out)
    assert dataset.class_names == ["n03", "n01", "n04"]  # ids in the list's order
    assert dataset.input_shape == (3, 8, 8)
    assert dataset.train_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    with h5py.File(out, "r") as f:
        images, labels = f["train/images"][...], f["train/labels"][...]
        assert f.attrs["dataset_id"] == data.dataset_id(cfg)
    # every pixel of folder n0k is 10 k; resizing a flat image keeps it
    expected = 10 * np.array([3, 1, 4])[labels]
    assert (images == expected[:, None, None, None]).all()
    check_normalised(dataset)


def test_image_folder_test_split_and_mixed_sizes(tmp_path):
    root = tmp_path / "tree"
    write_image_folder(root, ["a", "b"], splits=("train", "test"))
    cfg = {"name": "ImageFolder", "root": str(root)}
    assert re.fullmatch(f"ImageFolder-tree-{HASH}", data.dataset_id(cfg))
    with pytest.raises(ValueError, match="image_size"):
        data.prepare(cfg, tmp_path / "t.h5")
    dataset = data.load(data.prepare({**cfg, "image_size": 6}, tmp_path / "t.h5"))
    assert dataset.class_names == ["a", "b"] and len(dataset.test_y) == 6


def test_image_folder_missing_class_folder(tmp_path):
    root = tmp_path / "tree"
    write_image_folder(root, ["a", "b"])
    (root / "list.txt").write_text("a\nb\nc\n")
    cfg = {"name": "ImageFolder", "root": str(root), "class_list": "list.txt"}
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.prepare(cfg, tmp_path / "t.h5")
    message = str(info.value)
    assert str(root / "train" / "c") in message and str(root / "val" / "c") in message
    assert "never downloaded" in message

    # an empty root: the evaluation split is val/ (test/ only stands in for it)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.prepare({"name": "ImageFolder", "root": str(empty)}, tmp_path / "e.h5")
    assert f"{empty / 'train'}/\n  {empty / 'val'}/ (or test/)" in str(info.value)


def test_missing_cifar_names_files_and_fixes(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.prepare({"name": "CIFAR10", "root": str(root)}, tmp_path / "c.h5")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    folder = root / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        assert f"{folder / name} (missing)" in message
    assert "batches.meta" in message
    assert "download is off" in message and "data.download: true" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert not (tmp_path / "c.h5").exists()


def test_corrupted_cifar_is_reported(tmp_path):
    root = tmp_path / "raw"
    write_cifar10(root)  # the md5s are not the published archive's
    with pytest.raises(data.DatasetNotFoundError, match="md5"):
        data.prepare({"name": "CIFAR10", "root": str(root)}, tmp_path / "c.h5")


def test_missing_mnist_names_raw_files(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.prepare({"name": "MNIST", "root": str(tmp_path)}, tmp_path / "m.h5")
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "data.download" in message


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets.CIFAR100, "download", offline)
    cfg = {"name": "CIFAR100", "root": str(tmp_path), "download": True}
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.prepare(cfg, tmp_path / "c.h5")
    message = str(info.value)
    assert "downloading failed" in message and "no network" in message
    assert "cifar-100-python" in message and "meta" in message


def test_unknown_name_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match="'CIFAR11'"):
        data.prepare({"name": "CIFAR11", "root": "x"}, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="test_fraction"):
        data.prepare({"name": "digits", "test_fraction": 1.5}, tmp_path / "x.h5")
    with pytest.raises(ValueError, match="image_size"):
        data.prepare({"name": "digits", "image_size": 0}, tmp_path / "x.h5")


def test_dataset_ids():
    assert data.dataset_id({"name": "digits", "test_fraction": 0.2}) == "digits"
    assert data.dataset_id({"name": "digits", "test_fraction": 0.3}) == "digits-test0.3"
    assert data.dataset_id({"name": "digits", "root": "elsewhere"}) == "digits"
    # pinned: the hash must not change between versions, or every study re-prepares
    cifar = {"name": "CIFAR10", "root": "data", "image_size": None}
    assert data.dataset_id(cifar) == "CIFAR10-a4a42510"
    assert data.dataset_id({**cifar, "image_size": 16}) == "CIFAR10-16px-a4a42510"
    for same in ("data/", "./data", "data//"):  # one folder, normalised
        assert data.dataset_id({**cifar, "root": same}) == "CIFAR10-a4a42510"
    cfg = {"name": "ImageFolder", "root": "/d/imagenet", "class_list": None}
    assert re.fullmatch(
        f"ImageFolder-imagenet-64px-{HASH}", data.dataset_id({**cfg, "image_size": 64})
    )


def test_dataset_ids_tell_sources_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("CIFAR10", "MNIST"):
        a = data.dataset_id({"name": name, "root": "a", "image_size": 16})
        assert a != data.dataset_id({"name": name, "root": "b", "image_size": 16})
        assert a == data.dataset_id({"name": name, "root": "a", "image_size": 16})

    # ImageFolder: the same class list file name under two roots
    for root in ("a", "b"):
        write_image_folder(tmp_path / root, ["n1", "n2"])
    Path("classes.txt").write_text("n1\nn2\n")
    cfg = {"name": "ImageFolder", "root": "a", "class_list": "classes.txt"}
    first = data.dataset_id(cfg)
    assert re.fullmatch(f"ImageFolder-classes-{HASH}", first)
    assert data.dataset_id({**cfg, "root": "b"}) != first
    assert data.dataset_id(dict(cfg)) == first

    # two roots with the same folder name, no class list
    tree = {"name": "ImageFolder", "class_list": None}
    x = data.dataset_id({**tree, "root": "x/tree"})
    y = data.dataset_id({**tree, "root": "y/tree"})
    assert (
        x != y
        and x.startswith("ImageFolder-tree-")
        and y.startswith("ImageFolder-tree-")
    )

    # two class lists with one file stem in two folders: their classes decide
    ids = {}
    for folder, text in [("one", "n1\nn2\n"), ("two", "n2\nn1\n"), ("three", "n1\nn2")]:
        Path(folder).mkdir()
        Path(folder, "classes.txt").write_text(text)
        ids[folder] = data.dataset_id({**cfg, "class_list": f"{folder}/classes.txt"})
    assert ids["one"] != ids["two"]  # another order is other class ids
    assert ids["one"] == ids["three"] == first  # same classes, same prepared data

    # editing the class list gives a new id; a comment or blank line does not
    Path("classes.txt").write_text("# two classes\nn1\n\nn2\n")
    assert data.dataset_id(cfg) == first
    Path("classes.txt").write_text("n1\n")
    assert data.dataset_id(cfg) != first

    # a class list found under the root, as prepare looks for it
    Path("classes.txt").unlink()
    (tmp_path / "a" / "classes.txt").write_text("n1\nn2\n")
    assert data.dataset_id(cfg) == first
    # a class list that is not there yet: its path stands in, deterministically
    missing = {**cfg, "class_list": "nowhere/classes.txt"}
    assert data.dataset_id(missing) == data.dataset_id(missing) != first


@pytest.mark.slow
def test_two_roots_prepare_two_files_in_the_workflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Snakemake's working directory, for the class list
    for root in ("imf", "imf_b"):
        write_image_folder(tmp_path / root, ["n1", "n2", "n3", "n4"])
    (tmp_path / "classes.txt").write_text("n1\nn2\nn3\nn4\n")
    image_folder = {"name": "ImageFolder", "class_list": "classes.txt", "image_size": 8}
    # the data in defaults: at demo scale, `demo` overrides an experiment's overrides
    demo = {k: v for k, v in TINY["demo"].items() if k != "data"}
    demo |= {"tasks": {"classes": [[0, 1], [2, 3]], "iterations": 10}}
    demo |= {"probe": {"size": 4}}
    cfg = {**TINY, "defaults": {"data": {**image_folder, "root": "imf"}}, "demo": demo}
    experiment = {
        "grid": {"model.width": [8]},
        "seeds": [0],
        "figure": {"line": "width"},
    }
    cfg["experiments"] = {
        "expa": {**experiment, "description": "Root imf."},
        "expb": {
            **experiment,
            "description": "Root imf_b.",
            "overrides": {"data": {"root": "imf_b"}},
        },
    }
    write_config(tmp_path, cfg)
    result = snakemake(tmp_path, "-n", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    listing = result.stdout + result.stderr
    prepared = set(re.findall(r"output: results/data/(\S+)\.h5", listing))
    expected = {data.dataset_id({**image_folder, "root": r}) for r in ("imf", "imf_b")}
    assert prepared == expected and len(prepared) == 2


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "d.h5"
    out.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", broken)
    with pytest.raises(OSError, match="disk full"):
        data.prepare({"name": "digits"}, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        data.load(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        data.load(tmp_path / "other.h5")

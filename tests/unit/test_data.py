"""Data stage: the embedded MNIST split, label noise, and torchvision's MNIST reader on small
files in the real IDX format that the tests write themselves (no download, no network)."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct

import numpy as np
import pytest
import torch

from dve_repro.config import ImageDataConfig, compose
from dve_repro.data import flip_labels, load_image_data
from dve_repro.errors import DveError
from dve_repro.train import run_training, train_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def _tiny_data() -> ImageDataConfig:
    return compose(["experiment=tiny_mlp"]).data


def data_cfg(**changes) -> ImageDataConfig:
    """The tiny experiment's data section with some fields changed (composed once)."""
    return dataclasses.replace(_tiny_data(), **changes)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


# --------------------------------------------------------------------------- embedded MNIST


def test_embedded_split_sizes_range_and_disjointness():
    d = load_image_data(data_cfg())
    assert d.x_train.shape == (256, 784) and d.y_train.shape == (256,)
    assert d.x_val.shape == (64, 784) and d.x_test.shape == (64, 784)
    assert d.x_train.dtype == torch.float64 and d.y_train.dtype == torch.int64
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.min() >= 0 and x.max() <= 1
        assert x.max() == 1  # scaled by 255, not by the maximum of a batch
    for y in (d.y_train, d.y_val, d.y_test):
        assert set(y.tolist()) <= set(range(10))
    assert len(set(d.y_train.tolist())) == 10  # shuffled: the source is sorted by label
    assert d.n_classes == 10 and len(d.source_ids_train) == 256
    tr, va, te = rows(d.x_train), rows(d.x_val), rows(d.x_test)
    assert len(tr) == 256 and not (tr & va) and not (tr & te) and not (va & te)


def test_embedded_split_is_determined_by_split_seed():
    a = load_image_data(data_cfg())
    b = load_image_data(data_cfg())
    c = load_image_data(data_cfg(split_seed=1))
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.x_train, c.x_train)
    assert not np.array_equal(a.source_ids_train, c.source_ids_train)
    # The same source digit carries the same label whatever the split.
    common = np.intersect1d(a.source_ids_train, c.source_ids_train)
    assert len(common) > 0
    ia = {s: k for k, s in enumerate(a.source_ids_train)}
    ic = {s: k for k, s in enumerate(c.source_ids_train)}
    for s in common:
        assert (
            torch.equal(a.x_train[ia[s]], c.x_train[ic[s]]) and a.y_train[ia[s]] == c.y_train[ic[s]]
        )


def test_embedded_split_larger_than_the_set_is_refused():
    with pytest.raises(DveError) as info:
        load_image_data(data_cfg(n_train=4950))
    assert "\n" not in str(info.value)
    with pytest.raises(DveError):
        load_image_data(data_cfg(name="cifar10"))


# --------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_label_noise(fraction):
    clean = load_image_data(data_cfg())
    noisy = load_image_data(data_cfg(label_noise=fraction, noise_seed=3))
    n = round(fraction * 256)
    idx, true = noisy.noisy_indices, noisy.true_labels
    assert len(idx) == n == len(true)
    assert np.array_equal(idx, np.unique(idx))  # sorted, no repeats
    assert np.array_equal(true, clean.y_train.numpy()[idx])
    changed = np.flatnonzero(noisy.y_train.numpy() != clean.y_train.numpy())
    assert np.array_equal(changed, idx), "flipped labels must differ, and only those"
    assert torch.equal(noisy.x_train, clean.x_train) and torch.equal(noisy.y_val, clean.y_val)
    assert set(noisy.y_train.tolist()) <= set(range(10))
    again = load_image_data(data_cfg(label_noise=fraction, noise_seed=3))
    assert torch.equal(again.y_train, noisy.y_train)
    other = load_image_data(data_cfg(label_noise=fraction, noise_seed=4))
    assert not np.array_equal(other.noisy_indices, idx)


def test_flip_labels_never_keeps_the_class():
    y = np.repeat(np.arange(10), 20)
    noisy, idx, true = flip_labels(y, 0.999, 10, seed=0)
    assert len(idx) == 200 and np.all(noisy != y) and np.array_equal(true, y)
    assert np.all((noisy >= 0) & (noisy < 10))


def test_training_run_records_the_flipped_labels(tiny):
    cfg = compose(tiny("data.label_noise=0.1"))
    path = run_training(cfg)
    labels = json.loads((path / "labels.json").read_text())
    data = load_image_data(cfg.data)
    assert (
        labels["noisy_indices"] == data.noisy_indices.tolist()
        and len(labels["noisy_indices"]) == 26
    )
    assert labels["true_labels"] == data.true_labels.tolist()
    # The noise is part of the run's identity: another directory than the clean run's.
    assert path == train_dir(cfg) and path != train_dir(compose(tiny()))


# --------------------------------------------------------------------------- torchvision reader


def write_idx(root, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX files as torchvision 0.29 reads them: <root>/MNIST/raw/<split>-*-ubyte."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    n = len(images)
    (raw / f"{split}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x00000803, n, 28, 28) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{split}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x00000801, n) + labels.astype(np.uint8).tobytes()
    )


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", 40), ("t10k", 12)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = 0, 255  # both ends of the pixel range
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(tmp_path, split, images, labels)
        sets[split] = (images, labels)
    return tmp_path, sets


def tv_cfg(root, **changes) -> ImageDataConfig:
    base = {"source": "torchvision", "root": str(root), "n_train": 30, "n_val": 10, "n_test": 5}
    return data_cfg(**{**base, **changes})


def test_torchvision_mnist_reader(mnist_root):
    root, sets = mnist_root
    d = load_image_data(tv_cfg(root))
    assert (
        d.x_train.shape == (30, 784) and d.x_val.shape == (10, 784) and d.x_test.shape == (5, 784)
    )
    assert d.x_train.dtype == torch.float64
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0

    def lookup(split):
        images, labels = sets[split]
        flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
        return {r.tobytes(): int(lab) for r, lab in zip(flat, labels, strict=True)}

    train_set, test_set = lookup("train"), lookup("t10k")
    for x, y, table in (
        (d.x_train, d.y_train, train_set),
        (d.x_val, d.y_val, train_set),
        (d.x_test, d.y_test, test_set),
    ):
        for xi, yi in zip(x, y, strict=True):
            key = xi.numpy().tobytes()
            assert key in table, "an image that is not in the written files"
            assert table[key] == int(yi), "image and label out of step"
    assert not (rows(d.x_train) & rows(d.x_val))
    for i, s in enumerate(d.source_ids_train):  # source ids point into the train file
        assert np.array_equal(d.x_train[i].numpy(), sets["train"][0][s].reshape(-1) / 255.0)
    again = load_image_data(tv_cfg(root))
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.x_test, d.x_test)


def test_torchvision_reader_errors(mnist_root, tmp_path):
    root, _ = mnist_root
    cases = {
        "missing folder": tv_cfg(tmp_path / "nonexistent"),
        "empty folder": tv_cfg(tmp_path / "runs"),
        "too many training points": tv_cfg(root, n_train=35),
        "too many test points": tv_cfg(root, n_test=13),
    }
    (tmp_path / "runs").mkdir()
    for what, cfg in cases.items():
        with pytest.raises(DveError) as info:
            load_image_data(cfg)
        msg = str(info.value)
        assert msg and "\n" not in msg, f"{what}: {msg!r}"
    with pytest.raises(DveError, match="data folder not found"):
        load_image_data(cases["missing folder"])
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    full = labels.read_bytes()
    labels.write_bytes(full[:20])  # truncated: the header promises 40 labels
    with pytest.raises(DveError) as info:
        load_image_data(tv_cfg(root))
    assert "\n" not in str(info.value)
    labels.write_bytes(struct.pack(">II", 0x00000801, 36) + full[8:44])  # valid, but 36 labels
    with pytest.raises(DveError, match="40 images but 36 labels"):
        load_image_data(tv_cfg(root))

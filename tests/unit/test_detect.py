"""E6 pieces: 10% label noise exactly, the CIFAR-10 reader on small files in the real
python-pickle format that the tests write, AUROC / AP against scikit-learn, self-influence
against one-at-a-time autograd, and a planted problem where DVEmb must find the flips."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics

from dve_repro.config import compose
from dve_repro.data import _read_cifar_batches, load_image_data
from dve_repro.detect import auroc, average_precision, found_at, found_curve, run_detect
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun
from dve_repro.self_influence import grad_sq_norms, self_influence
from dve_repro.stats import stratified_ci
from dve_repro.train import run_training

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- CIFAR-10 files


def write_cifar(
    root, train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray]
):
    """CIFAR-10's python version as torchvision 0.29 expects it: <root>/cifar-10-batches-py/
    data_batch_1..5 and test_batch (pickled dicts: data uint8 [n, 3072] with the 1024 red, then
    green, then blue values of each row-major 32×32 image; labels a list of ints) and
    batches.meta (label_names)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i + 1}", b) for i, b in enumerate(train)] + [("test_batch", test)]
    for name, (images, labels) in batches:  # images [n, 32, 32, 3] HWC, as one looks at them
        flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.uint8)
        entry = {
            "batch_label": name,
            "labels": [int(v) for v in labels],
            "data": flat,
            "filenames": [f"{name}_{k}.png" for k in range(len(images))],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(
            {"label_names": CLASSES, "num_cases_per_batch": len(train[0][0]), "num_vis": 3072},
            fh,
            protocol=2,
        )


@pytest.fixture
def cifar_root(tmp_path):
    rng = np.random.default_rng(0)
    train = []
    for _ in range(5):
        images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        train.append((images, rng.integers(0, 10, size=8)))
    train[0][0][0] = 0
    train[0][0][0, :, :, 0] = 255  # the first image is pure red
    test = (rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=6))
    write_cifar(tmp_path, train, test)
    return tmp_path, train, test


def cifar_cfg(root, **changes):
    d = compose(["experiment=cifar10_noise", f"data.root={root}", "data.trust_pickle=true"]).data
    return dataclasses.replace(
        d, **{"n_train": 30, "n_val": 10, "n_test": 5, "label_noise": 0.0, **changes}
    )


def test_cifar_reader_reads_the_python_batches(cifar_root):
    root, train, test = cifar_root
    x, y = _read_cifar_batches(root, train=True, trust=True)
    assert x.shape == (40, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, np.concatenate([im for im, _ in train]).transpose(0, 3, 1, 2))
    assert np.array_equal(y, np.concatenate([lab for _, lab in train]))
    assert (x[0, 0] == 255).all() and (x[0, 1:] == 0).all(), "channel order must be R, G, B"
    xt, yt = _read_cifar_batches(root, train=False, trust=True)
    assert np.array_equal(xt, test[0].transpose(0, 3, 1, 2)) and np.array_equal(yt, test[1])


def test_torchvision_refuses_test_files_but_load_image_data_reads_them(cifar_root):
    import torchvision

    root, train, test = cifar_root
    with pytest.raises(RuntimeError, match="not found or corrupted"):  # md5 of the official release
        torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    d = load_image_data(cifar_cfg(root))
    assert (
        d.x_train.shape == (30, 3, 32, 32)
        and d.x_val.shape == (10, 3, 32, 32)
        and d.x_test.shape == (5, 3, 32, 32)
    )
    assert d.x_train.dtype == torch.float64 and float(d.x_train.max()) <= 1.0
    src = np.concatenate([im for im, _ in train]).transpose(0, 3, 1, 2) / 255.0
    labels = np.concatenate([lab for _, lab in train])
    for i, s in enumerate(d.source_ids_train):
        assert np.array_equal(d.x_train[i].numpy(), src[s]) and int(d.y_train[i]) == labels[s]
    test_rows = {im.tobytes() for im in test[0].transpose(0, 3, 1, 2) / 255.0}
    assert all(x.numpy().tobytes() in test_rows for x in d.x_test), (
        "test images come from test_batch"
    )
    assert "CIFAR-10" in d.description and "differ from the official release" in d.description


def test_cifar_reader_errors_are_one_line(cifar_root, tmp_path):
    root, _, _ = cifar_root
    folder = root / "cifar-10-batches-py"
    with pytest.raises(DveError, match="data folder not found"):
        load_image_data(cifar_cfg(tmp_path / "nowhere"))
    with pytest.raises(DveError, match="has 40 training images"):
        load_image_data(cifar_cfg(root, n_train=35))
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])  # truncated
    with pytest.raises(DveError, match="cannot read") as info:
        _read_cifar_batches(root, trust=True)
    assert "\n" not in str(info.value)
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, fh)
    with pytest.raises(DveError, match="4 images but 3 labels"):
        _read_cifar_batches(root, trust=True)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DveError, match="missing CIFAR-10 file"):
        _read_cifar_batches(root, trust=True)


# --------------------------------------------------------------------------- label noise


def test_e6_flips_exactly_ten_percent_to_other_classes():
    cfg = compose(["experiment=mnist_noise"])
    assert (cfg.data.n_train, cfg.data.n_val, cfg.data.label_noise) == (1000, 500, 0.1)
    noisy = load_image_data(cfg.data)
    clean = load_image_data(dataclasses.replace(cfg.data, label_noise=0.0))
    idx = noisy.noisy_indices
    assert len(idx) == 100 == len(np.unique(idx)), "exactly 10% of 1,000 labels are flipped"
    y, y0 = noisy.y_train.numpy(), clean.y_train.numpy()
    assert np.all(y[idx] != y0[idx]), "every flipped label differs from the true one"
    assert np.array_equal(np.flatnonzero(y != y0), idx) and np.array_equal(
        noisy.true_labels, y0[idx]
    )
    assert torch.equal(noisy.y_val, clean.y_val), "the validation labels stay clean"
    real = compose(["experiment=cifar10_noise"])
    assert (real.data.n_train, real.data.n_val, real.data.label_noise) == (1000, 500, 0.1)
    assert (
        real.model.name == "cnn" and real.embed.engine == "func" and real.projection.kind == "dense"
    )


# --------------------------------------------------------------------------- metrics


def test_auroc_and_average_precision_match_scikit_learn():
    """The fast forms against the field's definitions (scikit-learn is in requirements.lock:
    a missing reference fails here rather than skipping), with ties of every density."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 200))
        flipped = rng.random(n) < rng.uniform(0.05, 0.5)
        flipped[:2] = [True, False]
        values = rng.normal(size=n) - flipped
        if trial % 3:
            values = np.round(values, trial % 3 - 1)  # ties: one decimal, or whole numbers
        assert auroc(values, flipped) == pytest.approx(
            metrics.roc_auc_score(flipped, -values), abs=1e-12
        )
        assert average_precision(values, flipped) == pytest.approx(
            metrics.average_precision_score(flipped, -values), abs=1e-12
        )


def test_committed_detection_table_is_scikit_learns():
    """results/mnist_noise/auroc.csv holds scikit-learn's AUROC and AP of its values.csv, and
    the metrics here give the same numbers from them."""
    folder = ROOT / "results" / "mnist_noise"
    values = pd.read_csv(folder / "values.csv")
    table = pd.read_csv(folder / "auroc.csv").set_index("method")
    flipped = values["flipped"].to_numpy().astype(bool)
    assert 0 < flipped.sum() < len(flipped) and len(table) >= 5
    for method, row in table.iterrows():
        v = values[method].to_numpy()
        assert row["auroc"] == pytest.approx(metrics.roc_auc_score(flipped, -v), abs=1e-12), method
        assert row["ap"] == pytest.approx(
            metrics.average_precision_score(flipped, -v), abs=1e-12
        ), method
        assert auroc(v, flipped) == pytest.approx(row["auroc"], abs=1e-12), method
        assert average_precision(v, flipped) == pytest.approx(row["ap"], abs=1e-12), method


def test_metrics_on_hand_cases():
    flipped = np.array([True, True, False, False, False])
    best = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert auroc(best, flipped) == 1.0 and average_precision(best, flipped) == 1.0
    assert auroc(-best, flipped) == 0.0
    assert auroc(np.zeros(5), flipped) == 0.5 and average_precision(
        np.zeros(5), flipped
    ) == pytest.approx(0.4)
    x, y = found_curve(best, flipped)
    assert x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == 1 and y[2] == 1.0
    assert found_at(best, flipped, 0.2) == 0.5 and found_at(-best, flipped, 0.4) == 0.0
    values = np.random.default_rng(1).normal(size=200) - np.r_[np.ones(20), np.zeros(180)]
    lab = np.r_[np.ones(20, bool), np.zeros(180, bool)]
    lo, hi = stratified_ci(values, lab, auroc, 200, seed=0)
    assert lo <= auroc(values, lab) <= hi and (lo, hi) == stratified_ci(values, lab, auroc, 200, seed=0)


# --------------------------------------------------------------------------- self-influence


def test_self_influence_equals_one_at_a_time_autograd(tiny):
    run = TrainedRun.load(run_training(compose(tiny("data.n_train=64", "data.label_noise=0.1"))))
    task = run.task
    want = np.zeros(task.n_train)
    for c in [c for c in run.checkpoints if c < run.T]:
        params = run.load_params(c)[0]
        assert np.allclose(grad_sq_norms(run, params, chunk=16), grad_sq_norms(run, params))
        for i in range(task.n_train):
            p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = task.per_sample_loss(p, *task.batch(np.array([i]))).sum()
            want[i] += float(run.traj.lrs[c]) * sum(
                float(g.pow(2).sum()) for g in torch.autograd.grad(loss, list(p.values()))
            )
    assert len(run.checkpoints) > 2
    np.testing.assert_allclose(self_influence(run), want, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- planted problem


def test_planted_flips_are_ranked_first_by_dvemb(tmp_path):
    """Ten well-separated classes written in CIFAR-10's file format: each class lights its own
    50 pixels (each kept with probability 0.8) plus 12 random pixels anywhere. 10% of 200
    training labels are flipped. A flipped point pushes its class's pixels toward a wrong
    class, so removing it lowers the clean validation loss: DVEmb must put all 20 flips among
    its 40 lowest values and reach AUROC ≥ 0.98 (measured over data seeds 0-3: 0.996-1.0,
    all flips within the lowest 40 every time)."""
    rng = np.random.default_rng(0)
    support = rng.permutation(3072)[:500].reshape(10, 50)  # disjoint bright pixels per class

    def sample(n):
        y = rng.integers(0, 10, size=n)
        flat = np.zeros((n, 3072), np.uint8)
        for i, c in enumerate(y):
            flat[i, support[c][rng.random(50) < 0.8]] = 200
            flat[i, rng.integers(0, 3072, size=12)] = 200
        return flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), y  # HWC, as write_cifar takes

    write_cifar(tmp_path / "cifar", [sample(60) for _ in range(5)], sample(10))
    cfg = compose(
        [
            "experiment=cifar10_noise",
            f"data.root={tmp_path / 'cifar'}",
            "data.trust_pickle=true",
            "data.n_train=200",
            "data.n_val=100",
            "data.n_test=0",
            "model=mlp",
            "model.in_features=3072",
            "model.hidden=[8]",
            "projection=kronecker",
            "embed.engine=auto",
            "train.epochs=4",
            "train.batch_size=20",
            "baselines.bootstrap=20",
            "baselines.cg_iters=10",
            f"runtime.out_root={tmp_path / 'runs'}",
            "runtime.progress=false",
        ]
    )
    out = run_detect(cfg, tmp_path / "results", figures=False)
    values = pd.read_csv(out / "values.csv")
    assert values["flipped"].sum() == 20
    found = int(values.nsmallest(40, "dvemb")["flipped"].sum())
    assert found == 20, f"DVEmb put only {found} of the 20 planted flips among its 40 lowest values"
    table = pd.read_csv(out / "auroc.csv").set_index("method")
    assert table.loc["dvemb", "auroc"] >= 0.98, table.loc["dvemb"]
    assert (table["dataset"] == "CIFAR-10").all()

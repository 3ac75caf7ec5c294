"""`dve detect-mislabeled` end to end through Typer's CliRunner: the MNIST stand-in on a tiny
run (every output written, labelled as the stand-in, cached values reused), a one-line
error that names the stand-in when CIFAR-10 is missing, and the CIFAR-10 configuration (CNN,
torch.func gradients, dense projection) on small files in CIFAR-10's format."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dve_repro.cli import app

METHODS = ["dvemb", "influence", "tracin", "self-influence", "grad-dot", "train-loss"]
AUROC_COLUMNS = [
    "dataset",
    "method",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "ap",
    "ap_lo",
    "ap_hi",
    "found_at_10pct",
    "value",
    "direction",
    "note",
    "n_train",
    "n_flipped",
    "n_val",
]
OUTPUTS = [
    "values.csv",
    "auroc.csv",
    "auroc.md",
    "epochs.csv",
    "detection.png",
    "detection.pdf",
    "epochs.png",
    "epochs.pdf",
    "COMMAND.txt",
]
TINY = [
    "data.n_train=200",
    "data.n_val=100",
    "data.n_test=0",
    "train.epochs=3",
    "train.batch_size=32",
    "baselines.bootstrap=50",
    "baselines.cg_iters=20",
    "runtime.progress=false",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_detect_mislabeled_mnist_stand_in(tmp_path):
    results = tmp_path / "results"
    over = [
        "experiment=mnist_noise",
        *TINY,
        "model.hidden=[8]",
        f"runtime.out_root={tmp_path / 'runs'}",
    ]
    res = invoke("detect-mislabeled", *over, "--results", str(results))
    assert res.exit_code == 0, (res.output, res.exception)
    for name in OUTPUTS:
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name

    table = pd.read_csv(results / "auroc.csv")
    assert list(table.columns) == AUROC_COLUMNS and list(table["method"]) == METHODS
    assert (table["dataset"] == "MNIST stand-in for CIFAR-10").all(), (
        "the stand-in must say so in its table"
    )
    assert (
        (table["n_train"] == 200).all()
        and (table["n_flipped"] == 20).all()
        and (table["n_val"] == 100).all()
    )
    assert table["auroc"].between(0, 1).all() and table["ap"].between(0, 1).all()
    assert (table["auroc_lo"] <= table["auroc"]).all() and (
        table["auroc"] <= table["auroc_hi"]
    ).all()
    md = (results / "auroc.md").read_text()
    assert md.startswith("# E6 mislabeled-data detection — MNIST stand-in for CIFAR-10")

    values = pd.read_csv(results / "values.csv")
    assert len(values) == 200 and values["flipped"].sum() == 20
    flipped = values[values["flipped"] == 1]
    assert (flipped["given_label"] != flipped["true_label"]).all()
    assert (
        values.loc[values["flipped"] == 0, "given_label"]
        == values.loc[values["flipped"] == 0, "true_label"]
    ).all()
    # All-epoch DVEmb is the sum of the per-epoch values.
    per_epoch = values[[f"dvemb_epoch_{e}" for e in range(3)]].sum(axis=1)
    np.testing.assert_allclose(per_epoch, values["dvemb"], rtol=1e-6, atol=1e-12)
    epochs = pd.read_csv(results / "epochs.csv")
    assert (
        list(epochs["epoch"]) == [0, 1, 2]
        and (epochs["dataset"] == "MNIST stand-in for CIFAR-10").all()
    )
    assert epochs["flipped_fitted"].between(0, 1).all()
    assert (
        (results / "COMMAND.txt")
        .read_text()
        .startswith("dve detect-mislabeled experiment=mnist_noise ")
    )

    # A rerun reuses the training run, the embedding and the cached method values.
    res = invoke("detect-mislabeled", *over, "--results", str(results))
    assert res.exit_code == 0, (res.output, res.exception)
    pd.testing.assert_frame_equal(pd.read_csv(results / "auroc.csv"), table)


def test_cifar10_without_files_names_the_stand_in(tmp_path):
    res = invoke(
        "detect-mislabeled",
        "experiment=cifar10_noise",
        f"data.root={tmp_path / 'none'}",
        f"runtime.out_root={tmp_path / 'runs'}",
        "runtime.progress=false",
    )
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "experiment=mnist_noise" in lines[0]
    )
    res = invoke(
        "detect-mislabeled",
        "experiment=mnist_noise",
        "data.label_noise=0",
        f"runtime.out_root={tmp_path / 'runs'}",
    )
    assert res.exit_code == 2 and "label noise" in res.stderr


def test_detect_mislabeled_cifar10_cnn(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 16) for i in range(1, 6)), ("test_batch", 4)]:
        entry = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2)
    )
    results = tmp_path / "results"
    res = invoke(
        "detect-mislabeled",
        "experiment=cifar10_noise",
        f"data.root={tmp_path / 'cifar'}",
        "data.trust_pickle=true",
        "data.n_train=60",
        "data.n_val=20",
        "data.n_test=0",
        "train.epochs=2",
        "train.batch_size=20",
        "model.channels=[2]",
        "model.hidden=4",
        "projection.dim=16",
        "baselines.bootstrap=20",
        "baselines.cg_iters=5",
        f"runtime.out_root={tmp_path / 'runs'}",
        "runtime.progress=false",
        "--results",
        str(results),
    )
    assert res.exit_code == 0, (res.output, res.exception)
    table = pd.read_csv(results / "auroc.csv")
    assert (table["dataset"] == "CIFAR-10").all() and (table["n_flipped"] == 6).all()
    assert np.isfinite(table["auroc"]).all()
    md = (results / "auroc.md").read_text()
    assert "stand-in" not in md and "differ from the official release" in md

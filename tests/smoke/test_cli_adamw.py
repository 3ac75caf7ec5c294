"""The AdamW-aware embedding through the CLI: `dve train optim=adamw` → `dve embed
embed.optimizer_aware=true` (Algorithms 1 and 2) → `dve score`; one-line refusals. (The
stored embedding's equality with the matrix-free unrolling is tests/unit/test_embedding_adamw.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dve_repro.cli import app
from dve_repro.config import compose
from dve_repro.replay import TrainedRun
from dve_repro.unroll import adamw_unrolled_scores, query_gradients

ADAMW = [
    "optim=adamw",
    "optim.lr=0.003",
    "optim.grad_clip=0.85",
    "model.hidden=[4]",
    "train.epochs=1",
    "trajectory.checkpoint_every=2",
]
AWARE = ["embed.optimizer_aware=true", "embed.adamw_k_out=4", "embed.adamw_k_in=100"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def ok(result) -> Path:
    assert result.exit_code == 0, (result.output, result.exception)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("adamw-smoke")
    return [
        "experiment=tiny_mlp",
        f"runtime.out_root={root / 'runs'}",
        "runtime.progress=false",
        *ADAMW,
    ]


@pytest.fixture(scope="module")
def run_dir(base) -> Path:
    return ok(invoke("train", *base))


def test_embed_writes_an_adamw_aware_embedding_that_tracks_the_unrolling(base, run_dir):
    path = ok(invoke("embed", *base, *AWARE))
    meta = json.loads((path / "embedding.json").read_text())
    assert meta["optimizer_aware"] is True and meta["estimator"].startswith("AdamW-aware")
    scores = pd.read_parquet(path / "scores.parquet")["score"].to_numpy()
    run = TrainedRun.load(run_dir)
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    ref = adamw_unrolled_scores(run, {k: v[:1] for k, v in q.items()}, "ef")[:, 0]
    assert np.corrcoef(scores, ref)[0, 1] > 0.8  # a quarter of the coordinates kept (measured 0.94)
    # Algorithm 2 gives the same embedding, and its dynamics end on the final checkpoint
    path2 = ok(invoke("embed", *base, *AWARE, "embed.algorithm=2", "embed.segments=2"))
    np.testing.assert_allclose(
        np.load(path2 / "E.npy"),
        np.load(path / "E.npy"),
        rtol=1e-9,
        atol=1e-12 * np.abs(np.load(path / "E.npy")).max(),
    )
    dyn = np.load(path2 / "dynamics.npy")
    np.testing.assert_allclose(dyn[:, -1], scores, rtol=1e-8, atol=1e-12 * np.abs(scores).max())
    # scoring new queries goes through the same subspace
    out = ok(invoke("score", *base, *AWARE))
    assert len(pd.read_parquet(out)) == len(scores)


def test_optimizer_aware_embedding_refuses_an_sgd_run(tmp_path):
    base = [
        "experiment=tiny_mlp",
        f"runtime.out_root={tmp_path}",
        "runtime.progress=false",
        "train.epochs=1",
    ]
    ok(invoke("train", *base))
    res = invoke("embed", *base, "embed.optimizer_aware=true")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim=adamw" in lines[0], res.stderr


def test_experiments_compose():
    for name in ("mnist_mlp_adamw", "pythia_tiny_adamw"):
        cfg = compose([f"experiment={name}"])
        assert cfg.optim.name == "adamw" and cfg.baselines.adamw_subspaces


@pytest.mark.slow
def test_detect_mislabeled_shows_the_adamw_embeddings_on_an_adamw_run(tmp_path):
    args = ["experiment=tiny_mlp", f"runtime.out_root={tmp_path / 'runs'}", "runtime.progress=false", *ADAMW,
            "data.label_noise=0.1", "embed.adamw_k_out=4", "embed.adamw_k_in=50", "baselines.bootstrap=20",
            "baselines.cg_iters=5"]
    out = ok(invoke("detect-mislabeled", *args, "--results", str(tmp_path / "res")))
    table = pd.read_csv(out / "auroc.csv") if (out / "auroc.csv").is_file() else pd.read_csv(out / "summary.csv")
    methods = set(table["method"])
    assert {"dvemb", "dvemb-adamw-mask", "dvemb-adamw-kron"} <= methods, methods

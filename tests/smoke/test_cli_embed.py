"""`dve train` → `dve embed` → `dve score` on the tiny MNIST run, through the Typer app:
artifacts, Algorithm 2 = Algorithm 1, capture during training = capture by replay, and
one-line errors (exit 2, no traceback) for bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dve_repro.artifacts import load_tensors
from dve_repro.cli import app
from dve_repro.trajectory import ckpt_path

T = 16  # tiny_mlp: 256 points, batch 32, 2 epochs
TRAIN = ["trajectory.checkpoint_every=4"]
MC = ["embed.curvature=mc", "embed.mc_samples=2", "embed.mc_seed=5"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def ok(result) -> Path:
    assert result.exit_code == 0, (result.output, result.exception)
    return Path(result.stdout.strip().splitlines()[-1])


def user_error(result, *needles: str) -> str:
    """Exit 2 with exactly one line `error: …` on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embed-smoke")


@pytest.fixture(scope="module")
def base(root) -> list[str]:
    return ["experiment=tiny_mlp", f"runtime.out_root={root / 'runs'}", "runtime.progress=false", *TRAIN]


@pytest.fixture(scope="module")
def run_dir(base) -> Path:
    return ok(invoke("train", *base))


@pytest.fixture(scope="module")
def emb1(run_dir) -> Path:
    return ok(invoke("embed", str(run_dir), "runtime.progress=false"))


def test_embed_writes_its_artifacts(run_dir, emb1):
    for name in ("E.npy", "scores.parquet", "values.parquet", "embedding.json", "occurrences.parquet", "DONE"):
        assert (emb1 / name).is_file(), name
    meta = json.loads((emb1 / "embedding.json").read_text())
    assert meta["curvature"] == "ef" and meta["algorithm"] == 1
    assert meta["estimator"].startswith("first-order SGD estimate")
    assert meta["projection"]["kind"] == "kronecker"
    E = np.load(emb1 / "E.npy")
    assert E.shape == (T * 32, meta["p_tilde"]) and np.isfinite(E).all() and np.abs(E).max() > 0
    scores = pd.read_parquet(emb1 / "scores.parquet")
    assert list(scores.columns) == ["index", "step", "epoch", "score"]
    assert len(scores) == T * 32 and scores["step"].is_monotonic_increasing
    assert scores["score"].std() > 0
    values = pd.read_parquet(emb1 / "values.parquet").set_index("index")
    assert set(values.columns) == {"all_epoch", "single_epoch"} and len(values) == 256
    np.testing.assert_allclose(values["all_epoch"], scores.groupby("index")["score"].sum().loc[values.index], rtol=1e-12)
    last = scores.sort_values("step").groupby("index")["score"].last().loc[values.index]
    np.testing.assert_allclose(values["single_epoch"], last, rtol=1e-12)
    # rerunning reuses the finished embedding
    assert ok(invoke("embed", str(run_dir), "runtime.progress=false")) == emb1


def test_algorithm2_equals_algorithm1(run_dir, emb1):
    emb2 = ok(invoke("embed", str(run_dir), "runtime.progress=false", "embed.algorithm=2", "embed.segments=2"))
    assert emb2 != emb1
    s1 = pd.read_parquet(emb1 / "scores.parquet")
    s2 = pd.read_parquet(emb2 / "scores.parquet")
    pd.testing.assert_frame_equal(s1[["index", "step", "epoch"]], s2[["index", "step", "epoch"]])
    np.testing.assert_allclose(s2["score"], s1["score"], rtol=1e-8, atol=1e-14 * np.abs(s1["score"]).max())
    assert json.loads((emb2 / "boundaries.json").read_text())["boundaries"] == [0, 8, 16]
    assert (emb2 / "dynamics.npy").is_file()


def test_score_queries(run_dir, emb1):
    out = ok(invoke("score", str(emb1), "--split", "test"))
    test = pd.read_parquet(out)
    assert list(test.columns) == ["index", "step", "epoch", "score"] and len(test) == T * 32
    # the validation split scored afresh reproduces the embedding's own scores
    val = pd.read_parquet(ok(invoke("score", str(emb1), "--split", "val")))
    own = pd.read_parquet(emb1 / "scores.parquet")
    np.testing.assert_allclose(val["score"], own["score"], rtol=1e-10, atol=1e-14)
    assert not np.allclose(test["score"], own["score"])
    # a query set from a file, in the model's feature shape
    x = np.random.default_rng(0).random((5, 784))
    np.savez(emb1.parent / "q.npz", x=x, y=np.arange(5))
    out = ok(invoke("score", str(emb1), "--queries", str(emb1.parent / "q.npz")))
    assert out.parent.name == "query-q" and len(pd.read_parquet(out)) == T * 32


def test_an_embedding_moved_with_its_training_run_still_scores(run_dir, emb1, tmp_path):
    meta = json.loads((emb1 / "embedding.json").read_text())
    assert meta["train_run"] == f"../{run_dir.name}"  # relative: the pair moves together
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir.parent, moved)
    out = ok(invoke("score", str(moved / emb1.name), "--split", "val"))
    assert out.is_relative_to(moved)
    np.testing.assert_allclose(pd.read_parquet(out)["score"], pd.read_parquet(emb1 / "scores.parquet")["score"],
                               rtol=1e-10, atol=1e-14)


def test_score_refuses_another_projection(emb1):
    user_error(invoke("score", str(emb1), "projection.k_in=7"), "another projection", "k_in")


def test_score_overrides_apply_to_the_saved_projection(run_dir):
    """`dve score DIR key=value` checks the saved projection with that key changed, not the
    defaults with it changed: a dense embedding accepts its own seed."""
    emb = ok(invoke("embed", str(run_dir), "runtime.progress=false", "projection=dense", "projection.dim=64"))
    meta = json.loads((emb / "embedding.json").read_text())
    assert meta["projection"]["kind"] == "dense" and meta["p_tilde"] == 64
    assert ok(invoke("score", str(emb), "projection.seed=0", "--split", "val")).is_file()
    user_error(invoke("score", str(emb), "projection.seed=1"), "another projection", "seed")


def test_embed_refuses_bad_inputs(run_dir, emb1, tmp_path):
    def copy() -> Path:
        dst = tmp_path / f"c{len(list(tmp_path.iterdir()))}" / run_dir.parent.name / run_dir.name
        shutil.copytree(run_dir, dst)
        return dst

    no_done = copy()
    (no_done / "DONE").unlink()
    user_error(invoke("embed", str(no_done), "runtime.progress=false"), "no DONE marker")

    no_ckpt = copy()
    ckpt_path(no_ckpt, T).unlink()
    user_error(invoke("embed", str(no_ckpt), "runtime.progress=false"), f"step_{T:07d}.safetensors is missing")

    user_error(invoke("embed", str(run_dir), "projection.dim=0"), "projection.dim must be > 0")

    before = sorted(p.name for p in run_dir.parent.iterdir())
    user_error(invoke("embed", str(run_dir), "embed.algorithm=2", f"embed.segments={T + 1}"),
               f"embed.segments={T + 1}", f"T={T}")
    assert sorted(p.name for p in run_dir.parent.iterdir()) == before  # refused before writing anything

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 783)), y=np.zeros(3, dtype=np.int64))
    user_error(invoke("score", str(emb1), "--queries", str(bad)), "query features have shape (783,)")
    np.savez(bad, x=np.zeros((3, 784)), y=np.array([0, 10, 1]))
    user_error(invoke("score", str(emb1), "--queries", str(bad)), "query labels must lie in [0, 10)")
    np.savez(bad, x=np.zeros((0, 784)), y=np.zeros(0, dtype=np.int64))
    user_error(invoke("score", str(emb1), "--queries", str(bad)), "empty")
    user_error(invoke("score", str(emb1), "--queries", str(tmp_path / "absent.npz")), "cannot read queries")


def test_capture_during_training_equals_replay(run_dir, base, root):
    """`trajectory.capture=true` (hooks inside the training step) stores the same projected
    gradients and Monte-Carlo curvature rows as the embedding stage's replay."""
    cap_dir = ok(invoke("train", *base, "trajectory.capture=true", *MC))
    assert cap_dir != run_dir
    # capture does not perturb training
    a, b = load_tensors(ckpt_path(run_dir, T)), load_tensors(ckpt_path(cap_dir, T))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    emb_replay = ok(invoke("embed", str(run_dir), "runtime.progress=false", *MC))
    grads = [p for p in (root / "runs" / "tiny_mlp").glob("grads-*")
             if json.loads((p / "meta.json").read_text())["curvature"] == "mc"]
    assert len(grads) == 1
    captured, replayed = cap_dir / "grads", grads[0]
    assert np.load(captured / "done.npy").all() and np.load(replayed / "done.npy").all()
    for name, rows in (("G.npy", T * 32), ("F.npy", T * 32 * 2)):
        g_cap, g_rep = np.load(captured / name), np.load(replayed / name)
        assert g_cap.shape == g_rep.shape and g_cap.shape[0] == rows
        assert np.abs(g_rep).max() > 0
        np.testing.assert_allclose(g_cap, g_rep, rtol=0, atol=1e-12 * np.abs(g_rep).max())

    # the capture run's embedding reads its own gradients and agrees with the replayed one
    before = set((root / "runs" / "tiny_mlp").glob("grads-*"))
    emb_cap = ok(invoke("embed", str(cap_dir), "runtime.progress=false", *MC))
    assert set((root / "runs" / "tiny_mlp").glob("grads-*")) == before  # nothing recomputed
    s_cap = pd.read_parquet(emb_cap / "scores.parquet")["score"]
    s_rep = pd.read_parquet(emb_replay / "scores.parquet")["score"]
    np.testing.assert_allclose(s_cap, s_rep, rtol=1e-9, atol=1e-14)

"""Training stage: the run directory contract, reuse / force / refusal, and resume after a kill.

All runs are the seconds-long ``tiny_mlp`` experiment in float64 (16 steps of 32 points,
2 epochs); comparisons of parameters are exact.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dve_repro import artifacts
from dve_repro.config import compose, from_dict, stage_payload, to_dict
from dve_repro.errors import ArtifactError, DveError
from dve_repro.models import build_model
from dve_repro.optim import global_norm, lr_schedule
from dve_repro.tasks import build_task
from dve_repro.train import run_training, train_dir
from dve_repro.trajectory import (
    TRAJECTORY,
    checkpoint_schedule,
    list_checkpoints,
    load_checkpoint,
    plan_batches,
)

TRAJECTORY_COLUMNS = ["step", "epoch", "pos", "indices", "lr", "loss"]
METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def snapshot(path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path``: bytes and modification time."""
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def read_trajectory(path) -> pd.DataFrame:
    frame = pd.read_parquet(path / TRAJECTORY)
    frame["indices"] = [list(map(int, b)) for b in frame["indices"]]
    return frame


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# --------------------------------------------------------------------------- the run directory


def test_run_directory_contract(tiny):
    cfg = compose(tiny())
    path = run_training(cfg)
    assert path.is_dir() and path.parent.name == "tiny_mlp" and path.name.startswith("train-")

    saved = json.loads((path / "config.json").read_text())
    assert saved["payload"] == json.loads(json.dumps(stage_payload(cfg, "train")))
    assert from_dict(saved["config"]) == cfg

    env = json.loads((path / "env.json").read_text())
    assert isinstance(env["git_sha"], str) and env["git_sha"]
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu"
    assert isinstance(env["torch_threads"], int) and env["torch_threads"] > 0

    task = build_task(cfg)
    plan = plan_batches(task.n_train, cfg.train)
    T = len(plan)
    assert T == 16  # 256 points, batches of 32, 2 epochs

    traj = pd.read_parquet(path / TRAJECTORY)
    assert list(traj.columns) == TRAJECTORY_COLUMNS
    assert traj["step"].tolist() == list(range(T))
    assert traj["epoch"].tolist() == [s.epoch for s in plan] == [0] * 8 + [1] * 8
    assert traj["pos"].tolist() == [s.pos for s in plan]
    for s, batch in zip(plan, traj["indices"], strict=True):
        assert np.array_equal(np.asarray(batch), s.indices), f"step {s.step}: not the planned batch"
    for epoch in (0, 1):  # each epoch visits every training point exactly once
        seen = np.concatenate(traj["indices"][traj["epoch"] == epoch].to_list())
        assert np.array_equal(np.sort(seen), np.arange(task.n_train))
    assert traj["lr"].tolist() == lr_schedule(cfg.schedule, cfg.optim.lr, T)

    assert list_checkpoints(path) == checkpoint_schedule(plan, cfg.trajectory) == [0, 8, 16]
    theta0, state0 = load_checkpoint(path, 0)
    assert state0 == {}  # plain SGD has no optimizer state
    assert_same_tensors(theta0, dict(build_model(cfg.model).named_parameters()), "θ_0 vs the init")
    # The recorded loss is the batch mean at θ_t, before the update.
    for t in (0, 8):
        theta, _ = load_checkpoint(path, t)
        x, y = task.batch(plan[t].indices)
        assert math.isclose(
            traj["loss"][t], float(task.per_sample_loss(theta, x, y).mean()), rel_tol=1e-12
        )

    metrics = pd.read_csv(path / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == [0, 1] and metrics["step"].tolist() == [8, 16]
    assert (
        ((metrics[["train_acc", "val_acc"]] >= 0) & (metrics[["train_acc", "val_acc"]] <= 1))
        .all()
        .all()
    )
    theta_T, _ = load_checkpoint(path, T)
    val_loss, val_acc = task.evaluate(theta_T, task.x_val, task.y_val)
    assert math.isclose(metrics["val_loss"].iloc[-1], val_loss, rel_tol=1e-12)
    assert metrics["val_acc"].iloc[-1] == val_acc

    done = json.loads((path / artifacts.DONE).read_text())
    assert done["steps"] == T and done["resumed_from"] == 0
    labels = json.loads((path / "labels.json").read_text())
    assert labels["noisy_indices"] == [] and labels["true_labels"] == []
    leftovers = [p.name for p in path.rglob(".*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_second_call_reuses_and_force_redoes(tiny):
    cfg = compose(tiny())
    path = run_training(cfg)
    before = snapshot(path)
    assert run_training(compose(tiny())) == path
    assert snapshot(path) == before, "reusing a finished run rewrote some of its files"

    old = 1_000_000_000  # push every mtime far into the past, so a rewrite is visible
    for p in path.rglob("*"):
        os.utime(p, (old, old))
    (path / "stray.txt").write_text("left over from an old run")
    assert run_training(cfg, force=True) == path
    after = snapshot(path)
    assert "stray.txt" not in after, "--force kept an old file"
    assert set(after) == set(before)
    for name in [n for n in after if n.startswith("checkpoints/") or n in (TRAJECTORY, "DONE")]:
        assert after[name][1] > old * 10**9, f"{name} was not rewritten by force=True"
        if name.startswith("checkpoints/"):
            assert after[name][0] == before[name][0], f"{name}: retraining is not deterministic"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_run_directory_with_another_config_is_refused(tiny, force):
    cfg = compose(tiny())
    path = run_training(cfg)
    saved = json.loads((path / "config.json").read_text())
    saved["payload"]["optim"]["lr"] = 0.5
    (path / "config.json").write_text(json.dumps(saved))
    for p in path.rglob("*"):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    before = snapshot(path)
    with pytest.raises(ArtifactError) as info:
        run_training(cfg, force=force)
    msg = str(info.value)
    assert "\n" not in msg
    assert "optim.lr" in msg and "saved=0.5" in msg and "requested=0.1" in msg, msg
    assert snapshot(path) == before, "a refused call changed the run's files"


def test_unfinished_run_with_another_config_is_refused(tiny):
    """The check happens before resuming too, not only for finished runs."""
    cfg = compose(tiny())
    path = run_training(cfg)
    (path / artifacts.DONE).unlink()
    saved = json.loads((path / "config.json").read_text())
    saved["payload"]["train"]["batch_size"] = 16
    (path / "config.json").write_text(json.dumps(saved))
    before = snapshot(path)
    with pytest.raises(ArtifactError, match=r"train\.batch_size: saved=16 requested=32"):
        run_training(cfg)
    assert snapshot(path) == before


# --------------------------------------------------------------------------- interruption


class Kill:
    """Make ``train_step`` raise KeyboardInterrupt when it reaches step ``at``."""

    def __init__(self, monkeypatch, at: int):
        import dve_repro.train as train_mod

        self.at, self.real = at, train_mod.train_step
        monkeypatch.setattr(train_mod, "train_step", self)

    def __call__(self, task, params, state, t, *args, **kwargs):
        if t == self.at:
            raise KeyboardInterrupt
        return self.real(task, params, state, t, *args, **kwargs)


def reference_run(cfg, tmp_path):
    """The same run, uninterrupted, in another out_root (out_root is not in the fingerprint)."""
    ref_cfg = from_dict(to_dict(cfg))
    ref_cfg.runtime.out_root = str(tmp_path / "reference")
    return run_training(ref_cfg)


def assert_same_run(path, ref) -> None:
    assert list_checkpoints(path) == list_checkpoints(ref)
    for step in list_checkpoints(ref):
        a, b = load_checkpoint(path, step), load_checkpoint(ref, step)
        assert_same_tensors(a[0], b[0], f"θ_{step}")
        assert_same_tensors(a[1], b[1], f"optimizer state at {step}")
    pd.testing.assert_frame_equal(read_trajectory(path), read_trajectory(ref))
    pd.testing.assert_frame_equal(
        pd.read_csv(path / "metrics.csv"), pd.read_csv(ref / "metrics.csv")
    )


@pytest.mark.parametrize(
    "kill_at, resume_at, extra",
    [(5, 4, ()), (11, 10, ("optim=adamw", "optim.lr=0.01")), (9, 8, ("optim.momentum=0.9",))],
    ids=["sgd-epoch0", "adamw-epoch1", "momentum-epoch-boundary"],
)
def test_interrupted_run_resumes_bit_exact(tiny, tmp_path, monkeypatch, kill_at, resume_at, extra):
    cfg = compose(tiny("trajectory.checkpoint_every=2", *extra))
    with monkeypatch.context() as m:
        Kill(m, kill_at)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    path = train_dir(cfg)
    assert not (path / artifacts.DONE).exists()
    assert list_checkpoints(path) == list(range(0, resume_at + 1, 2))
    assert len(pd.read_parquet(path / TRAJECTORY)) == resume_at

    assert run_training(cfg) == path
    done = json.loads((path / artifacts.DONE).read_text())
    assert done["resumed_from"] == resume_at, "the rerun did not resume from the latest checkpoint"
    assert_same_run(path, reference_run(cfg, tmp_path))


@pytest.mark.parametrize("storage", ["float64", "float32"])
def test_interrupted_capture_resumes_from_the_done_mask(tiny, tmp_path, monkeypatch, storage):
    """A capturing run stopped at step 5: the done-mask marks the steps up to the last
    checkpoint (their rows are written before it is), and the rerun fills in the rest so that
    the gradients equal those of an uninterrupted run (the same floating-point operations)."""
    cfg = compose(tiny("trajectory.checkpoint_every=2", "trajectory.capture=true", f"embed.storage_dtype={storage}"))
    with monkeypatch.context() as m:
        Kill(m, 5)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    path = train_dir(cfg)
    assert np.load(path / "grads" / "done.npy").tolist() == [True] * 4 + [False] * 12
    assert run_training(cfg) == path
    assert json.loads((path / artifacts.DONE).read_text())["resumed_from"] == 4
    ref = reference_run(cfg, tmp_path)
    assert_same_run(path, ref)
    assert np.load(path / "grads" / "done.npy").all()
    got, want = np.load(path / "grads" / "G.npy"), np.load(ref / "grads" / "G.npy")
    assert got.dtype == np.dtype(storage) and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


def test_kill_between_checkpoint_and_trajectory_write(tiny, tmp_path, monkeypatch):
    """Killed after θ_8 and metrics.csv were written but before the trajectory was: the
    checkpoint of step 8 has no trajectory rows yet, so the rerun resumes from step 6 and
    must neither trust θ_8's file nor count epoch 0's metrics twice."""
    cfg = compose(tiny("trajectory.checkpoint_every=2"))
    real_save = artifacts.save_table

    def save_table(path, df):
        if str(path).endswith(TRAJECTORY) and len(df) == 8:
            raise KeyboardInterrupt
        real_save(path, df)

    with monkeypatch.context() as m:
        m.setattr(artifacts, "save_table", save_table)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    path = train_dir(cfg)
    assert 8 in list_checkpoints(path) and len(pd.read_parquet(path / TRAJECTORY)) == 6

    run_training(cfg)
    assert json.loads((path / artifacts.DONE).read_text())["resumed_from"] == 6
    assert_same_run(path, reference_run(cfg, tmp_path))
    assert pd.read_csv(path / "metrics.csv")["epoch"].tolist() == [0, 1]


# --------------------------------------------------------------------------- planning and optimizer pieces


def test_plan_batches_and_checkpoint_schedule():
    cfg = compose(["experiment=tiny_mlp", "train.batch_size=100", "train.epochs=3"])
    plan = plan_batches(256, cfg.train)
    assert [len(s.indices) for s in plan] == [100, 100, 56] * 3
    assert [s.step for s in plan] == list(range(9))
    again = plan_batches(256, cfg.train)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(plan, again, strict=True))
    assert not np.array_equal(plan[0].indices, plan[3].indices)  # a new shuffle every epoch
    cfg.train.order_seed = 1
    assert not np.array_equal(plan_batches(256, cfg.train)[0].indices, plan[0].indices)
    cfg.train.order_seed, cfg.train.drop_last = 0, True
    assert [len(s.indices) for s in plan_batches(256, cfg.train)] == [100, 100] * 3
    cfg.train.drop_last, cfg.train.max_steps = False, 5
    assert len(plan_batches(256, cfg.train)) == 5

    assert checkpoint_schedule(plan, cfg.trajectory) == [0, 3, 6, 9]  # each epoch start, and T
    cfg.trajectory.checkpoint_every = 4
    assert checkpoint_schedule(plan, cfg.trajectory) == [0, 4, 8, 9]
    cfg.trajectory.dense_until, cfg.trajectory.dense_every = 4, 1
    assert checkpoint_schedule(plan, cfg.trajectory) == [0, 1, 2, 3, 4, 8, 9]


def test_lr_schedules():
    cfg = compose(
        ["schedule=warmup_cosine", "schedule.warmup_steps=4", "schedule.min_lr_ratio=0.1"]
    )
    lrs = lr_schedule(cfg.schedule, 1.0, 20)
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert 0.1 <= lrs[-1] < 0.2
    cfg = compose([])
    assert lr_schedule(cfg.schedule, 0.3, 5) == [0.3] * 5


def test_global_norm_does_not_depend_on_dict_order():
    """A checkpoint lists tensors sorted by name, a live model in module order; the clipped
    update (AdamW, grad_clip) must not change with that order, or replay is not bit-exact."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        grads = {
            f"p{i}": torch.randn(
                int(torch.randint(1, 50, (1,), generator=gen)), generator=gen, dtype=torch.float64
            )
            * 10.0 ** int(torch.randint(-3, 4, (1,), generator=gen))
            for i in range(6)
        }
        reordered = dict(reversed(list(grads.items())))
        assert torch.equal(global_norm(grads), global_norm(reordered))
        expected = torch.linalg.vector_norm(torch.cat(list(grads.values())))
        assert torch.isclose(global_norm(grads), expected, rtol=1e-13, atol=0)


def test_bad_data_fails_in_one_line_and_leaves_no_run_directory(tiny):
    cfg = compose(tiny("data.n_train=4900"))  # 4900 + 64 + 64 > the 5,000 embedded digits
    with pytest.raises(DveError) as info:
        run_training(cfg)
    assert "\n" not in str(info.value) and "5000" in str(info.value)
    assert not train_dir(cfg).exists()

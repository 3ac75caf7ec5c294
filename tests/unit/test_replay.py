"""Replay of recorded runs (SPEC §1, §5): bit-exact reproduction and exact leave-one-out steps.

Every test trains a seconds-long run (the ``tiny_mlp`` experiment), loads it back with
``TrainedRun.load`` and re-executes it with ``replay``; comparisons are exact (``torch.equal``) unless a point is
removed, where the update of the removal step is checked against autograd in float64.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from dve_repro import artifacts
from dve_repro.config import compose
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun, replay
from dve_repro.train import run_training
from dve_repro.trajectory import TRAJECTORY, ckpt_path

# Relative tolerance of the removal identity in float64: the two sides differ only by
# rounding in the batch sums and in θ - η·g (measured ~1e-14).
REMOVAL_RTOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train_tiny(root, *extra: str) -> TrainedRun:
    """A seconds-long float64 run (the ``tiny`` overrides of conftest) and its loaded view."""
    torch.set_num_threads(1)
    overrides = [
        "experiment=tiny_mlp",
        f"runtime.out_root={root}",
        "runtime.progress=false",
        *extra,
    ]
    return TrainedRun.load(run_training(compose(overrides)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> TrainedRun:
    """float64, plain SGD, T = 16 steps of 32 points, checkpoints every 3 steps (0, 3, …, 15, 16)."""
    return train_tiny(tmp_path_factory.mktemp("base"), "trajectory.checkpoint_every=3")


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b), f"{what}: different tensor names {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k} dtype {a[k].dtype} vs {b[k].dtype}"
        assert torch.equal(a[k], b[k]), (
            f"{what}: {k} differs, max |Δ| = {(a[k] - b[k]).abs().max().item():.3e}"
        )


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return num / den


def collect(run: TrainedRun, **kw) -> tuple[dict[int, dict], dict]:
    """θ_s before every replayed step s, plus the final (θ_stop, state)."""
    seen: dict[int, dict] = {}

    def before(t: int, params: dict) -> None:
        seen[t] = {k: v.clone() for k, v in params.items()}

    final = replay(run, before_step=before, **kw)
    return seen, final


# --------------------------------------------------------------------------- bit-exact replay


@pytest.mark.parametrize(
    "extra",
    [
        ("train.dtype=float32",),
        ("optim.momentum=0.9",),
        ("optim=adamw", "optim.lr=0.01"),
        ("optim=adamw", "optim.lr=0.01", "train.dtype=float32"),
        (),  # float64 plain SGD: the shared base run
    ],
    ids=["sgd-f32", "momentum-f64", "adamw-f64", "adamw-f32", "sgd-f64"],
)
def test_replay_without_removal_is_bit_exact(tmp_path, base_run, extra):
    run = train_tiny(tmp_path, "trajectory.checkpoint_every=3", *extra) if extra else base_run
    assert run.T == 16 and {0, 3, 9, 16} <= set(run.checkpoints)
    final_params, final_state = run.load_params(run.T)
    dtype = torch.float32 if "train.dtype=float32" in extra else torch.float64
    assert all(v.dtype == dtype for v in final_params.values())
    if "optim=adamw" in extra or "optim.momentum=0.9" in extra:
        # The optimizer state must be in the checkpoints for a resumed replay to be exact.
        assert final_state and all(v.abs().sum() > 0 for v in run.load_params(3)[1].values())
    for start in (0, 3, 9):
        params, state = replay(run, start=start)
        assert_bit_equal(params, final_params, f"θ_T replayed from step {start}")
        assert_bit_equal(state, final_state, f"optimizer state at T replayed from step {start}")
    assert not torch.equal(params["net.0.weight"], run.load_params(0)[0]["net.0.weight"])


def test_replay_uses_the_thread_count_of_training(tmp_path):
    """Reductions split by thread count; a replay in a process with another count (a speed-only
    setting) must still be bit-exact. This width and batch differ at 1 vs 2 threads."""
    run = train_tiny(tmp_path, "runtime.threads=2", "model.hidden=[256]", "train.batch_size=128")
    assert run.threads == 2
    torch.set_num_threads(1)
    params, _ = replay(run)
    assert torch.get_num_threads() == 1, "replay did not restore the caller's thread count"
    assert_bit_equal(params, run.final_params(), "θ_T replayed on 1 thread, trained on 2")


def test_replay_passes_every_intermediate_checkpoint(base_run):
    run = base_run
    seen, (last, _) = collect(run)
    seen[run.T] = last
    for step in run.checkpoints:
        assert_bit_equal(seen[step], run.load_params(step)[0], f"θ_{step}")


def test_replay_stop_returns_intermediate_params(base_run):
    run = base_run
    params, _ = replay(run, stop=6)
    assert_bit_equal(params, run.load_params(6)[0], "θ_6 from replay(stop=6)")
    with pytest.raises(DveError):
        replay(run, stop=run.T + 1)
    with pytest.raises(DveError):
        replay(run, start=6, stop=3)


# --------------------------------------------------------------------------- leaving a point out


def point_grad(run: TrainedRun, params: dict, index: int) -> dict[str, torch.Tensor]:
    """∇ℓ(θ, z_index) by plain autograd on one point."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    x, y = run.task.batch([index])
    loss = run.task.per_sample_loss(p, x, y).sum()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))


def mean_grad(run: TrainedRun, params: dict, indices) -> dict[str, torch.Tensor]:
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    x, y = run.task.batch(indices)
    loss = run.task.per_sample_loss(p, x, y).mean()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))


@pytest.fixture
def removal_setup(base_run):
    t = 5  # between the checkpoints of steps 3 and 6
    return base_run, t, int(base_run.traj.batches[t][7])


def test_removal_leaves_earlier_steps_alone_and_changes_later_ones(removal_setup):
    run, t, i = removal_setup
    orig, (orig_T, _) = collect(run, start=0)
    cf, (cf_T, _) = collect(run, start=0, removals={t: [i]})
    assert sorted(orig) == sorted(cf) == list(range(run.T))
    for s in range(t + 1):  # θ_0 … θ_t: the removal has not acted yet
        assert_bit_equal(cf[s], orig[s], f"θ_{s} with index {i} removed from step {t}")
    for s in range(t + 1, run.T):
        assert not torch.equal(cf[s]["net.0.weight"], orig[s]["net.0.weight"]), f"θ_{s} unchanged"
    assert not torch.equal(cf_T["net.2.weight"], orig_T["net.2.weight"])
    # The default start is the nearest checkpoint at or before t, with the same result.
    cf_T2, _ = replay(run, removals={t: [i]})
    assert_bit_equal(cf_T2, cf_T, "θ'_T from the nearest checkpoint")


def test_removal_subtracts_exactly_one_term(removal_setup):
    run, t, i = removal_setup
    theta_t, _ = replay(run, stop=t)
    full, _ = replay(run, stop=t + 1)
    removed, _ = replay(run, stop=t + 1, removals={t: [i]}, renormalize=False)
    lr, size = float(run.traj.lrs[t]), len(run.traj.batches[t])
    assert size == 32
    g = point_grad(run, theta_t, i)
    expected = {k: lr / size * g[k] for k in g}
    diff = {k: removed[k] - full[k] for k in full}
    assert rel_err(diff, expected) < REMOVAL_RTOL
    # The weights themselves: 1/|B| for the others, 0 for the removed point.
    w = run.traj.weights(t, [i], renormalize=False)
    pos = list(run.traj.batches[t]).index(i)
    assert w[pos] == 0 and torch.all(w[torch.arange(size) != pos] == 1.0 / size)


def test_removal_with_renormalize_averages_over_the_rest(removal_setup):
    run, t, i = removal_setup
    batch = [int(j) for j in run.traj.batches[t]]
    w = run.traj.weights(t, [i], renormalize=True)
    pos = batch.index(i)
    assert w[pos] == 0
    assert torch.all(w[torch.arange(len(batch)) != pos] == 1.0 / (len(batch) - 1))
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype), rtol=0, atol=1e-15)

    theta_t, _ = replay(run, stop=t)
    removed, _ = replay(run, stop=t + 1, removals={t: [i]}, renormalize=True)
    g = mean_grad(run, theta_t, [j for j in batch if j != i])
    lr = float(run.traj.lrs[t])
    expected = {k: theta_t[k] - lr * g[k] for k in g}
    step = {k: removed[k] - theta_t[k] for k in g}
    assert rel_err(step, {k: expected[k] - theta_t[k] for k in g}) < REMOVAL_RTOL
    kept, _ = replay(run, stop=t + 1, removals={t: [i]}, renormalize=False)
    assert not torch.equal(kept["net.0.weight"], removed["net.0.weight"])


def test_removal_errors(removal_setup):
    run, t, i = removal_setup
    absent = next(j for j in range(run.task.n_train) if j not in set(run.traj.batches[t].tolist()))
    with pytest.raises(DveError, match="not in the batch"):
        replay(run, removals={t: [absent]})
    with pytest.raises(DveError, match="cannot remove"):
        replay(run, removals={t: [i]}, start=6)
    with pytest.raises(DveError):
        replay(run, removals={run.T: [i]})
    with pytest.raises(DveError):
        replay(run, start=5)  # no checkpoint at step 5


# --------------------------------------------------------------------------- corrupt run directories


def snapshot(path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _truncate_checkpoint(path):
    ck = ckpt_path(path, 16)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])


def _truncate_middle_checkpoint(path):
    ck = ckpt_path(path, 9)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])


def _drop_trajectory(path):
    (path / TRAJECTORY).unlink()


def _garble_trajectory(path):
    data = (path / TRAJECTORY).read_bytes()
    (path / TRAJECTORY).write_bytes(data[: len(data) // 3])


def _drop_last_rows(n):
    def corrupt(path):
        frame = pd.read_parquet(path / TRAJECTORY)
        artifacts.save_table(path / TRAJECTORY, frame.iloc[:-n])

    return corrupt


def _drop_done(path):
    (path / artifacts.DONE).unlink()


def _drop_final_checkpoint(path):
    ckpt_path(path, 16).unlink()


def _garble_config(path):
    (path / "config.json").write_text("{not json")


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate_checkpoint,
        _truncate_middle_checkpoint,
        _drop_trajectory,
        _garble_trajectory,
        _drop_last_rows(1),
        _drop_last_rows(3),
        _drop_done,
        _drop_final_checkpoint,
        _garble_config,
    ],
    ids=[
        "truncated-final-ckpt",
        "truncated-mid-ckpt",
        "no-trajectory",
        "garbled-trajectory",
        "trajectory-1-row-short",
        "trajectory-3-rows-short",
        "no-DONE",
        "no-final-ckpt",
        "garbled-config",
    ],
)
def test_corrupt_run_directory_is_refused_in_one_line(tmp_path, base_run, corrupt):
    path = tmp_path / "run"
    shutil.copytree(base_run.path, path)
    TrainedRun.load(path)  # the intact copy loads
    corrupt(path)
    before = snapshot(path)
    with pytest.raises(DveError) as info:
        TrainedRun.load(path)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert snapshot(path) == before, "loading a corrupt run changed its files"

"""Online data selection (select.py, E5): schedules select at exactly their steps, a
selecting step trains on exactly the chosen candidates (scores checked against an independent
computation), a selected run replays and resumes bit for bit, the selector prefers clean
points on a planted problem, bad input is refused before training, the experiment composes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dve_repro import artifacts
from dve_repro.config import compose
from dve_repro.errors import ConfigError
from dve_repro.select import (
    SELECTION,
    check_windows,
    draw_pool,
    selecting_steps,
    selection_split,
    windows,
)
from dve_repro.train import CURVE, run_training, train_dir
from dve_repro.trajectory import (
    TRAJECTORY,
    Trajectory,
    list_checkpoints,
    load_checkpoint,
    plan_batches,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from rel_helpers import invoke, one_error_line

SEL = ("select.windows=fractions", "select.early_end=0.25", "select.late_start=0.75", "select.n_split=32",
       "select.val_batch=8", "projection=none", "trajectory.checkpoint_every=1", "train.eval_every=4")


def _selection(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / SELECTION)


# --------------------------------------------------------------------------- schedules


def test_each_schedule_selects_at_exactly_its_steps():
    sel = compose(["experiment=pythia_tiny_selection"]).select
    T, warm = 200, 7
    steps = {s: np.flatnonzero(selecting_steps(sel, s, warm, T)).tolist() for s in
             ("never", "always", "early_late", "early", "late")}
    assert steps["never"] == [] and steps["always"] == list(range(200))
    assert steps["early"] == list(range(7))  # the warm-up steps, as analyze phases labels them
    assert steps["late"] == list(range(180, 200))  # the last tenth
    assert steps["early_late"] == list(range(7)) + list(range(180, 200))
    frac = compose(["experiment=pythia_tiny_selection", "select.windows=fractions", "select.early_end=0.031",
                    "select.late_start=0.955"]).select
    assert windows(frac, warm, T) == (7, 191)  # ceil(6.2), floor(191)


def test_pool_is_the_usual_batch_then_distinct_others():
    usual = np.array([5, 3, 9])
    pool = draw_pool(usual, 20, 12, [0, 0, 4])
    assert pool[:3].tolist() == [5, 3, 9] and len(set(pool.tolist())) == 12 and pool.max() < 20
    assert np.array_equal(pool, draw_pool(usual, 20, 12, [0, 0, 4]))  # seeded: the same in every schedule
    assert not np.array_equal(pool, draw_pool(usual, 20, 12, [0, 0, 5]))


# --------------------------------------------------------------------------- a selected run


def _independent_scores(task, params, pool, xv, yv, lr):
    """η·⟨∇ℓ(z_i), ∇ mean_val ℓ⟩ from plain autograd, one candidate at a time (float64)."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    gv = torch.autograd.grad(task.per_sample_loss(p, xv, yv).mean(), list(p.values()))
    out = []
    for i in pool:
        x, y = task.batch(np.array([i]))
        gi = torch.autograd.grad(task.per_sample_loss(p, x, y).sum(), list(p.values()))
        out.append(lr * sum(float((a * b).sum()) for a, b in zip(gi, gv, strict=True)))
    return np.array(out)


def test_selecting_steps_train_on_exactly_the_chosen_candidates(tiny, one_thread):
    from dve_repro.tasks import build_task

    cfg = compose(tiny(*SEL, "select.schedule=early_late"))
    path = run_training(cfg)
    traj = Trajectory.load(path)
    plan = plan_batches(256, cfg.train)
    frame = _selection(path)
    T = len(traj)
    assert frame["step"].tolist() == np.flatnonzero(selecting_steps(cfg.select, "early_late", 0, T)).tolist()
    task = build_task(cfg)
    x_split, y_split = selection_split(task, cfg)
    for r in frame.itertuples():
        t, pool, chosen = r.step, np.asarray(r.pool), np.asarray(r.chosen)
        assert len(pool) == 4 * len(plan[t].indices) and np.array_equal(pool[: len(plan[t].indices)], plan[t].indices)
        assert np.array_equal(traj.batches[t], pool[chosen]), f"step {t} did not train on the chosen candidates"
        scores = np.asarray(r.scores)
        top = np.sort(np.argsort(-scores, kind="stable")[: len(chosen)])
        assert np.array_equal(top, chosen)
        params, _ = load_checkpoint(path, t)
        val = torch.from_numpy(np.array(r.val_batch))
        want = _independent_scores(task, params, pool, x_split[val], y_split[val], float(traj.lrs[t]))
        np.testing.assert_allclose(scores, want, rtol=1e-9, atol=1e-15)
    selected = set(frame["step"])
    for t in range(T):  # every other step trains on its usual batch
        if t not in selected:
            assert np.array_equal(traj.batches[t], plan[t].indices)
    curve = pd.read_csv(path / CURVE)
    assert curve["step"].tolist() == [0, 4, 8, 12, 16]


def test_selected_run_replays_bit_for_bit(tiny, one_thread):
    from dve_repro.replay import TrainedRun, replay

    cfg = compose(tiny(*SEL, "select.schedule=always", "optim=adamw", "optim.lr=0.01"))
    path = run_training(cfg)
    run = TrainedRun.load(path)
    params, state = replay(run)
    final, final_state = load_checkpoint(path, run.T)
    for k in final:
        assert torch.equal(params[k], final[k]), k
    for k in final_state:
        assert torch.equal(state[k], final_state[k]), k


def test_interrupted_selected_run_resumes_identically(tiny, tmp_path, monkeypatch, one_thread):
    import dve_repro.train as train_mod

    cfg = compose(tiny(*SEL, "select.schedule=always"))
    real = train_mod.train_step

    def kill(task, params, state, t, *args, **kwargs):
        if t == 9:
            raise KeyboardInterrupt
        return real(task, params, state, t, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "train_step", kill)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg)
    path = train_dir(cfg)
    assert len(_selection(path)) == 9 and not (path / artifacts.DONE).exists()
    run_training(cfg)
    assert json.loads((path / artifacts.DONE).read_text())["resumed_from"] == 9
    ref_cfg = compose(tiny(*SEL, "select.schedule=always"))
    ref_cfg.runtime.out_root = str(tmp_path / "reference")
    ref = run_training(ref_cfg)
    pd.testing.assert_frame_equal(_selection(path).drop(columns="seconds"), _selection(ref).drop(columns="seconds"))
    pd.testing.assert_frame_equal(pd.read_parquet(path / TRAJECTORY), pd.read_parquet(ref / TRAJECTORY))
    pd.testing.assert_frame_equal(pd.read_csv(path / CURVE), pd.read_csv(ref / CURVE))
    assert list_checkpoints(path) == list_checkpoints(ref)
    a, b = load_checkpoint(path, 16)[0], load_checkpoint(ref, 16)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_selector_prefers_real_text_on_a_planted_problem(score):
    """A pool of 64 training sequences of the tiny GPT-NeoX, every second one replaced by
    uniformly random token ids: the selector (at θ_0, with the experiment's projection)
    leaves the random ones out. (Label noise on a 10-class MLP is a much weaker contrast for
    this score: the mean validation gradient mostly rewards the classes it underfits.)"""
    from dve_repro.select import Selector, choose
    from dve_repro.tasks import build_task, initial_params

    cfg = compose(["experiment=pythia_tiny_selection", "select.schedule=always", f"select.score={score}",
                   "data.n_train=256"])
    task = build_task(cfg)
    selector = Selector(cfg, task, 32)
    pool = np.random.default_rng(0).choice(task.n_train, 64, replace=False)
    x = task.x_train[torch.from_numpy(pool)].long().clone()
    x[::2] = torch.from_numpy(np.random.default_rng(1).integers(0, 50_000, size=(32, x.shape[1])))
    task.x_train = task.y_train = torch.cat([task.x_train.long(), x])  # the pool: the appended rows
    planted = np.arange(task.n_train - 64, task.n_train)
    chosen = planted[choose(selector.scores(initial_params(task), planted, selector.val_batch(0), 1e-3), 32)]
    random_rows = planted[::2]
    share = np.isin(chosen, random_rows).mean()
    assert share <= 0.2, f"{share:.0%} of the chosen candidates are random tokens (pool: 50%)"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, needle", [
    (("select.schedule=always", "select.pool_factor=0.5"), "makes the pool smaller than the batch"),
    (("select.schedule=early",), "the early window holds no step"),  # constant schedule: no warm-up
    (("select.schedule=late", "select.windows=fractions", "select.late_start=1.0"), "select.late_start must be in [0, 1)"),
    (("select.schedule=early_late", "select.windows=fractions", "select.early_end=0.8",
      "select.late_start=0.5"), "reaches the late one"),
    (("select.schedule=always", "select.early_end=1.5"), "select.early_end must be in (0, 1]"),
    (("select.schedule=always", "select.n_split=1000"), "the selection split needs rows"),
    (("select.schedule=always", "select.pool_factor=9"), "larger than the training set"),
])
def test_bad_selection_is_refused_before_training(tiny, out_root, extra, needle):
    result = invoke("train", *tiny(*extra))
    one_error_line(result, needle)
    assert not Path(out_root).exists() or not any(Path(out_root).rglob("trajectory.parquet"))


def test_selection_split_overlapping_the_evaluation_split_is_refused(out_root):
    args = ["experiment=pythia_tiny_selection", f"runtime.out_root={out_root}", "runtime.progress=false",
            "select.schedule=always", "data.n_train=128", "train.max_steps=10"]
    one_error_line(invoke("train", *args, "select.split_start=10"), "overlaps the evaluation split")
    assert not Path(out_root).exists() or not any(Path(out_root).rglob("trajectory.parquet"))
    with pytest.raises(ConfigError, match=r"select\.pool_factor"):
        compose(["experiment=pythia_tiny_selection", "select.pool_factor=0.9"])


def test_lm_selection_split_is_disjoint_from_the_evaluation_split():
    from dve_repro.tasks import build_task

    cfg = compose(["experiment=pythia_tiny_selection", "data.n_train=64"])
    task = build_task(cfg)
    xs, _ = selection_split(task, cfg)
    assert xs.shape == (cfg.select.n_split, cfg.data.seq_len)
    stream = np.load(task.extra["heldout_stream"], mmap_mode="r")
    eval_end = cfg.data.n_val * cfg.data.seq_len
    first = np.asarray(xs[0, :8])
    # the split starts right after the first end-of-text token past the evaluation rows
    hits = [s for s in range(eval_end, eval_end + 50_000) if np.array_equal(stream[s:s + 8], first)]
    assert hits and hits[0] > eval_end and stream[hits[0] - 1] == task.extra["eot_id"]
    assert np.array_equal(np.asarray(task.x_val.cpu()), np.asarray(stream[:eval_end]).reshape(-1, cfg.data.seq_len))


def test_experiment_composes_with_windows_from_the_phases():
    cfg = compose(["experiment=pythia_tiny_selection"])
    T = cfg.data.n_train // cfg.train.batch_size
    early_end, late_start = windows(cfg.select, cfg.schedule.warmup_steps, T)
    assert early_end / T < 0.04, "the early window must be under 4% of the run"
    frac = (early_end + T - late_start) / T
    assert frac <= 0.2, "early+late must select at least 5x fewer steps than always"
    for s in cfg.select.schedules:
        check_windows(cfg.select, s, cfg.schedule.warmup_steps, T)
    assert cfg.train.eval_every > 0 and len(cfg.select.seeds) >= 3


def test_selected_run_embeds_and_scores_like_any_other(tiny, one_thread):
    """dve embed replays a selected run (capture by replay) and gives its chosen points
    embeddings at exactly the steps that trained on them."""
    from dve_repro.embed_stage import resolve, run_embedding

    overrides = tiny(*SEL[:-3], "select.schedule=early_late", "projection.k_in=16", "projection.k_out=4")
    path = run_training(compose(overrides))
    cfg, run = resolve(path, overrides)
    out = run_embedding(cfg, run)
    scores = pd.read_parquet(out / "scores.parquet")
    traj = Trajectory.load(path)
    occ = traj.occurrences()
    assert len(scores) == len(occ)
    assert np.array_equal(scores["index"].to_numpy(), occ["index"].to_numpy())
    assert np.isfinite(scores["score"].to_numpy()).all()


def test_corrupt_sequences_replaces_exactly_the_recorded_rows():
    from dve_repro.lm import corrupt_sequences

    train = torch.arange(40 * 8).reshape(40, 8) % 1000
    out, idx = corrupt_sequences(train, 0.25, 3, 50_304)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    same = (out == train).all(dim=1).numpy()
    assert not same[idx].any() and same[np.setdiff1d(np.arange(40), idx)].all()
    assert int(out.max()) < 50_304
    again, idx2 = corrupt_sequences(train, 0.25, 3, 50_304)
    assert np.array_equal(idx, idx2) and torch.equal(out, again)
    assert compose(["experiment=pythia_tiny_selection_noisy"]).data.corrupt_fraction == 0.5
    with pytest.raises(ConfigError, match=r"data\.corrupt_fraction"):
        compose(["experiment=pythia_tiny_selection", "data.corrupt_fraction=1.0"])


def _runs(losses: dict[str, list[float]], cand: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame([{"schedule": s, "seed": k, "final_val_loss": v, "selecting_steps": cand[s] // 32,
                          "candidate_grads": cand[s]}
                         for s, vals in losses.items() for k, v in enumerate(vals)])


def test_gain_fractions_and_verdicts_follow_their_written_rules():
    from dve_repro.select_report import summary_table, verdicts

    cand = {"never": 0, "always": 6400, "early_late": 896, "early": 224}
    runs = _runs({"never": [5.0, 5.1, 4.9], "always": [4.8, 4.9, 4.7], "early_late": [4.82, 4.92, 4.72],
                  "early": [4.9, 5.0, 4.8]}, cand)
    t = summary_table(runs).set_index("schedule")
    assert t.loc["always", "gain_fraction"] == pytest.approx(1.0)
    assert t.loc["early_late", "gain_fraction"] == pytest.approx(0.18 / 0.2)
    assert t.loc["early", "gain_fraction"] == pytest.approx(0.5)
    assert t.loc["early_late", "cost_fraction"] == pytest.approx(896 / 6400)
    v = verdicts(summary_table(runs), 3)
    assert v["early_late"].startswith("holds") and v["early"].startswith("holds")
    worse = _runs({"never": [5.0, 5.1, 4.9], "always": [4.8, 4.9, 4.7], "early_late": [4.95, 5.05, 4.85],
                   "early": [4.99, 5.09, 4.89]}, cand)
    v = verdicts(summary_table(worse), 3)
    assert v["early_late"].startswith("does not hold") and v["early"].startswith("does not hold")
    hurts = _runs({"never": [5.0, 5.1, 4.9], "always": [5.1, 5.15, 4.95], "early_late": [4.99, 5.09, 4.89],
                   "early": [4.99, 5.09, 4.89]}, cand)
    v = verdicts(summary_table(hurts), 3)
    assert v["early_late"].startswith("not tested") and "early_late itself gains +0.0100" in v["early_late"]
    one = verdicts(summary_table(runs[runs.seed == 0]), 1)
    assert one["early"].startswith("not tested: one seed") and "0.50 of always'" in one["early"]

"""Several processes under torchrun (distributed.py) equal one process.

The 2-rank tests launch ``python -m torch.distributed.run --nproc-per-node 2 -m dve_repro``
(gloo on the CPU) on the tiny models, as a user would, and hold what they write against a
one-process run of the same config in float64:

* training: the trajectory is the same data; θ_t and the captured rows differ only by the
  all-reduce's summation order (measured on tiny_mlp: ≤ 5.6e-17 on θ, ≤ 4.4e-16 on rows of
  size ~1.5);
* embedding the same rows: Algorithm 1's M blocks split over ranks and Algorithm 2's
  segments over ranks give E equal to one process's (measured on tiny_mlp: 0.0, bit for
  bit; held to 1e-12 relative, as BLAS may round a narrower column slice differently);
* replay on one process of the 2-rank run reaches its θ_T up to the same rounding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dve_repro import distributed, embedding
from dve_repro.cli import app
from dve_repro.config import compose
from dve_repro.embed_stage import embed_dir, resolve, run_embedding
from dve_repro.replay import TrainedRun, replay
from dve_repro.train import run_training, train_dir
from dve_repro.trajectory import load_checkpoint


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("n,world", [(32, 2), (33, 2), (7, 3), (2, 2), (5, 4)])
def test_batch_slices_partition_the_batch_in_order(n, world):
    parts = [distributed.Context(r, world).batch_slice(n) for r in range(world)]
    assert np.concatenate([np.arange(n)[p] for p in parts]).tolist() == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_split_contiguous_balances_cost_and_covers_every_item():
    costs = [100, 1, 1, 1, 100, 1]
    parts = distributed.split_contiguous(costs, 2)
    assert parts[0][0] == 0 and parts[-1][1] == len(costs) and parts[0][1] == parts[1][0]
    assert parts == [(0, 3), (3, 6)]  # 102 | 102
    assert distributed.split_contiguous([10, 10, 10, 1, 1, 1, 1], 2) == [(0, 2), (2, 7)]  # 20 | 14, not 30 | 4
    assert distributed.split_contiguous([1, 1, 1, 1, 10, 10, 10], 2) == [(0, 5), (5, 7)]  # 14 | 20
    assert sorted(b - a for a, b in distributed.split_contiguous([5], 3)) == [0, 0, 1]
    assert sum(b - a for a, b in distributed.split_contiguous(list(range(1, 11)), 4)) == 10


def test_column_parts_of_block_diagonal_algorithm1_equal_the_whole():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((40, 9))
    offsets, w = [0, 10, 20, 30, 40], np.array([0.1, 0.2, 0.1, 0.3])
    blocks = [slice(0, 2), slice(2, 6), slice(6, 9)]
    whole, _ = embedding.algorithm1(G, offsets, w, blocks=blocks)
    out = np.zeros_like(G)
    for first, last in [(0, 2), (2, 3)]:
        cols, mine = embedding.column_part(blocks, 9, first, last)
        embedding.algorithm1(G[:, cols], offsets, w, blocks=mine, out=out[:, cols])
    # the same products on a narrower row stride: BLAS may round the last bit otherwise
    # (measured 2.2e-16 on values ~0.1 here; 0.0 on the tiny MLP's rows)
    np.testing.assert_allclose(out, whole.numpy(), rtol=1e-12, atol=1e-15)


def test_segments_computed_apart_then_combined_equal_algorithm2():
    rng = np.random.default_rng(1)
    G = rng.standard_normal((48, 6))
    offsets, w, bounds = list(range(0, 49, 8)), np.full(6, 0.05), [0, 2, 4, 6]
    ref = embedding.algorithm2(G, offsets, w, bounds, queries={3: np.ones(6)})
    out = np.zeros_like(G)
    local = {**embedding.segment_recursions(G, offsets, w, bounds, [0, 1], out=out),
             **embedding.segment_recursions(G, offsets, w, bounds, [2], out=out)}
    res = embedding.algorithm2(G, offsets, w, bounds, out=out, local=local, queries={3: np.ones(6)})
    np.testing.assert_allclose(out, ref.embeddings.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.dynamics.numpy(), ref.dynamics.numpy(), rtol=1e-12, atol=1e-15)
    assert np.isnan(res.dynamics.numpy()).sum() == np.isnan(ref.dynamics.numpy()).sum()


def test_other_commands_refuse_torchrun_in_one_line(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["compare-tsloo", *tiny()])
    assert res.exit_code == 2 and "runs on one process" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- 2 ranks
def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVE_QUIET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "dve_repro", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _check_against_one_process(base: list[str], tmp_path: Path, embeds: list[list[str]], theta_tol: float,
                               row_tol: float) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(["train", *base, f"runtime.out_root={two}"], tmp_path)
    cfg1, cfg2 = compose([*base, f"runtime.out_root={one}"]), compose([*base, f"runtime.out_root={two}"])
    d1, d2 = run_training(cfg1), train_dir(cfg2)
    assert (d2 / "DONE").is_file()
    t1, t2 = TrainedRun.load(d1), TrainedRun.load(d2)
    assert [b.tolist() for b in t1.traj.batches] == [b.tolist() for b in t2.traj.batches]
    assert t1.checkpoints == t2.checkpoints
    for step in t1.checkpoints:
        assert _max_diff(load_checkpoint(d1, step)[0], load_checkpoint(d2, step)[0]) <= theta_tol
    G1, G2 = np.load(d1 / "grads" / "G.npy"), np.load(d2 / "grads" / "G.npy")
    assert np.abs(G1).max() > 0.01 and np.abs(G1 - G2).max() <= row_tol
    # one process replays the 2-rank run to its θ_T up to the all-reduce's rounding
    replayed, _ = replay(t2)
    assert _max_diff(replayed, t2.final_params()) <= theta_tol
    # the embedding split over ranks equals one process's on the same (2-rank) rows
    same = tmp_path / "same"
    shutil.copytree(two, same)
    for extra in embeds:
        _torchrun(["embed", *base, *extra, f"runtime.out_root={two}"], tmp_path)
        cfg_same, run_same = resolve(None, [*base, *extra, f"runtime.out_root={same}"])
        e_one = run_embedding(cfg_same, run_same)
        e_two = embed_dir(compose([*base, *extra, f"runtime.out_root={two}"]))
        np.testing.assert_allclose(np.load(e_two / "E.npy"), np.load(e_one / "E.npy"), rtol=1e-12, atol=1e-18)
        if (e_one / "dynamics.npy").is_file():
            np.testing.assert_allclose(np.load(e_two / "dynamics.npy"), np.load(e_one / "dynamics.npy"),
                                       rtol=1e-12, atol=1e-18)


def test_two_ranks_capture_and_embed_the_tiny_mlp_as_one_process(tiny, tmp_path, one_thread):
    base = tiny("trajectory.capture=true", "train.dtype=float64", "embed.blocks=layer", "data.n_train=128",
                "train.batch_size=16", "trajectory.checkpoint_every=4")
    _check_against_one_process(base, tmp_path, [[], ["embed.algorithm=2", "embed.segments=2"]],
                               theta_tol=1e-15, row_tol=1e-14)


@pytest.mark.slow  # two tiny GPT-NeoX ranks plus one process: ~2 min on two cores
def test_two_ranks_capture_and_embed_the_tiny_lm_as_one_process(tmp_path, one_thread):
    base = ["experiment=pythia_tiny", "runtime.progress=false", "train.dtype=float64", "data.n_train=64",
            "data.n_val=4", "data.seq_len=16", "train.batch_size=8", "trajectory.checkpoint_every=4",
            "trajectory.dense_until=0", "schedule.warmup_steps=2",
            "embed.storage_dtype=float64"]  # float32 rows would round the ranks' last-bit differences apart
    _check_against_one_process(base, tmp_path, [[], ["embed.algorithm=2", "embed.segments=2"]],
                               theta_tol=1e-12, row_tol=1e-12)

"""Device and dtype placement without a GPU: Algorithms 1/2 in float32 and float64 on the
device they are given, Algorithm 2 refusing CPU workers for another device, the replay
refusing a device other than training's, LM batches gathered from a memory map onto the
model's device, and the background row writer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dve_repro import embedding
from dve_repro.capture import AsyncRowWriter, GradientStore
from dve_repro.config import compose
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun, replay
from dve_repro.train import run_training

F32_RTOL = 1e-4  # float32 Algorithm 1 vs float64 on the same small problem


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    return G, [0, 3, 6, 9, 12], torch.tensor([0.1, 0.2, 0.15, 0.05], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_algorithm1_runs_in_the_dtype_and_on_the_device_asked(dtype):
    G, offs, w = _problem()
    E, M = embedding.algorithm1(
        G, offs, w, dtype=dtype, device="cpu", blocks=[slice(0, 2), slice(2, 6)]
    )
    assert E.dtype == dtype and all(m.dtype == dtype and m.device.type == "cpu" for m in M)
    ref = embedding.explicit_embeddings(G, offs, w, blocks=[slice(0, 2), slice(2, 6)])
    torch.testing.assert_close(
        E.double(), ref, rtol=F32_RTOL if dtype == torch.float32 else 1e-12, atol=1e-7
    )


def test_algorithm2_float32_equals_algorithm1_and_returns_dynamics_on_the_cpu():
    G, offs, w = _problem(1)
    E1, _ = embedding.algorithm1(G, offs, w, dtype=torch.float32)
    res = embedding.algorithm2(
        G,
        offs,
        w,
        [0, 2, 4],
        dtype=torch.float32,
        device="cpu",
        queries={1: torch.ones(6, dtype=torch.float64), 2: torch.ones(6)},
    )
    torch.testing.assert_close(res.embeddings, E1, rtol=F32_RTOL, atol=1e-7)
    assert res.dynamics.device.type == "cpu" and res.dynamics.dtype == torch.float32


def test_algorithm2_refuses_cpu_workers_for_another_device():
    G, offs, w = _problem()
    with pytest.raises(DveError, match=r"embed.workers=1 runs segments in CPU processes"):
        embedding.algorithm2(G, offs, w, [0, 2, 4], workers=1, device="meta")


def test_memmap_rows_are_written_from_device_tensors(tmp_path):
    G, offs, w = _problem()
    out = np.lib.format.open_memmap(
        tmp_path / "E.npy", mode="w+", dtype=np.float32, shape=tuple(G.shape)
    )
    embedding.algorithm1(G, offs, w, out=out, dtype=torch.float32, device="cpu")
    ref, _ = embedding.algorithm1(G, offs, w)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=F32_RTOL, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TrainedRun:
    root = tmp_path_factory.mktemp("tiny")
    return TrainedRun.load(
        run_training(
            compose(["experiment=tiny_mlp", f"runtime.out_root={root}", "runtime.progress=false"])
        )
    )


def test_replay_refuses_a_device_other_than_trainings(tiny_run):
    assert tiny_run.train_device == "cpu"
    elsewhere = dataclasses.replace(tiny_run, train_device="cuda")
    with pytest.raises(
        DveError, match=r"trained on cuda but would be replayed on cpu.*runtime.inexact_replay=true"
    ):
        replay(elsewhere, stop=1)
    allowed = dataclasses.replace(elsewhere, inexact_replay=True)
    params, _ = replay(allowed, stop=1)
    assert all(torch.isfinite(v).all() for v in params.values())


def test_lm_batches_come_from_the_memory_map_as_int64_on_the_model_device(tmp_path):
    from dve_repro.tasks import Task

    np.save(tmp_path / "t.npy", np.arange(64, dtype=np.uint16))
    stream = np.load(tmp_path / "t.npy", mmap_mode="r")
    from dve_repro.text import pack

    rows = pack(stream, 8, 0, "n_train", mapped=True)
    assert rows.dtype == torch.uint16 and rows.shape == (8, 8)
    model = torch.nn.Linear(2, 2)
    task = Task("lm", model, rows, rows, rows[:1].long(), rows[:1].long(), 64, "memmap check")
    x, y = task.batch(np.array([3, 1]))
    assert (
        x.dtype == torch.long
        and x.device == task.device
        and torch.equal(x[0], torch.arange(24, 32))
    )
    assert y is x


def test_async_writer_commits_only_written_rows_and_raises_its_errors(tmp_path):
    store = GradientStore(tmp_path / "g", np.array([0, 2, 4]), 3, {"projection": {}}, 0, "float32")
    writer = AsyncRowWriter(store, depth=1)
    writer.write(0, torch.ones(2, 3))
    writer.write(1, torch.full((2, 3), 2.0))
    writer.commit([0, 1])
    assert store.complete and np.array_equal(
        np.asarray(store.G)[2:], np.full((2, 3), 2.0, np.float32)
    )
    writer.write(
        5, torch.ones(2, 3)
    )  # a step outside the store: the thread's error comes back here
    with pytest.raises(IndexError):
        writer.flush()
    writer.close()

"""The 410M experiment's pipeline on CUDA, shrunk in width and depth (same code path and config
keys as ``experiment=pythia410m_pile1pct``): train with capture → embed → score on CUDA,
every stage's tensors on the GPU, and the CUDA embeddings equal to the CPU ones to float
tolerance (each device trains its own run: replay across devices is refused). Skipped
without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dve_repro.cli import app
from dve_repro.embed_stage import resolve
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun, replay

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# float32 training and Algorithm 1 on both devices over 8 steps; cuBLAS and the CPU sum in
# other orders, so the two runs part in the last float32 bits and drift a little per step.
DEVICE_RTOL = 2e-3


SHRUNK = [
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.intermediate_size=256",
    "model.max_position_embeddings=64",
    "model.expected_parameters=0",
]


def _ov(root, device: str) -> list[str]:
    """The shrunk 410M overrides of tests/smoke/test_cli_pythia410m_layout.py, on ``device``."""
    pile = root / "pile"
    pile.mkdir()
    docs = [
        f"Record {i}: the river carried {i % 13} boats past the mill before noon on day {i}."
        for i in range(300)
    ]
    (pile / "00.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [
        "experiment=pythia410m_pile1pct",
        *SHRUNK,
        f"data.path={pile}",
        "data.fraction=1.0",
        "data.seq_len=16",
        "data.n_train=32",
        "data.n_val=2",
        f"data.cache_dir={root / 'tokens'}",
        "train.batch_size=4",
        "train.dtype=float32",
        "schedule.warmup_steps=2",
        "trajectory.checkpoint_every=4",
        "trajectory.dense_until=0",
        f"runtime.out_root={root / 'runs'}",
        "runtime.progress=false",
        f"runtime.device={device}",
    ]


def _invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for device in ("cpu", "cuda"):
        ov = _ov(tmp_path_factory.mktemp(device), device)
        train = _invoke("train", *ov)
        embed = _invoke("embed", *ov)
        out[device] = (ov, train, embed)
    return out


def test_cuda_run_records_its_device_and_places_every_stage_on_it(runs):
    ov, train, embed = runs["cuda"]
    assert json.loads(Path(train, "env.json").read_text())["device"] == "cuda"
    _, run = resolve(None, ov)
    assert run.device == "cuda" and run.task.device.type == "cuda"
    x, _ = run.task.batch(np.arange(4))
    assert x.device.type == "cuda" and x.dtype == torch.long
    assert run.task.x_val.device.type == "cuda"
    assert all(v.device.type == "cuda" for v in run.final_params().values())
    score = _invoke("score", embed, "--split", "val")
    np.testing.assert_allclose(
        pd.read_parquet(score)["score"],
        pd.read_parquet(f"{embed}/scores.parquet")["score"],
        rtol=1e-4,
        atol=1e-9,
    )


def test_cuda_and_cpu_embeddings_agree(runs):
    E = {d: np.load(f"{runs[d][2]}/E.npy").astype(np.float64) for d in runs}
    scale = np.abs(E["cpu"]).max()
    assert scale > 0
    assert np.abs(E["cuda"] - E["cpu"]).max() <= DEVICE_RTOL * scale
    s = {d: pd.read_parquet(f"{runs[d][2]}/scores.parquet")["score"].to_numpy() for d in runs}
    assert np.corrcoef(s["cpu"], s["cuda"])[0, 1] > 0.999


def test_replay_of_a_cpu_run_on_cuda_is_refused_unless_asked(runs):
    _, train, _ = runs["cpu"]
    run = TrainedRun.load(train, "cuda")
    with pytest.raises(DveError, match="trained on cpu but would be replayed on cuda"):
        replay(run, stop=1)
    run = TrainedRun.load(train, "cuda", inexact_replay=True)
    params, _ = replay(run, stop=1)
    assert all(v.device.type == "cuda" for v in params.values())


def test_compare_on_cuda(runs, tmp_path):
    """`dve compare-tsloo` on the CUDA run (a few points): ground truth and estimates on CUDA."""
    ov, _, _ = runs["cuda"]
    r = CliRunner().invoke(
        app,
        [
            "compare-tsloo",
            *ov,
            "tsloo.n_points=4",
            "baselines.bootstrap=10",
            f"--results={tmp_path / 'cmp'}",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)

"""The paper's 410M experiment on the CPU, shrunk: ``experiment=pythia410m_pile1pct`` (same
code path, same config keys: Pile-format shards, capture during training with the per-layer
Kronecker projection, one M per layer, float32 Algorithm 1) with the model narrowed to
2 layers × width 64. Train → embed → score → analyze phases through the Typer app, and the
budget figures the training check computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from dve_repro.cli import app
from dve_repro.config import compose
from dve_repro.tasks import build_task
from dve_repro.train import capture_budget_for

T = 8  # 32 sequences / batch 4
SHRUNK = [
    "model.hidden_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.intermediate_size=256",
    "model.max_position_embeddings=64",
    "model.expected_parameters=0",
]


def pile_folder(root: Path) -> Path:
    pile = root / "pile"
    pile.mkdir()
    docs = [
        f"Record {i}: the river carried {i % 13} boats past the mill before noon on day {i}."
        for i in range(300)
    ]
    (pile / "00.jsonl").write_text(
        "".join(json.dumps({"text": d, "meta": {"pile_set_name": "Pile-CC"}}) + "\n" for d in docs)
    )
    return pile


def overrides(tmp_path: Path) -> list[str]:
    return [
        "experiment=pythia410m_pile1pct",
        *SHRUNK,
        f"data.path={pile_folder(tmp_path)}",
        "data.fraction=1.0",
        "data.seq_len=16",
        "data.n_train=32",
        "data.n_val=2",
        f"data.cache_dir={tmp_path / 'tokens'}",
        "train.batch_size=4",
        "train.dtype=float32",
        "runtime.device=cpu",
        "schedule.warmup_steps=2",
        "trajectory.checkpoint_every=4",
        "trajectory.dense_until=0",
        f"runtime.out_root={tmp_path / 'runs'}",
        "runtime.progress=false",
    ]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def ok(result) -> Path:
    assert result.exit_code == 0, (result.output, result.exception)
    return Path(result.stdout.strip().splitlines()[-1])


def test_shrunk_410m_train_embed_score_phases(tmp_path):
    ov = overrides(tmp_path)
    cfg = compose(ov)
    assert (
        cfg.trajectory.capture
        and cfg.embed.blocks == "layer"
        and cfg.embed.compute_dtype == "float32"
    )
    train = ok(invoke("train", *ov))
    assert (train / "grads" / "G.npy").is_file()  # captured during training
    env = json.loads((train / "env.json").read_text())
    assert env["device"] == "cpu"

    embed = ok(invoke("embed", *ov))
    assert not list((tmp_path / "runs" / "pythia410m_pile1pct").glob("grads-*"))  # nothing replayed
    meta = json.loads((embed / "embedding.json").read_text())
    assert meta["p_tilde"] == 8 * 32 * 32  # 4 linears × 2 blocks, 32 × 32 each
    E = np.load(embed / "E.npy")
    assert E.shape == (T * 4, meta["p_tilde"]) and E.dtype == np.float32 and np.isfinite(E).all()
    scores = pd.read_parquet(embed / "scores.parquet")
    assert (
        len(scores) == T * 4
        and np.isfinite(scores["score"]).all()
        and scores["score"].abs().max() > 0
    )

    # dve score on the validation split reproduces the embedding's own scores
    out = ok(invoke("score", str(embed), "--split", "val"))
    again = pd.read_parquet(out)
    np.testing.assert_allclose(again["score"], scores["score"], rtol=1e-4, atol=1e-9)

    res = tmp_path / "results"
    r = invoke("analyze", "phases", *ov, "--results", str(res))
    assert r.exit_code == 0, (r.output, r.exception)
    table = pd.read_csv(res / "phases.csv")
    assert len(table) == T and np.isfinite(table["normalized"]).all()


def test_budget_figures_of_the_shrunk_model(tmp_path):
    cfg = compose(overrides(tmp_path))
    task = build_task(cfg, "cpu")
    b = capture_budget_for(cfg, task, n_rows=32)
    assert b["p_tilde"] == 8192 and b["m_blocks"] == 8
    assert b["m_bytes"] == 8 * 1024**2 * 4  # one float32 1,024 × 1,024 M per layer
    assert b["rows_disk"] == 32 * 8192 * 4
    # per step: batch × tokens × Σ (d_in + d_out) over the 8 linears, float32 factors
    widths = 2 * ((65 + 192) + (65 + 64) + (65 + 256) + (257 + 64))
    assert b["factor_bytes"] == 4 * 16 * widths * 4

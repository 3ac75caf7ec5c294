"""``dve bench gpu``: E2 on the real pipeline, the paper's Table 1 for ``experiment=pythia410m_pile1pct``.

Runs the commands a user runs, in order, and times each one (``dve bench gpu``):

1. ``dve train`` with capture for ``steps`` steps (the *store* step: forward, backward,
   projected factors, rows to the disk by the background writer);
2. ``dve embed`` (Algorithm 1 on the captured rows, per-layer M, on the run's device);
3. the LoGra-style alternative: every training point's projected gradient recomputed at θ_T;
4. ``dve score`` on the validation split (query throughput);
5. ``dve analyze phases`` on the short run (paper Fig. 1a).

Peak memory is ``torch.cuda.max_memory_allocated`` of each stage (reset before it); off a GPU
it is reported as n/a, never estimated. Writes ``<out>/gpu.{csv,md}`` and ``<out>/phases/``.
Run folders go to a scratch ``runtime.out_root`` under ``<out>/runs`` (ignored by git).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dve_repro import ui
from dve_repro.bench.harness import header, load_avg, table
from dve_repro.config import compose

# Paper Table 1 (Pythia-410M, 1% of the Pile, one A100, projection dimension 1024).
PAPER = {
    "store throughput": "667.5 points/s (LoGra: 41.6)",
    "peak GPU memory, store step": "not reported separately",
    "peak GPU memory, embedding step": "0.84 GB (LoGra: 63.6 GB)",
    "storage per point": "171 GB for the run (LoGra: 170 GB)",
    "query throughput": "640 points/s",
    "recompute at θ_T (LoGra-style)": "41.6 points/s",
}


def _peak(device: str) -> float:
    return float(torch.cuda.max_memory_allocated()) if device == "cuda" else float("nan")


def _stage(device: str, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak bytes, result) of ``fn`` with the device synchronised around it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, _peak(device), out


def _gb(x: float) -> str:
    return "n/a (not on a GPU)" if x != x else f"{x / 1e9:.2f} GB"


def bench_gpu(
    out_dir: Path, overrides: list[str], steps: int = 8, device: str = "cuda"
) -> pd.DataFrame:
    """Train ``steps`` steps with capture, embed, recompute at θ_T, score, phases; one row
    (the timed stages draw no progress bars)."""
    with ui.progress(False):
        return _bench_gpu(out_dir, overrides, steps, device)


def _bench_gpu(out_dir: Path, overrides: list[str], steps: int, device: str) -> pd.DataFrame:
    from dve_repro.analyze import run_phases
    from dve_repro.embed_stage import (
        make_featurizer,
        query_features,
        resolve,
        run_embedding,
        score_queries,
    )
    from dve_repro.replay import TrainedRun
    from dve_repro.train import run_training

    started, load_start = time.perf_counter(), load_avg()
    os.environ.setdefault(
        "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
    )  # deterministic cuBLAS (as the CLI sets)
    ov = [
        "experiment=pythia410m_pile1pct",
        f"runtime.device={device}",
        f"train.max_steps={steps}",
        f"trajectory.checkpoint_every={steps}",
        "trajectory.dense_until=0",
        "runtime.progress=false",
        f"schedule.warmup_steps={max(1, steps // 4)}",  # the run is `steps` long: warm-up scaled to it
        f"runtime.out_root={out_dir / 'runs'}",
        *overrides,
    ]
    cfg = compose(ov)
    row: dict[str, Any] = {
        "device": device,
        "steps": steps,
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "dtype": cfg.train.dtype,
        "model": f"{cfg.model.preset} ({cfg.model.num_hidden_layers} × {cfg.model.hidden_size})",
    }
    if device == "cuda":
        row["gpu"] = torch.cuda.get_device_name(0)

    s, peak, train_path = _stage(device, lambda: run_training(cfg, force=True))
    points = steps * cfg.train.batch_size
    row.update(store_s=s, store_pts_per_s=points / s, store_peak_bytes=peak)

    ecfg, run = resolve(None, ov)
    s, peak, embed_path = _stage(device, lambda: run_embedding(ecfg, run, force=True))
    g_bytes = os.path.getsize(Path(train_path) / "grads" / "G.npy")
    row.update(
        embed_s=s,
        embed_pts_per_s=points / s,
        embed_peak_bytes=peak,
        storage_bytes_per_point=g_bytes / points,
    )

    run = TrainedRun.load(train_path, device)
    feat = make_featurizer(ecfg, run)
    final = run.final_params()
    idx = np.arange(points)

    def recompute() -> None:
        for a in range(0, points, cfg.train.batch_size):
            x, y = run.task.batch(idx[a : a + cfg.train.batch_size])
            query_features(feat, final, x, y)

    s, peak, _ = _stage(device, recompute)
    row.update(recompute_s=s, recompute_pts_per_s=points / s, recompute_peak_bytes=peak)

    n_val = int(run.task.x_val.shape[0])
    s, peak, _ = _stage(device, lambda: score_queries(Path(embed_path), [], "val", None))
    row.update(query_s=s, query_pts_per_s=n_val / s, query_peak_bytes=peak)

    phases = run_phases(ecfg, ov, results=out_dir / "phases")
    row["phases"] = str(phases)
    df = pd.DataFrame([row])
    _write(out_dir, df, row, ov, started, load_start)
    return df


def _write(
    out_dir: Path, df: pd.DataFrame, row: dict, ov: list[str], started: float, load_start: str
) -> None:
    ours = {
        "store throughput": f"{row['store_pts_per_s']:.1f} points/s (`dve train` with capture, {row['steps']} steps)",
        "peak GPU memory, store step": _gb(row["store_peak_bytes"]),
        "peak GPU memory, embedding step": _gb(row["embed_peak_bytes"])
        + " (`dve embed`, Algorithm 1, per-layer M)",
        "storage per point": f"{row['storage_bytes_per_point'] / 1e3:.1f} kB/point",
        "query throughput": f"{row['query_pts_per_s']:.1f} points/s (`dve score --split val`)",
        "recompute at θ_T (LoGra-style)": f"{row['recompute_pts_per_s']:.1f} points/s, peak "
        f"{_gb(row['recompute_peak_bytes'])}",
    }
    paper = pd.DataFrame(
        {"metric": list(PAPER), "paper": list(PAPER.values()), "ours": [ours[k] for k in PAPER]}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "gpu.csv", index=False)
    head = header(
        "dve bench gpu " + " ".join(ov[1:]), torch.get_num_threads(), started, load_start
    )
    where = row.get("gpu", row["device"])
    text = (
        f"# Pythia-410M efficiency on the real pipeline (paper Table 1)\n\n{head}\n\n"
        f"Measured on {where}: {row['model']}, batch {row['batch']} × {row['seq_len']} tokens, "
        f"{row['dtype']}; phases figure: `{row['phases']}`.\n\n{table(paper)}\n{table(df)}"
    )
    (out_dir / "gpu.md").write_text(text)
    print(table(paper), end="")

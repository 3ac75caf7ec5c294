"""The recorded training trajectory: data order, learning rates and checkpoints.

Artifacts of a training run directory read and written here:

* ``trajectory.parquet`` — one row per step: ``step, epoch, pos`` (position of the batch
  in its epoch), ``indices`` (the exact training indices of the batch, a list), ``lr`` (the
  learning rate actually used), ``loss`` (batch mean loss at θ_t, before the update).
* ``checkpoints/step_<t>.safetensors`` (t zero-padded to 7 digits, e.g. ``step_0000063``) —
  θ_t, the parameters *before* step t (so t = 0 holds θ_0 and t = T holds θ_T), plus the
  optimizer state tensors prefixed ``opt.``.

Data order is data (STYLE habit 3): the batches are planned once from ``train.order_seed``
and from then on only ever read back from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts
from dve_repro.config import TrainLoopConfig, TrajectoryConfig
from dve_repro.errors import ArtifactError, DveError

CKPT_DIR = "checkpoints"
TRAJECTORY = "trajectory.parquet"
_CKPT_RE = re.compile(r"step_(\d+)\.safetensors$")


@dataclass
class Step:
    step: int
    epoch: int
    pos: int
    indices: np.ndarray  # [|B_t|] training indices


def plan_batches(n_train: int, cfg: TrainLoopConfig) -> list[Step]:
    """Shuffle each epoch with ``numpy.random.default_rng([order_seed, epoch])`` and cut batches."""
    steps: list[Step] = []
    for epoch in range(cfg.epochs):
        perm = np.random.default_rng([cfg.order_seed, epoch]).permutation(n_train)
        n_batches = n_train // cfg.batch_size if cfg.drop_last else -(-n_train // cfg.batch_size)
        for pos in range(n_batches):
            idx = perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            steps.append(Step(len(steps), epoch, pos, idx.astype(np.int64)))
            if cfg.max_steps and len(steps) == cfg.max_steps:
                return steps
    return steps


def checkpoint_schedule(plan: list[Step], cfg: TrajectoryConfig) -> list[int]:
    """Steps whose θ is saved: always 0 and T; every ``checkpoint_every`` steps (or each epoch
    start when 0); every ``dense_every`` steps before ``dense_until``."""
    total = len(plan)
    out = {0, total}
    if cfg.checkpoint_every:
        out.update(range(0, total, cfg.checkpoint_every))
    else:
        out.update(s.step for s in plan if s.pos == 0)
    if cfg.dense_until:
        out.update(range(0, min(cfg.dense_until, total), cfg.dense_every))
    return sorted(out)


def ckpt_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}.safetensors"


def save_checkpoint(run_dir: Path, step: int, params: dict, opt_state: dict) -> None:
    tensors = dict(params)
    tensors.update({f"opt.{k}": v for k, v in opt_state.items()})
    artifacts.save_tensors(ckpt_path(run_dir, step), tensors, metadata={"step": str(step)})


def list_checkpoints(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)))


def load_checkpoint(run_dir: Path, step: int, device: str = "cpu") -> tuple[dict, dict]:
    """(params, optimizer state) saved before step ``step``."""
    path = ckpt_path(run_dir, step)
    if not path.is_file():
        have = list_checkpoints(run_dir)
        raise ArtifactError(f"missing checkpoint for step {step}: {path} (have steps {have[:8]}{'...' if len(have) > 8 else ''})")
    tensors = artifacts.load_tensors(path, device=device)
    params = {k: v for k, v in tensors.items() if not k.startswith("opt.")}
    state = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return params, state


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "epoch", "pos", "indices", "lr", "loss"])


class Trajectory:
    """Read-only view of ``trajectory.parquet``: per-step batches and learning rates."""

    def __init__(self, frame: pd.DataFrame, path: Path | None = None):
        self.frame = frame
        self.path = path
        self.steps = frame["step"].to_numpy()
        if len(self.steps) and not np.array_equal(self.steps, np.arange(len(self.steps))):
            raise ArtifactError(f"trajectory {path} is not a contiguous sequence of steps")
        self.batches = [np.asarray(b, dtype=np.int64) for b in frame["indices"]]
        self.lrs = frame["lr"].to_numpy(dtype=np.float64)
        self.epochs = frame["epoch"].to_numpy()

    @classmethod
    def load(cls, run_dir: Path) -> Trajectory:
        path = Path(run_dir) / TRAJECTORY
        return cls(artifacts.load_table(path), path)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def n_epochs(self) -> int:
        return int(self.epochs.max()) + 1 if len(self.epochs) else 0

    def sizes(self) -> np.ndarray:
        return np.array([len(b) for b in self.batches], dtype=np.int64)

    def offsets(self) -> np.ndarray:
        """Row offsets [T+1] of each step's occurrences in occurrence-ordered arrays."""
        return np.concatenate([[0], np.cumsum(self.sizes())]).astype(np.int64)

    def occurrences(self) -> pd.DataFrame:
        """One row per (training index, step) occurrence, in step order."""
        sizes = self.sizes()
        return pd.DataFrame(
            {
                "index": np.concatenate(self.batches) if self.batches else np.zeros(0, np.int64),
                "step": np.repeat(self.steps, sizes),
                "epoch": np.repeat(self.epochs, sizes),
            }
        )

    def steps_of(self, index: int) -> list[int]:
        return [t for t, b in enumerate(self.batches) if index in b]

    def weights(self, t: int, removed: list[int] | np.ndarray = (), renormalize: bool = False,
                dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
        """Per-sample loss weights of step t [|B_t|]: 1/|B_t| each, removed points 0.

        ``renormalize=False`` keeps |B_t| as the denominator (SPEC §1); ``True`` divides by
        the number of points that remain.
        """
        batch = self.batches[t]
        n = len(batch)
        mask = np.ones(n, dtype=bool)
        for i in removed:
            hit = np.flatnonzero(batch == i)
            if not len(hit):
                raise DveError(f"training index {i} is not in the batch of step {t}; cannot remove it there")
            mask[hit] = False
        kept = int(mask.sum())
        if kept == 0:
            raise DveError(f"removing {n - kept} point(s) empties the batch of step {t} (size {n})")
        denom = kept if renormalize else n
        w = torch.zeros(n, dtype=dtype, device=device)
        w[torch.from_numpy(mask).to(device)] = 1.0 / denom
        return w

    def check_checkpoints(self, run_dir: Path) -> list[int]:
        """Checkpoints present must lie in [0, T] and include 0 and T."""
        have = list_checkpoints(run_dir)
        total = len(self)
        if 0 not in have or total not in have:
            raise ArtifactError(
                f"{run_dir} lacks the checkpoint of step 0 or of the final step {total} (have {have[:6]}...)"
            )
        if have[-1] > total:
            raise ArtifactError(
                f"trajectory of {run_dir} has {total} steps but a checkpoint of step {have[-1]} exists: they do not match"
            )
        return have

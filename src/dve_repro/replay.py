"""Replay engine: re-execute a recorded run, optionally leaving points out of steps.

Reads a finished training run directory (config, trajectory, checkpoints). Resumes from
the nearest checkpoint at or before the first step that matters and re-executes the
recorded steps with :func:`dve_repro.train.train_step`, the function training used, so
that a replay with nothing removed reproduces θ_T bit for bit.

Removal (SPEC §1): ``removals = {t: [i, …]}`` leaves training index i out of step t by
giving it loss weight 0. ``renormalize=False`` keeps |B_t| as the denominator, so the
update of step t is the full update minus exactly ``η_t/|B_t| ∇ℓ(θ_t, z_i)``;
``renormalize=True`` averages over the points that remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dve_repro import artifacts, torch_state
from dve_repro.config import Config, from_dict
from dve_repro.errors import ArtifactError, DveError
from dve_repro.tasks import Task, build_task, resolve_device
from dve_repro.trajectory import Trajectory, ckpt_path, load_checkpoint

Tensors = dict[str, torch.Tensor]


@dataclass
class TrainedRun:
    """A finished training run, loaded and checked for consistency."""

    path: Path
    cfg: Config
    task: Task
    traj: Trajectory
    checkpoints: list[int]
    device: str
    threads: int = 0  # torch CPU threads training ran with (env.json); 0 = unknown
    train_device: str = ""  # the device training ran on (env.json); "" = unknown
    inexact_replay: bool = False  # runtime.inexact_replay: replay on another device anyway

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, *, inexact_replay: bool = False) -> TrainedRun:
        """Load a finished run onto ``device`` (default: the device it trained on)."""
        path = Path(run_dir)
        if not path.is_dir():
            raise ArtifactError(f"run directory not found: {path}")
        if (path / "recorder.json").is_file():  # written by dve_repro.api.Recorder: no config to rebuild from
            raise ArtifactError(f"{path} was recorded from your own model by dve_repro.Recorder, which dve cannot "
                                "rebuild from a config; embed and score it from Python: dve_repro.embed, "
                                "dve_repro.features, dve_repro.score")
        if not (path / artifacts.DONE).is_file():
            raise ArtifactError(f"{path} has no DONE marker: training did not finish; rerun `dve train` with the same config")
        artifacts.require_verified(path, "training run", "rerun `dve train` with the same overrides to rebuild it")
        saved = artifacts.read_json(path / "config.json")
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ArtifactError(f"{path / 'config.json'} holds no resolved config")
        cfg = from_dict(saved["config"])
        env = artifacts.read_json(path / "env.json") if (path / "env.json").is_file() else {}
        env = env if isinstance(env, dict) else {}
        trained_on = str(env.get("device", ""))
        device = resolve_device(device or trained_on or cfg.runtime.device)
        task = build_task(cfg, device)
        traj = Trajectory.load(path)
        ckpts = traj.check_checkpoints(path)
        for step in ckpts:  # header and size only: a truncated file fails here, not mid-replay
            artifacts.check_tensors(ckpt_path(path, step))
        flat = np.concatenate(traj.batches) if len(traj) else np.zeros(0, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= task.n_train):
            raise ArtifactError(f"trajectory of {path} names training indices outside [0, {task.n_train})")
        threads = env.get("torch_threads", 0)
        return cls(path, cfg, task, traj, ckpts, device, int(threads or 0), trained_on, inexact_replay)

    def require_exact_replay(self) -> None:
        """Refuse (one line) a replay on another device than training's: another device runs
        other kernels, so the replay would not reproduce θ_T bit for bit (SPEC §5). The dtype
        is the training config's by construction (the task is built from it)."""
        if self.inexact_replay or not self.train_device:
            return
        if torch.device(self.device).type != torch.device(self.train_device).type:
            raise DveError(
                f"{self.path.name} was trained on {self.train_device} but would be replayed on {self.device}, "
                f"which is not bit-exact; set runtime.device={self.train_device}, or runtime.inexact_replay=true "
                "to replay anyway"
            )

    @property
    def T(self) -> int:
        return len(self.traj)

    def nearest_checkpoint(self, step: int) -> int:
        """Latest checkpoint at or before ``step``."""
        return max(c for c in self.checkpoints if c <= step)

    def load_params(self, step: int) -> tuple[Tensors, Tensors]:
        params, state = load_checkpoint(self.path, step, self.device)
        expected = {k: tuple(v.shape) for k, v in self.task.model.named_parameters()}
        got = {k: tuple(v.shape) for k, v in params.items()}
        if got != expected:
            raise ArtifactError(f"checkpoint of step {step} in {self.path} does not fit the model of its config")
        dtype = next(self.task.model.parameters()).dtype
        return ({k: v.to(dtype) for k, v in params.items()}, {k: v.to(dtype) for k, v in state.items()})

    def final_params(self) -> Tensors:
        return self.load_params(self.T)[0]


def check_removals(run: TrainedRun, removals: dict[int, list[int]]) -> None:
    for t, idx in removals.items():
        if not 0 <= t < run.T:
            raise DveError(f"step {t} is outside the trajectory [0, {run.T})")
        for i in idx:
            if not 0 <= i < run.task.n_train:
                raise DveError(f"training index {i} is outside the training set [0, {run.task.n_train})")


def replay(
    run: TrainedRun,
    *,
    removals: dict[int, list[int]] | None = None,
    renormalize: bool = False,
    start: int | None = None,
    stop: int | None = None,
    before_step: Callable[..., None] | None = None,
    with_state: bool = False,
) -> tuple[Tensors, Tensors]:
    """Re-execute steps [start, stop) and return (θ_stop, optimizer state).

    ``start`` defaults to the latest checkpoint at or before the first removed step (0
    when nothing is removed); it must itself be a checkpoint. ``before_step(t, θ_t)`` is
    called with the parameters before each step (for gradient capture and unrolling);
    ``with_state=True`` calls ``before_step(t, θ_t, state_t)`` with the optimizer state too.
    """
    from dve_repro.train import train_step

    removals = {int(t): list(v) for t, v in (removals or {}).items() if len(v)}
    check_removals(run, removals)
    stop = run.T if stop is None else stop
    if not 0 <= stop <= run.T:
        raise DveError(f"replay stop={stop} is outside [0, {run.T}]")
    if start is None:
        start = run.nearest_checkpoint(min(removals) if removals else 0)
    if start not in run.checkpoints:
        raise ArtifactError(
            f"replay from step {start} needs its checkpoint; {run.path} has {run.checkpoints[:8]} "
            "(retrain with trajectory.checkpoint_every set to include it)"
        )
    if stop < start:
        raise DveError(f"replay stop={stop} is before start={start}")
    if removals and min(removals) < start:
        raise DveError(f"cannot remove points from step {min(removals)} when replaying from step {start}")
    run.require_exact_replay()
    params, state = run.load_params(start)
    cfg, task, traj = run.cfg, run.task, run.traj
    # CPU steps run with the thread count training used: ATen splits reductions by thread
    # count, so another count changes the last bits (measured: 1e-17 after 4 float64 steps).
    with torch_state.deterministic(), torch_state.threads(run.threads if run.device == "cpu" else None):
        for t in range(start, stop):
            x, y = task.batch(traj.batches[t])
            w = traj.weights(t, removals.get(t, ()), renormalize, dtype=task.weight_dtype, device=run.device)
            if before_step is not None:
                before_step(t, params, state) if with_state else before_step(t, params)
            params, state, _ = train_step(task, params, state, t, x, y, w, float(traj.lrs[t]), cfg)
    return params, state

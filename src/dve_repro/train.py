"""Training stage: run SGD/AdamW and write down the trajectory.

Reads the config; writes a run directory ``<out_root>/<name>/train-<fingerprint>/``:

* ``config.json``, ``env.json`` — resolved config and environment;
* ``trajectory.parquet`` — every step's batch indices, learning rate and loss (see
  ``trajectory.py``), rewritten atomically at each checkpoint;
* ``checkpoints/step_*.safetensors`` — θ_t and optimizer state on the checkpoint schedule
  (always θ_0 and θ_T);
* ``metrics.csv`` — per epoch: train/val loss and accuracy;
* ``labels.json`` — flipped training indices and their true labels (label noise);
* ``grads/`` — projected per-sample gradients when ``trajectory.capture=true``;
* ``curve.csv`` — validation loss every ``train.eval_every`` steps (when > 0);
* ``selection.parquet`` — each selecting step's pool, scores and choice (``select.schedule``
  ≠ never; see ``select.py``: the chosen indices are the trajectory's batches);
* ``DONE`` — written last.

One function, :func:`train_step`, executes a step for both training and replay, so a
replay re-runs the very same floating-point operations (bit-for-bit, SPEC §5).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts, distributed, torch_state, ui
from dve_repro.config import Config, fingerprint, stage_payload, to_dict
from dve_repro.errors import ArtifactError, ConfigError
from dve_repro.grads import LinearFactorHooks
from dve_repro.optim import init_state, lr_schedule, update
from dve_repro.tasks import Task, build_task, initial_params, mc_step_seed, resolve_device
from dve_repro.trajectory import (
    TRAJECTORY,
    checkpoint_schedule,
    ckpt_path,
    list_checkpoints,
    load_checkpoint,
    plan_batches,
    rows_to_frame,
    save_checkpoint,
)

Tensors = dict[str, torch.Tensor]
# metrics.csv always has its header, even before the first epoch ends (a checkpoint written
# mid-epoch 0 used to leave an empty file that read_csv rejects, so the run never resumed).
METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc"]
CURVE, SELECTION = "curve.csv", "selection.parquet"  # also named in select.py


def autocast(dtype: str, device: torch.device | str):
    """bf16 mixed precision for ``train.dtype=bfloat16`` (weights, optimizer state and the
    update stay float32; the forward's matmuls run in bf16); a no-op context otherwise."""
    if dtype != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def step_grads(task: Task, params: Tensors, x, y, w: torch.Tensor, dtype: str = "float32") -> tuple[torch.Tensor, Tensors]:
    """Per-sample losses [B] at θ and ∇_θ Σ_i w_i ℓ_i (w_i = 1/|B| for the mean loss).

    ``dtype="bfloat16"``: the forward runs under autocast, the backward outside it (as
    torch's AMP recipe has it); the loss itself is computed from float32 logits."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with autocast(dtype, x.device):
        losses = task.per_sample_loss(p, x, y)
    grads = torch.autograd.grad((losses * w).sum(), list(p.values()))
    return losses.detach(), dict(zip(p, grads, strict=True))


def train_step(task: Task, params: Tensors, state: Tensors, t: int, x, y, w: torch.Tensor, lr: float,
               cfg: Config, reduce: Callable[[Tensors], Tensors] | None = None) -> tuple[Tensors, Tensors, torch.Tensor]:
    """θ_{t+1} from θ_t: one optimizer step on the weighted batch loss. Returns losses [B] too.

    ``reduce``: sums the gradient over ranks before the update (a torchrun run, where x, y,
    w are this rank's slice of the batch; :meth:`dve_repro.distributed.Context.sum_grads`)."""
    losses, grads = step_grads(task, params, x, y, w, cfg.train.dtype)
    if reduce is not None:
        grads = reduce(grads)
    new_p, new_s = update(params, grads, state, lr, t, cfg.optim)
    return {k: v.detach() for k, v in new_p.items()}, {k: v.detach() for k, v in new_s.items()}, losses


def train_dir(cfg: Config) -> Path:
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "train", fingerprint(stage_payload(cfg, "train")))


def _resume_point(run_dir: Path, n_steps: int) -> tuple[int, list[dict]]:
    """Latest checkpoint whose trajectory rows are all on disk (0 if none)."""
    ckpts = list_checkpoints(run_dir)
    traj_path = run_dir / TRAJECTORY
    rows: list[dict] = []
    if traj_path.is_file():
        try:
            rows = artifacts.load_table(traj_path).to_dict("records")
        except ArtifactError:
            rows = []
    usable = [s for s in ckpts if s <= len(rows) and s <= n_steps]
    for start in sorted(usable, reverse=True):  # a truncated checkpoint is skipped, not trusted
        try:
            artifacts.check_tensors(ckpt_path(run_dir, start))
        except ArtifactError:
            ui.warn(f"warning: {ckpt_path(run_dir, start)} is damaged; resuming from an earlier checkpoint")
            continue
        if start > 0:
            return start, rows[:start]
        break
    return 0, []


def run_training(cfg: Config, force: bool = False) -> Path:
    """Train (or reuse / resume) the configured run; returns its directory.

    The folder is locked for the whole run; a finished one is reused only after its
    manifest verifies (a damaged one is rebuilt beside it and swapped in). Under torchrun
    every rank trains its slice of each batch (:func:`_run_training_ranks`)."""
    ctx = distributed.context(resolve_device(cfg.runtime.device))
    device = ctx.device(resolve_device(cfg.runtime.device))
    if ctx.active:
        return _run_training_ranks(cfg, ctx, device, force)
    payload = stage_payload(cfg, "train")
    run = artifacts.RunDir(train_dir(cfg), payload)
    run.check()  # refuses a mismatched config before anything is written
    with run.locked():
        if run.reusable(force):
            ui.log(f"reusing finished training run {run.final}")  # reused as is: nothing rewritten
            return run.final
        with torch_state.deterministic(), torch_state.threads(cfg.runtime.threads):
            task = build_task(cfg, device)  # before the folder is touched: bad data leaves no trace
            plan = plan_batches(task.n_train, cfg.train)
            check_training(cfg, task, plan, device)
            from dve_repro.select import make_selector

            selector = make_selector(cfg, task, len(plan))  # refuses bad windows / splits before any write
            run.prepare(to_dict(cfg), device, force=force)
            _train(cfg, run, task, plan, device, selector)
    return run.final


def _run_training_ranks(cfg: Config, ctx: distributed.Context, device: str, force: bool) -> Path:
    """:func:`run_training` on ``ctx.world`` ranks: rank 0 checks, locks and prepares the
    folder exactly as one process would, then tells the others whether to reuse it or where
    to train; a refusal on rank 0 is raised on every rank (nothing was written)."""
    check_ranks(cfg, ctx)
    run = artifacts.RunDir(train_dir(cfg), stage_payload(cfg, "train"))
    with contextlib.ExitStack() as stack:
        built: dict = {}

        def prepare() -> tuple[bool, str]:  # rank 0: what one process does before its first step
            run.check()
            stack.enter_context(run.locked())
            if run.reusable(force):
                return True, str(run.path)
            stack.enter_context(torch_state.deterministic())
            built["task"] = task = build_task(cfg, device)
            built["plan"] = plan = plan_batches(task.n_train, cfg.train)
            check_training(cfg, task, plan, device)
            run.prepare(to_dict(cfg), device, force=force)
            return False, str(run.path)

        reuse, path = distributed.on_main(ctx, prepare)
        if reuse:
            ui.log(f"reusing finished training run {run.final}")
            return run.final
        if not ctx.is_main:
            stack.enter_context(torch_state.deterministic())
            run.path = Path(path)  # rank 0's folder (a staging folder when it rebuilds one)
            built["task"] = task = build_task(cfg, device)
            built["plan"] = plan_batches(task.n_train, cfg.train)
        stack.enter_context(torch_state.threads(cfg.runtime.threads))
        _train(cfg, run, built["task"], built["plan"], device, None, ctx)
    return run.final


def check_ranks(cfg: Config, ctx: distributed.Context) -> None:
    """Refuse what has no data-parallel form (before any rank writes)."""
    if cfg.select.schedule != "never":
        raise ConfigError("data selection (select.schedule) picks each batch on one process; train it without torchrun")
    if cfg.trajectory.capture and cfg.embed.curvature == "mc":
        raise ConfigError("embed.curvature=mc draws labels for the whole batch from one generator; "
                          "capture it without torchrun, or use embed.curvature=ef/gn")
    if cfg.train.batch_size < ctx.world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} leaves some of the {ctx.world} ranks no data")


def check_training(cfg: Config, task: Task, plan, device: str) -> None:
    """Refuse meaningless combinations of config and data before anything is built."""
    n = task.n_train
    if cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training set ({n} points)")
    if not plan:
        raise ConfigError(f"the run has no steps (data has {n} training points, train.batch_size="
                          f"{cfg.train.batch_size}, drop_last={cfg.train.drop_last})")
    T = len(plan)
    if cfg.schedule.warmup_steps >= T and cfg.schedule.kind != "constant":
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} is not shorter than the run ({T} steps)")
    if cfg.train.dtype == "bfloat16" and torch.device(device).type == "cpu":
        raise ConfigError("train.dtype=bfloat16 is bf16 autocast for CUDA; on the CPU use float32 or float64")
    y = task.y_train
    if task.kind == "classify" and len(y) and int(y.max()) >= task.n_classes:
        raise ConfigError(f"the data has labels up to {int(y.max())} but model.n_classes={task.n_classes}")
    # disk: every checkpoint holds θ and the optimizer state
    nbytes = sum(p.numel() * p.element_size() for p in task.model.parameters())
    n_ckpt = len(checkpoint_schedule(plan, cfg.trajectory))
    state = {"sgd": 1 if cfg.optim.momentum else 0, "adamw": 2}.get(cfg.optim.name, 2)
    ckpt_bytes = n_ckpt * nbytes * (1 + state)
    if cfg.trajectory.capture:
        check_capture_budget(cfg, task, plan, device, ckpt_bytes, nbytes * (2 + state))
    artifacts.ensure_space(train_dir(cfg).parent, ckpt_bytes, f"{n_ckpt} checkpoints")


def capture_budget_for(cfg: Config, task: Task, n_rows: int) -> dict[str, int]:
    """What capture and the embedding of this config need, in bytes (see
    :func:`dve_repro.capture.capture_budget`), plus ``p_tilde`` and ``m_blocks``."""
    from dve_repro.capture import capture_budget, curvature_rows_per_point
    from dve_repro.embed_stage import compute_dtype
    from dve_repro.projection import Projector

    blocks = capture_blocks(task)
    projector = Projector(cfg.projection, blocks)
    m_blocks = projector.block_slices() if cfg.embed.blocks == "layer" else None
    tokens = int(task.x_train.shape[1]) if task.kind == "lm" else 1
    item = 2 if cfg.train.dtype == "bfloat16" else next(task.model.parameters()).element_size()
    out = capture_budget(blocks, projector.out_dim, n_rows,
                         rows_per_point=curvature_rows_per_point(cfg.embed.curvature, task.n_classes,
                                                                 cfg.embed.mc_samples),
                         storage_dtype=cfg.embed.storage_dtype, compute_dtype=compute_dtype(cfg),
                         m_blocks=m_blocks, batch=cfg.train.batch_size, tokens=tokens, factor_bytes=item)
    return {**out, "p_tilde": projector.out_dim, "m_blocks": len(m_blocks) if m_blocks else 1}


def device_memory_bytes(device: str) -> int:
    """Total memory of ``device`` (GPU memory, or this machine's RAM for the CPU); 0 = unknown."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_capture_budget(cfg: Config, task: Task, plan, device: str, ckpt_bytes: int, state_bytes: int) -> None:
    """Before the first step of a capturing run: refuse, with the numbers, rows that do not
    fit on the disk beside the checkpoints, or factors + weights / optimizer state (training)
    or M (embedding) that do not fit in the device's memory. Logs the figures otherwise."""
    n_rows = sum(len(s.indices) for s in plan)
    b = capture_budget_for(cfg, task, n_rows)
    gb = lambda x: f"{x / 1e9:,.2f} GB"  # noqa: E731
    ui.log(f"capture budget: rows {gb(b['rows_disk'])} on disk ({n_rows:,} rows × p̃={b['p_tilde']:,} "
           f"{cfg.embed.storage_dtype}), checkpoints {gb(ckpt_bytes)}; per step factors {gb(b['factor_bytes'])} "
           f"+ weights/grad/state {gb(state_bytes)}; embedding M {gb(b['m_bytes'])} ({b['m_blocks']} block(s), "
           f"{cfg.embed.compute_dtype})")
    artifacts.ensure_space(train_dir(cfg).parent, ckpt_bytes + b["rows_disk"],
                           f"the captured gradients ({gb(b['rows_disk'])}) and checkpoints ({gb(ckpt_bytes)})")
    total = device_memory_bytes(device)
    if not total:
        return
    train_need = b["factor_bytes"] + b["projected_bytes"] + state_bytes
    if train_need > total:
        raise ConfigError(f"capture needs {gb(train_need)} of {device} memory per step (factors {gb(b['factor_bytes'])}"
                          f" + weights, gradient and optimizer state {gb(state_bytes)}), more than its {gb(total)}; "
                          "lower train.batch_size or data.seq_len")
    copies = 2 if cfg.embed.algorithm == 1 else cfg.embed.segments + 2
    if copies * b["m_bytes"] > total:
        raise ConfigError(f"the embedding's M needs {gb(copies * b['m_bytes'])} of {device} memory "
                          f"({copies} × {gb(b['m_bytes'])}, p̃={b['p_tilde']:,}, {b['m_blocks']} block(s)), more than "
                          f"its {gb(total)}; use embed.blocks=layer or a smaller projection")


def _train(cfg: Config, run: artifacts.RunDir, task: Task, plan, device: str, selector=None,
           ctx: distributed.Context | None = None) -> None:
    """The training loop. With ``ctx`` (torchrun) every rank runs it on its slice of each
    batch; rank 0 alone writes the folder's files, and waits for every rank's rows at each
    checkpoint before it marks them done."""
    ctx = ctx or distributed.Context()
    main = ctx.is_main
    T = len(plan)
    lrs = lr_schedule(cfg.schedule, cfg.optim.lr, T)
    ckpts = set(checkpoint_schedule(plan, cfg.trajectory))
    if main:
        artifacts.write_json(run.file("labels.json"), {
            "noisy_indices": np.asarray(task.extra.get("noisy_indices", [])).tolist(),
            "true_labels": np.asarray(task.extra.get("true_labels", [])).tolist(),
            "data": task.description,
        })

    start, rows, params, state, capture = _start_point(cfg, run, task, plan, device, ctx)
    metrics = _load_metrics(run.path, start) if main else []
    every = cfg.train.eval_every if main else 0
    curve = _load_curve(run.path, start) if every else []
    if every and start == 0:
        curve.append({"step": 0, "val_loss": task.evaluate(params, task.x_val, task.y_val)[0]})
    if selector is not None:
        selector.resume(run.path, start)
    epoch_losses: list[float] = [r["loss"] for r in rows if r["epoch"] == (plan[start].epoch if start < T else -1)]
    t0, step_s = time.perf_counter(), 0.0
    with ui.bar("train", total=T, unit="step", completed=start) as bar:
        for t in range(start, T):
            s = plan[t]
            indices = s.indices if selector is None else selector.batch(t, params, s.indices, lrs[t])
            part = ctx.batch_slice(len(indices))  # the whole batch on one process
            x, y = task.batch(indices[part])
            # w_i = 1/|B_t| of the global batch: the ranks' gradients sum to the batch mean's
            w = torch.full((len(x),), 1.0 / len(indices), dtype=task.weight_dtype, device=x.device)
            reduce = ctx.sum_grads if ctx.active else None
            if capture is not None:
                params, state, losses = capture.step(task, params, state, t, x, y, w, lrs[t], cfg, reduce, part.start,
                                                     not ctx.active)
            else:
                s0 = time.perf_counter()
                params, state, losses = train_step(task, params, state, t, x, y, w, lrs[t], cfg, reduce)
                step_s += time.perf_counter() - s0
            loss = float(losses.mean()) if not ctx.active else ctx.sum_scalar(float(losses.sum())) / len(indices)
            if not main:
                bar.update(1, loss=loss)
                if t + 1 in ckpts and capture is not None:
                    capture.store.flush()  # this rank's rows are in the store before rank 0 commits
                if t + 1 in ckpts:
                    ctx.barrier()
                continue
            rows.append({"step": t, "epoch": s.epoch, "pos": s.pos, "indices": indices.tolist(), "lr": lrs[t], "loss": loss})
            if every and ((t + 1) % every == 0 or t + 1 == T):
                curve.append({"step": t + 1, "val_loss": task.evaluate(params, task.x_val, task.y_val)[0]})
            epoch_losses.append(loss)
            bar.update(1, loss=loss)
            end_of_epoch = t + 1 == T or plan[t + 1].epoch != s.epoch
            if end_of_epoch:
                metrics.append(_epoch_metrics(task, params, s.epoch, t + 1, epoch_losses))
                epoch_losses = []
                m = metrics[-1]
                ui.log(f"epoch {s.epoch}: train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f} | val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}")
            if t + 1 in ckpts:
                _commit_checkpoint(run, t + 1, params, state, capture, ctx, rows, metrics, curve if every else None,
                                   selector)
    if capture is not None:
        capture.store.close()  # every row written (θ_T is a checkpoint: committed above)
    if not main:
        ctx.barrier()  # returns once rank 0 has marked the run done
        return
    elapsed = time.perf_counter() - t0
    # profile: seconds of this process's steps (speed only; dve bench embed reads it)
    profile = capture.profile() if capture is not None else {"step_s": step_s}
    run.mark_done({"steps": T, "seconds": elapsed, "final_val_loss": metrics[-1]["val_loss"] if metrics else None,
                   "resumed_from": start, "profile": profile, "ranks": ctx.world})
    ctx.barrier()
    ui.log(f"trained {T - start} steps in {elapsed:.1f}s -> {run.final}")


def _start_point(cfg: Config, run: artifacts.RunDir, task: Task, plan, device: str, ctx: distributed.Context):
    """Where the loop starts: the last resumable checkpoint (its trajectory rows, θ, optimizer
    state) or θ_0, written by rank 0 and read back by the others; and the gradient store
    when the run captures (rank 0 allocates it, the others open it)."""
    main, T = ctx.is_main, len(plan)
    start, rows = _resume_point(run.path, T) if main else (0, [])
    start = ctx.broadcast(start)
    params = state = None
    if start > 0:
        params, state = load_checkpoint(run.path, start, device)
        ui.log(f"resuming {run.final.name} from step {start}/{T}")
    elif main:
        params = initial_params(task)
        state = init_state(params, cfg.optim)
        save_checkpoint(run.path, 0, params, state)
    capture = None
    if cfg.trajectory.capture and main:
        capture = _make_capture(cfg, task, run.path, plan)  # rank 0 allocates the shared store
    ctx.barrier()
    if not main:
        if start == 0:  # θ_0 as rank 0 wrote it (the same bits on every rank)
            params, state = load_checkpoint(run.path, 0, device)
        if cfg.trajectory.capture:
            capture = _make_capture(cfg, task, run.path, plan)  # opens rank 0's store
    return start, rows, params, state, capture


def _commit_checkpoint(run: artifacts.RunDir, step: int, params: Tensors, state: Tensors, capture, ctx, rows, metrics,
                       curve, selector) -> None:
    """Rank 0 at checkpoint ``step``: θ and the optimizer state, every rank's captured rows of
    the steps before it, then the tables; the trajectory rows last, as they are what marks
    the checkpoint resumable."""
    save_checkpoint(run.path, step, params, state)
    if capture is not None:
        capture.store.flush()
    ctx.barrier()  # every rank's rows of steps < step are written
    if capture is not None:
        capture.store.commit(range(0, step))
    artifacts.save_table(run.file("metrics.csv"), pd.DataFrame(metrics, columns=METRIC_COLUMNS))
    if curve is not None:
        artifacts.save_table(run.file(CURVE), pd.DataFrame(curve, columns=["step", "val_loss"]))
    if selector is not None:
        artifacts.save_table(run.file(SELECTION), selector.frame())
    artifacts.save_table(run.file(TRAJECTORY), rows_to_frame(rows))


def _load_curve(run_dir: Path, start: int) -> list[dict]:
    """Validation-curve points at or before step ``start`` (the resume point)."""
    path = run_dir / CURVE
    if start <= 0 or not path.is_file():
        return []
    return [c for c in artifacts.load_table(path).to_dict("records") if c["step"] <= start]


def _load_metrics(run_dir: Path, start: int) -> list[dict]:
    """Rows of the epochs that ended at or before step ``start`` (the resume point)."""
    path = run_dir / "metrics.csv"
    if start <= 0 or not path.is_file():
        return []
    return [m for m in artifacts.load_table(path).to_dict("records") if m["step"] <= start]


def _epoch_metrics(task: Task, params: Tensors, epoch: int, step: int, batch_losses: list[float]) -> dict:
    if task.kind == "classify":
        tr_loss, tr_acc = task.evaluate(params, task.x_train, task.y_train)
    else:
        tr_loss, tr_acc = float(np.mean(batch_losses)), float("nan")
    va_loss, va_acc = task.evaluate(params, task.x_val, task.y_val)
    return {"epoch": epoch, "step": step, "train_loss": tr_loss, "train_acc": tr_acc, "val_loss": va_loss, "val_acc": va_acc}


class _Float32Factors(dict):
    """Hook factors read one layer at a time, each upcast to float32 as the projection takes
    it and then dropped: autocast's bf16 factors never exist twice over all layers."""

    def __getitem__(self, key):
        a, b = self.pop(key)
        return (a.float() if a.is_floating_point() else a, b.float())

    def items(self):  # the materialising projections read every layer at once
        return [(k, self[k]) for k in list(self.keys())]


class _TrainCapture:
    """Captures projected per-sample gradients inside the training step (no extra backward);
    the rows go to the store through a background writer (``AsyncRowWriter``).

    With a Kronecker projection the hooks' inputs and output gradients are projected by the
    fused :meth:`~dve_repro.projection.Projector.project_captured`; other projections
    materialise the factors (:meth:`LinearFactorHooks.factors`). ``row_dtype``: the dtype the
    rows are projected in — float32 rows for float32 storage (a float64 projection would be
    rounded on the way to the disk anyway), None = the factors' dtype (bf16 → float32)."""

    def __init__(self, featurizer, store, curvature: str, mc_samples: int, mc_seed: int,
                 row_dtype: torch.dtype | None = None):
        from dve_repro.capture import AsyncRowWriter

        self.featurizer, self.store = featurizer, AsyncRowWriter(store)
        self.curvature, self.mc_samples, self.mc_seed = curvature, mc_samples, mc_seed
        self.row_dtype = row_dtype
        self.hooks = LinearFactorHooks(featurizer.task.model, featurizer.blocks)  # registered per step
        # seconds spent on the training thread: curvature rows, the (hooked) training step, the
        # projection (see profile())
        self.curvature_s = self.step_s = self.project_s = 0.0

    def step(self, task, params, state, t, x, y, w, lr, cfg, reduce=None, start: int = 0, whole: bool = True):
        """One training step with its rows captured. ``reduce``/``start``/``whole=False``:
        a torchrun rank's slice of the batch, whose rows go to positions ``start…`` of step t."""
        t0 = time.perf_counter()
        curv = None
        if self.curvature != "ef":
            curv = self.featurizer.curvature(params, x, y, self.curvature, self.mc_samples,
                                             mc_step_seed(self.mc_seed, t))
        t1 = time.perf_counter()
        if self.featurizer.engine == "hooks":
            with self.hooks:
                new_p, new_s, losses = train_step(task, params, state, t, x, y, w, lr, cfg, reduce)
            t2 = time.perf_counter()
            rows = self._rows(w, cfg)
        else:
            rows = self.featurizer.features(params, x, y)
            t2 = time.perf_counter()
            new_p, new_s, losses = train_step(task, params, state, t, x, y, w, lr, cfg, reduce)
        t3 = time.perf_counter()
        self.store.write(t, rows, curv, start, whole)
        self.curvature_s += t1 - t0
        self.step_s += t2 - t1 if self.featurizer.engine == "hooks" else time.perf_counter() - t2
        self.project_s += t3 - t2 if self.featurizer.engine == "hooks" else t2 - t1
        return new_p, new_s, losses

    def profile(self) -> dict[str, float]:
        """Where the capture's time went (seconds, summed over the steps): ``step_s`` the
        training step with the hooks on (forward, backward, update), ``project_s`` the
        projection, ``curvature_s`` the curvature rows' extra backwards, ``queue_wait_s`` the
        training thread blocked on the writer (full queue, commits), ``writer_s`` the background
        thread's copies and writes (overlapped with training while a core is free)."""
        return {"step_s": self.step_s, "project_s": self.project_s, "curvature_s": self.curvature_s,
                "queue_wait_s": getattr(self.store, "waited_s", 0.0),
                "writer_s": getattr(self.store, "written_s", 0.0)}

    def _rows(self, w: torch.Tensor, cfg: Config) -> torch.Tensor:
        """[B, p̃] rows of the step the hooks just saw."""
        projector = self.featurizer.projector
        if projector.kronecker:
            return projector.project_captured(self.hooks.captured(), 1.0 / w, self.row_dtype)
        factors = self.hooks.factors(w)
        if cfg.train.dtype == "bfloat16":  # project autocast's bf16 factors in float32
            factors = _Float32Factors(factors)
        rows = self.featurizer.from_factors(factors)
        return rows if self.row_dtype is None else rows.to(self.row_dtype)


def _make_capture(cfg: Config, task: Task, run_dir: Path, plan) -> _TrainCapture:
    from dve_repro.capture import Featurizer, GradientStore, curvature_rows_per_point, store_meta
    from dve_repro.projection import Projector

    blocks = capture_blocks(task)
    projector = Projector(cfg.projection, blocks)
    feat = Featurizer(task, blocks, projector, cfg.embed.engine)
    offsets = np.concatenate([[0], np.cumsum([len(s.indices) for s in plan])])
    rpp = curvature_rows_per_point(cfg.embed.curvature, task.n_classes, cfg.embed.mc_samples)
    store = GradientStore(run_dir / "grads", offsets, projector.out_dim, store_meta(feat, cfg.embed), rpp,
                          cfg.embed.storage_dtype)
    row_dtype = torch.float32 if cfg.embed.storage_dtype == "float32" else None
    return _TrainCapture(feat, store, cfg.embed.curvature, cfg.embed.mc_samples, cfg.embed.mc_seed, row_dtype)


def capture_blocks(task: Task):
    """The gradient blocks DVEmb sees: all parameters of a classifier; an LM's chosen linears."""
    from dve_repro.grads import gradient_layout

    layers = task.extra.get("capture_layers")
    return gradient_layout(task.model, layers)

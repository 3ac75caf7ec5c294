"""Ground truth: trajectory-specific leave-one-out (TSLOO) by actually retraining.

Reads a finished training run; writes a TSLOO run directory
``<out_root>/<name>/tsloo-<fingerprint>/`` with

* ``jobs.parquet`` — one row per (point, setting, convention): the training index, the
  steps it is removed from, and the checkpoint the replay starts at;
* ``delta.npy`` — [n_jobs, 1 + N_val]: column 0 is L(θ'_T) − L(θ_T) for the mean validation
  loss, the rest per validation point (SPEC §1 sign: positive = the point helped);
* ``done.npy`` — per-job done-mask (resume after an interruption; shards fill disjoint rows);
* ``DONE`` when every job is done.

Settings (SPEC §1): ``single`` removes the point from its last occurrence (its last-epoch
step); ``all`` from every occurrence. Conventions: ``keep`` (denominator |B_t| kept) and
``renormalize``.

Fast path: the replays of a chunk of jobs advance together as a stack of parameter copies;
every copy sees the same batch and differs only in its per-sample weights (0 where its point
is removed). Each chunk also carries one copy with nothing removed, so the difference is
taken between numerically identical computations. Jobs are grouped by the latest checkpoint
before their first removal, where their replays start. Per-copy gradients come from one of
two kernels (:func:`grads_for`): ``stacked`` for MLP classifiers (the shared batch makes the
first layer of all copies one matrix product) and ``vmap`` (``vmap(grad(.))``, any model).
The naive reference, :func:`naive_delta`, retrains each job alone from θ_0 with the
ordinary replay engine; ``naive_delta(..., start=job.start)`` is the same replay from the
job's start checkpoint (the same-start baseline of the benchmark).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dve_repro import artifacts, torch_state, ui
from dve_repro.config import Config, OptimConfig, fingerprint, stage_payload, to_dict
from dve_repro.errors import ArtifactError, DveError
from dve_repro.models import MLP
from dve_repro.optim import update
from dve_repro.replay import TrainedRun, replay
from dve_repro.tasks import Task, logits_of

Tensors = dict[str, torch.Tensor]


@dataclass
class Job:
    index: int  # training index removed
    setting: str  # single | all
    convention: str  # keep | renormalize
    steps: list[int]  # steps it is removed from
    start: int  # checkpoint the replay starts from


def select_points(run: TrainedRun, n: int, how: str, seed: int) -> np.ndarray:
    """Training indices whose removal is measured (only points that occur in the trajectory)."""
    used = np.unique(np.concatenate(run.traj.batches))
    if how == "all":
        return used
    rng = np.random.default_rng(seed)
    if n > len(used):
        raise DveError(f"tsloo.n_points={n} but only {len(used)} training points occur in the run")
    if how == "uniform":
        return np.sort(rng.choice(used, size=n, replace=False))
    labels = run.task.y_train.cpu().numpy()[used]
    classes = np.unique(labels)
    per = -(-n // len(classes))
    picked = []
    for c in classes:
        pool = used[labels == c]
        picked.extend(rng.choice(pool, size=min(per, len(pool)), replace=False).tolist())
    return np.sort(rng.choice(np.array(picked), size=n, replace=False))


def make_jobs(run: TrainedRun, points: np.ndarray, settings: list[str], conventions: list[str]) -> list[Job]:
    occ: dict[int, list[int]] = {}
    for t, b in enumerate(run.traj.batches):
        for i in b:
            occ.setdefault(int(i), []).append(t)
    jobs = []
    for conv in conventions:
        for setting in settings:
            for i in points:
                steps = occ.get(int(i))
                if not steps:
                    raise DveError(f"training index {int(i)} is never used by the run")
                chosen = [steps[-1]] if setting == "single" else steps
                jobs.append(Job(int(i), setting, conv, chosen, run.nearest_checkpoint(chosen[0])))
    return jobs


def jobs_frame(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": [j.index for j in jobs],
            "setting": [j.setting for j in jobs],
            "convention": [j.convention for j in jobs],
            "steps": [list(j.steps) for j in jobs],
            "start": [j.start for j in jobs],
        }
    )


def _val_losses(run: TrainedRun, params: Tensors) -> torch.Tensor:
    """Per-validation-point losses [N_val] at ``params``."""
    with torch.no_grad():
        return run.task.per_sample_loss(params, run.task.x_val, run.task.y_val)


def naive_delta(run: TrainedRun, job: Job, base: torch.Tensor | None = None, start: int = 0) -> np.ndarray:
    """Reference: retrain the job alone with the replay engine. Returns [1 + N_val].

    ``start``: the checkpoint the replay starts from — θ_0 by default (the reference); the
    job's own ``job.start`` gives the same-start one-at-a-time baseline (replay from a
    checkpoint reproduces the recorded run bit for bit, so the result is the same)."""
    if base is None:
        base = _val_losses(run, run.final_params())
    params, _ = replay(run, removals={t: [job.index] for t in job.steps},
                       renormalize=job.convention == "renormalize", start=start)
    d = _val_losses(run, params) - base
    return torch.cat([d.mean().view(1), d]).cpu().numpy()


GradFn = Callable[[Tensors, torch.Tensor, torch.Tensor, torch.Tensor], Tensors]
KERNELS = ("auto", "stacked", "vmap")


def vmap_grads(task: Task) -> GradFn:
    """Per-copy gradients by ``vmap(grad(·))`` over the stack (any model; the reference).

    ``(P, x, y, W) ↦ G``: P and G map names to [a, *shape], x [B, …], y [B], W [a, B] the
    per-copy sample weights; G[k][c] = ∇_θ Σ_i W[c, i] ℓ(θ_c, z_i)."""
    model = task.model

    def weighted_loss(p, x, y, w):
        logits = functional_call(model, p, (x,))
        logits = logits_of(logits)
        return (task.per_sample_loss_from_logits(logits, y) * w).sum()

    return vmap(grad(weighted_loss), in_dims=(0, None, None, 0))


def stacked_mlp_grads(task: Task) -> GradFn | None:
    """Per-copy gradients of an MLP classifier without vmap (None for other models).

    Same contract as :func:`vmap_grads`. Every copy sees the same batch, so the first layer
    of all ``a`` copies is one matrix product x [B, in] · [a·out, in]ᵀ, and its weight
    gradient one product [a·out, B] · x (vmap runs a batched product over ``a`` expanded
    copies of x instead, which is slower); later layers are batched products over copies.
    The summation order of those products differs from vmap's, so the result agrees with
    :func:`vmap_grads` to rounding, not bit for bit."""
    model = task.model
    if task.kind != "classify" or not isinstance(model, MLP):
        return None
    layers = list(model.net)

    def grads(P: Tensors, x: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> Tensors:
        a, B = W.shape
        p = {k: v.detach().requires_grad_(True) for k, v in P.items()}
        h = x.flatten(1)  # [B, in], shared by every copy
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Linear):
                h = layer(h)  # elementwise activation
                continue
            w = p[f"net.{i}.weight"]  # [a, out, in]
            h = (F.linear(h, w.reshape(-1, w.shape[-1])).view(B, a, -1) if h.dim() == 2
                 else torch.einsum("bai,aoi->bao", h, w))  # [B, a, out]
            if layer.bias is not None:
                h = h + p[f"net.{i}.bias"]
        # rows (sample, copy) in one contiguous [B·a, C] block: a class dim in the middle of a
        # permuted tensor makes log_softmax run slice by slice
        losses = F.cross_entropy(h.reshape(B * a, -1), y.repeat_interleave(a), reduction="none").view(B, a)
        g = torch.autograd.grad((losses * W.T).sum(), list(p.values()))
        return dict(zip(p, g, strict=True))

    return grads


def grads_for(task: Task, kernel: str = "auto") -> GradFn:
    """The per-copy gradient function ``kernel`` names: stacked (MLP classifiers), vmap, or
    auto (stacked where it applies)."""
    if kernel not in KERNELS:
        raise DveError(f"tsloo kernel must be one of {KERNELS} (got {kernel!r})")
    fast = stacked_mlp_grads(task) if kernel != "vmap" else None
    if kernel == "stacked" and fast is None:
        raise DveError("the stacked tsloo kernel needs an MLP classifier; use kernel vmap")
    return fast or vmap_grads(task)


def update_stack(P: Tensors, S: Tensors, grads: Tensors, lr: float, t: int, cfg: OptimConfig) -> None:
    """One optimizer step of every copy, written into the stacks ``P``/``S`` ([a, *shape] views).

    Exactly the numbers of ``vmap(optim.update)``: plain SGD runs the same two roundings
    (``lr·g``, then ``θ − ·``) in place, in the gradient's and the stack's memory (no new
    tensors per step); other optimizers are elementwise, so ``update`` runs on the stacks
    directly, except that clipping needs each copy's own norm (vmap)."""
    if cfg.name == "sgd" and not (cfg.momentum or cfg.weight_decay or cfg.grad_clip):
        for k, v in P.items():
            g = grads[k]
            v.sub_(g.mul_(lr) if g.is_contiguous() else lr * g)  # an expanded gradient cannot be written
        return
    if cfg.grad_clip > 0:
        new_p, new_s = vmap(lambda p, g, s: update(p, g, s, lr, t, cfg))(P, grads, S)
    else:
        new_p, new_s = update(P, grads, S, lr, t, cfg)
    for k, v in new_p.items():
        P[k].copy_(v)
    for k, v in new_s.items():
        S[k].copy_(v)


def _step_weights(batch: np.ndarray, removed: list[tuple[int, int, bool]], active: int, t: int,
                  dtype: torch.dtype, device: str) -> torch.Tensor:
    """Per-copy sample weights [active, |B_t|] of step t: 1/|B_t|, 0 where a copy's point is removed."""
    n = len(batch)
    W = torch.full((active, n), 1.0 / n, dtype=dtype, device=device)
    for c, i, renorm in removed:
        pos = np.flatnonzero(batch == i)
        if not len(pos):
            raise DveError(f"training index {i} is not in the batch of step {t}")
        W[c, torch.as_tensor(pos)] = 0.0
        if renorm:
            W[c][W[c] > 0] = 1.0 / (n - len(pos))
    return W


def batched_delta(run: TrainedRun, jobs: list[Job], dtype: torch.dtype = torch.float64,
                  kernel: str = "auto") -> np.ndarray:
    """Replay ``jobs`` (same start checkpoint) together; returns [len(jobs), 1 + N_val].

    Copy 0 of the stack is the reference (nothing removed). A job's copy is identical to the
    reference until its first removal, so it joins the stack only then, as a clone of the
    reference at that step: each copy costs the steps from its first removal to T. The stack
    is allocated once ([1 + len(jobs), *shape] per tensor); copies join in order of their
    first removal, so the active copies are always a prefix of it. ``kernel``: how per-copy
    gradients are computed (:func:`grads_for`).
    """
    start = jobs[0].start
    assert all(j.start == start for j in jobs)
    task, traj, cfg = run.task, run.traj, run.cfg
    run.require_exact_replay()
    grads_of = grads_for(task, kernel)
    params, state = run.load_params(start)
    size = 1 + len(jobs)
    stack = {k: v.to(dtype).unsqueeze(0).repeat(size, *([1] * v.dim())) for k, v in params.items()}
    sstack = {k: v.to(dtype).unsqueeze(0).repeat(size, *([1] * v.dim())) for k, v in state.items()}
    # Copies join in order of their first removed step (jobs removing nothing join at T).
    order = sorted(range(len(jobs)), key=lambda j: min(jobs[j].steps, default=run.T))
    joins = [min(jobs[j].steps, default=run.T) for j in order]
    removal: dict[int, list[tuple[int, int, bool]]] = {}
    for c, j in enumerate(order, start=1):
        for t in jobs[j].steps:
            removal.setdefault(t, []).append((c, jobs[j].index, jobs[j].convention == "renormalize"))

    def join(upto: int, active: int) -> int:
        """Clone the reference into every copy whose first removal is ≤ ``upto``."""
        new = active
        while new - 1 < len(joins) and joins[new - 1] <= upto:
            new += 1
        if new > active:
            for buf in (*stack.values(), *sstack.values()):
                buf[active:new] = buf[0]
        return new

    active = 1
    for t in range(start, run.T):
        active = join(t, active)
        batch = traj.batches[t]
        x, y = task.batch(batch)
        x = x.to(dtype) if x.is_floating_point() else x
        W = _step_weights(batch, removal.get(t, ()), active, t, dtype, run.device)
        P = {k: v[:active] for k, v in stack.items()}
        S = {k: v[:active] for k, v in sstack.items()}
        update_stack(P, S, grads_of(P, x, y, W), float(traj.lrs[t]), t, cfg.optim)
    active = join(run.T, active)
    x_val = task.x_val.to(dtype) if task.x_val.is_floating_point() else task.x_val  # LM inputs are token ids
    with torch.no_grad():
        losses = vmap(lambda p: task.per_sample_loss(p, x_val, task.y_val))(stack)  # [P, N_val]
    d = losses[1:] - losses[:1]
    rows = torch.cat([d.mean(dim=1, keepdim=True), d], dim=1).cpu().numpy()
    out = np.empty_like(rows)
    out[np.asarray(order)] = rows
    return out


def tsloo_dir(cfg: Config) -> Path:
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "tsloo", fingerprint(stage_payload(cfg, "tsloo")))


def parse_shard(spec: str | None) -> tuple[int, int]:
    if not spec:
        return 0, 1
    try:
        i, n = (int(s) for s in spec.split("/"))
    except ValueError:
        raise DveError(f"--shard must look like i/n with 0 <= i < n (got {spec!r})") from None
    if n < 1 or not 0 <= i < n:
        raise DveError(f"--shard must look like i/n with 0 <= i < n (got {spec!r})")
    return i, n


def chunks_of(jobs: list[Job], size: int) -> list[list[int]]:
    """Job ids grouped by start checkpoint, then cut into chunks of ``size``."""
    by_start: dict[int, list[int]] = {}
    for j, job in enumerate(jobs):
        by_start.setdefault(job.start, []).append(j)
    out = []
    for s in sorted(by_start):
        ids = by_start[s]
        out += [ids[k : k + size] for k in range(0, len(ids), size)]
    return out


def run_tsloo(cfg: Config, run: TrainedRun, force: bool = False, shard: str | None = None) -> Path:
    """Measure TSLOO for the configured points (resumable, shardable). Returns its directory.

    Deterministic algorithms for the whole measurement (restored after), as training and replay
    use: on a GPU the retrained copies must be as reproducible as the run they are compared to."""
    with torch_state.deterministic():
        return _run_tsloo(cfg, run, force, shard)


def _run_tsloo(cfg: Config, run: TrainedRun, force: bool, shard: str | None) -> Path:
    si, sn = parse_shard(shard)
    tc = cfg.tsloo
    payload = stage_payload(cfg, "tsloo")
    rd = artifacts.RunDir(tsloo_dir(cfg), payload)
    rd.check()
    if force and sn > 1:
        raise DveError("--force cannot be combined with --shard (the shards share one folder); delete "
                       f"{rd.final} to recompute the ground truth")
    # One process per folder; shards lock only their part (they may run at once, on several machines).
    lock = rd.locked() if sn == 1 else artifacts.FolderLock(rd.final / f"part-{si}-of-{sn}")
    with lock:
        if rd.reusable(force):
            return rd.final
        points = select_points(run, tc.n_points, tc.selection, tc.seed)
        jobs = make_jobs(run, points, tc.settings, tc.conventions)
        n_val = int(run.task.x_val.shape[0])
        artifacts.ensure_space(rd.final.parent, 2 * len(jobs) * (1 + n_val) * 8, "the ground-truth deltas")
        rd.prepare(to_dict(cfg), run.device, force=force)
        _run_jobs(cfg, run, rd, jobs, n_val, si, sn)
    return rd.final


def _open_part(part: Path, n_jobs: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (delta map, done-mask): resumed after both are size-checked, else new."""
    delta_path, done_path = part / "delta.npy", part / "done.npy"
    if delta_path.is_file() and done_path.is_file():
        done = artifacts.load_npy(done_path)
        if done.shape != (n_jobs,):
            raise DveError(f"{part} holds results of another job list; rerun with --force")
        delta = artifacts.open_npy(delta_path, "r+", (n_jobs, 1 + n_val), np.float64)
        return delta, done
    delta = artifacts.create_npy(delta_path, (n_jobs, 1 + n_val), np.float64)
    return delta, np.zeros(n_jobs, dtype=bool)


def _run_jobs(cfg: Config, run: TrainedRun, rd: artifacts.RunDir, jobs: list[Job], n_val: int, si: int, sn: int) -> None:
    tc = cfg.tsloo
    artifacts.save_table(rd.file("jobs.parquet"), jobs_frame(jobs))
    part = rd.path / f"part-{si}-of-{sn}"
    part.mkdir(exist_ok=True)
    done_path = part / "done.npy"
    delta, done = _open_part(part, len(jobs), n_val)
    dtype = torch.float64 if tc.dtype == "float64" else torch.float32
    mine = [c for k, c in enumerate(chunks_of(jobs, tc.chunk_size)) if k % sn == si]
    todo = [c for c in mine if not done[c].all()]
    steps_total = sum(run.T - jobs[c[0]].start for c in todo)
    t0 = time.perf_counter()
    with ui.bar(f"tsloo {si}/{sn}" if sn > 1 else "tsloo", total=max(steps_total, 1), unit="step") as bar:
        for c, rows in _compute_chunks(run, jobs, todo, dtype, tc.workers):
            delta[c] = rows
            delta.flush()
            done[c] = True
            artifacts.save_npy(done_path, done)
            bar.update(run.T - jobs[c[0]].start)
    seconds = time.perf_counter() - t0
    # shards finishing together merge one after the other (the merge takes a moment)
    with artifacts.FolderLock(rd.final, min_wait=600) if sn > 1 else contextlib.nullcontext():
        # DONE of the folder being written: a rebuilt one is staged beside the damaged final one
        merged = merge_shards(rd.path, len(jobs), n_val) and not (rd.path / artifacts.DONE).is_file()
        if merged:
            rd.mark_done({"jobs": len(jobs), "seconds_last_call": seconds, "shards": sn})
    if not merged and not rd.done:
        ui.log(f"shard {si}/{sn} finished; run the other shards, then rerun to merge")


def _compute_chunks(run: TrainedRun, jobs: list[Job], todo: list[list[int]], dtype: torch.dtype, workers: int):
    """Yield (job ids, delta rows) per chunk: in this process, or spread over ``workers``
    processes (one torch thread each; each loads the run itself)."""
    if workers <= 0 or len(todo) <= 1:
        for c in todo:
            yield c, batched_delta(run, [jobs[j] for j in c], dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {
            pool.submit(_worker_chunk, str(run.path), run.device, [jobs[j] for j in c], str(dtype)): c
            for c in todo
        }
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


_WORKER_RUN: dict[str, TrainedRun] = {}


def _worker_chunk(path: str, device: str, chunk: list[Job], dtype: str) -> np.ndarray:
    with torch_state.threads(1):
        if path not in _WORKER_RUN:
            _WORKER_RUN[path] = TrainedRun.load(path, device)
        return batched_delta(_WORKER_RUN[path], chunk, getattr(torch, dtype.split(".")[-1]))


def merge_shards(path: Path, n_jobs: int, n_val: int) -> bool:
    """Join the parts of a sharded run into ``delta.npy`` once all jobs are done somewhere."""
    delta = np.zeros((n_jobs, 1 + n_val))
    done = np.zeros(n_jobs, dtype=bool)
    for part in sorted(path.glob("part-*-of-*")):
        pd_, pm = part / "delta.npy", part / "done.npy"
        if not (pd_.is_file() and pm.is_file()):
            continue
        m = artifacts.load_npy(pm)
        if m.shape != (n_jobs,):
            continue
        rows = artifacts.open_npy(pd_, "r", (n_jobs, 1 + n_val), np.float64)
        both = m & done  # a job two parts hold (shards of another count, or rerun): they must agree
        if both.any() and not np.allclose(rows[both], delta[both], rtol=1e-10, atol=1e-15):
            bad = np.flatnonzero(both & ~np.isclose(rows, delta, rtol=1e-10, atol=1e-15).all(axis=1))
            raise ArtifactError(f"{part} disagrees with another part on {len(bad)} job(s) (first: job {bad[0]}); "
                                f"delete {path} to recompute the ground truth")
        delta[m] = rows[m]
        done |= m
    if not done.all():
        return False
    artifacts.save_npy(path / "delta.npy", delta)
    return True


def unfinished_shards(cfg: Config, run: TrainedRun, n: int) -> list[int]:
    """The shards i of ``n`` whose jobs are not all done in ``part-i-of-n`` (all of them
    before the folder exists)."""
    path = tsloo_dir(cfg)
    points = select_points(run, cfg.tsloo.n_points, cfg.tsloo.selection, cfg.tsloo.seed)
    jobs = make_jobs(run, points, cfg.tsloo.settings, cfg.tsloo.conventions)
    chunks = chunks_of(jobs, cfg.tsloo.chunk_size)
    out = []
    for i in range(n):
        mask = path / f"part-{i}-of-{n}" / "done.npy"
        done = artifacts.load_npy(mask) if mask.is_file() else np.zeros(len(jobs), bool)
        mine = [j for k, c in enumerate(chunks) if k % n == i for j in c]
        if done.shape != (len(jobs),) or not done[mine].all():
            out.append(i)
    return out


def shard_job(overrides: list[str], shard: str) -> str:
    """One ground-truth shard ``i/n`` of the configured run (a launcher job: runs in its own
    process or on another machine; the training run must already exist)."""
    from dve_repro.config import compose
    from dve_repro.train import train_dir

    cfg = compose(overrides)
    with ui.progress(False):  # several shards share a terminal: the parent reports
        run = TrainedRun.load(train_dir(cfg), cfg.runtime.device)
        return str(run_tsloo(cfg, run, shard=shard))


def load_ground_truth(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(jobs table, delta [n_jobs, 1 + N_val]) of a finished TSLOO directory."""
    rd = artifacts.RunDir(path, {})
    rd.require_done("ground-truth retraining")
    jobs = artifacts.load_table(path / "jobs.parquet")
    delta = artifacts.load_npy(path / "delta.npy")
    if delta.ndim != 2 or delta.shape[0] != len(jobs):
        raise ArtifactError(f"{path}: delta.npy has shape {delta.shape} but jobs.parquet lists {len(jobs)} jobs")
    return jobs, delta

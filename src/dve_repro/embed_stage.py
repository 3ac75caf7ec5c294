"""Embedding stage (`dve embed`): capture-if-needed → Algorithm 1 / 2 (the maths in
``embedding.py``) → scoring.

Reads a finished training run (config, trajectory, checkpoints, and ``grads/`` when it was
trained with ``trajectory.capture=true``). Writes ``<out_root>/<name>/embed-<fingerprint>/``:

* projected per-sample gradients recomputed by replay, when the training run has none with
  this projection, go to a sibling ``grads-<fingerprint>/`` shared by every embedding with
  the same projection and curvature (resumable through its done-mask);
* a fitted projection (``projection.kind=kfac``) is first estimated from the run by a replay
  into a sibling ``projection-<fingerprint>/`` (``projection_fit.py``), whose checksum the
  saved projection description carries;
* ``E.npy`` — [N_occ, p̃] DVEmb of every (training index, step) occurrence;
* ``occurrences.parquet`` — row → (index, step, epoch);
* ``scores.parquet`` — index, step, epoch, score: predicted L(θ'_T) − L(θ_T) of the mean
  validation loss when the occurrence is removed (positive = helped);
* ``scores_points.npy`` — [N_occ, N_val] the same per validation point;
* ``values.parquet`` — per training index: ``all_epoch`` (sum over occurrences) and
  ``single_epoch`` (last occurrence);
* ``dynamics.npy`` + ``boundaries.json`` (Algorithm 2) — influence of each occurrence on
  the validation loss at every segment-boundary checkpoint (paper Fig. 4);
* ``embedding.json`` — projection, curvature, algorithm, and whether the estimate is
  exact-SGD or an SGD proxy; ``DONE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts, distributed, embedding, ui
from dve_repro.capture import Featurizer, GradientStore, curvature_rows_per_point, store_meta
from dve_repro.config import Config, compose, fingerprint, from_dict, stage_payload, to_dict
from dve_repro.errors import ArtifactError, ConfigError, DveError
from dve_repro.optim import is_plain_sgd
from dve_repro.projection import check_compatible
from dve_repro.projection_fit import make_projector
from dve_repro.replay import TrainedRun, replay
from dve_repro.tasks import mc_step_seed
from dve_repro.train import capture_blocks, train_dir

TRAIN_SECTIONS = ("name", "seed", "data", "model", "optim", "schedule", "train", "trajectory")


def embed_overrides(run_dir: Path | None, overrides: list[str]) -> list[str]:
    """``overrides`` with ``experiment=<the run's>`` in front when ``run_dir`` was trained from
    one of the shipped experiments and no ``experiment=`` is given (its projection, embed, …
    settings are then the experiment's)."""
    if run_dir is not None and not any(o.startswith("experiment=") for o in overrides):
        from dve_repro.config import list_experiments

        path = Path(run_dir) / "config.json"
        saved = (artifacts.read_json(path).get("config") or {}).get("name") if path.is_file() else None
        if saved in list_experiments():
            return [f"experiment={saved}", *overrides]
    return list(overrides)


def open_run(run_dir: Path | None, requested: Config) -> tuple[Config, TrainedRun]:
    """The config to embed with and the training run it reads, from the config composed once
    from :func:`embed_overrides`.

    With ``run_dir`` the training sections come from the run's saved config and the rest from
    ``requested``; otherwise ``requested`` names the run."""
    if run_dir is None:
        path = train_dir(requested)
        if not path.is_dir():
            raise ArtifactError(f"no training run for this config at {path}; run `dve train` with the same overrides first")
        run = TrainedRun.load(path, requested.runtime.device, inexact_replay=requested.runtime.inexact_replay)
        return requested, run
    run = TrainedRun.load(run_dir, requested.runtime.device, inexact_replay=requested.runtime.inexact_replay)
    cfg = dataclasses.replace(requested, **{k: getattr(run.cfg, k) for k in TRAIN_SECTIONS})
    # Outputs go beside the training run: <out_root>/<name>/train-<fp> → <out_root>.
    out_root = str(Path(run_dir).resolve().parents[1])
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, out_root=out_root)), run


def resolve(run_dir: Path | None, overrides: list[str]) -> tuple[Config, TrainedRun]:
    """:func:`open_run` on the overrides composed here (for callers without a config yet)."""
    return open_run(run_dir, compose(embed_overrides(run_dir, overrides)))


def estimator_label(cfg: Config) -> str:
    if cfg.embed.optimizer_aware:
        return (f"AdamW-aware: the linearised AdamW map ({cfg.embed.curvature} curvature, "
                f"{cfg.embed.adamw_subspace} subspace)")
    if is_plain_sgd(cfg.optim):
        return f"first-order SGD estimate ({cfg.embed.curvature} curvature)"
    what = [cfg.optim.name] + (["momentum"] if cfg.optim.momentum else []) + (["clipping"] if cfg.optim.grad_clip else [])
    return f"SGD proxy: the run used {'+'.join(what)}; recursion applied with scheduled lr and raw gradients"


def make_featurizer(cfg: Config, run: TrainedRun) -> Featurizer:
    if cfg.embed.optimizer_aware:  # query gradients mapped into the AdamW embedding's subspace
        from dve_repro.embed_adamw import SubspaceFeaturizer

        return SubspaceFeaturizer.for_config(cfg, run)  # type: ignore[return-value]
    blocks = capture_blocks(run.task)
    return Featurizer(run.task, blocks, make_projector(cfg, run, blocks), cfg.embed.engine)


def gradients(cfg: Config, run: TrainedRun, feat: Featurizer, folder: Path) -> GradientStore:
    """Captured gradients of the training run when they match, else recompute by replay."""
    offsets = run.traj.offsets()
    rpp = curvature_rows_per_point(cfg.embed.curvature, run.task.n_classes, cfg.embed.mc_samples)
    meta = store_meta(feat, cfg.embed)
    captured = run.path / "grads"
    if captured.is_dir():
        try:
            store = GradientStore(captured, offsets, feat.projector.out_dim, meta, rpp, cfg.embed.storage_dtype)
            if store.complete:
                ui.log(f"using gradients captured during training ({captured})")
                return store
        except DveError:
            pass  # captured with another projection or curvature: recompute below
    with artifacts.FolderLock(folder):  # shared by embeddings: one process fills it at a time
        if (folder / artifacts.DONE).is_file() and (problems := artifacts.verify(folder)):
            ui.warn(f"warning: {folder} is damaged ({problems[0]}); recomputing the gradients")
            shutil.rmtree(folder)
        store = GradientStore(folder, offsets, feat.projector.out_dim, meta, rpp, cfg.embed.storage_dtype)
        if not store.complete:
            _replay_gradients(cfg, run, feat, store, rpp)
        if not (folder / artifacts.DONE).is_file():
            artifacts.RunDir(folder, {}).mark_done({"gradients": "complete"})
    return store


def _replay_gradients(cfg: Config, run: TrainedRun, feat: Featurizer, store: GradientStore, rpp: int) -> None:
    first = int(np.flatnonzero(~store.done)[0])
    start = run.nearest_checkpoint(first)
    traj, task = run.traj, run.task
    todo = int((~store.done).sum())
    pending: list[int] = []
    with ui.bar("capture (replay)", total=todo, unit="step") as bar:

        def before(t: int, params: dict) -> None:
            if store.done[t]:
                return
            x, y = task.batch(traj.batches[t])
            rows = feat.features(params, x, y)
            curv = None
            if rpp:
                curv = feat.curvature(params, x, y, cfg.embed.curvature, cfg.embed.mc_samples,
                                       mc_step_seed(cfg.embed.mc_seed, t))
            store.write(t, rows, curv)
            pending.append(t)
            if len(pending) >= 32:
                store.commit(pending)
                pending.clear()
            bar.update(1)

        replay(run, start=start, before_step=before)
        store.commit(pending)


def grads_dir(cfg: Config, feat: Featurizer) -> Path:
    """Recomputed gradients are shared by every embedding of the same run, projection and curvature."""
    key = {"train": stage_payload(cfg, "train"), "meta": store_meta(feat, cfg.embed), "dtype": cfg.embed.storage_dtype}
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "grads", fingerprint(key))


def query_features(feat: Featurizer, params: dict, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Projected gradients of each query's loss at ``params``: [N_q, p̃]."""
    return torch.cat([feat.features(params, x[s : s + chunk], y[s : s + chunk]) for s in range(0, x.shape[0], chunk)])


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype of Algorithms 1/2 on the run's device (``embed.compute_dtype``)."""
    return torch.float64 if cfg.embed.compute_dtype == "float64" else torch.float32


def embed_dir(cfg: Config) -> Path:
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "embed", fingerprint(stage_payload(cfg, "embed")))


def boundaries_for(run: TrainedRun, k: int) -> list[int]:
    """K segments cut at the checkpoints nearest to an even split of [0, T)."""
    if k > run.T:
        raise DveError(f"embed.segments={k} is larger than the number of steps T={run.T}")
    inner = [c for c in run.checkpoints if 0 < c < run.T]
    if k - 1 > len(inner):
        raise DveError(
            f"embed.segments={k} needs {k - 1} intermediate checkpoints but the run has {len(inner)} "
            "(retrain with a smaller trajectory.checkpoint_every)"
        )
    chosen: list[int] = []
    for j in range(1, k):
        target = j * run.T / k
        best = min((c for c in inner if c not in chosen), key=lambda c: abs(c - target))
        chosen.append(best)
    return [0, *sorted(chosen), run.T]


def run_embedding(cfg: Config, run: TrainedRun, force: bool = False) -> Path:
    ctx = distributed.context(run.device)
    # Refuse an impossible segmentation before any folder is made or gradient computed.
    bounds = boundaries_for(run, cfg.embed.segments) if cfg.embed.algorithm == 2 else None
    if ctx.active:
        return _run_embedding_ranks(cfg, run, ctx, force, bounds)
    payload = stage_payload(cfg, "embed")
    rd = artifacts.RunDir(embed_dir(cfg), payload)
    rd.check()
    with rd.locked():  # one process per embedding folder; a finished one is verified before reuse
        if rd.reusable(force):
            ui.log(f"reusing finished embedding {rd.final}")
            return rd.final
        if cfg.embed.optimizer_aware:
            from dve_repro import embed_adamw

            embed_adamw.check_fits(cfg, run)
            rd.prepare(to_dict(cfg), run.device, force=force)
            embed_adamw.embed_stage(cfg, run, rd, bounds)
            return rd.final
        feat = make_featurizer(cfg, run)
        blocks = feat.projector.block_slices() if cfg.embed.blocks == "layer" else None
        embedding.check_matrix_fits(feat.projector.out_dim, blocks, compute_dtype(cfg), cfg.embed.max_matrix_gb,
                                    copies=2 if cfg.embed.algorithm == 2 else 1)
        _check_space(cfg, run, feat, rd.final)
        rd.prepare(to_dict(cfg), run.device, force=force)
        _embed(cfg, run, rd, feat, blocks, bounds)
    return rd.final


def _run_embedding_ranks(cfg: Config, run: TrainedRun, ctx: distributed.Context, force: bool, bounds) -> Path:
    """:func:`run_embedding` under torchrun. Rank 0 checks, locks and prepares the folder,
    and brings the gradient rows (captured, or recomputed by replay); then the recursion is
    split: Algorithm 1's per-layer M blocks (independent given the rows) in contiguous
    groups of about equal Σ p_b², or Algorithm 2's segments, one group per rank, each rank
    writing its columns / rows of the shared E. Rank 0 then combines (Algorithm 2) and
    scores exactly as one process does."""
    if cfg.embed.optimizer_aware:
        raise ConfigError("embed.optimizer_aware=true runs on one process; run it without torchrun")
    if cfg.embed.algorithm == 1 and cfg.embed.blocks != "layer":
        raise ConfigError("Algorithm 1 with one M (embed.blocks=full) cannot be split over processes; use "
                          "embed.blocks=layer, embed.algorithm=2, or run it without torchrun")
    rd = artifacts.RunDir(embed_dir(cfg), stage_payload(cfg, "embed"))
    with contextlib.ExitStack() as stack:
        held: dict = {}

        def prepare():  # rank 0: what one process does before the recursion
            rd.check()
            stack.enter_context(rd.locked())
            if rd.reusable(force):
                return None
            feat = held["feat"] = make_featurizer(cfg, run)
            blocks = feat.projector.block_slices() if cfg.embed.blocks == "layer" else None
            embedding.check_matrix_fits(feat.projector.out_dim, blocks, compute_dtype(cfg), cfg.embed.max_matrix_gb,
                                        copies=2 if cfg.embed.algorithm == 2 else 1)
            _check_space(cfg, run, feat, rd.final)
            rd.prepare(to_dict(cfg), run.device, force=force)
            t0 = time.perf_counter()
            store = held["store"] = gradients(cfg, run, feat, grads_dir(cfg, feat))
            held["capture_s"] = time.perf_counter() - t0
            artifacts.create_npy(rd.file("E.npy.partial"), store.G.shape, cfg.embed.storage_dtype).flush()
            return str(rd.path), str(store.folder), blocks

        plan = distributed.on_main(ctx, prepare)
        if plan is None:
            ui.log(f"reusing finished embedding {rd.final}")
            return rd.final
        path, store_folder, blocks = plan
        rd.path = Path(path)
        store = held.get("store") or GradientStore.open_existing(Path(store_folder))
        E = artifacts.open_npy(rd.file("E.npy.partial"), "r+")
        offsets, w = run.traj.offsets(), run.traj.lrs / run.traj.sizes()
        kw = {"dtype": compute_dtype(cfg), "max_matrix_gb": cfg.embed.max_matrix_gb, "device": run.device}
        t0 = time.perf_counter()
        if cfg.embed.algorithm == 1:
            dynamics = _ranked_algorithm1(cfg, ctx, store, E, offsets, w, blocks, kw)
        else:
            dynamics = _ranked_algorithm2(run, ctx, store, E, offsets, w, blocks, bounds, held.get("feat"), kw)
        if ctx.is_main:
            E.flush()
            del E
            feat = held["feat"]
            timings = {"capture_s": held["capture_s"], "algorithm_s": time.perf_counter() - t0}
            finish_embedding(cfg, run, rd, feat, dynamics, bounds, timings, _embedding_meta(cfg, run, feat, store)
                             | {"ranks": ctx.world})
        ctx.barrier()  # the other ranks return once rank 0 has marked the embedding done
    return rd.final


def _ranked_algorithm1(cfg: Config, ctx: distributed.Context, store, E, offsets, w, blocks, kw) -> None:
    """This rank's contiguous group of per-layer M blocks (about equal Σ p_b² per rank), its
    columns of the shared E written in place; no dynamics (returns None)."""
    p = store.G.shape[1]
    first, last = distributed.split_contiguous([(b.stop - b.start) ** 2 for b in blocks], ctx.world)[ctx.rank]
    cols, mine = embedding.column_part(blocks, p, first, last)
    ui.log(f"algorithm 1 on {ctx.world} ranks: rank 0 has M blocks {first}..{last - 1} of {len(blocks)}")
    if mine:
        embedding.algorithm1(store.G[:, cols], offsets, w, F=None if store.F is None else store.F[:, cols],
                             f_offsets=store.f_offsets(), blocks=mine, out=E[:, cols],
                             chunk_steps=cfg.embed.chunk_steps, **kw)
    E.flush()
    ctx.barrier()
    return None


def _ranked_algorithm2(run: TrainedRun, ctx: distributed.Context, store, E, offsets, w, blocks, bounds, feat, kw):
    """This rank's contiguous group of segments (about equal rows per rank), their local rows
    written into E; rank 0 gathers every segment's M_k and propagates across segments
    (:func:`embedding.algorithm2` with ``local``), returning the dynamics (None elsewhere)."""
    K = len(bounds) - 1
    first, last = distributed.split_contiguous([int(offsets[bounds[k + 1]] - offsets[bounds[k]])
                                                for k in range(K)], ctx.world)[ctx.rank]
    ui.log(f"algorithm 2 on {ctx.world} ranks: {K} segments at {bounds}; rank 0 has {first}..{last - 1}")
    local = embedding.segment_recursions(store.G, offsets, w, bounds, range(first, last), F=store.F,
                                         f_offsets=store.f_offsets(), blocks=blocks, out=E, **kw)
    E.flush()
    parts = ctx.gather({k: [M.cpu() for M in (M if isinstance(M, list) else [M])] for k, M in local.items()})
    if not ctx.is_main:
        return None
    merged = {k: M if blocks is not None else M[0] for part in parts for k, M in part.items()}
    queries = {j: query_features(feat, run.load_params(b)[0], run.task.x_val, run.task.y_val).mean(0)
               for j, b in enumerate(bounds[1:], start=1)}
    return embedding.algorithm2(store.G, offsets, w, bounds, F=store.F, f_offsets=store.f_offsets(),
                                blocks=blocks, queries=queries, out=E, local=merged, **kw).dynamics


def _check_space(cfg: Config, run: TrainedRun, feat: Featurizer, folder: Path) -> None:
    """Refuse before any work when E, the scores and recomputed gradients cannot fit on disk."""
    n_rows, item = int(run.traj.offsets()[-1]), np.dtype(cfg.embed.storage_dtype).itemsize
    rpp = curvature_rows_per_point(cfg.embed.curvature, run.task.n_classes, cfg.embed.mc_samples)
    need = n_rows * feat.projector.out_dim * item + n_rows * (1 + int(run.task.x_val.shape[0])) * 8
    if not (run.path / "grads").is_dir() and not (grads_dir(cfg, feat) / artifacts.DONE).is_file():
        need += n_rows * (1 + rpp) * feat.projector.out_dim * item
    artifacts.ensure_space(folder.parent, need, "the embedding (E, scores and gradients)")


def _embed(cfg: Config, run: TrainedRun, rd: artifacts.RunDir, feat: Featurizer, blocks, bounds) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    store = gradients(cfg, run, feat, grads_dir(cfg, feat))
    timings["capture_s"] = time.perf_counter() - t0
    offsets = run.traj.offsets()
    w = run.traj.lrs / run.traj.sizes()
    E = artifacts.create_npy(rd.file("E.npy.partial"), store.G.shape, cfg.embed.storage_dtype)
    t0 = time.perf_counter()
    dynamics = None
    if cfg.embed.algorithm == 1:
        with ui.bar("algorithm 1", total=run.T, unit="step") as bar:
            embedding.algorithm1(store.G, offsets, w, F=store.F, f_offsets=store.f_offsets(), blocks=blocks, out=E,
                                 chunk_steps=cfg.embed.chunk_steps, progress=bar.update,
                                 max_matrix_gb=cfg.embed.max_matrix_gb, dtype=compute_dtype(cfg), device=run.device)
    else:
        queries = {}
        for j, b in enumerate(bounds[1:], start=1):
            params = run.load_params(b)[0]  # θ_T for the last boundary
            queries[j] = query_features(feat, params, run.task.x_val, run.task.y_val).mean(0)
        ui.log(f"algorithm 2: {len(bounds) - 1} segments at {bounds}, workers={cfg.embed.workers}")
        res = embedding.algorithm2(store.G, offsets, w, bounds, F=store.F, f_offsets=store.f_offsets(), blocks=blocks,
                                   workers=cfg.embed.workers, queries=queries, out=E,
                                   max_matrix_gb=cfg.embed.max_matrix_gb, dtype=compute_dtype(cfg), device=run.device)
        dynamics = res.dynamics
    E.flush()
    timings["algorithm_s"] = time.perf_counter() - t0
    del E
    finish_embedding(cfg, run, rd, feat, dynamics, bounds, timings, _embedding_meta(cfg, run, feat, store))


def _embedding_meta(cfg: Config, run: TrainedRun, feat: Featurizer, store: GradientStore) -> dict:
    return {
        "projection": feat.projector.describe(),
        "curvature": cfg.embed.curvature,
        "layers": [b.name for b in feat.blocks],
        "left_out": run.task.extra.get("left_out", "nothing (all parameters)"),
        "p_tilde": feat.projector.out_dim,
        "gradient_bytes": store.nbytes(),
    }


def finish_embedding(cfg: Config, run: TrainedRun, rd: artifacts.RunDir, feat, dynamics, bounds,
                     timings: dict, meta: dict) -> None:
    """Score the finished ``E.npy.partial`` at θ_T, write every output and DONE (shared by
    the SGD recursion and the AdamW-aware one, ``embed_adamw.py``). ``feat.features(θ, x, y)``
    maps query gradients to E's coordinates."""
    sdtype = torch.float64 if cfg.embed.storage_dtype == "float64" else torch.float32
    occ = run.traj.occurrences()
    final = run.final_params()
    E = artifacts.open_npy(rd.file("E.npy.partial"), "r")
    # Scoring at θ_T: the mean validation loss's gradient is the mean of the per-point ones.
    # Rows of E are read from the disk and moved to the queries' device (the run's).
    t0 = time.perf_counter()
    Q = query_features(feat, final, run.task.x_val, run.task.y_val).to(run.device, sdtype)  # [N_val, p̃]
    q_mean = Q.mean(0)
    scores_mean = np.empty(len(occ))
    scores_pts = artifacts.create_npy(rd.file("scores_points.npy.partial"), (len(occ), Q.shape[0]), np.float64)
    for a in range(0, len(occ), 8192):
        rows = torch.from_numpy(np.array(E[a : a + 8192])).to(run.device, sdtype)
        scores_mean[a : a + 8192] = (rows @ q_mean).double().cpu().numpy()
        scores_pts[a : a + 8192] = (rows @ Q.T).double().cpu().numpy()
    scores_pts.flush()
    timings["scoring_s"] = time.perf_counter() - t0
    del E, scores_pts
    # Rename the big arrays into place only once complete.
    Path(rd.file("E.npy.partial")).replace(rd.file("E.npy"))
    Path(rd.file("scores_points.npy.partial")).replace(rd.file("scores_points.npy"))
    table = occ.assign(score=scores_mean)
    artifacts.save_table(rd.file("occurrences.parquet"), occ)
    artifacts.save_table(rd.file("scores.parquet"), table)
    idx, total, last = embedding.per_index_views(torch.from_numpy(scores_mean), occ["index"].to_numpy(), occ["step"].to_numpy())
    artifacts.save_table(rd.file("values.parquet"), pd.DataFrame(
        {"index": idx.numpy(), "all_epoch": total.numpy(), "single_epoch": last.numpy()}))
    if dynamics is not None:
        artifacts.save_npy(rd.file("dynamics.npy"), np.asarray(dynamics, dtype=np.float64))
        artifacts.write_json(rd.file("boundaries.json"), {"boundaries": bounds})
    meta = {
        # relative to this folder (usually ../train-<fp>): the pair can be moved or copied together
        "train_run": os.path.relpath(Path(run.path).absolute(), Path(rd.final).absolute()),
        "train_fingerprint": fingerprint(stage_payload(cfg, "train")),
        "algorithm": cfg.embed.algorithm,
        "blocks": cfg.embed.blocks,
        "estimator": estimator_label(cfg),
        "optimizer_aware": cfg.embed.optimizer_aware,
        "n_occurrences": len(occ),
        "timings": timings,
        **meta,
    }
    artifacts.write_json(rd.file("embedding.json"), meta)
    rd.mark_done({"timings": timings})
    ui.log(f"embedded {len(occ)} occurrences (p̃={meta['p_tilde']}, {meta['estimator']}) -> {rd.final}")


def load_embedding(path: Path) -> tuple[dict, Config]:
    rd = artifacts.RunDir(path, {})
    if not Path(path).is_dir():
        raise ArtifactError(f"embedding directory not found: {path}")
    rd.require_done("embedding")
    meta = artifacts.read_json(Path(path) / "embedding.json")
    cfg = from_dict(artifacts.read_json(Path(path) / "config.json")["config"])
    return meta, cfg


def train_run_of(embed_path: Path, meta: dict) -> Path:
    """The training run an embedding was computed from: ``embedding.json``'s ``train_run``,
    relative to the embedding's folder (absolute in folders written before that)."""
    path = Path(meta["train_run"])
    return path if path.is_absolute() else Path(os.path.normpath(Path(embed_path).absolute() / path))


def score_queries(embed_path: Path, overrides: list[str], split: str, queries_file: Path | None) -> Path:
    """Score a query set against saved embeddings (no recomputation). Writes
    ``query-<name>/scores.parquet`` (index, step, epoch, score for the query set's mean loss)."""
    meta, cfg = load_embedding(embed_path)
    if overrides:
        # The overrides apply on top of the saved projection, not on the defaults.
        saved = dataclasses.asdict(cfg.projection)
        base = [f"projection={saved['kind']}", *(f"projection.{k}={v}" for k, v in saved.items() if k != "kind")]
        requested = compose([*base, *overrides]).projection
        asked = dataclasses.asdict(requested)
        saved.pop("chunk_size"), asked.pop("chunk_size")
        check_compatible(saved, asked, f"embedding {embed_path}")
    run = TrainedRun.load(train_run_of(embed_path, meta), cfg.runtime.device)
    feat = make_featurizer(cfg, run)
    device = run.device
    check_compatible(meta["projection"], feat.projector.describe(), f"embedding {embed_path}")
    if queries_file is not None:
        name = Path(queries_file).stem
        try:
            data = np.load(queries_file)
            x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
        except Exception as exc:
            raise DveError(f"cannot read queries from {queries_file} (need an .npz with arrays x and y): {exc}") from None
        want = tuple(run.task.x_train.shape[1:])
        if tuple(x.shape[1:]) != want or x.shape[0] != y.shape[0]:
            raise DveError(f"query features have shape {tuple(x.shape[1:])} but the model takes {want}")
        if run.task.kind == "classify" and len(y) and (int(y.min()) < 0 or int(y.max()) >= run.task.n_classes):
            raise DveError(f"query labels must lie in [0, {run.task.n_classes}) "
                           f"(got {int(y.min())}..{int(y.max())}) in {queries_file}")
        # queries enter the model on its device, as the training points do (token ids: int64)
        x = x.to(device, torch.long if run.task.kind == "lm" else run.task.x_val.dtype)
        y = y.to(device)
    else:
        name = split
        if split == "val":
            x, y = run.task.x_val, run.task.y_val
        elif split == "test" and "x_test" in run.task.extra:
            x, y = run.task.extra["x_test"], run.task.extra["y_test"]
        else:
            raise DveError(f"unknown query split {split!r} (use val or test, or --queries FILE.npz)")
    if x.shape[0] == 0:
        raise DveError(f"the query set {name!r} is empty")
    q = query_features(feat, run.final_params(), x, y).mean(0).to(device, torch.float64)
    E = artifacts.open_npy(Path(embed_path) / "E.npy", "r")
    scores = np.concatenate([(torch.from_numpy(np.array(E[a : a + 8192])).to(device, torch.float64) @ q).cpu().numpy()
                             for a in range(0, E.shape[0], 8192)])
    occ = artifacts.load_table(Path(embed_path) / "occurrences.parquet")
    if len(occ) != len(scores):
        raise ArtifactError(f"{embed_path}: E.npy has {len(scores)} rows but occurrences.parquet {len(occ)}")
    rd = artifacts.RunDir(Path(embed_path) / f"query-{name}", {})
    with rd.locked():
        rd.final.mkdir(exist_ok=True)
        (rd.final / artifacts.DONE).unlink(missing_ok=True)
        artifacts.save_table(rd.file("scores.parquet"), occ.assign(score=scores))
        rd.mark_done({"queries": name, "n": int(x.shape[0])})
    return rd.final / "scores.parquet"


def embed_dir_for(cfg: Config) -> Path:
    """The finished embedding folder that `dve embed` with this config writes."""
    path = embed_dir(cfg)
    if not (path / artifacts.DONE).is_file():
        raise ArtifactError(f"no finished embedding for this config at {path}; run `dve embed` with the same "
                            "overrides first")
    return path


def score_summary(scores_path: Path, top: int = 5) -> list[str]:
    """Lines naming the ``top`` most helpful and most harmful training points (scores summed
    over each point's occurrences; positive = removing the point raises the query loss)."""
    df = artifacts.load_table(scores_path)
    per = df.groupby("index")["score"].sum().sort_values(ascending=False)
    fmt = lambda s: ", ".join(f"{int(i)} ({v:+.3g})" for i, v in s.items())  # noqa: E731
    return [f"{len(per)} training points scored; most helpful: {fmt(per.head(top))}",
            f"most harmful: {fmt(per.tail(top)[::-1])}"]

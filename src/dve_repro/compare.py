"""Compare stage: every estimator against ground-truth TSLOO (paper §5.1, Fig. 3).

Reads the training run, its embedding, and the TSLOO run (each made on demand); computes
the full-dimension unrolled scores (``unroll.py``) and the baselines (``baselines.py``),
each cached in its own run folder ``<out_root>/<name>/method-<method>-<fingerprint>/``
(``scores.npy``; locked, verified before reuse, rebuilt when damaged or with ``--force``)
whose fingerprint covers exactly what that method reads (:func:`method_payload`): the
recorded trajectory, the queries (``baselines.val_points``) and the method's own settings
(curvature; ``mc`` seed and samples; the influence function's CG settings). So a change of
the embedding recomputes only the embedding (``dvemb`` and ``dvemb-adamw-*`` are read from
their embedding folders, keyed by the embed stage's fingerprint), a change of
``baselines.if_damping`` only ``influence``, and the summary's ``baselines.bootstrap`` /
``bootstrap_seed`` no method. The tables below are rebuilt from the cached scores on every
run, then written as small results to ``results/<name>/``:

* ``tidy.csv`` — one row per (point, setting, convention, method): estimate and ground truth
  for the mean validation loss;
* ``summary.csv`` / ``summary.md`` — Spearman and Pearson with bootstrap 95% intervals for the
  mean validation loss, and the per-validation-point correlations averaged over points;
* ``scatter.{png,pdf}`` — estimate vs truth per method and setting, correlation printed;
* ``correlations.{png,pdf}`` — bar chart of every Spearman correlation;
* ``COMMAND.txt`` — the command that produced them.

Methods (all on the TSLOO sign). Per-occurrence estimates give single-epoch removal from
the point's last occurrence and all-epoch removal from the sum over occurrences:
``dvemb`` (Algorithm 1, the configured projection and curvature; ``dvemb-sgd-proxy`` on an
AdamW / momentum / clipped run), ``dvemb-paper`` (the paper's own choices beside a configured
fitted projection or other curvature: random Kronecker projection, empirical Fisher;
:func:`paper_config`), ``unrolled-<c>`` (no projection, matrix-free, curvature c:
``hessian`` is the exact first-order unrolled influence, ``ef`` is DVEmb without projection,
``none`` drops the Hessian term; ``unrolled-adamw-<c>`` through the linearised AdamW map;
``unrolled-adamw-nl-<c>`` with the AdamW map taken exactly at the removal step and along the
tail of its moment perturbation, the loss curvature still first order).
Per-point baselines give one value whatever the setting: ``influence``, ``tracin``,
``grad-dot``.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dve_repro import artifacts, baselines, ui, unroll
from dve_repro.config import Config, fingerprint, stage_payload, to_dict
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun
from dve_repro.stats import correlation_ci, pearson, spearman
from dve_repro.tables import markdown_table

PER_POINT_METHODS = ("influence", "tracin", "grad-dot")
# A language model's default: the influence function's conjugate gradient costs a pass of
# Hessian-vector products over the training set per iteration (pythia_tiny_adamw, 1 thread:
# 56 s per iteration, up to cg_iters = 100, against 24 s for all of grad-dot); `--baselines` adds it.
LM_PER_POINT_METHODS = ("tracin", "grad-dot")


SCORES = "scores.npy"


def method_payload(cfg: Config, method: str, k: int) -> dict:
    """What the cached scores of ``method`` depend on, and nothing else (its folder's key).

    Every cached method reads the training run — only its trajectory (parameters at every
    step: data, model, optimizer, schedule, loop, checkpoints, seed), not what was captured
    with it — and the queries: the mean loss over the whole validation set, then the first
    ``k`` validation points (``k`` = ``baselines.val_points`` capped at the validation set).
    Besides: ``unrolled-*`` its curvature (``mc`` also ``embed.mc_samples`` and
    ``embed.mc_seed``), ``influence`` the conjugate-gradient solve (``baselines.if_damping``,
    ``cg_iters``, ``cg_tol``); ``tracin`` and ``grad-dot`` nothing more. The summary settings
    (``baselines.bootstrap``, ``bootstrap_seed``), the embedding and the ground truth enter no key.
    """
    payload: dict = {"method": method, "trajectory": stage_payload(cfg, "trajectory"), "query_points": int(k)}
    if method.startswith("unrolled-"):
        curvature = method.rsplit("-", 1)[1]
        payload["curvature"] = curvature
        if method.startswith("unrolled-adamw-nl-"):
            payload["nonlinear_threshold"] = float(cfg.baselines.adamw_nl_threshold)
        if curvature == "mc":
            payload["mc"] = {"mc_samples": cfg.embed.mc_samples, "mc_seed": cfg.embed.mc_seed}
    elif method == "influence":
        b = cfg.baselines
        payload["influence"] = {"if_damping": b.if_damping, "cg_iters": b.cg_iters, "cg_tol": b.cg_tol}
    elif method not in ("tracin", "grad-dot"):
        raise ValueError(f"no cached scores for method {method!r}")
    return payload


def method_dir(cfg: Config, method: str, payload: dict) -> Path:
    """``<out_root>/<name>/method-<method>-<fingerprint of its payload>/``."""
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, f"method-{method}", fingerprint(payload))


def cached_scores(cfg: Config, run: TrainedRun, method: str, k: int, compute, force: bool = False) -> np.ndarray:
    """The scores of ``method`` from its own verified run folder, or ``compute(folder)`` into it.

    The folder is locked while in use; a finished one is reused only when its manifest
    verifies, and a damaged one (or ``force``) is rebuilt beside it and swapped in when
    complete. ``compute`` may write side files (diagnostics) into the folder it is given."""
    payload = method_payload(cfg, method, k)
    rd = artifacts.RunDir(method_dir(cfg, method, payload), payload)
    with rd.locked():
        try:
            rd.check()
        except DveError as exc:  # its name is the payload's hash: an unreadable or other config.json is damage
            ui.warn(f"warning: {rd.final} is damaged ({exc}); recomputing it")
            shutil.rmtree(rd.final)
        if rd.reusable(force):
            try:
                value = artifacts.load_npy(rd.final / SCORES)
            except DveError as exc:  # a cache: recomputing it gives the same values
                ui.warn(f"warning: {exc}; recomputing it")
                force = True
            else:
                ui.log(f"reusing {method} scores from {rd.final}")
                return value
        rd.prepare(to_dict(cfg), run.device, force=force)
        value = np.asarray(compute(rd.path))
        artifacts.save_npy(rd.file(SCORES), value)
        rd.mark_done({"method": method, "shape": list(value.shape)})
    return value


def point_methods(task_kind: str, per_point: bool | Sequence[str] | None) -> tuple[str, ...]:
    """The per-point baselines to run: True all of ``PER_POINT_METHODS``, False none, names
    as given (checked), None the default for the task (a language model's leaves out the
    influence function, ``LM_PER_POINT_METHODS``); in the table's order."""
    if per_point is None:
        per_point = True if task_kind != "lm" else LM_PER_POINT_METHODS
    names = PER_POINT_METHODS if per_point is True else () if per_point is False else tuple(per_point)
    unknown = sorted(set(names) - set(PER_POINT_METHODS))
    if unknown:
        raise DveError(f"unknown per-point baseline(s) {unknown}; choose from {list(PER_POINT_METHODS)}")
    return tuple(m for m in PER_POINT_METHODS if m in names)


def method_scores(cfg: Config, run: TrainedRun, embed_path: Path, force: bool = False,
                  per_point: bool | Sequence[str] = True, folders: dict | None = None) -> tuple[dict, dict]:
    """Per-occurrence [N_occ, Q] and per-index [n_train, Q] scores of every method.

    Query 0 is the mean validation loss; queries 1..K the first K validation points.
    ``baselines.curvatures=[]`` skips the unrolled methods; ``per_point`` says which per-point
    baselines run: True all of ``PER_POINT_METHODS``, False none, or their names (at
    language-model scale the influence function's CG costs a full-dimension Hessian-vector
    product over the training set per iteration).
    ``dvemb`` is read from the embedding's folder; every other method from its own cache
    (:func:`cached_scores`; ``force`` recomputes them). ``folders`` collects {method: folder}.
    """
    folders = {} if folders is None else folders
    k = min(cfg.baselines.val_points, int(run.task.x_val.shape[0]))
    occ_scores: dict[str, np.ndarray] = {}
    # On a momentum / AdamW / clipped run the paper's recursion is an SGD proxy: say so in its name.
    occ_scores[dvemb_name(run)] = _embedding_scores(embed_path, k)
    folders[dvemb_name(run)] = embed_path
    paper = paper_config(cfg)
    if cfg.baselines.paper_dvemb and paper is not None:
        from dve_repro.embed_stage import run_embedding

        folders[f"{dvemb_name(run)}-paper"] = path = run_embedding(paper, run)
        occ_scores[f"{dvemb_name(run)}-paper"] = _embedding_scores(path, k)
    x_q, y_q = run.task.x_val, run.task.y_val
    idx_scores: dict[str, np.ndarray] = {}
    curvatures = list(cfg.baselines.curvatures)
    if run.task.kind == "lm" and "gn" in curvatures:
        ui.log("compare: unrolled-gn is defined for classifiers only; skipped for this language model")
        curvatures.remove("gn")
    if not curvatures and not per_point and run.cfg.optim.name != "adamw":
        return occ_scores, idx_scores
    queries: dict = {}

    def q() -> dict:  # the query gradients at θ_T, computed once and only when a method needs them
        if not queries:
            grads = unroll.query_gradients(run, run.final_params(), x_q, y_q)
            queries.update({n: v[: 1 + k] for n, v in grads.items()})
        return queries

    def cached(name: str, compute) -> np.ndarray:
        value = cached_scores(cfg, run, name, k, compute, force)
        folders[name] = method_dir(cfg, name, method_payload(cfg, name, k))
        return value

    prefix = "unrolled-adamw-" if run.cfg.optim.name == "adamw" else "unrolled-"
    for c in curvatures:
        occ_scores[f"{prefix}{c}"] = cached(
            f"{prefix}{c}",
            lambda _, c=c: unroll.unrolled_scores(run, q(), c, cfg.embed.mc_samples, cfg.embed.mc_seed),
        )
    b = cfg.baselines
    if run.cfg.optim.name == "adamw":
        for c in b.adamw_nonlinear:
            if run.task.kind == "lm" and c == "gn":
                continue
            occ_scores[f"unrolled-adamw-nl-{c}"] = cached(
                f"unrolled-adamw-nl-{c}",
                lambda _, c=c: unroll.adamw_unrolled_scores(run, q(), c, cfg.embed.mc_samples, cfg.embed.mc_seed,
                                                            nonlinear=b.adamw_nl_threshold),
            )
        for kind in b.adamw_subspaces:
            occ_scores[f"dvemb-adamw-{kind}"] = _adamw_embedding_scores(cfg, run, kind, k)
    names = point_methods(run.task.kind, per_point)

    def influence(folder: Path) -> np.ndarray:
        values, diag = baselines.influence_function(run, q(), b.if_damping, b.cg_iters, b.cg_tol)
        artifacts.write_json(folder / "influence_cg.json", {**diag, "damping": b.if_damping, "tol": b.cg_tol})
        return values

    compute = {"influence": influence, "tracin": lambda _: baselines.tracin(run, x_q, y_q, k),
               "grad-dot": lambda _: baselines.grad_dot(run, q())}
    for name in names:
        idx_scores[name] = cached(name, compute[name])
    return occ_scores, idx_scores


def _adamw_embedding_scores(cfg: Config, run: TrainedRun, kind: str, k: int) -> np.ndarray:
    """Scores [N_occ, 1 + k] of the stored AdamW-aware embedding with subspace ``kind`` (the
    embed stage with ``embed.optimizer_aware=true``, reused when finished)."""
    import dataclasses

    from dve_repro.embed_stage import run_embedding

    b = cfg.baselines
    embed = dataclasses.replace(cfg.embed, optimizer_aware=True, adamw_subspace=kind,
                                curvature=b.adamw_curvature, blocks=b.adamw_blocks)
    return _embedding_scores(run_embedding(dataclasses.replace(cfg, embed=embed), run), k)


def _embedding_scores(path: Path, k: int) -> np.ndarray:
    """Scores [N_occ, 1 + k] of a finished embedding folder: the mean validation loss, then the
    first k validation points."""
    mean = artifacts.load_table(path / "scores.parquet")["score"].to_numpy()
    pts = artifacts.open_npy(path / "scores_points.npy", "r")[:, :k]
    return np.concatenate([mean[:, None], pts], axis=1)


def paper_config(cfg: Config) -> Config | None:
    """The configuration of the paper's own estimator beside the configured one: the same run
    and embedding settings with a random Gaussian Kronecker projection (projection.kind
    kronecker, same k_out × k_in and seed) and the empirical Fisher (embed.curvature ef) —
    or None when the configured embedding already is that (then ``dvemb`` is the paper's)."""
    import dataclasses

    from dve_repro.config import ProjectionConfig

    p, e = cfg.projection, cfg.embed
    if p.kind == "kronecker" and e.curvature == "ef" and not e.optimizer_aware:
        return None
    if p.kind not in ("kronecker", "kfac", "pca", "gradcov"):  # a dense or no projection: no paper twin
        return None
    proj = ProjectionConfig(kind="kronecker", k_in=p.k_in, k_out=p.k_out, seed=p.seed, chunk_size=p.chunk_size)
    return dataclasses.replace(cfg, projection=proj, embed=dataclasses.replace(e, curvature="ef", optimizer_aware=False))


def dvemb_name(run: TrainedRun) -> str:
    """``dvemb`` on plain SGD, where the paper's recursion is exact up to its curvature
    substitution; ``dvemb-sgd-proxy`` on any other optimizer (SPEC §2 "Adam")."""
    from dve_repro.optim import is_plain_sgd

    return "dvemb" if is_plain_sgd(run.cfg.optim) else "dvemb-sgd-proxy"


def estimates(run: TrainedRun, jobs: pd.DataFrame, occ_scores: dict, idx_scores: dict) -> dict[str, np.ndarray]:
    """Estimate [n_jobs, Q] of every method for every TSLOO job."""
    occ = run.traj.occurrences()
    row_of = {(int(i), int(t)): r for r, (i, t) in enumerate(zip(occ["index"], occ["step"], strict=True))}
    rows = [[row_of[(int(i), int(t))] for t in steps] for i, steps in zip(jobs["index"], jobs["steps"], strict=True)]
    out = {}
    for name, s in occ_scores.items():
        out[name] = np.stack([np.asarray(s[r]).sum(axis=0) for r in rows])
    for name, s in idx_scores.items():
        out[name] = np.asarray(s)[jobs["index"].to_numpy()]
    return out


def summarize(jobs: pd.DataFrame, truth: np.ndarray, est: dict[str, np.ndarray], n_boot: int, seed: int) -> pd.DataFrame:
    rows = []
    k = next(iter(est.values())).shape[1] - 1
    for (setting, conv), grp in jobs.groupby(["setting", "convention"], sort=False):
        sel = grp.index.to_numpy()
        for name, e in est.items():
            x, y = e[sel, 0], truth[sel, 0]
            s_lo, s_hi = correlation_ci(x, y, "spearman", n_boot, seed)
            p_lo, p_hi = correlation_ci(x, y, "pearson", n_boot, seed)
            per = [spearman(e[sel, j], truth[sel, j]) for j in range(1, k + 1)] if k else []
            per_p = [pearson(e[sel, j], truth[sel, j]) for j in range(1, k + 1)] if k else []
            rows.append({
                "method": name, "setting": setting, "convention": conv, "n": len(sel),
                "spearman": spearman(x, y), "spearman_lo": s_lo, "spearman_hi": s_hi,
                "pearson": pearson(x, y), "pearson_lo": p_lo, "pearson_hi": p_hi,
                "per_point_spearman": float(np.nanmean(per)) if per else float("nan"),
                "per_point_pearson": float(np.nanmean(per_p)) if per_p else float("nan"),
                "val_points": k,
            })
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, tidy: pd.DataFrame, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv0 = tidy["convention"].iloc[0]
    tidy = tidy[tidy["convention"] == conv0]
    methods = list(dict.fromkeys(tidy["method"]))
    settings = list(dict.fromkeys(tidy["setting"]))
    fig, axes = plt.subplots(len(settings), len(methods), figsize=(2.6 * len(methods), 2.6 * len(settings)), squeeze=False)
    for r, st in enumerate(settings):
        for c, m in enumerate(methods):
            ax = axes[r][c]
            d = tidy[(tidy["setting"] == st) & (tidy["method"] == m)]
            ax.scatter(d["truth"], d["estimate"], s=6, alpha=0.7)
            row = summary[(summary["method"] == m) & (summary["setting"] == st) & (summary["convention"] == conv0)].iloc[0]
            ax.set_title(f"{m}\n{st}-epoch  ρ={row['spearman']:.3f}  r={row['pearson']:.3f}", fontsize=8)
            ax.tick_params(labelsize=6)
            if r == len(settings) - 1:
                ax.set_xlabel("TSLOO (retrained)", fontsize=7)
            if c == 0:
                ax.set_ylabel("estimate", fontsize=7)
    # wrapped to the figure's width (about 11 characters per inch at 10 pt, 16 at 7 pt)
    size = 10 if len(methods) > 2 else 7
    chars_per_inch = 11 if size == 10 else 16
    fig.suptitle(textwrap.fill(title, width=int(chars_per_inch * 2.6 * len(methods))), fontsize=size)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "scatter")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 3.5))
    s = summary[summary["convention"] == conv0]
    width = 0.8 / max(1, len(settings))
    for j, st in enumerate(settings):
        d = s[s["setting"] == st].set_index("method").loc[methods]
        xs = np.arange(len(methods)) + j * width
        ax.bar(xs, d["spearman"], width, label=f"{st}-epoch removal",
               yerr=[d["spearman"] - d["spearman_lo"], d["spearman_hi"] - d["spearman"]], capsize=2)
    ax.set_xticks(np.arange(len(methods)) + width * (len(settings) - 1) / 2, methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman with TSLOO (mean val loss)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "correlations")
    plt.close(fig)


def run_compare(cfg: Config, results_dir: Path, force: bool = False, shard: str | None = None,
                figures: bool = True, per_point: bool | None = None, command: str | None = None) -> Path | None:
    """Train → embed → TSLOO → methods → tables and figures in ``results_dir``. Returns it
    (None when only a shard of the ground truth was computed). ``per_point`` runs the
    per-point baselines; None = all for classifiers, TracIn and grad-dot for language models
    (``LM_PER_POINT_METHODS``). ``command``
    (the command line that asked for it) goes to ``COMMAND.txt``."""
    from dve_repro.embed_stage import run_embedding
    from dve_repro.train import run_training
    from dve_repro.tsloo import run_tsloo

    run = TrainedRun.load(run_training(cfg), cfg.runtime.device)
    gt_path = run_tsloo(cfg, run, shard=shard)
    if not (gt_path / artifacts.DONE).is_file():
        return None
    embed_path = run_embedding(cfg, run)
    return _compare(cfg, run, gt_path, embed_path, results_dir, figures, per_point, force, command)


def sweep_target(base: list[str], job: list[str], results: Path | None, cfg: Config) -> Path:
    """Where one job of a ``-m`` sweep writes: ``<results>/<its swept overrides>/`` (the
    overrides of keys not among the fixed ones, ``base``; Hydra may respell a value)."""
    fixed = {o.split("=", 1)[0].lstrip("+~") for o in base}
    tag = ",".join(o for o in job if o.split("=", 1)[0].lstrip("+~") not in fixed) or "base"
    return Path(results or Path(cfg.runtime.out_root) / cfg.name / "multirun") / tag


def compare_job(overrides: list[str], base: list[str], results: str | None, force: bool,
                per_point: bool | None, command: str) -> str:
    """One comparison of a sweep (a launcher job, possibly in another process)."""
    from dve_repro.ablate import share_stages
    from dve_repro.config import compose

    share_stages()
    cfg = compose(overrides)
    target = sweep_target(base, overrides, Path(results) if results else None, cfg)
    out = run_compare(cfg, target, force=force, per_point=per_point, command=" ".join([command, *overrides]))
    return str(out)


def run_sweep(overrides: list[str], *, shards: int = 1, results: Path | None = None, force: bool = False,
              per_point: bool | None = None, command: str = "dve compare-tsloo", target: Path | None = None) -> list[Path]:
    """``dve compare-tsloo -m …`` / ``--shards N``: every job of the sweep through Hydra's
    configured launcher (``sweep.py``). The training stage of every job is built first, in
    this process, once (launcher jobs would race to build it); with ``shards`` > 1 the
    ground truth of each job is ``shards`` launcher jobs, checked complete (none missing,
    none disagreeing) before the comparison runs. ``target``: the results folder of a
    sweep with no swept key. Returns the results folders."""
    from functools import partial

    from dve_repro import sweep, tsloo
    from dve_repro.ablate import expand_multirun
    from dve_repro.config import compose
    from dve_repro.train import run_training

    hydra_ov, job_ov = sweep.split_overrides(overrides)
    jobs = expand_multirun(job_ov)
    cfgs = [compose(j) for j in jobs]  # every job's config is checked before anything runs
    runs = {}
    for cfg in cfgs:
        path = run_training(cfg)
        runs.setdefault(path, TrainedRun.load(path, cfg.runtime.device))
    root = Path(cfgs[0].runtime.out_root) / cfgs[0].name / "sweeps"
    if shards > 1:
        for job, cfg in zip(jobs, cfgs, strict=True):
            gt = tsloo.tsloo_dir(cfg)
            if (gt / artifacts.DONE).is_file():  # finished before (sharded or not): verified when used
                ui.log(f"ground truth of [{' '.join(job)}] already finished: {gt}")
                continue
            ui.log(f"ground truth of [{' '.join(job)}] in {shards} shards")
            sweep.launch([*hydra_ov, *job], tsloo.shard_job, root, items=[f"{i}/{shards}" for i in range(shards)])
            run = runs[run_training(cfg)]
            if not (gt / artifacts.DONE).is_file():
                missing = tsloo.unfinished_shards(cfg, run, shards)
                raise DveError(f"ground-truth shard(s) {', '.join(f'{i}/{shards}' for i in missing) or '(merge)'} "
                               f"of {gt} did not finish; rerun the same command to finish them")
    fixed = [o for o in job_ov if "," not in o.split("=", 1)[-1]]
    if len(jobs) == 1:  # no swept key (shards only): the comparison runs here
        return [run_compare(cfgs[0], target or sweep_target(fixed, jobs[0], results, cfgs[0]), force=force,
                            per_point=per_point, command=" ".join([command, *overrides]))]
    job = partial(compare_job, base=fixed, results=str(results) if results else None, force=force,
                  per_point=per_point, command=command)
    return [Path(value) for _, _, value in sweep.launch([*hydra_ov, *job_ov], job, root)]


def _compare(cfg: Config, run: TrainedRun, gt_path: Path, embed_path: Path, results_dir: Path,
             figures: bool, per_point: bool | None, force: bool = False, command: str | None = None) -> Path:
    from dve_repro.tsloo import load_ground_truth

    jobs, truth = load_ground_truth(gt_path)
    folders: dict[str, Path] = {}
    occ_scores, idx_scores = method_scores(cfg, run, embed_path, force, point_methods(run.task.kind, per_point),
                                           folders)
    est = estimates(run, jobs, occ_scores, idx_scores)
    k = next(iter(est.values())).shape[1] - 1
    truth = truth[:, : 1 + k]
    tidy = pd.concat([
        pd.DataFrame({"index": jobs["index"], "setting": jobs["setting"], "convention": jobs["convention"],
                      "method": name, "estimate": e[:, 0], "truth": truth[:, 0]})
        for name, e in est.items()
    ], ignore_index=True)
    summary = summarize(jobs, truth, est, cfg.baselines.bootstrap, cfg.baselines.bootstrap_seed)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.save_table(out / "tidy.csv", tidy)
    artifacts.save_table(out / "summary.csv", summary)
    cols = ["method", "setting", "convention", "spearman", "spearman_lo", "spearman_hi", "pearson",
            "per_point_spearman", "per_point_pearson"]
    artifacts.write_text(out / "summary.md", markdown_table(summary[cols]))
    embed_meta = artifacts.read_json(embed_path / "embedding.json")
    title = (f"{cfg.name}: {run.task.description}; dvemb = {embed_meta['estimator']}, "
             f"p̃={embed_meta['p_tilde']}")
    if figures:
        plot(summary, tidy, out, title)
    if command:
        artifacts.write_text(out / "COMMAND.txt", command + "\n")
    cg = folders["influence"] / "influence_cg.json" if "influence" in folders else None
    if cg is not None and cg.is_file():  # did the inverse-Hessian solve converge?
        artifacts.write_json(out / "influence_cg.json", artifacts.read_json(cg))
    return out

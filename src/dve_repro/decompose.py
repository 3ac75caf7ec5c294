"""Projection-fidelity decomposition (issue 13): where the stored embedding loses to retraining.

For one recorded plain-SGD run and its ground truth (the tsloo stage), scores the mean
validation loss with DVEmb's recursion under every combination of

    curvature (ef | gn | mc) × projection (none, or kronecker / kfac at k_out × k_in) × M (full | layer)

matrix-free (SPEC §2): backward from v = P u (u the query gradient at θ_T, P the projection),
step t's rows are scored ``w_t G_t v`` and then ``v ← v − w_t F_tᵀ(F_t v)`` (per layer: each
layer's slice of v with its own columns), with G_t the step's projected per-sample gradients
and F_t its projected curvature rows (G_t itself for ef). These are the numbers of the stored
embedding of Algorithm 1 with the same settings (``E u`` equals them: tested), without the
p̃ × p̃ matrix, so every p̃ up to the full gradient is affordable. One replay serves every
setting: each step's hook factors are taken once per curvature and projected by every projector.

Writes to the results folder (:func:`run_decomposition`):

* ``decomposition.csv`` — one row per (curvature, projection, k_out, k_in, p̃, blocks, setting,
  convention): Spearman and Pearson with bootstrap 95% intervals against TSLOO;
* ``decomposition.md`` — the keep-convention Spearman table;
* ``decomposition.{png,pdf}`` — Spearman against p̃ per curvature and removal setting;
* ``COMMAND.txt`` — the command that made them.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts, torch_state, ui
from dve_repro.capture import curvature_targets, hook_factors
from dve_repro.config import (
    FITTED_PROJECTIONS,
    Config,
    ProjectionConfig,
    fingerprint,
    stage_payload,
    to_dict,
)
from dve_repro.errors import DveError
from dve_repro.grads import FACTOR_KINDS
from dve_repro.projection import Projector
from dve_repro.projection_fit import make_projector
from dve_repro.replay import TrainedRun, replay
from dve_repro.tasks import mc_step_seed

SCORES = "scores.npy"


@dataclass(frozen=True)
class Setting:
    curvature: str  # ef | gn | mc
    projection: str  # none | kronecker | kfac
    k_out: int
    k_in: int
    blocks: str  # full | layer


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"32x128,16x256"`` → [(32, 128), (16, 256)] (k_out × k_in)."""
    try:
        out = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) <= 0 for s in out):
        raise DveError(f"--sizes must be a comma-separated list of K_OUTxK_IN, e.g. 32x128,16x256 (got {text!r})")
    return out  # type: ignore[return-value]


def settings_for(curvatures: list[str], kinds: list[str], sizes: list[tuple[int, int]]) -> list[Setting]:
    out = []
    for c, blocks in itertools.product(curvatures, ("full", "layer")):
        out.append(Setting(c, "none", 0, 0, blocks))
        out += [Setting(c, kind, ko, ki, blocks) for kind in kinds for ko, ki in sizes]
    return out


def projectors_for(cfg: Config, run: TrainedRun, blocks, settings: list[Setting]) -> dict:
    """One projector per distinct (projection, k_out, k_in); fitted kinds load or fit their basis."""
    out = {}
    for s in settings:
        key = (s.projection, s.k_out, s.k_in)
        if key in out:
            continue
        if s.projection == "none":
            out[key] = Projector(ProjectionConfig(kind="none"), blocks)
        else:
            proj = dataclasses.replace(cfg.projection, kind=s.projection, k_out=s.k_out, k_in=s.k_in)
            out[key] = make_projector(dataclasses.replace(cfg, projection=proj), run, blocks)
    return out


def matrix_free_scores(cfg: Config, run: TrainedRun, blocks, settings: list[Setting],
                       projectors: dict) -> dict[Setting, np.ndarray]:
    """Scores [N_occ] of the mean validation loss for every setting (module docstring)."""
    task, traj = run.task, run.traj
    if run.cfg.optim.name != "sgd" or run.cfg.optim.momentum or run.cfg.optim.grad_clip or run.cfg.optim.weight_decay:
        raise DveError("the decomposition needs a plain-SGD run (no momentum, clipping or weight decay)")
    if any(b.kind not in FACTOR_KINDS for b in blocks):
        raise DveError("the decomposition needs a model whose layers are all nn.Linear or nn.Embedding")
    offsets = traj.offsets()
    u = hook_factors(task, blocks, run.final_params(), task.x_val, task.y_val)
    q = {key: p.project_factors(u).mean(0) for key, p in projectors.items()}
    v = {s: q[(s.projection, s.k_out, s.k_in)].clone() for s in settings}
    spans = {key: p.block_slices() for key, p in projectors.items()}
    out = {s: np.zeros(int(offsets[-1])) for s in settings}
    curvatures = sorted({s.curvature for s in settings})
    e = cfg.embed
    with ui.bar("decomposition (backward)", total=run.T, unit="step") as bar:
        for a, b in reversed(list(itertools.pairwise(run.checkpoints))):
            thetas: list[dict] = []
            replay(run, start=a, stop=b, before_step=lambda t, p: thetas.append(p))  # noqa: B023
            for t in range(b - 1, a - 1, -1):
                x, y = task.batch(traj.batches[t])
                n, w = x.shape[0], float(traj.lrs[t]) / x.shape[0]
                # every factor set of the step (G's, then each curvature's rows), projected in one call
                sets = [hook_factors(task, blocks, thetas[t - a], x, y)]
                rows = {"ef": (0, 1)}
                for c in (c for c in curvatures if c != "ef"):
                    targets = curvature_targets(task, thetas[t - a], x, y, c, e.mc_samples, mc_step_seed(e.mc_seed, t))
                    rows[c] = (len(sets), len(sets) + len(targets))
                    sets += [hook_factors(task, blocks, thetas[t - a], x, lab, wt) for lab, wt in targets]
                stacked = {name: tuple(torch.cat([f[name][i] for f in sets]) for i in (0, 1)) for name in sets[0]}
                P = {key: p.project_factors(stacked) for key, p in projectors.items()}
                G = {key: m[:n] for key, m in P.items()}
                for c in curvatures:
                    F = {key: m[rows[c][0] * n : rows[c][1] * n] for key, m in P.items()}
                    for s in (s for s in settings if s.curvature == c):
                        key = (s.projection, s.k_out, s.k_in)
                        out[s][offsets[t] : offsets[t + 1]] = (w * (G[key] @ v[s])).cpu().numpy()
                        for sl in (spans[key] if s.blocks == "layer" else [slice(None)]):
                            f = F[key][:, sl]
                            v[s][sl] -= w * (f.T @ (f @ v[s][sl]))
                bar.update(1)
    return out


def scores_payload(cfg: Config, settings: list[Setting]) -> dict:
    """What the decomposition's scores depend on: the recorded run, the settings, the projections'
    own configuration (seed; the fitted kinds' fit steps and random share) and the Monte-Carlo
    Fisher's draws — not the ground truth or the bootstrap."""
    p = cfg.projection
    return {"trajectory": stage_payload(cfg, "trajectory"), "settings": [list(dataclasses.astuple(s)) for s in settings],
            "projection": {"seed": p.seed, "fit_steps": p.fit_steps, "random_fraction": p.random_fraction},
            "mc": {"mc_samples": cfg.embed.mc_samples, "mc_seed": cfg.embed.mc_seed}}


def cached_scores(cfg: Config, run: TrainedRun, blocks, settings: list[Setting],
                  projectors: dict) -> dict[Setting, np.ndarray]:
    """:func:`matrix_free_scores` from ``<out_root>/<name>/decompose-<fp>/scores.npy``
    [n_settings, N_occ] (locked, verified before reuse), computed into it when missing — so a
    change of the tables, the figure or the bootstrap re-reads the scores instead of replaying."""
    payload = scores_payload(cfg, settings)
    rd = artifacts.RunDir(artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "decompose", fingerprint(payload)),
                          payload)
    with rd.locked():
        rd.check()
        if rd.reusable():
            ui.log(f"reusing the decomposition's scores from {rd.final}")
            values = artifacts.load_npy(rd.final / SCORES)
            return {s: values[i] for i, s in enumerate(settings)}
        rd.prepare(to_dict(cfg), run.device)
        t0 = time.perf_counter()
        scores = matrix_free_scores(cfg, run, blocks, settings, projectors)
        seconds = time.perf_counter() - t0
        ui.log(f"decomposition: {len(settings)} settings in {seconds:.1f} s")
        artifacts.save_npy(rd.file(SCORES), np.stack([scores[s] for s in settings]))
        rd.mark_done({"settings": len(settings), "seconds": seconds})
    return scores


def run_decomposition(cfg: Config, results: Path, curvatures: list[str], kinds: list[str],
                      sizes: list[tuple[int, int]], command: str | None = None) -> Path:
    """Ground truth (made or reused), every setting's scores, the tables and the figure."""
    from dve_repro.compare import estimates, summarize
    from dve_repro.train import capture_blocks, run_training
    from dve_repro.tsloo import load_ground_truth, run_tsloo

    with torch_state.threads(cfg.runtime.threads):  # speed only: small per-step products run fastest on one thread
        for c in curvatures:
            if c not in ("ef", "gn", "mc"):
                raise DveError(f"--curvatures: {c!r} is not one of ef, gn, mc")
        for k in kinds:
            if k not in ("kronecker", "kfac", "pca", "gradcov"):
                raise DveError(f"--kinds: {k!r} is not one of kronecker, kfac, pca, gradcov")
        run = TrainedRun.load(run_training(cfg), cfg.runtime.device)
        jobs, truth = load_ground_truth(run_tsloo(cfg, run))
        blocks = capture_blocks(run.task)
        settings = settings_for(curvatures, kinds, sizes)
        projectors = projectors_for(cfg, run, blocks, settings)
        scores = cached_scores(cfg, run, blocks, settings, projectors)
        names = {s: f"{s.curvature}|{s.projection}|{s.k_out}x{s.k_in}|{s.blocks}" for s in settings}
        est = estimates(run, jobs, {names[s]: scores[s][:, None] for s in settings}, {})
        summary = summarize(jobs, truth[:, :1], est, cfg.baselines.bootstrap, cfg.baselines.bootstrap_seed)
        parts = summary["method"].str.split("|", expand=True)
        p_dims = {names[s]: projectors[(s.projection, s.k_out, s.k_in)].out_dim for s in settings}
        table = pd.DataFrame({
            "curvature": parts[0], "projection": parts[1],
            "k_out": [0 if k == "0x0" else int(k.split("x")[0]) for k in parts[2]],
            "k_in": [0 if k == "0x0" else int(k.split("x")[1]) for k in parts[2]],
            "p_tilde": summary["method"].map(p_dims), "blocks": parts[3],
            **{c: summary[c] for c in ("setting", "convention", "n", "spearman", "spearman_lo", "spearman_hi",
                                       "pearson", "pearson_lo", "pearson_hi")},
        })
        results.mkdir(parents=True, exist_ok=True)
        artifacts.save_table(results / "decomposition.csv", table)
        artifacts.write_text(results / "decomposition.md", _markdown(table, cfg, run))
        _plot(table, results, projectors_for(cfg, run, blocks, [Setting("ef", "kronecker", cfg.projection.k_out,
                                                                         cfg.projection.k_in, "full")]))
        if command:
            artifacts.write_text(results / "COMMAND.txt", command + "\n")
    return results


def _markdown(table: pd.DataFrame, cfg: Config, run: TrainedRun) -> str:
    from dve_repro.tables import markdown_table

    keep = table[table["convention"] == "keep"].copy()
    keep["spearman (95% CI)"] = [f"{r.spearman:.3f} [{r.spearman_lo:.3f}, {r.spearman_hi:.3f}]"
                                 for r in keep.itertuples()]
    wide = keep.pivot_table(index=["curvature", "projection", "k_out", "k_in", "p_tilde", "blocks"],
                            columns="setting", values="spearman (95% CI)", aggfunc="first").reset_index()
    wide.columns = [f"{c}-epoch" if c in ("single", "all") else c for c in wide.columns]
    cols = [c for c in ["curvature", "projection", "k_out", "k_in", "p_tilde", "blocks", "single-epoch",
                        "all-epoch"] if c in wide.columns]
    order = {"none": 0, "kronecker": 1, "kfac": 2, "pca": 3, "gradcov": 4}
    wide = wide[cols].sort_values(["curvature", "blocks", "projection", "p_tilde"], kind="stable",
                                  key=lambda col: col.map(order) if col.name == "projection" else col)
    head = (f"# Projection-fidelity decomposition: {cfg.name} ({run.task.description})\n\n"
            "Spearman with retrained TSLOO (mean validation loss, keep convention, bootstrap 95% interval) of "
            "DVEmb's recursion, matrix-free, per curvature, projection (none = the exact gradient, p̃ = p), "
            "size k_out × k_in per layer and M (full: one over all layers; layer: one per layer). "
            "Rows with projection none and blocks full are the unprojected `unrolled-<curvature>` methods of "
            "compare-tsloo. Command: COMMAND.txt.\n\n")
    return head + markdown_table(wide)


def _plot(table: pd.DataFrame, out: Path, configured: dict) -> None:
    """Spearman against p̃; the dotted line marks the configured projection's p̃."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    keep = table[table["convention"] == "keep"]
    curvs, settings = list(dict.fromkeys(keep["curvature"])), list(dict.fromkeys(keep["setting"]))
    fig, axes = plt.subplots(len(settings), len(curvs), figsize=(4 * len(curvs), 3.2 * len(settings)),
                             squeeze=False, sharey=True)
    for (r, st), (c, cv) in itertools.product(enumerate(settings), enumerate(curvs)):
        ax, d = axes[r][c], keep[(keep["setting"] == st) & (keep["curvature"] == cv)]
        for (kind, blocks), g in d[d["projection"] != "none"].groupby(["projection", "blocks"], sort=False):
            # one line through the sizes of the most common k_out (p̃ grows with k_in); other
            # shapes of the same storage as unconnected markers of the same colour
            line = g[g["k_out"] == g["k_out"].mode().iloc[0]].sort_values("p_tilde")
            bar = ax.errorbar(line["p_tilde"], line["spearman"], yerr=[line["spearman"] - line["spearman_lo"],
                              line["spearman_hi"] - line["spearman"]], marker="o", ms=3, capsize=2, lw=1,
                              ls="-" if blocks == "full" else "--", label=f"{kind}, M {blocks}")
            other = g.drop(line.index)
            ax.plot(other["p_tilde"], other["spearman"], ls="none", marker="x", ms=4, color=bar[0].get_color())
        for blocks, ls in (("full", "-"), ("layer", "--")):
            base = d[(d["projection"] == "none") & (d["blocks"] == blocks)]
            if len(base):
                ax.axhline(float(base["spearman"].iloc[0]), color="black", ls=ls, lw=0.8,
                           label=f"unprojected, M {blocks}")
        for p in configured.values():
            ax.axvline(p.out_dim, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([1000, 2000, 5000, 10000, 20000]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{cv}, {st}-epoch removal", fontsize=9)
        ax.set_xlabel("p̃ (stored numbers per occurrence; x: other k_out × k_in)", fontsize=8)
        if c == 0:
            ax.set_ylabel("Spearman with TSLOO", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    artifacts.save_figure(fig, out, "decomposition")
    plt.close(fig)


def collect_stored(root: Path) -> Path:
    """``root/stored.{csv,md}``: for every ``root/<setting>/`` written by ``dve compare-tsloo …
    --results root/<setting>``, the stored embedding's (``dvemb``) Spearman with its interval
    (keep convention), p̃, storage of E and the gradients, and its times (basis fit, capture,
    Algorithm 1, scoring), read from the folders its ``COMMAND.txt`` names."""
    from dve_repro.config import compose
    from dve_repro.embed_stage import embed_dir
    from dve_repro.projection_fit import basis_dir
    from dve_repro.tables import markdown_table
    from dve_repro.tasks import build_task
    from dve_repro.train import capture_blocks

    rows = []
    for folder in sorted(p for p in Path(root).iterdir() if (p / "summary.csv").is_file() and (p / "COMMAND.txt").is_file()):
        words = (folder / "COMMAND.txt").read_text().split()
        cfg = compose([w for w in words if "=" in w and not w.startswith("-")])
        emb = embed_dir(cfg)
        meta = artifacts.read_json(emb / "embedding.json")
        fit_s = float("nan")
        if cfg.projection.kind in FITTED_PROJECTIONS:
            blocks = capture_blocks(build_task(cfg))
            fit_s = artifacts.read_json(basis_dir(cfg, blocks) / "basis.json")["fit_s"]
        summary = artifacts.load_table(folder / "summary.csv")
        row = {"setting": folder.name, "projection": cfg.projection.kind, "k_out": cfg.projection.k_out,
               "k_in": cfg.projection.k_in, "curvature": cfg.embed.curvature, "blocks": cfg.embed.blocks,
               "p_tilde": meta["p_tilde"]}
        for st in ("single", "all"):
            r = summary[(summary["method"] == "dvemb") & (summary["setting"] == st) & (summary["convention"] == "keep")]
            r = r.iloc[0]
            row[f"{st}-epoch"] = f"{r.spearman:.3f} [{r.spearman_lo:.3f}, {r.spearman_hi:.3f}]"
        t = meta["timings"]
        row.update({"E_MB": (emb / "E.npy").stat().st_size / 1e6, "gradients_MB": meta["gradient_bytes"] / 1e6,
                    "fit_s": fit_s, "capture_s": t["capture_s"], "algorithm_s": t["algorithm_s"],
                    "scoring_s": t["scoring_s"]})
        rows.append(row)
    if not rows:
        raise DveError(f"no compare-tsloo results (summary.csv + COMMAND.txt) under {root}")
    table = pd.DataFrame(rows)
    artifacts.save_table(Path(root) / "stored.csv", table)
    head = ("# Stored embeddings (dvemb) on E1 against retrained TSLOO\n\n"
            "Spearman (mean validation loss, keep convention, bootstrap 95% interval) of each `<setting>/`"
            " folder's stored embedding; its command is `<setting>/COMMAND.txt`. Storage: E.npy (float64) and"
            " the projected gradients (G and curvature rows) of the replayed capture; times in seconds on this"
            " machine (fit_s: the kfac basis, one replay; nan for the seeded projections).\n\n")
    artifacts.write_text(Path(root) / "stored.md", head + markdown_table(table, fmt="{:.1f}"))
    return Path(root) / "stored.md"

"""Analysis stage for the language-model experiments: training phases (E3) and data value
dynamics (E4).

Reads a finished embedding run (``scores.parquet``, and for dynamics ``dynamics.npy`` +
``boundaries.json`` of Algorithm 2) and its training run's ``trajectory.parquet``; both are
made on demand (train → embed) unless ``compute=False``, in which case a missing stage is a
one-line error naming the command to run. Writes small files to ``results/<name>/``:

* ``phases.csv`` — per step t: learning rate η_t, mean DVEmb score of B_t on the final mean
  validation loss, that mean ÷ η_t, and the region (warm-up / basin / late);
* ``phases.md`` — the regions' means and the ratios warm-up ÷ basin and late ÷ basin;
* ``phases.{png,pdf}`` — paper Fig. 1(a): the normalised influence over training;
* ``dynamics.csv`` / ``dynamics.{png,pdf}`` — paper Fig. 4: mean influence of the early /
  middle / late thirds of training points (by the step that used them) on the validation
  loss at every segment-boundary checkpoint;
* ``COMMAND.txt`` — one line per output family with the command that made it.

Regions (SPEC §3, E3; the paper names them, our cut points): warm-up = steps before
``schedule.warmup_steps``; late = the last tenth of the steps; basin = the steps between.
Dividing by η_t removes the schedule's direct scaling of every point's step
(DVEmb^{(t)} = η_t(…), SPEC §2), so what remains is how much the batch's gradient
direction still matters at the end.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from dve_repro import artifacts, ui
from dve_repro.config import Config
from dve_repro.errors import ArtifactError, DveError
from dve_repro.trajectory import Trajectory

REGIONS = ("warm-up", "basin", "late")
GROUPS = ("early", "middle", "late")


# --------------------------------------------------------------------------- inputs


def _command(stage: str, overrides: list[str]) -> str:
    return " ".join([f"dve {stage}", *overrides]).strip()


def ensure_embedding(cfg: Config, overrides: list[str], compute: bool = True) -> Path:
    """The finished embedding directory named by ``cfg`` (training and embedding made when missing)."""
    from dve_repro.embed_stage import embed_dir
    from dve_repro.train import train_dir

    path = embed_dir(cfg)
    if (path / artifacts.DONE).is_file():
        return path
    if not compute:
        if not (train_dir(cfg) / artifacts.DONE).is_file():
            raise ArtifactError(f"no finished training run at {train_dir(cfg)}; run `{_command('train', overrides)}` first")
        raise ArtifactError(f"no finished embedding at {path}; run `{_command('embed', overrides)}` first")
    from dve_repro.embed_stage import run_embedding
    from dve_repro.replay import TrainedRun
    from dve_repro.train import run_training

    run = TrainedRun.load(run_training(cfg), cfg.runtime.device)
    return run_embedding(cfg, run)


def _train_run_of(embed_path: Path) -> Path:
    from dve_repro.embed_stage import train_run_of

    return train_run_of(embed_path, artifacts.read_json(embed_path / "embedding.json"))


def _results_dir(results: Path) -> Path:
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _record_command(out: Path, key: str, command: str | None) -> None:
    """Keep one ``key: command`` line per output family in ``COMMAND.txt``."""
    if command:
        artifacts.record_command(out, key, command)


# --------------------------------------------------------------------------- E3: phases


def regions(T: int, warmup_steps: int) -> np.ndarray:
    """Region label of every step: warm-up (t < warm-up steps), late (last ⌈T/10⌉), basin."""
    late_from = T - max(1, math.ceil(T / 10))
    warm = min(warmup_steps, late_from)
    lab = np.full(T, "basin", dtype=object)
    lab[:warm] = "warm-up"
    lab[late_from:] = "late"
    return lab


def phase_table(scores: pd.DataFrame, lrs: np.ndarray, warmup_steps: int) -> pd.DataFrame:
    """Per step: mean score of its batch on the final validation loss, ÷ η_t (paper Fig. 1a).

    ``scores`` has columns step, score (one row per occurrence); ``lrs`` [T].
    """
    T = len(lrs)
    per = scores.groupby("step")["score"].agg(["mean", "size"]).reindex(range(T))
    if per["mean"].isna().any():
        missing = int(per["mean"].isna().sum())
        raise ArtifactError(f"scores.parquet has no rows for {missing} of {T} steps")
    return pd.DataFrame({
        "step": np.arange(T), "lr": lrs, "mean_score": per["mean"].to_numpy(),
        "n": per["size"].to_numpy().astype(int), "normalized": per["mean"].to_numpy() / lrs,
        "region": regions(T, warmup_steps),
    })


def phase_summary(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean normalised influence per region and the ratios ÷ the basin: of the signed means
    (the paper's quantity) and of the mean magnitudes |·| — the signed basin mean can sit
    near zero, where its ratios say little."""
    rows = []
    means, mags = {}, {}
    for r in REGIONS:
        d = table[table["region"] == r]
        means[r] = float(d["normalized"].mean()) if len(d) else float("nan")
        mags[r] = float(d["normalized"].abs().mean()) if len(d) else float("nan")
        rows.append({"region": r, "steps": f"{int(d['step'].min())}–{int(d['step'].max())}" if len(d) else "—",
                     "n_steps": len(d), "mean_normalized": means[r],
                     "median_normalized": float(d["normalized"].median()) if len(d) else float("nan"),
                     "mean_abs_normalized": mags[r]})

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    ratios = {"warmup_over_basin": ratio(means["warm-up"], means["basin"]),
              "late_over_basin": ratio(means["late"], means["basin"]),
              "warmup_over_basin_abs": ratio(mags["warm-up"], mags["basin"]),
              "late_over_basin_abs": ratio(mags["late"], mags["basin"])}
    return pd.DataFrame(rows), ratios


def _plot_phases(table: pd.DataFrame, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(table)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = {"warm-up": "tab:orange", "basin": "tab:blue", "late": "tab:red"}
    for r in REGIONS:
        d = table[table["region"] == r]
        if len(d):
            ax.axvspan(d["step"].min() - 0.5, d["step"].max() + 0.5, color=colors[r], alpha=0.08, lw=0)
            ax.text((d["step"].min() + d["step"].max()) / 2, 1.0, r, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color=colors[r])
    ax.plot(table["step"], table["normalized"], lw=0.6, color="0.6", label="per step")
    win = max(1, T // 40)
    smooth = table["normalized"].rolling(win, center=True, min_periods=1).mean()
    ax.plot(table["step"], smooth, lw=1.6, color="black", label=f"rolling mean ({win} steps)")
    ax.axhline(0, color="black", lw=0.4)
    ax.set_xlabel("training step t")
    ax.set_ylabel("mean influence of B_t on final val loss / η_t")
    ax.legend(fontsize=7, loc="upper right")
    ax2 = ax.twinx()
    ax2.plot(table["step"], table["lr"], lw=0.8, ls="--", color="tab:green")
    ax2.set_ylabel("η_t", color="tab:green", fontsize=8)
    ax2.tick_params(labelsize=7, colors="tab:green")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "phases")
    plt.close(fig)


def _estimator_kind(meta: dict) -> str:
    """Short label of an embedding's estimator for figure titles."""
    if meta.get("optimizer_aware"):
        return "AdamW-aware"
    return "SGD proxy" if meta["estimator"].startswith("SGD proxy") else "SGD"


def run_phases(cfg: Config, overrides: list[str], results: Path, compute: bool = True,
               command: str | None = None) -> Path:
    """E3 (paper Fig. 1a) for the embedding named by ``cfg``; returns the results folder."""
    from dve_repro.tables import markdown_table

    embed_path = ensure_embedding(cfg, overrides, compute)
    traj = Trajectory.load(_train_run_of(embed_path))
    scores = artifacts.load_table(embed_path / "scores.parquet")
    meta = artifacts.read_json(embed_path / "embedding.json")
    table = phase_table(scores, traj.lrs, cfg.schedule.warmup_steps)
    summary, ratios = phase_summary(table)
    out = _results_dir(results)
    artifacts.save_table(out / "phases.csv", table)
    md = [f"# {cfg.name}: influence of each step's batch on the final validation loss, ÷ η_t (paper Fig. 1a)",
          "", f"Estimator: {meta['estimator']}; p̃ = {meta['p_tilde']}; gradients: "
          f"{meta['left_out']}.", "", f"T = {len(table)} steps; warm-up = first {cfg.schedule.warmup_steps}, "
          "late = last tenth, basin = between.", "", markdown_table(summary, "{:.4g}"),
          f"Signed means: warm-up ÷ basin = **{ratios['warmup_over_basin']:.3f}**; "
          f"late ÷ basin = **{ratios['late_over_basin']:.3f}**.", "",
          f"Mean magnitudes |·|: warm-up ÷ basin = **{ratios['warmup_over_basin_abs']:.3f}**; "
          f"late ÷ basin = **{ratios['late_over_basin_abs']:.3f}**.", "",
          "Paper (Fig. 1a): a short high warm-up phase, a long low basin, a gradual late rise.", ""]
    artifacts.write_text(out / "phases.md", "\n".join(md))
    kind = _estimator_kind(meta)
    _plot_phases(table, f"{cfg.name} ({kind}): warm-up÷basin {ratios['warmup_over_basin']:.2f} "
                 f"(|·| {ratios['warmup_over_basin_abs']:.2f}), late÷basin {ratios['late_over_basin']:.2f} "
                 f"(|·| {ratios['late_over_basin_abs']:.2f})", out)
    _record_command(out, "phases", command)
    ui.log(f"phases: warm-up/basin {ratios['warmup_over_basin']:.3f} (|.| {ratios['warmup_over_basin_abs']:.3f}), "
           f"late/basin {ratios['late_over_basin']:.3f} (|.| {ratios['late_over_basin_abs']:.3f}) -> {out}")
    return out


# --------------------------------------------------------------------------- E4: dynamics


def step_groups(steps: np.ndarray, T: int) -> np.ndarray:
    """Early / middle / late third of training (by the step that used the point): 0, 1, 2."""
    return np.minimum((3 * np.asarray(steps)) // T, 2).astype(int)


def dynamics_table(dynamics: np.ndarray, steps: np.ndarray, boundaries: list[int], T: int) -> pd.DataFrame:
    """Mean influence of each group on the validation loss at each checkpoint b_1..b_K.

    ``dynamics`` [N_occ, K]: column j−1 is the influence on L(θ_{b_j}); NaN for points used at
    or after b_j (they cannot influence it). The mean is over the group's points used before
    the checkpoint (``n`` of them).
    """
    if dynamics.ndim != 2 or dynamics.shape[1] != len(boundaries) - 1:
        raise ArtifactError(f"dynamics.npy has shape {dynamics.shape}, expected [N_occ, {len(boundaries) - 1}]")
    grp = step_groups(steps, T)
    rows = []
    for j, b in enumerate(boundaries[1:]):
        for g, name in enumerate(GROUPS):
            col = dynamics[grp == g, j]
            ok = col[~np.isnan(col)]
            rows.append({"checkpoint": int(b), "group": name, "n": len(ok),
                         "mean_influence": float(ok.mean()) if len(ok) else float("nan"),
                         "sum_influence": float(ok.sum()) if len(ok) else float("nan")})
    return pd.DataFrame(rows)


def _plot_dynamics(table: pd.DataFrame, T: int, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, color in zip(GROUPS, ("tab:orange", "tab:blue", "tab:red"), strict=True):
        d = table[(table["group"] == name) & (table["n"] > 0)]
        ax.plot(d["checkpoint"], d["mean_influence"], marker="o", ms=3, color=color,
                label=f"{name} third of steps")
    for k in (1, 2):
        ax.axvline(k * T / 3, color="0.7", lw=0.6, ls=":")
    ax.axhline(0, color="black", lw=0.4)
    ax.set_xlabel("checkpoint (training step)")
    ax.set_ylabel("mean influence on val loss at checkpoint")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "dynamics")
    plt.close(fig)


def run_dynamics(cfg: Config, overrides: list[str], results: Path, compute: bool = True,
                 command: str | None = None) -> Path:
    """E4 (paper Fig. 4) from Algorithm 2's dynamics; returns the results folder."""
    if cfg.embed.algorithm != 2:
        ui.log("dynamics need Algorithm 2: using embed.algorithm=2")
        cfg = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, algorithm=2))
        overrides = [*overrides, "embed.algorithm=2"]
    embed_path = ensure_embedding(cfg, overrides, compute)
    if not (embed_path / "dynamics.npy").is_file():
        raise DveError(f"{embed_path} has no dynamics.npy; rerun `{_command('embed', overrides)} --force`")
    dyn = artifacts.load_npy(embed_path / "dynamics.npy")
    bounds = artifacts.read_json(embed_path / "boundaries.json")["boundaries"]
    occ = artifacts.load_table(embed_path / "occurrences.parquet")
    meta = artifacts.read_json(embed_path / "embedding.json")
    T = int(bounds[-1])
    table = dynamics_table(dyn, occ["step"].to_numpy(), bounds, T)
    out = _results_dir(results)
    artifacts.save_table(out / "dynamics.csv", table)
    kind = _estimator_kind(meta)
    _plot_dynamics(table, T, f"{cfg.name}: data value dynamics, K={len(bounds) - 1} segments ({kind})", out)
    _record_command(out, "dynamics", command)
    ui.log(f"dynamics over checkpoints {bounds[1:]} -> {out}")
    return out

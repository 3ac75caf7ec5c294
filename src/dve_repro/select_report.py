"""Tables and figures of ``dve select`` (E5): gain over ``never`` as a fraction of the gain of
``always``, against the selection cost, with the spread over seeds.

Per run (schedule s, seed k): L_s,k = validation loss at the last step. Gain
G_s,k = L_never,k − L_s,k (paired by seed: the same initialisation, data order and pools).
Gain fraction F_s = mean_k G_s,k ÷ mean_k G_always,k; its spread is the standard deviation over
seeds of G_s,k ÷ mean_k G_always,k. Cost fraction C_s = candidate gradients of s ÷ those of
``always`` (exact counts). The measured seconds are this machine's, not results: they go to
an ignored ``select_timings.csv`` under ``runtime.out_root``, never into the committed tables.

The paper's two claims, decided by :data:`RULES` (written into ``selection.md``):
* early+late ≈ always at > 5× less cost: F_early_late ≥ 0.8 and C_early_late ≤ 0.2;
* the first short window alone gives about half the gain: 0.3 ≤ F_early ≤ 0.7.
Neither is tested when always' gain does not stand out from the seeds' spread (mean G_always
≤ 2 standard errors): the table then says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dve_repro import artifacts
from dve_repro.config import Config
from dve_repro.tables import markdown_table

TIMING_COLUMNS = ("select_seconds", "train_seconds")  # per run, written to select_timings.csv
RULES = {"early_late_min_gain": 0.8, "early_late_max_cost": 0.2, "early_gain_range": (0.3, 0.7),
         "always_gain_min_se": 2.0}


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per schedule: final loss, gain and cost (see the module docstring)."""
    loss = runs.pivot(index="seed", columns="schedule", values="final_val_loss")
    if "never" not in loss or "always" not in loss:
        raise ValueError("the summary needs the never and always schedules")
    gain = (-loss).add(loss["never"], axis=0)  # G_s,k = L_never,k − L_s,k
    g_always = float(gain["always"].mean())
    cand = runs.groupby("schedule")["candidate_grads"].mean()
    rows = []
    for s in dict.fromkeys(runs["schedule"]):
        g = gain[s]
        rows.append({
            "schedule": s,
            "selecting_steps": int(runs.loc[runs.schedule == s, "selecting_steps"].iloc[0]),
            "final_loss_mean": float(loss[s].mean()),
            "final_loss_sd": float(loss[s].std(ddof=1)) if len(g) > 1 else float("nan"),
            "gain_mean": float(g.mean()),
            "gain_sd": float(g.std(ddof=1)) if len(g) > 1 else float("nan"),
            "gain_fraction": float(g.mean() / g_always) + 0.0 if g_always else float("nan"),  # + 0.0: no "-0"
            "gain_fraction_sd": float((g / g_always).std(ddof=1)) if g_always and len(g) > 1 else float("nan"),
            "cost_fraction": float(cand[s] / cand["always"]) if cand["always"] else float("nan"),
        })
        if "distinct_points" in runs:
            rows[-1]["distinct_points"] = float(runs.loc[runs.schedule == s, "distinct_points"].mean())
        if "chosen_corrupted" in runs:
            rows[-1]["chosen_corrupted"] = float(runs.loc[runs.schedule == s, "chosen_corrupted"].mean())
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame, n_seeds: int) -> dict[str, str]:
    """The two claims, by :data:`RULES`."""
    t = table.set_index("schedule")
    a = t.loc["always"]
    se = a["gain_sd"] / np.sqrt(n_seeds) if n_seeds > 1 else float("inf")
    if n_seeds < 2:
        why = "not tested: one seed gives no spread to compare the gains with (run select.seeds with 2 or more)"
        out = {"early_late": why, "early": why}
        for s in ("early_late", "early"):
            if s in t.index:
                e = t.loc[s]
                out[s] += (f"; {s} gains {e['gain_mean']:+.4f} = {e['gain_fraction']:.2f} of always' "
                           f"{a['gain_mean']:+.4f} at {e['cost_fraction']:.3f} of its selection cost")
        return out
    if not a["gain_mean"] > RULES["always_gain_min_se"] * se:
        why = (f"not tested: selecting always gains {a['gain_mean']:+.4f} ± {a['gain_sd']:.4f} (sd over {n_seeds} "
               "seeds), not more than 2 standard errors above zero, so there is no gain to recover a fraction of")
        out = {"early_late": why, "early": why}
        for s in ("early_late", "early"):
            if s in t.index:
                e = t.loc[s]
                out[s] += (f"; {s} itself gains {e['gain_mean']:+.4f} ± {e['gain_sd']:.4f} at {e['cost_fraction']:.3f} "
                           "of always' selection cost")
        return out
    out = {}
    if "early_late" in t.index:
        e = t.loc["early_late"]
        ok = e["gain_fraction"] >= RULES["early_late_min_gain"] and e["cost_fraction"] <= RULES["early_late_max_cost"]
        out["early_late"] = (f"{'holds' if ok else 'does not hold'}: early+late gives {e['gain_fraction']:.2f} "
                             f"± {e['gain_fraction_sd']:.2f} of always' gain at {e['cost_fraction']:.3f} of its "
                             f"selection cost ({1 / e['cost_fraction']:.1f}× less)")
    if "early" in t.index:
        e = t.loc["early"]
        lo, hi = RULES["early_gain_range"]
        ok = lo <= e["gain_fraction"] <= hi
        out["early"] = (f"{'holds' if ok else 'does not hold'}: the early window alone gives {e['gain_fraction']:.2f} "
                        f"± {e['gain_fraction_sd']:.2f} of always' gain at {e['cost_fraction']:.3f} of its cost")
    return out


def write_report(runs: list[dict], cfg: Config, out: Path, command: str | None = None) -> None:
    """selection.csv (one row per run), curves.csv, selection.md, curves.png, gain_vs_cost.png."""
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curve", "run")} for r in runs])
    timing = [c for c in TIMING_COLUMNS if c in frame]
    if timing:  # beside the run folders (ignored), so that a rerun leaves the committed tables as they are
        artifacts.save_table(Path(cfg.runtime.out_root) / cfg.name / "select_timings.csv",
                             frame[["schedule", "seed", *timing]])
        frame = frame.drop(columns=timing)
    curves = pd.concat([r["curve"].assign(schedule=r["schedule"], seed=r["seed"]) for r in runs], ignore_index=True)
    curves = curves[["schedule", "seed", "step", "val_loss"]]
    table = summary_table(frame)
    seeds = sorted(frame["seed"].unique())
    claims = verdicts(table, len(seeds))
    artifacts.save_table(out / "selection.csv", frame)
    artifacts.save_table(out / "curves.csv", curves)
    sel = cfg.select
    T = int(curves["step"].max())
    from dve_repro.select import windows

    early_end, late_start = windows(sel, cfg.schedule.warmup_steps, T)
    lines = [
        f"# {cfg.name}: online data selection timed by the influence phases (E5, paper Fig. 1b)", "",
        *([f"Command: `{command}`", ""] if command else []),
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); T = {T} steps of {cfg.train.batch_size} × "
        f"{getattr(cfg.data, 'seq_len', 1)} tokens; pool = {sel.pool_factor:g} × batch; score = "
        f"{'η_t·' if sel.lr_scaled else ''}{'⟨g_i, g_val⟩' if sel.score == 'dot' else 'cos(g_i, g_val)'} on "
        f"projected gradients (p̃ from `projection`), validation batch {sel.val_batch} of a {sel.n_split}-point "
        "selection split disjoint from the evaluation split.",
        f"Windows ({sel.windows}): early = steps [0, {early_end}) ({early_end / T:.1%} of the run), late = "
        f"[{late_start}, {T}) ({(T - late_start) / T:.1%})"
        + (" — the warm-up and late regions of `dve analyze phases`." if sel.windows == "phases" else "."), "",
        "Gain = final validation loss of `never` − that of the schedule (paired by seed); gain fraction = mean "
        "gain ÷ mean gain of `always` (± its sd over seeds); cost fraction = candidate gradients ÷ those of "
        "`always`; distinct_points = "
        "training points trained on at least once (a selecting step may pick a point another step already "
        "used)" + ("; chosen_corrupted = share of the chosen candidates that are planted random-token sequences "
                   "(the pools hold data.corrupt_fraction of them)" if "chosen_corrupted" in frame else "") + ".", "",
        markdown_table(table, "{:.4g}"), "",
        "## The paper's claims at this scale", "",
        f"Rules: early+late holds when its gain fraction ≥ {RULES['early_late_min_gain']} at a cost fraction ≤ "
        f"{RULES['early_late_max_cost']}; early holds when its gain fraction is in {list(RULES['early_gain_range'])}; "
        f"neither is tested unless always' mean gain exceeds {RULES['always_gain_min_se']:g} standard errors.", "",
        *(f"- **{k}**: {v}" for k, v in claims.items()), "",
    ]
    artifacts.write_text(out / "selection.md", "\n".join(lines))
    _plot_curves(curves, out, cfg.name, early_end, late_start, T)
    _plot_gain_vs_cost(table, out, cfg.name)
    if command:
        artifacts.record_command(out, "select", command)


_COLORS = {"never": "tab:gray", "always": "tab:blue", "early_late": "tab:green", "early": "tab:orange",
           "late": "tab:red"}


def _plot_curves(curves: pd.DataFrame, out: Path, name: str, early_end: int, late_start: int, T: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    never = curves[curves.schedule == "never"].pivot(index="step", columns="seed", values="val_loss")
    for s, g in curves.groupby("schedule", sort=False):
        piv = g.pivot(index="step", columns="seed", values="val_loss")
        c = _COLORS.get(s)
        ax.plot(piv.index, piv.mean(axis=1), label=s, color=c)
        ax.fill_between(piv.index, piv.min(axis=1), piv.max(axis=1), color=c, alpha=0.15)
        d = never[piv.columns] - piv  # gain over never, per seed
        bx.plot(d.index, d.mean(axis=1), label=s, color=c)
        bx.fill_between(d.index, d.min(axis=1), d.max(axis=1), color=c, alpha=0.15)
    for a in (ax, bx):
        a.axvspan(0, early_end, color="k", alpha=0.06)
        a.axvspan(late_start, T, color="k", alpha=0.06)
        a.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss (mean; band = min–max over seeds)")
    bx.set_ylabel("loss(never) − loss(schedule)")
    bx.axhline(0, color="k", lw=0.5)
    bx.set_title("gain over never (shaded: the selection windows)")
    bx.legend(fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "curves", ("png",))
    plt.close(fig)


def _plot_gain_vs_cost(table: pd.DataFrame, out: Path, name: str) -> None:
    """Gain over never (loss units, ± sd over seeds) against the selection cost ÷ always: the
    absolute gain, not the fraction of always' gain, so the figure reads the same whether
    selecting always helps or hurts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    offsets = {"never": (6, -12), "always": (-40, 8), "early_late": (6, 8), "early": (6, -14), "late": (6, 4)}
    for _, r in table.iterrows():
        c = _COLORS.get(r["schedule"])
        ax.errorbar(r["cost_fraction"], r["gain_mean"], yerr=r["gain_sd"], fmt="o", color=c, capsize=3)
        ax.annotate(r["schedule"], (r["cost_fraction"], r["gain_mean"]), textcoords="offset points",
                    xytext=offsets.get(r["schedule"], (6, 4)), fontsize=9, color=c)
    always = table.loc[table.schedule == "always", "gain_mean"]
    if len(always):
        ax.axhline(float(always.iloc[0]), color=_COLORS["always"], lw=0.6, ls="--")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("selection cost ÷ always (candidate gradients)")
    ax.set_ylabel("final validation loss: never − schedule")
    ax.set_xlim(-0.05, 1.12)
    ax.set_title(f"{name}: gain over never against selection cost (± sd over seeds)", fontsize=9)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "gain_vs_cost", ("png",))
    plt.close(fig)

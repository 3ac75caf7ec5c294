"""Ablations: where can the paper's estimator be trusted? (issue E1, beyond the paper)

Sweeps use Hydra's multirun override syntax (``key=a,b,c``). :func:`expand_multirun`
gives the full product, as ``hydra -m`` would; :func:`one_at_a_time` varies each swept key
alone with every other key at its configured value, which is what a "correlation against
each knob" figure needs. Each point is a full ``compare-tsloo`` run (cached in its own run
directories; a sweep of an embedding knob computes the unrolled methods and baselines once,
their caches keyed by what each reads); the small outputs are

* ``results/<name>/ablations/ablations.csv`` — one row per (knob, value, method, setting):
  Spearman and Pearson with the TSLOO ground truth;
* ``results/<name>/ablations/ablations.{png,pdf}`` — Spearman against each knob;
* ``results/<name>/ablations/COMMAND.txt``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dve_repro import artifacts, ui
from dve_repro.config import compose
from dve_repro.errors import ConfigError

SHOWN_METHODS = ("dvemb", "unrolled-hessian", "unrolled-gn", "unrolled-ef", "influence")


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None


def expand_multirun(overrides: list[str]) -> list[list[str]]:
    """Full product of the sweep overrides (Hydra's basic sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(_parse(overrides), None)
    return [job for batch in batches for job in batch]


def one_at_a_time(overrides: list[str]) -> list[tuple[str, str, list[str]]]:
    """(knob, value, overrides) for each value of each swept key, others held fixed."""
    parsed = _parse(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    jobs = []
    for o in parsed:
        if not o.is_sweep_override():
            continue
        key = o.get_key_element()
        for value in expand_multirun([o.input_line]):
            jobs.append((key, value[0].split("=", 1)[1], [*fixed, *value]))
    if not jobs:
        raise ConfigError("give at least one swept key, e.g. projection.k_in=16,32,64")
    return jobs


def run_ablation(overrides: list[str], results_dir: Path, command: str | None = None) -> Path:
    """One comparison per value of each swept knob (others fixed), as jobs of Hydra's
    configured launcher (``sweep.py``: ``hydra/launcher=joblib`` for processes); the
    training runs are built first, here, once each. Writes ``ablations.csv`` and the plot."""
    from functools import partial

    from dve_repro import sweep
    from dve_repro.train import run_training

    hydra_ov, job_ov = sweep.split_overrides(overrides)
    jobs = one_at_a_time(job_ov)
    cfgs = [compose(ov) for _, _, ov in jobs]  # every job's config is checked before anything runs
    for cfg in cfgs:
        run_training(cfg)
    out = Path(results_dir)
    ui.log(f"{len(jobs)} ablation jobs: " + ", ".join(f"{k}={v}" for k, v, _ in jobs))
    done = sweep.launch(hydra_ov, partial(ablation_job, results_dir=str(out)),
                        Path(cfgs[0].runtime.out_root) / cfgs[0].name / "sweeps", items=jobs)
    table = pd.concat([summary.assign(knob=knob, value=value) for _, (knob, value, _), summary in done],
                      ignore_index=True)
    artifacts.save_table(out / "ablations.csv", table)
    plot_ablation(table, out)
    if command:
        artifacts.write_text(out / "COMMAND.txt", command + "\n")
    return out


def ablation_job(_overrides: list[str], item: tuple[str, str, list[str]], results_dir: str) -> pd.DataFrame:
    """One value of one knob (a launcher job): its comparison's summary table."""
    from dve_repro.compare import run_compare

    knob, value, ov = item
    share_stages()
    res = run_compare(compose(ov), Path(results_dir) / "runs" / f"{knob}={value}", figures=False)
    return artifacts.load_table(res / "summary.csv")


def share_stages() -> None:
    """Jobs of one sweep share stages (the ground truth of every embedding knob's values):
    a job that finds one being built by another waits for it and then reuses it, instead of
    refusing (``artifacts.FolderLock``)."""
    import os

    os.environ.setdefault("DVE_LOCK_WAIT", str(7 * 24 * 3600))


def plot_ablation(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table[table["convention"] == table["convention"].iloc[0]]
    knobs = list(dict.fromkeys(table["knob"]))
    settings = list(dict.fromkeys(table["setting"]))
    fig, axes = plt.subplots(len(settings), len(knobs), figsize=(3.2 * len(knobs), 2.8 * len(settings)),
                             squeeze=False, sharey=True)
    for r, st in enumerate(settings):
        for c, knob in enumerate(knobs):
            ax = axes[r][c]
            d = table[(table["knob"] == knob) & (table["setting"] == st)]
            values = list(dict.fromkeys(d["value"]))
            for m in SHOWN_METHODS:
                dm = d[d["method"] == m].set_index("value")
                if len(dm):
                    ax.plot(range(len(values)), dm.loc[values, "spearman"], marker="o", ms=3, label=m)
            ax.set_xticks(range(len(values)), values, fontsize=7, rotation=30)
            ax.set_title(f"{knob} ({st}-epoch)", fontsize=8)
            ax.axhline(0, color="black", lw=0.4)
            if c == 0:
                ax.set_ylabel("Spearman vs TSLOO", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "ablations")
    plt.close(fig)

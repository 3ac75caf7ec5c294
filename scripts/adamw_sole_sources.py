"""Issue 11: where the first-order AdamW unrolling loses to retraining on the tiny LM.

Adam's step m̂/(√v̂+ε) is scale-invariant in the gradient of a coordinate whose moments come
from one gradient alone: its derivative along that gradient is ~0, yet leaving the point out
removes the whole update (a 100% change, far outside the linear regime). In a language model
the input-embedding row of a token gets a gradient only from sequences that contain it, so
removing the *only* sequence that has fed a token's row so far is exactly that case. This
splits the TSLOO jobs of a finished ``dve compare-tsloo`` run by whether the removed sequence
is, at its step, the first and only gradient source of a token that the validation loss reads,
and gives each method's Spearman (bootstrap interval) in both groups.

    python scripts/adamw_sole_sources.py experiment=pythia_tiny_adamw   # → results/pythia_tiny_adamw/sole_sources.{csv,md}

The run folders (training, ground truth) must exist: `make reproduce` or the experiment's
`dve compare-tsloo` makes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dve_repro import artifacts
from dve_repro.config import compose
from dve_repro.errors import DveError
from dve_repro.stats import bootstrap_ci, spearman
from dve_repro.tables import markdown_table


def sole_sources(tokens: np.ndarray, batches: list[np.ndarray], index: int, step: int,
                 wanted: set[int]) -> list[int]:
    """Tokens of sequence ``index`` [row of ``tokens`` (N, L)] in ``wanted`` whose embedding row
    has no gradient from any other sequence at ``step`` (in ``batches[step]``) nor from any
    sequence at an earlier step: removing ``index`` there removes the row's whole update.
    Conservative: a token that another sequence holds only in its last position (an input
    with no prediction after it, so no gradient) still counts as fed by that sequence."""
    before = {int(t) for s in range(step) for i in batches[s] for t in tokens[int(i)]}
    others = {int(t) for i in batches[step] if int(i) != index for t in tokens[int(i)]}
    return sorted(int(t) for t in set(tokens[index].tolist()) if t in wanted and t not in before | others)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="the experiment's overrides, e.g. experiment=pythia_tiny_adamw")
    ap.add_argument("--results", type=Path, default=None, help="the comparison's results folder "
                    "(default results/<experiment>)")
    args = ap.parse_args()
    try:
        out = run(args.overrides, args.results)
    except DveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(out)


def run(overrides: list[str], results: Path | None) -> Path:
    from dve_repro.replay import TrainedRun
    from dve_repro.train import train_dir
    from dve_repro.tsloo import tsloo_dir

    cfg = compose(overrides)
    if cfg.model.name != "gpt_neox":
        raise DveError(f"the split is by token rows of a language model's embedding; {cfg.name} trains "
                       f"model.name={cfg.model.name} (use experiment=pythia_tiny_adamw)")
    results = results or Path("results") / cfg.name
    tidy_path, gt = results / "tidy.csv", tsloo_dir(cfg)
    if not tidy_path.is_file() or not (gt / artifacts.DONE).is_file():
        raise DveError(f"needs a finished `dve compare-tsloo {' '.join(overrides)}` ({tidy_path} and {gt})")
    run_ = TrainedRun.load(train_dir(cfg))
    tokens = run_.task.x_train.cpu().numpy()
    wanted = {int(t) for t in run_.task.x_val.cpu().numpy().ravel()}
    jobs = artifacts.load_table(gt / "jobs.parquet")
    single = jobs[jobs["setting"] == "single"]
    step_of = {int(r.index): int(r.steps[0]) for r in single.itertuples()}
    n_sole = {i: len(sole_sources(tokens, run_.traj.batches, i, s, wanted)) for i, s in step_of.items()}
    tidy = artifacts.load_table(tidy_path)
    tidy = tidy[(tidy["setting"] == "single") & (tidy["convention"] == "keep")]
    b = cfg.baselines
    rows = []
    for method, g in tidy.groupby("method", sort=False):
        g = g[g["index"].isin(n_sole)]
        sole = g["index"].map(n_sole) > 0
        for name, part in (("sole source of a validation token", g[sole]), ("every token fed by others too", g[~sole]),
                           ("all", g)):
            est, truth = part["estimate"].to_numpy(), part["truth"].to_numpy()
            lo, hi = bootstrap_ci(est, truth, spearman, b.bootstrap, b.bootstrap_seed)
            rows.append({"method": method, "jobs": name, "n": len(part), "spearman": spearman(est, truth),
                         "spearman_lo": lo, "spearman_hi": hi})
    table = pd.DataFrame(rows)
    artifacts.save_table(results / "sole_sources.csv", table)
    coverage = mask_coverage(cfg, run_, wanted, {int(t) for t in tokens.ravel()})
    md = ["# Where first-order AdamW influence breaks: sole gradient sources of embedding rows", "",
          f"Command: `python scripts/adamw_sole_sources.py {' '.join(overrides)}`", "",
          "Single-epoch TSLOO jobs split by whether the removed sequence is, at its step, the first and only "
          "sequence that feeds the embedding row of a token the validation set contains (Adam's update of that "
          "row is scale-invariant in its only gradient: first order sees ~0, retraining removes the whole "
          f"update). Spearman with a {b.bootstrap}-resample bootstrap interval.", "",
          markdown_table(table, "{:.3f}", columns=["method", "jobs", "n", "spearman", "spearman_lo", "spearman_hi"]),
          "", "## The stored embedding's coordinate mask on the vocabulary tables", "",
          "Rows of each vocabulary-sized parameter that the `dvemb-adamw-mask` subspace keeps "
          "(`embed.adamw_k_out` seeded rows), and how many of them are tokens the validation set or the training "
          "set contains: a perturbation confined to the mask cannot reach the other rows.", "",
          markdown_table(coverage, "{:d}")]
    artifacts.write_text(results / "sole_sources.md", "\n".join(md))
    return results / "sole_sources.md"


def mask_coverage(cfg, run, val_tokens: set[int], train_tokens: set[int]) -> pd.DataFrame:
    """Per parameter with one row per vocabulary entry: the AdamW mask subspace's rows, and how
    many are validation / training tokens (the subspace the comparison's dvemb-adamw-mask uses)."""
    import dataclasses

    from dve_repro.embed_adamw import SubspaceFeaturizer

    embed = dataclasses.replace(cfg.embed, optimizer_aware=True, adamw_subspace="mask")
    sub = SubspaceFeaturizer.for_config(dataclasses.replace(cfg, embed=embed), run).sub
    vocab = cfg.model.vocab_size
    rows = []
    for name in sub.names:
        if sub.shapes[name][0] != vocab:
            continue
        kept = {int(r) for r in sub.rows[name].tolist()}
        rows.append({"parameter": name, "rows": vocab, "mask_rows": len(kept),
                     "validation_tokens": len(val_tokens), "mask_rows_validation": len(kept & val_tokens),
                     "training_tokens": len(train_tokens), "mask_rows_training": len(kept & train_tokens)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()

"""Detect stage: mislabeled-data detection under label noise (paper App. E; SPEC E6).

Reads a training run with label noise (its ``labels.json`` names the flipped points and
their true labels) and its embedding (both made on demand). Computes every method's value
per training point into ``<out_root>/<name>/detect-<fingerprint>/`` (cached per method,
with ``timings.json``), then writes small results to ``results/<name>/``:

* ``values.csv`` — per training point: flipped or not, given and true label, every method's
  value and DVEmb of each epoch alone (the figures and tables are rebuilt from it);
* ``auroc.csv`` / ``auroc.md`` — AUROC and average precision of each method for finding the
  flipped points, with stratified bootstrap 95% intervals, and the fraction found in the
  lowest 10% of values;
* ``epochs.csv`` — the same for DVEmb restricted to each epoch's occurrences (sum of a
  point's embeddings within epoch e, scored at θ_T), beside how many flipped points the
  model fits (predicts their flipped label) at the end of that epoch;
* ``detection.{png,pdf}`` — fraction of flipped labels found vs fraction of data inspected,
  lowest value first; ``epochs.{png,pdf}`` — AUROC of each epoch alone;
* ``COMMAND.txt`` — the command that produced them.

Every method is put on one convention: **lower value = more likely mislabeled**.
Attribution methods are on the TSLOO sign (positive = the point lowered the clean
validation loss), so a harmful point has a low value as is; self-influence and training
loss grow with suspicion and enter negated. The query is the mean loss over the clean
validation set. When the data is not CIFAR-10, every title and table says that it is the
MNIST stand-in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from dve_repro import artifacts, baselines, ui, unroll
from dve_repro.config import Config, fingerprint, section, stage_payload, to_dict
from dve_repro.errors import DveError
from dve_repro.replay import TrainedRun
from dve_repro.self_influence import self_influence
from dve_repro.stats import stratified_ci
from dve_repro.tables import markdown_table


@dataclass(frozen=True)
class Method:
    name: str
    value: str  # what the value is
    direction: str  # how it relates to suspicion


METHODS = (
    Method(
        "dvemb",
        "Σ over all occurrences of DVEmb·∇L_val(θ_T): predicted L_val(θ'_T) − L_val(θ_T)",
        "as is (low = removing it lowers val loss)",
    ),
    Method(
        "dvemb-adamw-mask",
        "the same through the linearised AdamW map, coordinate-subset subspace (AdamW runs only)",
        "as is (low = removing it lowers val loss)",
    ),
    Method(
        "dvemb-adamw-kron",
        "the same through the linearised AdamW map, Kronecker subspace (AdamW runs only)",
        "as is (low = removing it lowers val loss)",
    ),
    Method("influence", "(1/n) g_z(θ_T)ᵀ (H + δI)⁻¹ ∇L_val(θ_T)", "as is (TSLOO sign)"),
    Method("tracin", "Σ_c η_c g_z(θ_c)ᵀ ∇L_val(θ_c)", "as is (TSLOO sign)"),
    Method("self-influence", "−Σ_c η_c ‖g_z(θ_c)‖²", "negated (high self-influence = suspicious)"),
    Method("grad-dot", "g_z(θ_T)ᵀ ∇L_val(θ_T)", "as is (TSLOO sign)"),
    Method("train-loss", "−ℓ(θ_T, z) with the given label", "negated (high loss = suspicious)"),
)
INSPECT = 0.10  # fraction of the data inspected for the `found_at_10pct` column


# --------------------------------------------------------------------------- metrics
# AUROC and AP are scikit-learn's definitions, ``roc_auc_score(flipped, −values)`` and
# ``average_precision_score(flipped, −values)``, written out here because the stratified
# bootstrap calls them once per resample and method (32 000 calls for mnist_noise), and
# scikit-learn's input validation makes each call an order of magnitude slower. The fast
# forms are held equal to scikit-learn's (ties included) by tests/unit/test_detect.py.


def auroc(values: np.ndarray, flipped: np.ndarray) -> float:
    """P(a flipped point has a lower value than a clean one), ties counted half
    (= ``sklearn.metrics.roc_auc_score(flipped, -values)``).

    ``values`` [N] (lower = suspicious), ``flipped`` [N] bool. Mann-Whitney U from average ranks.
    """
    values, flipped = np.asarray(values, dtype=np.float64), np.asarray(flipped, dtype=bool)
    n_pos, n_neg = int(flipped.sum()), int((~flipped).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(-values)  # rank 1 = highest value; flipped should rank high in −value
    return float((ranks[flipped].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(values: np.ndarray, flipped: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds of −value, from the most
    suspicious down, tied values entering together
    (= ``sklearn.metrics.average_precision_score(flipped, -values)``)."""
    values, flipped = np.asarray(values, dtype=np.float64), np.asarray(flipped, dtype=bool)
    n_pos = int(flipped.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(values, kind="mergesort")
    v, y = values[order], flipped[order]
    last = np.append(np.flatnonzero(np.diff(v) != 0), len(v) - 1)  # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def found_curve(values: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected [N+1], fraction of flipped found [N+1]), lowest value first."""
    order = np.argsort(values, kind="mergesort")
    hits = np.concatenate([[0], np.cumsum(np.asarray(flipped, dtype=bool)[order])])
    return np.arange(len(values) + 1) / len(values), hits / max(1, int(np.sum(flipped)))


def found_at(values: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    """Fraction of the flipped points among the lowest ``round(fraction·N)`` values."""
    k = round(fraction * len(values))
    return float(
        np.asarray(flipped, dtype=bool)[np.argsort(values, kind="mergesort")[:k]].sum()
        / max(1, np.sum(flipped))
    )


def summarize(
    values: dict[str, np.ndarray], flipped: np.ndarray, n_boot: int, seed: int
) -> pd.DataFrame:
    rows = []
    for name, v in values.items():
        a_lo, a_hi = stratified_ci(v, flipped, auroc, n_boot, seed)
        p_lo, p_hi = stratified_ci(v, flipped, average_precision, n_boot, seed)
        rows.append(
            {
                "method": name,
                "auroc": auroc(v, flipped),
                "auroc_lo": a_lo,
                "auroc_hi": a_hi,
                "ap": average_precision(v, flipped),
                "ap_lo": p_lo,
                "ap_hi": p_hi,
                "found_at_10pct": found_at(v, flipped, INSPECT),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- values


def dataset_label(cfg: Config) -> str:
    return "CIFAR-10" if cfg.data.name == "cifar10" else "MNIST stand-in for CIFAR-10"


def detect_dir(cfg: Config) -> tuple[Path, dict]:
    """The cache folder of the method values, and the payload that names it."""
    payload = {
        "embed": stage_payload(cfg, "embed"),
        "baselines": {
            k: section(cfg, "baselines")[k] for k in ("if_damping", "cg_iters", "cg_tol")
        },
    }
    return artifacts.stage_dir(
        cfg.runtime.out_root, cfg.name, "detect", fingerprint(payload)
    ), payload


def final_train_losses(run: TrainedRun) -> np.ndarray:
    """ℓ(θ_T, z) of every training point with its given label: [n_train]."""
    task = run.task
    params = run.final_params()
    chunks = [np.arange(s, min(s + 1024, task.n_train)) for s in range(0, task.n_train, 1024)]
    with torch.no_grad():
        losses = [task.per_sample_loss(params, *task.batch(i)) for i in chunks]
    return torch.cat(losses).double().cpu().numpy()


def _adamw_values(cfg: Config, run: TrainedRun, timings: dict) -> dict[str, np.ndarray]:
    """All-epoch values of the stored AdamW-aware embeddings (embed.optimizer_aware=true with
    each of ``baselines.adamw_subspaces``), made by the embed stage and reused when finished."""
    import dataclasses

    from dve_repro.embed_stage import run_embedding

    b, out = cfg.baselines, {}
    for kind in b.adamw_subspaces:
        embed = dataclasses.replace(cfg.embed, optimizer_aware=True, adamw_subspace=kind,
                                    curvature=b.adamw_curvature, blocks=b.adamw_blocks)
        path = run_embedding(dataclasses.replace(cfg, embed=embed), run)
        values = artifacts.load_table(path / "values.parquet").set_index("index")["all_epoch"]
        out[f"dvemb-adamw-{kind}"] = values.reindex(np.arange(run.task.n_train), fill_value=0.0).to_numpy()
        timings[f"dvemb-adamw-{kind}"] = sum(artifacts.read_json(path / "embedding.json")["timings"].values())
    return out


def method_values(
    cfg: Config, run: TrainedRun, embed_path: Path, cache: Path
) -> tuple[dict, dict, dict]:
    """({method: values [n_train]} on the lower-is-suspicious convention, {method: seconds},
    {method: diagnostic note}); values, timings and notes are cached in ``cache``."""
    n = run.task.n_train

    def cached_json(name: str) -> dict:
        return artifacts.read_json(cache / name) if (cache / name).is_file() else {}

    timings, notes = cached_json("timings.json"), cached_json("notes.json")
    dv = artifacts.load_table(embed_path / "values.parquet").set_index("index")["all_epoch"]
    emb_t = artifacts.read_json(embed_path / "embedding.json")["timings"]
    timings["dvemb"] = sum(emb_t.values())
    out = {"dvemb": dv.reindex(np.arange(n), fill_value=0.0).to_numpy()}
    if run.cfg.optim.name == "adamw":  # the AdamW-aware embeddings beside the paper's SGD proxy
        out.update(_adamw_values(cfg, run, timings))
    x_q, y_q = run.task.x_val, run.task.y_val
    b = cfg.baselines
    q = None

    def query():
        nonlocal q
        if q is None:
            q = {
                k: v[:1]
                for k, v in unroll.query_gradients(run, run.final_params(), x_q, y_q).items()
            }
        return q

    def influence():
        v, diag = baselines.influence_function(run, query(), b.if_damping, b.cg_iters, b.cg_tol)
        it, res = diag["cg_iterations"], diag["cg_rel_residual"]
        notes["influence"] = f"CG {it} iterations, relative residual {res:.3g}" + (
            "" if res <= b.cg_tol else f" (not converged to cg_tol={b.cg_tol:g})"
        )
        return v[:, 0]

    compute = {
        "influence": influence,
        "tracin": lambda: baselines.tracin(run, x_q, y_q, 0)[:, 0],
        "self-influence": lambda: -self_influence(run),
        "grad-dot": lambda: baselines.grad_dot(run, query())[:, 0],
        "train-loss": lambda: -final_train_losses(run),
    }
    for name, fn in compute.items():
        path = cache / f"{name}.npy"
        if path.is_file():
            try:
                out[name] = artifacts.load_npy(path)
                continue
            except DveError as exc:  # a cache: recomputing it gives the same values
                ui.warn(f"warning: {exc}; recomputing it")
        t0 = time.perf_counter()
        value = np.asarray(fn(), dtype=np.float64)
        timings[name] = time.perf_counter() - t0
        with artifacts.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, value)
        artifacts.write_json(cache / "timings.json", timings)
        artifacts.write_json(cache / "notes.json", notes)
        out[name] = value
        ui.log(f"{name}: {timings[name]:.1f}s")
    for name, v in out.items():
        if v.shape != (n,) or not np.isfinite(v).all():
            raise DveError(
                f"method {name} gave non-finite or misshaped values ({v.shape}); the run may have diverged"
            )
    return out, timings, notes


def epoch_values(embed_path: Path, n: int) -> tuple[list[int], np.ndarray]:
    """DVEmb of each epoch alone: [n_train, n_epochs], a point's occurrences within epoch e summed."""
    scores = artifacts.load_table(embed_path / "scores.parquet")
    per = scores.groupby(["index", "epoch"])["score"].sum().unstack("epoch", fill_value=0.0)
    per = per.reindex(np.arange(n), fill_value=0.0)
    return [int(e) for e in per.columns], per.to_numpy()


def fitted_flipped(run: TrainedRun, steps: list[int], flipped: np.ndarray) -> list[float]:
    """Fraction of the flipped points predicted as their (wrong) given label at each step."""
    task = run.task
    x, y = task.batch(np.flatnonzero(flipped))
    out = []
    for s in steps:
        if s not in run.checkpoints:
            out.append(float("nan"))
            continue
        with torch.no_grad():
            out.append(
                float((task.logits(run.load_params(s)[0], x).argmax(-1) == y).double().mean())
            )
    return out


# --------------------------------------------------------------------------- outputs


# digits of the auroc.md columns (the rest: 3); a missing value is an empty cell
MD_FORMATS = {"auroc": "{:.3f}", "ap": "{:.3f}", "found_at_10pct": "{:.2f}", "flipped_fitted": "{:.2f}"}


def plot_detection(
    values: dict, flipped: np.ndarray, summary: pd.DataFrame, out: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    rate = flipped.mean()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="random")
    ax.plot([0, rate, 1], [0, 1, 1], color="grey", lw=0.8, ls="--", label="oracle")
    auc = summary.set_index("method")["auroc"]
    for name, v in values.items():
        x, y = found_curve(v, flipped)
        ax.plot(x, y, lw=2.0 if name == "dvemb" else 1.2, label=f"{name} (AUROC {auc[name]:.3f})")
    ax.set_xlabel("fraction of training data inspected (lowest value first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "detection")
    plt.close(fig)


def plot_epochs(epochs: pd.DataFrame, all_epoch_auroc: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    e = epochs["epoch"].to_numpy()
    ax.plot(e, epochs["auroc"], marker="o", label="DVEmb of epoch e alone")
    ax.fill_between(e, epochs["auroc_lo"], epochs["auroc_hi"], alpha=0.2)
    ax.axhline(
        all_epoch_auroc, color="C0", ls="--", lw=0.8, label=f"all epochs ({all_epoch_auroc:.3f})"
    )
    ax.axhline(0.5, color="grey", ls=":", lw=0.8, label="random")
    ax.plot(
        e,
        epochs["flipped_fitted"],
        marker="s",
        color="C3",
        lw=1,
        label="flipped points fitted at end of epoch",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("AUROC / fraction")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(e)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, out, "epochs")
    plt.close(fig)


def _with_ci(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Columns ``auroc`` and ``ap`` as ``0.912 [0.88, 0.94]`` strings for the markdown table."""
    out = df[keys].copy()
    for m in ("auroc", "ap"):
        out[f"{m} [95% CI]"] = [
            f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            for v, lo, hi in zip(df[m], df[f"{m}_lo"], df[f"{m}_hi"], strict=True)
        ]
    return out


def run_detect(
    cfg: Config,
    results_dir: Path,
    force: bool = False,
    command: str = "",
    figures: bool = True,
) -> Path:
    """Train → embed → every method's values → tables and figures. Returns the results folder."""
    from dve_repro.embed_stage import run_embedding
    from dve_repro.train import run_training

    if cfg.data.name not in ("mnist", "cifar10"):
        raise DveError(
            f"detect-mislabeled needs image data (mnist or cifar10), got data.name={cfg.data.name}"
        )
    if cfg.data.label_noise <= 0:
        raise DveError(
            "detect-mislabeled needs label noise: set data.label_noise > 0 (E6 uses 0.1)"
        )
    try:
        train_path = run_training(cfg)
    except DveError as exc:
        if cfg.data.name != "cifar10":
            raise
        raise DveError(
            f"{exc}; without the CIFAR-10 files run the MNIST stand-in: "
            "dve detect-mislabeled experiment=mnist_noise"
        ) from None
    run = TrainedRun.load(train_path, cfg.runtime.device)
    flipped, given, true = _noisy_labels(run, train_path)

    embed_path = run_embedding(cfg, run)
    path, payload = detect_dir(cfg)
    rd = artifacts.RunDir(path, payload)
    rd.check()
    lock = artifacts.FolderLock(path)
    lock.acquire()  # held until this function returns (or fails)
    try:
        rd.reusable(force)  # a damaged finished folder is rebuilt beside it
        rd.prepare(to_dict(cfg), run.device, force=force)
        return _detect(cfg, run, rd, train_path, embed_path, flipped, given, true, results_dir, command, figures)
    finally:
        lock.release()


def _noisy_labels(run: TrainedRun, train_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the run's labels.json: which points were flipped [n] (bool), the labels trained on
    [n] and the true ones [n]; refuses a record naming a point whose label did not change."""
    labels = artifacts.read_json(train_path / "labels.json")
    noisy = np.asarray(labels["noisy_indices"], dtype=np.int64)
    flipped = np.zeros(run.task.n_train, dtype=bool)
    flipped[noisy] = True
    given = run.task.y_train.cpu().numpy()
    true = given.copy()
    true[noisy] = labels["true_labels"]
    if np.any(true[noisy] == given[noisy]):
        raise DveError(f"labels.json of {train_path} names points whose label was not changed")
    return flipped, given, true


def _detect(cfg, run, rd, train_path, embed_path, flipped, given, true, results_dir, command, figures) -> Path:
    """Every method's values → the method and per-epoch tables, values.csv, auroc.md, figures."""
    n = run.task.n_train
    values, timings, notes = method_values(cfg, run, embed_path, rd.path)
    epochs, per_epoch = epoch_values(embed_path, n)
    label = dataset_label(cfg)
    summary = _method_table(cfg, run, values, notes, flipped, label)
    ep = _epoch_table(cfg, run, train_path, epochs, per_epoch, flipped, label)
    embed_meta = artifacts.read_json(embed_path / "embedding.json")
    title = "\n".join(
        [
            f"E6 mislabeled-data detection — {label}",
            f"{run.task.description}; n={n}, {int(flipped.sum())} flipped, "
            f"{run.task.x_val.shape[0]} clean validation points",
            f"dvemb = {embed_meta['estimator']}, p̃={embed_meta['p_tilde']}; lower value = more suspicious",
        ]
    )
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_values(out / "values.csv", values, epochs, per_epoch, flipped, given, true)
    artifacts.save_table(out / "auroc.csv", summary)
    artifacts.save_table(out / "epochs.csv", ep)
    artifacts.write_text(out / "auroc.md", _markdown(summary, ep, title, flipped, cfg.baselines.bootstrap, label))
    if figures:
        plot_detection(values, flipped, summary, out, title)
        plot_epochs(
            ep,
            float(summary.set_index("method").loc["dvemb", "auroc"]),
            out,
            f"E6 — {label}: DVEmb AUROC from each epoch alone",
        )
    if command:
        artifacts.write_text(out / "COMMAND.txt", command + "\n")
    rd.mark_done({"results": str(out), "timings": timings})
    ui.log(f"detection results -> {out}")
    return out


def _method_table(cfg, run, values: dict, notes: dict, flipped: np.ndarray, label: str) -> pd.DataFrame:
    """One row per method: AUROC / AP with stratified intervals, found_at_10pct, what its value
    is and which way is suspicious."""
    b = cfg.baselines
    summary = summarize(values, flipped, b.bootstrap, b.bootstrap_seed)
    info = {m.name: m for m in METHODS}
    summary.insert(0, "dataset", label)
    summary["value"] = [info[m].value for m in summary["method"]]
    summary["direction"] = [info[m].direction for m in summary["method"]]
    # no seconds here: they are this machine's, not a result (``timings.json`` in the ignored
    # run folder keeps them), and a committed table must not change when the code does not
    summary["note"] = [notes.get(m, "") for m in summary["method"]]
    summary["n_train"], summary["n_flipped"], summary["n_val"] = (
        run.task.n_train,
        int(flipped.sum()),
        int(run.task.x_val.shape[0]),
    )
    return summary


def _epoch_table(cfg, run, train_path: Path, epochs, per_epoch: np.ndarray, flipped: np.ndarray,
                 label: str) -> pd.DataFrame:
    """One row per epoch: AUROC / AP of that epoch's embeddings alone, the share of flipped
    points fitted to their flipped label at its end, and the epoch's accuracies."""
    b = cfg.baselines
    metrics = artifacts.load_table(train_path / "metrics.csv").set_index("epoch")
    ep = summarize(
        {str(e): per_epoch[:, j] for j, e in enumerate(epochs)},
        flipped,
        b.bootstrap,
        b.bootstrap_seed,
    )
    ep = ep.rename(columns={"method": "epoch"}).astype({"epoch": int})
    steps = [int(metrics.loc[e, "step"]) if e in metrics.index else -1 for e in epochs]
    ep["flipped_fitted"] = fitted_flipped(run, steps, flipped)
    ep["train_acc"] = [
        float(metrics.loc[e, "train_acc"]) if e in metrics.index else np.nan for e in epochs
    ]
    ep["val_acc"] = [
        float(metrics.loc[e, "val_acc"]) if e in metrics.index else np.nan for e in epochs
    ]
    ep.insert(0, "dataset", label)
    return ep


def _write_values(path: Path, values: dict, epochs, per_epoch, flipped, given, true) -> None:
    """values.csv: per training point its labels and every method's value (and each epoch's)."""
    table = pd.DataFrame(
        {
            "index": np.arange(len(flipped)),
            "flipped": flipped.astype(int),
            "given_label": given,
            "true_label": true,
        }
    )
    for name, v in values.items():
        table[name] = v
    for j, e in enumerate(epochs):
        table[f"dvemb_epoch_{e}"] = per_epoch[:, j]
    with artifacts.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.8g")


def _markdown(summary: pd.DataFrame, ep: pd.DataFrame, title: str, flipped: np.ndarray, n_boot: int,
              label: str) -> str:
    """auroc.md: the method table, then the per-epoch table, each with its reading notes."""
    head, *rest = title.splitlines()

    def ci_table(frame: pd.DataFrame, keys: list[str], *columns: str) -> str:
        """``frame``'s keys, AUROC and AP with their intervals, then ``columns`` as they are."""
        return markdown_table(_with_ci(frame, keys).assign(**{c: frame[c] for c in columns}),
                              formats=MD_FORMATS, nan="")

    md = [
        f"# {head}",
        "",
        "Data: " + rest[0] + ".",
        "Method: " + rest[1] + ".",
        f"Random ranking: AUROC 0.5, AP {flipped.mean():.3f}. Intervals: stratified bootstrap "
        f"({n_boot} resamples). `found_at_10pct`: share of flipped labels among the lowest "
        f"{INSPECT:.0%} of values.",
        "",
        ci_table(summary, ["dataset", "method"], "found_at_10pct", "value", "direction", "note"),
        f"## DVEmb of each epoch alone ({label})",
        "",
        "A point's embeddings within epoch e summed, scored on the clean validation loss at θ_T. "
        "`flipped_fitted`: share of flipped points the model predicts as their flipped label at "
        "the end of the epoch; `train_acc` is measured against the given (noisy) labels.",
        "",
        ci_table(ep, ["dataset", "epoch"], "flipped_fitted", "train_acc", "val_acc"),
    ]
    return "\n".join(md)

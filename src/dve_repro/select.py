"""Online data selection by gradient alignment, timed by the influence phases (E5, paper
§5.3, Fig. 1b): ``dve select``.

A selecting step t of a run with ``select.schedule`` ≠ ``never``:

1. the pool P_t: the step's usual batch B_t followed by ``round(pool_factor·|B_t|) − |B_t|``
   points drawn without replacement from the rest of the training set
   (``numpy.random.default_rng([train.order_seed, select.seed, t])``). The pools do not
   depend on θ, so every schedule of one seed sees the same candidates (common random
   numbers: the schedules differ only in where they choose);
2. the projected per-sample gradients g_i ∈ R^p̃ of the pool at θ_t, by the capture
   machinery (``capture.Featurizer`` with the run's ``projection``), and the projected
   gradient g_val of a validation batch of ``select.val_batch`` points drawn afresh from the
   selection split (``default_rng([select.seed, 1, t])``);
3. the score s_i = η_t·⟨g_i, g_val⟩ — the first-order decrease of the validation loss that
   a step on z_i alone would bring, DoGE's generalisation estimate (Fan et al. 2024, which
   reweights domains by the inner product of their gradient with the others'); ``score=
   cosine`` divides by the norms, ``lr_scaled=false`` drops η_t (neither changes a ranking
   within a step; both change the logged scores);
4. the step trains on the |B_t| highest-scoring candidates (ties by pool position), in pool
   order.

Every other step trains on its usual batch, so ``never`` is plain ``dve train``. The chosen
indices are the trajectory's batches, so replay, capture, ``dve embed`` and ``dve analyze``
treat a selected run like any other; ``selection.parquet`` keeps each selecting step's pool,
validation batch, scores and cost.

Windows (``select.windows``): ``phases`` = the regions ``dve analyze phases`` reports — the
warm-up steps (t < ``schedule.warmup_steps``, the paper's high-influence phase; check the
run's phases figure, the peak can come later) and the last tenth of the run (the late rise);
``fractions`` = [0, early_end·T) and [late_start·T, T).
Schedules: ``always`` every step, ``early_late`` both windows, ``early`` / ``late`` one.

The selection split never overlaps the evaluation split: for a language model it is
``n_split`` sequences of the held-out documents' token stream starting at the first
document after the validation rows (or at row ``split_start``); for a classifier, rows of
the test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts, ui
from dve_repro.config import Config, SelectConfig, compose
from dve_repro.errors import ArtifactError, ConfigError
from dve_repro.train import CURVE, SELECTION

SELECTION_COLUMNS = ["step", "pool", "val_batch", "scores", "chosen", "n_candidates", "seconds"]


# --------------------------------------------------------------------------- schedules


def windows(sel: SelectConfig, warmup_steps: int, T: int) -> tuple[int, int]:
    """(early_end, late_start) in steps: the early window is [0, early_end), the late one
    [late_start, T)."""
    if sel.windows == "phases":
        late = T - max(1, math.ceil(T / 10))  # as analyze.regions labels the late tenth
        return min(warmup_steps, late), late
    return math.ceil(sel.early_end * T), math.floor(sel.late_start * T)


def selecting_steps(sel: SelectConfig, schedule: str, warmup_steps: int, T: int) -> np.ndarray:
    """Boolean mask [T]: which steps choose their batch under ``schedule``."""
    early_end, late_start = windows(sel, warmup_steps, T)
    t = np.arange(T)
    early, late = t < early_end, t >= late_start
    return {"never": np.zeros(T, bool), "always": np.ones(T, bool), "early_late": early | late,
            "early": early, "late": late}[schedule]


def check_windows(sel: SelectConfig, schedule: str, warmup_steps: int, T: int) -> None:
    """Refuse windows that hold no step of the run, before training starts."""
    if schedule in ("never", "always"):
        return
    early_end, late_start = windows(sel, warmup_steps, T)
    where = ("schedule.warmup_steps" if sel.windows == "phases" else "select.early_end")
    if schedule in ("early", "early_late") and early_end < 1:
        raise ConfigError(f"select.schedule={schedule}: the early window holds no step of the {T}-step run "
                          f"({where} gives 0 steps); raise {where} or use select.windows=fractions")
    if schedule in ("late", "early_late") and late_start >= T:
        raise ConfigError(f"select.schedule={schedule}: the late window [{late_start}, {T}) holds no step; "
                          "lower select.late_start")
    if schedule == "early_late" and early_end >= late_start:
        raise ConfigError(f"select.schedule=early_late: the early window [0, {early_end}) reaches the late one "
                          f"[{late_start}, {T}): that is selecting always; shorten the windows")


# --------------------------------------------------------------------------- selection split


def selection_split(task, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out points validation gradients are drawn from: (x, y) of ``select.n_split``
    rows, disjoint from the evaluation split (see the module docstring)."""
    sel = cfg.select
    if task.kind == "lm":
        stream_path = task.extra.get("heldout_stream")
        if stream_path is None or not Path(stream_path).is_file():
            raise ArtifactError(f"the held-out token stream {stream_path} is missing; rebuild the text cache")
        stream = np.load(stream_path, mmap_mode="r")
        L, n_val = cfg.data.seq_len, cfg.data.n_val
        eval_end = n_val * L
        if sel.split_start == -1:
            eot = np.flatnonzero(np.asarray(stream[eval_end:]) == task.extra["eot_id"])
            if not len(eot):
                raise ConfigError("the held-out documents end with the evaluation rows: no document is left for "
                                  "the selection split; lower data.n_val or raise data.val_docs_fraction")
            start = eval_end + int(eot[0]) + 1
        else:
            if sel.split_start < n_val:
                raise ConfigError(f"select.split_start={sel.split_start} overlaps the evaluation split (rows 0–"
                                  f"{n_val - 1} of the held-out stream are the validation set); use a row >= {n_val} "
                                  "or -1")
            start = sel.split_start * L
        stop = start + sel.n_split * L
        if stop > len(stream):
            raise ConfigError(f"the selection split needs {sel.n_split} sequences of {L} tokens from token {start:,} "
                              f"of the held-out stream, which holds {len(stream):,}; lower select.n_split or "
                              "raise data.val_docs_fraction")
        rows = torch.from_numpy(np.asarray(stream[start:stop], dtype=np.int64).reshape(sel.n_split, L))
        rows = rows.to(task.device)
        return rows, rows
    x, y = task.extra.get("x_test"), task.extra.get("y_test")
    start = max(sel.split_start, 0)
    if x is None or start + sel.n_split > len(x):
        have = 0 if x is None else len(x)
        raise ConfigError(f"the selection split needs rows {start}–{start + sel.n_split - 1} of the test split, "
                          f"which holds {have} (data.n_test); lower select.n_split or raise data.n_test")
    return x[start:start + sel.n_split], y[start:start + sel.n_split]


# --------------------------------------------------------------------------- selector


def pool_size(sel: SelectConfig, batch: int) -> int:
    return max(batch, round(sel.pool_factor * batch))


def draw_pool(usual: np.ndarray, n_train: int, size: int, seed: list[int]) -> np.ndarray:
    """The usual batch followed by ``size − |usual|`` distinct other training indices [size]."""
    rng = np.random.default_rng(seed)
    taken = set(usual.tolist())
    extra: list[int] = []
    need = size - len(usual)
    while len(extra) < need:  # rejection sampling: O(pool), not O(n_train)
        for i in rng.integers(0, n_train, size=2 * (need - len(extra)) + 8).tolist():
            if i not in taken:
                taken.add(i)
                extra.append(i)
                if len(extra) == need:
                    break
    return np.concatenate([usual, np.asarray(extra, dtype=np.int64)])


def choose(scores: torch.Tensor, k: int) -> np.ndarray:
    """Pool positions of the ``k`` highest scores, ties by position, returned in pool order."""
    order = np.argsort(-scores.cpu().numpy(), kind="stable")
    return np.sort(order[:k])


@dataclass
class _Record:
    step: int
    pool: list
    val_batch: list
    scores: list
    chosen: list
    n_candidates: int
    seconds: float


class Selector:
    """Chooses the batch of a selecting step (the module docstring's steps 1–4)."""

    def __init__(self, cfg: Config, task, T: int):
        from dve_repro.capture import Featurizer
        from dve_repro.projection import Projector
        from dve_repro.train import capture_blocks

        self.sel, self.task = cfg.select, task
        self.order_seed = cfg.train.order_seed
        self.mask = selecting_steps(cfg.select, cfg.select.schedule, cfg.schedule.warmup_steps, T)
        self.x_split, self.y_split = selection_split(task, cfg)
        blocks = capture_blocks(task)
        self.featurizer = Featurizer(task, blocks, Projector(cfg.projection, blocks), cfg.embed.engine)
        self.records: list[_Record] = []

    def val_batch(self, t: int) -> np.ndarray:
        rng = np.random.default_rng([self.sel.seed, 1, t])
        return np.sort(rng.choice(len(self.x_split), size=self.sel.val_batch, replace=False))

    def scores(self, params: dict, pool: np.ndarray, val: np.ndarray, lr: float) -> torch.Tensor:
        """s_i [|pool|] (float64) at θ_t = ``params``."""
        x, y = self.task.batch(pool)
        g = self.featurizer.features(params, x, y).double()  # [P, p̃]
        g_val = self.featurizer.features(params, self.x_split[val], self.y_split[val]).double().mean(0)  # [p̃]
        s = g @ g_val
        if self.sel.score == "cosine":
            s = s / (g.norm(dim=1) * g_val.norm()).clamp_min(1e-300)
        return s * lr if self.sel.lr_scaled else s

    def batch(self, t: int, params: dict, usual: np.ndarray, lr: float) -> np.ndarray:
        """Training indices of step t: the usual batch, or the chosen candidates."""
        if not self.mask[t]:
            return usual
        t0 = time.perf_counter()
        pool = draw_pool(usual, self.task.n_train, pool_size(self.sel, len(usual)), [self.order_seed, self.sel.seed, t])
        val = self.val_batch(t)
        s = self.scores(params, pool, val, lr)
        pos = choose(s, len(usual))
        self.records.append(_Record(t, pool.tolist(), val.tolist(), s.tolist(), pos.tolist(), len(pool),
                                    time.perf_counter() - t0))
        return pool[pos]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([r.__dict__ for r in self.records], columns=SELECTION_COLUMNS)

    def resume(self, run_dir: Path, start: int) -> None:
        """Keep the records of the steps before ``start`` (the resume point)."""
        path = Path(run_dir) / SELECTION
        if start <= 0 or not path.is_file():
            return
        frame = artifacts.load_table(path)
        self.records = [_Record(**r) for r in frame.to_dict("records") if r["step"] < start]
        for r in self.records:  # parquet gives numpy arrays back
            r.pool, r.val_batch, r.scores, r.chosen = (list(map(type_, v)) for type_, v in
                                                       ((int, r.pool), (int, r.val_batch), (float, r.scores), (int, r.chosen)))


def make_selector(cfg: Config, task, T: int) -> Selector | None:
    """The run's selector (None for ``never``); refuses bad settings before training starts."""
    sel = cfg.select
    if sel.schedule == "never":
        return None
    check_windows(sel, sel.schedule, cfg.schedule.warmup_steps, T)
    if pool_size(sel, cfg.train.batch_size) > task.n_train:
        raise ConfigError(f"the pool of select.pool_factor={sel.pool_factor} × {cfg.train.batch_size} = "
                          f"{pool_size(sel, cfg.train.batch_size)} candidates is larger than the training set "
                          f"({task.n_train} points)")
    return Selector(cfg, task, T)


# --------------------------------------------------------------------------- dve select


def run_overrides(schedule: str, seed: int) -> list[str]:
    """The overrides of one run of the experiment: the schedule, and the seed everywhere."""
    return [f"select.schedule={schedule}", f"train.order_seed={seed}", f"model.init_seed={seed}", f"select.seed={seed}"]


def _check_all(configs: dict[tuple[str, int], Config]) -> None:
    """Every run's windows, pool and split, checked before the first one trains."""
    from dve_repro.tasks import build_task
    from dve_repro.trajectory import plan_batches

    first = next(iter(configs.values()))
    task = build_task(first, "cpu" if first.runtime.device != "cuda" else "cuda")
    T = len(plan_batches(task.n_train, first.train))
    for (schedule, _seed), cfg in configs.items():
        check_windows(cfg.select, schedule, cfg.schedule.warmup_steps, T)
        if schedule != "never" and pool_size(cfg.select, cfg.train.batch_size) > task.n_train:
            make_selector(cfg, task, T)  # raises its one line
    selection_split(task, first)


def run_select(overrides: list[str], results: Path, command: str | None = None) -> Path:
    """Train every schedule × seed of the configured experiment (reusing finished runs) and
    write ``selection.{csv,md}``, ``curves.{csv,png}`` and ``gain_vs_cost.png``."""
    from dve_repro.train import run_training

    base = compose(overrides)
    if base.train.eval_every <= 0:
        raise ConfigError("dve select needs a validation-loss curve: set train.eval_every > 0")
    configs = {(s, seed): compose([*overrides, *run_overrides(s, seed)])
               for seed in base.select.seeds for s in base.select.schedules}
    _check_all(configs)
    runs = []
    t0 = time.perf_counter()
    for i, ((schedule, seed), cfg) in enumerate(configs.items(), 1):
        ui.log(f"select: run {i}/{len(configs)}: schedule {schedule}, seed {seed}")
        path = run_training(cfg)
        runs.append(_summarise_run(path, schedule, seed))
        r = runs[-1]
        ui.log(f"select: {schedule} seed {seed}: final validation loss {r['final_val_loss']:.4f}, "
               f"{r['selecting_steps']} selecting steps, {r['select_seconds']:.1f}s selecting")
    out = Path(results)
    out.mkdir(parents=True, exist_ok=True)
    from dve_repro.select_report import write_report

    write_report(runs, base, out, command=command)
    ui.log(f"select: {len(configs)} runs in {time.perf_counter() - t0:.0f}s -> {out}")
    return out


def _summarise_run(path: Path, schedule: str, seed: int) -> dict:
    curve = artifacts.load_table(path / CURVE)
    done = artifacts.read_json(path / "DONE") if (path / "DONE").is_file() else {}
    sel_path = path / SELECTION
    frame = artifacts.load_table(sel_path) if sel_path.is_file() else pd.DataFrame(columns=SELECTION_COLUMNS)
    labels = artifacts.read_json(path / "labels.json")
    noisy = set(labels.get("noisy_indices", []))
    out = {
        "schedule": schedule, "seed": seed, "run": str(path),
        "final_val_loss": float(curve["val_loss"].iloc[-1]),
        "selecting_steps": len(frame),
        "candidate_grads": int(frame["n_candidates"].sum()) if len(frame) else 0,
        "select_seconds": float(frame["seconds"].sum()) if len(frame) else 0.0,
        "train_seconds": float(done.get("seconds", float("nan"))),
        # selecting draws with replacement across steps: how many distinct points were trained on
        "distinct_points": len(np.unique(np.concatenate([np.asarray(b) for b in
                                                             artifacts.load_table(path / "trajectory.parquet")["indices"]]))),
        "curve": curve[["step", "val_loss"]],
    }
    if noisy and len(frame):
        chosen = [np.asarray(p)[np.asarray(c)] for p, c in zip(frame["pool"], frame["chosen"], strict=True)]
        pools = np.concatenate([np.asarray(p) for p in frame["pool"]])
        flat = np.concatenate(chosen)
        out["chosen_corrupted"] = float(np.isin(flat, list(noisy)).mean())
        out["pool_corrupted"] = float(np.isin(pools, list(noisy)).mean())
    return out

"""Speed and memory benchmarks: ``dve bench embed`` and ``dve bench tsloo``.

Both write ``<out_dir>/<name>.csv`` (every column) and ``<out_dir>/<name>.md`` (a header
line naming the command, date, torch threads and CPU count, notes, then the table), and
print the table. Alternatives are timed side by side in the same process and, within each
repeat, one right after the other, so that the ratios see the same machine load; every
number is the median over the repeats (``time.perf_counter``).

* :func:`bench_embed` — for the MNIST MLP, over a few trajectory lengths T and projection
  sizes p̃: training with and without gradient capture, Algorithm 1 (with its GFLOP/s next
  to a plain matmul of the same shape), Algorithm 2 in-process and with two worker
  processes, and the LoGra-style alternative (recompute every training point's projected
  gradient at θ_T). Memory is computed analytically (stated in the ``mem_method`` column).
  The two trainings are also timed at one thread (``*_1t`` columns): on a shared two-core
  machine, small-op training at two threads can be many times slower than at one.
* :func:`bench_tsloo` — ground-truth retraining: the batched fast path
  (:func:`dve_repro.tsloo.batched_delta`) against the naive one-retraining-per-job
  reference (:func:`dve_repro.tsloo.naive_delta`) on the same jobs, with the largest
  difference between their answers, for several chunk sizes.

Run directories go to a temporary folder under ``<out_dir>/_runs`` that is removed at
the end (``keep_runs=True`` keeps it).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dve_repro import ui

K_SEGMENTS = 4  # Algorithm 2 segments


# ----------------------------------------------------------------------------- helpers
def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not available on every platform
        return "n/a"


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA:
        return "–"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "–"
        if v == 0.0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def _markdown(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    cols = list(columns) if columns is not None else list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _print_table(title: str, df: pd.DataFrame, columns: Sequence[str]) -> None:
    """Plain aligned text on stdout (wide tables stay readable when piped or in a narrow terminal)."""
    cells = [[_fmt(row[c]) for c in columns] for _, row in df.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def _header(command: str, threads: int, started: float, load_start: str) -> str:
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"`{command}` · {now} · torch threads {threads} · cpu count {os.cpu_count()} · "
        f"torch {torch.__version__} · load avg (1 min) {load_start} at start, {_load_avg()} at end · "
        f"runtime {time.perf_counter() - started:.0f} s"
    )


def _write_outputs(out_dir: Path, name: str, df: pd.DataFrame, header: str, notes: list[str],
                   tables: list[tuple[str, list[str]]], closing: Sequence[str] = ()) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    parts = [f"# {name} benchmark", "", header, ""]
    parts += [f"- {n}" for n in notes]
    for title, cols in tables:
        parts += ["", f"## {title}", "", _markdown(df, cols)]
    if closing:
        parts += ["", "## Summary", "", *[f"- {n}" for n in closing]]
    (out_dir / f"{name}.md").write_text("\n".join(parts) + "\n")


class _Session:
    """Threads, quiet progress bars and a scratch folder for one benchmark call."""

    def __init__(self, out_dir: Path, threads: int, keep_runs: bool):
        self.out_dir, self.threads, self.keep_runs = Path(out_dir), threads, keep_runs

    def __enter__(self) -> _Session:
        self.show = ui.enabled()
        self.ui_flag = getattr(ui, "_enabled", True)
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        (self.out_dir / "_runs").mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=self.out_dir / "_runs"))
        self.started = time.perf_counter()
        self.load_start = _load_avg()
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads_before)
        ui.set_enabled(self.ui_flag)  # run_training switches bars off for the whole process
        if not self.keep_runs:
            shutil.rmtree(self.scratch, ignore_errors=True)
            runs = self.out_dir / "_runs"
            if runs.is_dir() and not any(runs.iterdir()):
                runs.rmdir()

    def say(self, msg: str) -> None:
        if self.show:
            from rich.console import Console

            Console(stderr=True).print(msg, highlight=False)

    def overrides(self, *extra: str, threads: int | None = None) -> list[str]:
        # run_training applies runtime.threads to the whole process; callers restore it
        return [f"runtime.out_root={self.scratch}", "runtime.progress=false",
                f"runtime.threads={threads or self.threads}", *extra]


# ----------------------------------------------------------------------------- bench embed
EMBED_NOTES = [
    "Times are medians over `repeats` rounds; inside a round every alternative runs once, one after "
    "the other (same machine load; the order rotates between rounds). Training times are the training "
    "loop of `run_training` (its DONE `seconds`: excludes data loading; includes waiting for the last "
    "rows to be written); `capture_overhead_wall` uses the whole call.",
    "`capture_overhead` = capture training ÷ plain training (aim ≤ 1.3 at p̃ = 4,426) with float32 rows "
    "(`embed.storage_dtype` default, projected in float32); `capture_overhead_f64` with float64 rows "
    "(the storage the float64 oracle experiments pin; the Algorithm 1/2 and LoGra columns use that run's G).",
    "Capture profile: per-step milliseconds of the float32-row capture (see `_capture_profile` in "
    "bench.py): the training step with and without the hooks, the projection, time blocked on the "
    "background row writer, the writer's own time (overlapped), and the unexplained rest.",
    "`*_1t` columns: the same trainings at 1 torch thread, in the same rounds.",
    "`capture_pts_per_s` = N_occ / capture-training time; `alg1_pts_per_s` = N_occ / Algorithm 1 "
    "time (in memory, float64, on the captured G); Algorithm 2 uses K=4 even segments, `w0` in "
    "process, `w2` two worker processes (their pool start-up is included; the forkserver it forks from is started once, untimed, in a warm-up).",
    "`alg1_gflops` counts 4·N_occ·p̃² flops (G Mᵀ and the M update); `matmul_gflops` is a plain "
    "[B, p̃] @ [p̃, p̃] float64 matmul (B = batch size) timed in the same round; "
    "`matmul_over_alg1` is their ratio (aim ≤ 1.5).",
    "LoGra-style alternative: one pass over the training set at θ_T with the same Featurizer "
    "(chunks of 256), storing n_train·p̃·8 bytes; DVEmb stores G.npy (N_occ·p̃·8, size on disk).",
    "Memory (`mem_method` = analytic, not measured; torch allocations are invisible to "
    "tracemalloc and maxrss deltas are unreliable in one process): capture = one step's rows "
    "B·p̃·8 + projection matrices; alg1 = G + E (2·N_occ·p̃·8) + M (p̃²·8) + one chunk of 64 "
    "steps; alg2 = G + E + (K+2)·p̃²·8; logra = n_train·p̃·8 + one chunk of rows.",
]

EMBED_SPEED_COLS = [
    "experiment", "epochs", "T", "p_tilde", "N_occ", "repeats",
    "plain_train_s", "capture_train_s", "capture_overhead", "capture_f64_train_s", "capture_overhead_f64",
    "capture_overhead_wall", "capture_pts_per_s",
    "alg1_s", "alg1_pts_per_s", "alg1_gflops", "matmul_gflops", "matmul_over_alg1",
    "alg2_w0_s", "alg2_w0_pts_per_s", "alg2_w2_s", "alg2_w2_pts_per_s", "alg2_vs_alg1_rel_diff",
    "logra_s", "logra_pts_per_s",
]
EMBED_MEM_COLS = [
    "experiment", "epochs", "k_in", "k_out", "p_tilde", "N_occ", "n_train",
    "G_bytes_disk", "logra_bytes", "M_bytes", "mem_capture_bytes", "mem_alg1_bytes",
    "mem_alg2_bytes", "mem_logra_bytes", "mem_method",
]


def _embed_grid(quick: bool) -> list[dict]:
    if quick:
        return [{"experiment": "tiny_mlp", "epochs": 2, "k_in": 32, "k_out": 16}]
    # T sweep at the small projection, p̃ sweep at one epoch (Algorithm 2's p̃³ suffix
    # products make the full grid too slow for a few minutes on two cores).
    return [
        {"experiment": "mnist_mlp", "epochs": 1, "k_in": 32, "k_out": 16},
        {"experiment": "mnist_mlp", "epochs": 2, "k_in": 32, "k_out": 16},
        {"experiment": "mnist_mlp", "epochs": 4, "k_in": 32, "k_out": 16},
        {"experiment": "mnist_mlp", "epochs": 1, "k_in": 64, "k_out": 32},
        {"experiment": "mnist_mlp", "epochs": 1, "k_in": 128, "k_out": 32},
    ]


def _matmul_seconds(rows: int, p: int, min_s: float = 0.2) -> float:
    a = torch.randn(rows, p, dtype=torch.float64)
    m = torch.randn(p, p, dtype=torch.float64)
    a @ m  # warm-up
    n, total = 0, 0.0
    while total < min_s or n < 3:
        t0 = time.perf_counter()
        a @ m
        total += time.perf_counter() - t0
        n += 1
    return total / n


def _train_once(overrides: list[str]) -> tuple[float, float, Path, dict]:
    """(training-loop seconds, whole-call seconds, run dir, the loop's profile) of a forced
    fresh training (profile: see ``_TrainCapture.profile``; ``step_s`` alone without capture)."""
    from dve_repro import artifacts
    from dve_repro.config import compose
    from dve_repro.train import run_training

    cfg = compose(overrides)
    wall, path = _timed(lambda: run_training(cfg, force=True))
    done = artifacts.read_json(Path(path) / artifacts.DONE)
    return float(done.get("seconds", wall)), wall, Path(path), dict(done.get("profile", {}))


def _embed_warmup(sess: _Session, spec: dict) -> None:
    """Untimed: first data load and lazy imports (one plain training), and the forkserver
    that Algorithm 2's worker pools fork from (started once per process)."""
    from dve_repro import embedding

    _train_once(sess.overrides(f"experiment={spec['experiment']}", f"train.epochs={spec['epochs']}"))
    g = torch.randn(16, 4, dtype=torch.float64)
    embedding.algorithm2(g, list(range(0, 17, 2)), [0.1] * 8, [0, 4, 8], workers=2)


def _embed_round(sess: _Session, cfg, spec_ov: list[str], train_threads: list[int], flip: int,
                 add: Callable[[str, float], None], info: dict) -> None:
    """One round of every alternative for one (T, p̃) configuration, one after the other."""
    from dve_repro import embedding
    from dve_repro.embed_stage import make_featurizer, query_features
    from dve_repro.replay import TrainedRun
    from dve_repro.trajectory import Trajectory

    # training: rotate which goes first, so none always sees a warm cache. capture = float32
    # rows (the default storage), capture_f64 = float64 rows (the oracle experiments' storage).
    cap_path = None
    kinds = ["plain", "capture", "capture_f64"]
    for th in train_threads:
        tag = "" if th == sess.threads else f"_{th}t"
        for kind in kinds[flip:] + kinds[:flip]:
            ov = sess.overrides(*spec_ov, f"trajectory.capture={str(kind != 'plain').lower()}",
                                f"embed.storage_dtype={'float64' if kind == 'capture_f64' else 'float32'}", threads=th)
            loop_s, wall_s, path, profile = _train_once(ov)
            add(f"{kind}{tag}_train_s", loop_s)
            add(f"{kind}{tag}_wall_s", wall_s)
            for k, v in profile.items():
                add(f"{kind}{tag}_prof_{k}", v)
            cap_path = path if kind == "capture_f64" else cap_path
    torch.set_num_threads(sess.threads)
    assert cap_path is not None

    # Algorithm 1 / 2 on the captured G, in memory, float64
    G = torch.from_numpy(np.load(cap_path / "grads" / "G.npy"))
    traj = Trajectory.load(cap_path)
    offsets, w, T = traj.offsets(), traj.lrs / traj.sizes(), len(traj)
    n_occ, p = G.shape
    batch = int(cfg.train.batch_size)
    s, (E1, _) = _timed(lambda: embedding.algorithm1(G, offsets, w))
    add("alg1_s", s)
    add("matmul_s", _matmul_seconds(batch, p))
    bounds = [round(k * T / K_SEGMENTS) for k in range(K_SEGMENTS + 1)]
    scale = float(E1.abs().max()) or 1.0
    rel = []
    for workers in (0, 2):
        s, res = _timed(lambda wk=workers: embedding.algorithm2(G, offsets, w, bounds, workers=wk))
        add(f"alg2_w{workers}_s", s)
        rel.append(float((res.embeddings - E1).abs().max()) / scale)
        del res
    add("alg2_vs_alg1_rel_diff", max(rel))
    E1 = None  # free before the LoGra pass

    # LoGra-style: every training point's projected gradient at θ_T, one pass
    run = TrainedRun.load(cap_path)
    feat = make_featurizer(cfg, run)
    if feat.projector.out_dim != p:
        raise RuntimeError(f"projector p̃={feat.projector.out_dim} but G has {p} columns")
    final = run.final_params()
    s, rows = _timed(lambda: query_features(feat, final, run.task.x_train, run.task.y_train))
    add("logra_s", s)
    proj_bytes = sum(8 * x.numel() for i in range(len(feat.blocks))
                     for x in feat.projector.kron_factors(i, torch.float64, "cpu") if x is not None)
    info.update(T=T, N_occ=n_occ, p_tilde=p, batch=batch, n_train=run.task.n_train, proj_bytes=proj_bytes,
                G_bytes_disk=os.path.getsize(cap_path / "grads" / "G.npy"),
                logra_bytes=int(rows.shape[0] * rows.shape[1] * 8))


def _embed_row(sess: _Session, spec: dict, repeats: int, row_budget_s: float,
               other_threads: Sequence[int]) -> dict:
    from dve_repro.config import compose

    # the paper's estimator (random Kronecker projection, empirical Fisher): capture during
    # training cannot use a fitted basis, and one row per point is what the table measures
    spec_ov = [f"experiment={spec['experiment']}", f"train.epochs={spec['epochs']}", "projection=kronecker",
               "embed.curvature=ef", f"projection.k_in={spec['k_in']}", f"projection.k_out={spec['k_out']}"]
    cfg = compose(sess.overrides(*spec_ov, "trajectory.capture=true"))
    train_threads = [sess.threads, *[t for t in other_threads if t != sess.threads]]
    m: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    row_t0 = time.perf_counter()
    rounds, last = 0, 0.0
    while rounds < repeats and (rounds == 0 or time.perf_counter() - row_t0 + last <= row_budget_s):
        r0 = time.perf_counter()
        _embed_round(sess, cfg, spec_ov, train_threads, rounds % 3,
                     lambda k, v: m.setdefault(k, []).append(v), info)
        rounds += 1
        last = time.perf_counter() - r0

    med = {k: _median(v) for k, v in m.items()}
    n_occ, p, n_train, batch = info["N_occ"], info["p_tilde"], info["n_train"], info["batch"]
    alg1_gflops = 4.0 * n_occ * p * p / med["alg1_s"] / 1e9
    matmul_gflops = 2.0 * batch * p * p / med["matmul_s"] / 1e9
    chunk_rows = min(64 * batch, n_occ)
    extra = {}
    for th in other_threads:
        if th != sess.threads:
            plain, cap, f64 = (med[f"{k}_{th}t_train_s"] for k in ("plain", "capture", "capture_f64"))
            extra |= {f"plain_train_{th}t_s": plain, f"capture_train_{th}t_s": cap,
                      f"capture_overhead_{th}t": cap / plain, f"capture_overhead_f64_{th}t": f64 / plain}
    for th in train_threads:
        extra |= _capture_profile(m, info["T"], "" if th == sess.threads else f"_{th}t")
    return {
        "experiment": spec["experiment"], "epochs": spec["epochs"], "T": info["T"],
        "k_in": spec["k_in"], "k_out": spec["k_out"], "p_tilde": p, "N_occ": n_occ, "n_train": n_train,
        "batch": batch, "repeats": rounds,
        "plain_train_s": med["plain_train_s"], "capture_train_s": med["capture_train_s"],
        "capture_overhead": med["capture_train_s"] / med["plain_train_s"],
        "capture_overhead_wall": med["capture_wall_s"] / med["plain_wall_s"],
        "capture_f64_train_s": med["capture_f64_train_s"],
        "capture_overhead_f64": med["capture_f64_train_s"] / med["plain_train_s"],
        "capture_pts_per_s": n_occ / med["capture_train_s"],
        **extra,
        "alg1_s": med["alg1_s"], "alg1_pts_per_s": n_occ / med["alg1_s"],
        "alg1_gflops": alg1_gflops, "matmul_gflops": matmul_gflops,
        "matmul_over_alg1": matmul_gflops / alg1_gflops,
        "alg2_w0_s": med["alg2_w0_s"], "alg2_w0_pts_per_s": n_occ / med["alg2_w0_s"],
        "alg2_w2_s": med["alg2_w2_s"], "alg2_w2_pts_per_s": n_occ / med["alg2_w2_s"],
        "alg2_vs_alg1_rel_diff": med["alg2_vs_alg1_rel_diff"],
        "logra_s": med["logra_s"], "logra_pts_per_s": n_train / med["logra_s"],
        "G_bytes_disk": info["G_bytes_disk"], "logra_bytes": info["logra_bytes"],
        "M_bytes": p * p * 8,
        "mem_capture_bytes": batch * p * 8 + info["proj_bytes"],
        "mem_alg1_bytes": 2 * n_occ * p * 8 + p * p * 8 + chunk_rows * p * 8,
        "mem_alg2_bytes": 2 * n_occ * p * 8 + (K_SEGMENTS + 2) * p * p * 8,
        "mem_logra_bytes": info["logra_bytes"] + 256 * p * 8 + info["proj_bytes"],
        "mem_method": "analytic",
    }


PROFILE_FIELDS = ["plain_step_ms", "capture_step_ms", "hooks_ms", "project_ms", "queue_wait_ms", "writer_ms",
                  "other_ms"]


def _capture_profile(m: dict[str, list[float]], T: int, tag: str) -> dict[str, float]:
    """Per-step milliseconds (medians over the rounds) of the float32-row capture training
    against the plain one at one thread count (``tag`` "" or "_1t"): ``plain_step_ms`` /
    ``capture_step_ms`` the training step (forward, backward, update; with the hooks on for
    capture), ``hooks_ms`` their difference, ``project_ms`` the projection, ``queue_wait_ms``
    the training thread blocked on the row writer, ``writer_ms`` the writer thread's copies and
    writes (in the background), ``other_ms`` the rest of the capturing loop's extra time over
    the plain loop (enqueueing, the writer competing for the cores, noise)."""
    ms = lambda k: 1e3 * _median(m.get(k, [])) / T  # noqa: E731
    plain, cap = ms(f"plain{tag}_prof_step_s"), ms(f"capture{tag}_prof_step_s")
    project, wait = ms(f"capture{tag}_prof_project_s"), ms(f"capture{tag}_prof_queue_wait_s")
    extra = ms(f"capture{tag}_train_s") - ms(f"plain{tag}_train_s")
    out = {"plain_step_ms": plain, "capture_step_ms": cap, "hooks_ms": cap - plain, "project_ms": project,
           "queue_wait_ms": wait, "writer_ms": ms(f"capture{tag}_prof_writer_s"),
           "other_ms": extra - (cap - plain) - project - wait}
    return {f"{k}{tag}": v for k, v in out.items()}


def bench_embed(out_dir: Path, quick: bool = False, *, threads: int = 2, repeats: int | None = None,
                row_budget_s: float = 60.0, other_threads: Sequence[int] = (1,),
                keep_runs: bool = False) -> pd.DataFrame:
    """Capture, Algorithm 1 / 2 and the LoGra-style alternative on the MNIST MLP.

    One row per (T, p̃) configuration; writes ``out_dir/embed.csv`` and ``out_dir/embed.md``.
    ``quick``: the tiny MLP, one repeat. A row stops repeating once another round would
    take it past ``row_budget_s`` (its ``repeats`` column says how many rounds ran).
    ``other_threads``: thread counts at which the two trainings are also timed (columns
    ``*_{n}t``), since small-op training is sensitive to threads on a shared machine.
    """
    out_dir = Path(out_dir)
    repeats = repeats or (1 if quick else 3)
    rows = []
    with _Session(out_dir, threads, keep_runs) as sess:
        grid = _embed_grid(quick)
        _embed_warmup(sess, grid[0])
        for spec in grid:
            sess.say(f"bench embed: {spec} …")
            row = _embed_row(sess, spec, repeats, row_budget_s, other_threads)
            rows.append(row)
            sess.say(f"  p̃={row['p_tilde']} N_occ={row['N_occ']}: capture ×{row['capture_overhead']:.2f}, "
                     f"alg1 {row['alg1_s']:.2f}s ({row['alg1_gflops']:.1f} GFLOP/s), "
                     f"alg2 {row['alg2_w0_s']:.2f}s / {row['alg2_w2_s']:.2f}s, logra {row['logra_s']:.2f}s")
        df = pd.DataFrame(rows)
        others = [th for th in other_threads if th != threads]
        speed_cols = list(EMBED_SPEED_COLS)
        at = speed_cols.index("capture_pts_per_s") + 1
        speed_cols[at:at] = [c for th in others
                             for c in (f"plain_train_{th}t_s", f"capture_train_{th}t_s", f"capture_overhead_{th}t",
                                       f"capture_overhead_f64_{th}t")]
        capture_cols = ["experiment", "epochs", "p_tilde", "capture_overhead", "capture_overhead_f64",
                        *[c for th in others for c in (f"capture_overhead_{th}t", f"capture_overhead_f64_{th}t")]]
        profile_cols = ["experiment", "epochs", "p_tilde", *PROFILE_FIELDS,
                        *[f"{c}_{th}t" for th in others for c in PROFILE_FIELDS]]
        header = _header("dve bench embed" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
        _write_outputs(out_dir, "embed", df, header, EMBED_NOTES,
                       [("Capture overhead (capture training ÷ plain training)", capture_cols),
                        ("Capture profile (ms per step, float32 rows)", profile_cols),
                        ("Speed", speed_cols), ("Memory and storage", EMBED_MEM_COLS)])
        if sess.show:
            _print_table("dve bench embed — capture overhead", df, capture_cols)
            _print_table("dve bench embed — capture profile (ms per step)", df, profile_cols)
            _print_table("dve bench embed — speed", df, speed_cols)
            _print_table("dve bench embed — memory and storage", df, EMBED_MEM_COLS)
    return df


# ----------------------------------------------------------------------------- bench tsloo
TSLOO_COLS = [
    "method", "kernel", "threads", "chunk", "setting", "n_jobs", "timed_jobs", "seconds", "jobs_per_s",
    "s_per_job", "speedup_vs_naive", "speedup_vs_same_start", "max_abs_diff", "max_abs_delta", "repeats", "note",
]


def _tsloo_round(run, jobs: list, naive_ids: list[int], base: torch.Tensor, plan: list[tuple[int, list[str], str]],
                 settings: list[str], add: Callable[[tuple, float], None]) -> dict[tuple, Any]:
    """One round at the current thread count: each timed job retrained alone from θ_0 and,
    right after it, from its own start checkpoint; then each (chunk, settings, kernel) of
    ``plan`` batched. Adds per-setting seconds; returns the answers
    {("naive", 0, "") | ("same_start", 0, "") | ("batched", c, kernel)}."""
    from dve_repro import tsloo

    out: dict[tuple, Any] = {}
    per = {(m, st): 0.0 for m in ("naive", "same_start") for st in settings}
    answers: dict[str, dict] = {"naive": {}, "same_start": {}}
    for j in naive_ids:
        for m, start in (("naive", 0), ("same_start", jobs[j].start)):
            s, answers[m][j] = _timed(lambda j=j, start=start: tsloo.naive_delta(run, jobs[j], base, start=start))
            per[(m, jobs[j].setting)] += s
    for (m, st), v in per.items():
        add((m, 0, "", st), v)
    out[("naive", 0, "")], out[("same_start", 0, "")] = answers["naive"], answers["same_start"]
    for c, sts, kernel in plan:
        per_b = dict.fromkeys(sts, 0.0)
        delta = np.full((len(jobs), 1 + run.task.x_val.shape[0]), np.nan)
        mine = [j for j in range(len(jobs)) if jobs[j].setting in sts]
        for ids in tsloo.chunks_of([jobs[j] for j in mine], c):
            gids = [mine[i] for i in ids]
            s, delta[gids] = _timed(lambda gids=gids, kernel=kernel: tsloo.batched_delta(
                run, [jobs[j] for j in gids], kernel=kernel))
            per_b[jobs[gids[0]].setting] += s
        for st in sts:
            add(("batched", c, kernel, st), per_b[st])
        out[("batched", c, kernel)] = delta
    return out


def _tsloo_notes(experiment: str, run, n_points: int, jobs: list, chunk: int, default_chunk: bool,
                 other_chunks: list[int], sweep: list[str], fast: str) -> list[str]:
    starts = sorted({job.start for job in jobs})
    default_note = " (the config's `tsloo.chunk_size`)" if default_chunk else ""
    return [
        f"Run: `experiment={experiment}` (T={run.T} steps, {run.task.n_train} training points, "
        f"checkpoints {run.checkpoints}); {n_points} points chosen uniformly (seed 0), settings "
        f"single and all, convention keep: {len(jobs)} jobs starting at checkpoints {starts}.",
        "batched = `tsloo.batched_delta` over `tsloo.chunks_of(jobs, chunk)`; a chunk never spans two "
        f"start checkpoints, so chunk {chunk}{default_note} "
        f"runs every job; the other chunk sizes {other_chunks} run the {'/'.join(sweep) or '–'} jobs only "
        "(cheaper: they start late) to keep the benchmark within a few minutes. `kernel` = how the "
        f"per-copy gradients are computed: `{fast}` (the default, `kernel=auto`) and, at chunk {chunk}, "
        "`vmap` (`vmap(grad(·))`, the earlier code path, bit for bit) for comparison.",
        "naive = `tsloo.naive_delta` (one full retraining from θ_0 per job); same_start = the same "
        "one-at-a-time replay started from the job's own start checkpoint, the one its batched chunk "
        "starts from (`naive_delta(…, start=job.start)`). Both are timed on the same jobs and "
        "extrapolated per job.",
        "`speedup_vs_naive` = naive seconds per job ÷ this row's; it also counts the later start of "
        "single-epoch jobs (their last occurrence is in the last epoch). `speedup_vs_same_start` = "
        "same_start seconds per job ÷ this row's: the gain of batching alone, start point held equal.",
        "Medians over `repeats` rounds; within a round each timed job runs naive then same_start, "
        "then every batched (chunk, kernel) runs, at each thread count, so the ratios come from "
        "measurements side by side.",
        "`max_abs_diff` = max |row − naive| over the naive-timed jobs and all 1 + N_val columns "
        "(mean validation loss and per point; naive at the main thread count); `max_abs_delta` = the "
        "largest |Δ loss|, for scale.",
    ]


def bench_tsloo(out_dir: Path, quick: bool = False, *, threads: int = 2, repeats: int | None = None,
                n_points: int | None = None, chunk: int | None = None, other_chunks: Sequence[int] | None = None,
                other_chunk_settings: Sequence[str] = ("single",), naive_per_setting: int | None = None,
                other_threads: Sequence[int] = (1,), keep_runs: bool = False) -> pd.DataFrame:
    """Batched ground-truth retraining vs one retraining per job, on the same jobs.

    Jobs: ``make_jobs`` for ``n_points`` uniformly chosen points, settings single and all
    (convention keep). The batched path runs every job at ``chunk`` (default: the config's
    ``tsloo.chunk_size``) with the default kernel and with the vmap kernel, and the jobs of
    ``other_chunk_settings`` at each of ``other_chunks``; the one-at-a-time paths retrain
    ``naive_per_setting`` jobs of each setting, from θ_0 (naive) and from the job's start
    checkpoint (same_start), and are extrapolated per job. ``other_threads``: thread counts
    at which the one-at-a-time paths and ``chunk`` are timed too, in the same rounds. Writes
    ``out_dir/tsloo.csv`` and ``out_dir/tsloo.md``.
    """
    from dve_repro import tsloo
    from dve_repro.config import compose
    from dve_repro.replay import TrainedRun
    from dve_repro.train import run_training

    out_dir = Path(out_dir)
    repeats = repeats or (1 if quick else 3)
    n_points = n_points or (4 if quick else 128)
    naive_per_setting = naive_per_setting or (1 if quick else 4)
    settings = ["single", "all"]
    with _Session(out_dir, threads, keep_runs) as sess:
        experiment = "tiny_mlp" if quick else "mnist_mlp"
        cfg = compose(sess.overrides(f"experiment={experiment}"))
        chunk = chunk or (4 if quick else cfg.tsloo.chunk_size)
        other_chunks = [c for c in (other_chunks or ((2,) if quick else (16, 32, 128))) if c != chunk]
        sweep = [s_ for s_ in settings if s_ in other_chunk_settings]
        run = TrainedRun.load(run_training(cfg))
        fast = "stacked" if tsloo.stacked_mlp_grads(run.task) is not None else "vmap"
        points = tsloo.select_points(run, n_points, "uniform", 0)
        jobs = tsloo.make_jobs(run, points, settings, ["keep"])
        by_setting = {st: [j for j, job in enumerate(jobs) if job.setting == st] for st in settings}
        naive_ids = [j for st in settings for j in by_setting[st][:naive_per_setting]]
        base = tsloo._val_losses(run, run.final_params())
        thread_list = [threads, *[t for t in other_threads if t != threads]]
        main = [(chunk, settings, fast)] + ([(chunk, settings, "vmap")] if fast != "vmap" else [])
        plans = {th: sorted(main + ([(c, sweep, fast) for c in other_chunks] if th == threads and sweep else []))
                 for th in thread_list}
        # timings[(threads, method, chunk, kernel, setting)] -> per-round seconds, summed over that setting's jobs
        timings: dict[tuple, list[float]] = {}
        answers: dict[int, dict] = {}
        sess.say(f"bench tsloo: {len(jobs)} jobs (T={run.T}), chunk {chunk} (+{other_chunks} on {sweep}), "
                 f"threads {thread_list}, {repeats} round(s)")
        for r in range(repeats):
            for th in thread_list:
                torch.set_num_threads(th)
                got = _tsloo_round(run, jobs, naive_ids, base, plans[th], settings,
                                   lambda k, v, th=th: timings.setdefault((th, *k), []).append(v))
                if r == 0:
                    answers[th] = got
            torch.set_num_threads(threads)
            sess.say(f"  round {r + 1}/{repeats} done ({time.perf_counter() - sess.started:.0f}s)")
        rows = _tsloo_rows(jobs, by_setting, naive_ids, settings, thread_list, plans, timings, answers, repeats)
        df = pd.DataFrame(rows, columns=TSLOO_COLS)
        df["chunk"] = df["chunk"].astype("Int64")
        floors = {}
        for th in thread_list:
            torch.set_num_threads(th)
            floors[th] = _first_layer_floor(run, jobs, chunk, repeats)
        torch.set_num_threads(threads)
        notes = _tsloo_notes(experiment, run, n_points, jobs, chunk, chunk == cfg.tsloo.chunk_size,
                             other_chunks, sweep, fast)
        closing = _tsloo_summary(df, thread_list, chunk, fast, floors)
        header = _header("dve bench tsloo" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
        _write_outputs(out_dir, "tsloo", df, header, notes, [("Ground-truth retraining", TSLOO_COLS)], closing)
        if sess.show:
            _print_table("dve bench tsloo", df, [c for c in TSLOO_COLS if c != "note"])
            print("\n".join(["", *closing]))
    return df


def _first_layer_floor(run, jobs: list, chunk: int, repeats: int) -> float | None:
    """Seconds per job that the first layer's two matrix products alone cost the batched
    path (MLP runs; None otherwise): the products of one step for a full stack of
    ``chunk + 1`` copies are timed (median of a few), divided per copy-step, and multiplied
    by the copy-steps every chunk of ``jobs`` runs (each copy from its first removal to T,
    the reference copy from the chunk's start)."""
    from dve_repro import tsloo

    if tsloo.stacked_mlp_grads(run.task) is None:
        return None
    w = run.load_params(0)[0]["net.0.weight"]  # [out, in]
    a = chunk + 1
    stack = w.unsqueeze(0).repeat(a, 1, 1).reshape(a * w.shape[0], w.shape[1])
    x, _ = run.task.batch(run.traj.batches[0])
    x = x.flatten(1)
    dz = torch.ones(x.shape[0], stack.shape[0], dtype=x.dtype)
    times = [_timed(lambda: (x @ stack.T, dz.T @ x))[0] for _ in range(max(3, repeats))]
    per_copy_step = _median(times) / a
    steps = 0
    for ids in tsloo.chunks_of(jobs, chunk):
        steps += run.T - jobs[ids[0]].start + sum(run.T - min(jobs[j].steps) for j in ids)
    return per_copy_step * steps / len(jobs)


def _tsloo_summary(df: pd.DataFrame, thread_list: list[int], chunk: int, fast: str,
                   floors: dict[int, float | None]) -> list[str]:
    """Closing lines: the ratios of the default kernel at ``chunk``, both baselines, per thread count."""
    out = []
    for th in thread_list:
        b = df[(df["method"] == "batched") & (df["threads"] == th) & (df["chunk"] == chunk)]

        def ratio(kernel: str, st: str, col: str, b=b) -> str:
            r = b[(b["kernel"] == kernel) & (b["setting"] == st)]
            return f"{r[col].item():.3g}×" if len(r) else "–"

        parts = [f"{st} {ratio(fast, st, 'speedup_vs_naive')} / {ratio(fast, st, 'speedup_vs_same_start')}"
                 for st in ("single", "all", "single+all")]
        line = (f"{th} thread(s), chunk {chunk}, kernel {fast} — vs naive / vs same-start: " + ", ".join(parts))
        if fast != "vmap":
            line += (f"; the vmap kernel: single+all {ratio('vmap', 'single+all', 'speedup_vs_naive')} / "
                     f"{ratio('vmap', 'single+all', 'speedup_vs_same_start')}")
        naive = df[(df["method"] == "naive") & (df["threads"] == th) & (df["setting"] == "single+all")]
        if floors.get(th) and len(naive):
            spj = naive["s_per_job"].item()
            line += (f". Floor: the first layer's two matrix products alone (timed in this run) cost "
                     f"{floors[th]:.3g} s per job, i.e. at most {spj / floors[th]:.3g}× naive on single+all")
        out.append(line + ".")
    return out


def _tsloo_rows(jobs, by_setting, naive_ids, settings, thread_list, plans, timings, answers, repeats) -> list[dict]:
    """Table rows from the per-round timings: medians per (method, chunk, kernel, setting group)."""
    from dve_repro import tsloo

    reference = answers[thread_list[0]][("naive", 0, "")]

    def secs(th: int, method: str, c: int, kernel: str, sts: list[str]) -> float:
        return _median([sum(x) for x in zip(*(timings[(th, method, c, kernel, s_)] for s_ in sts), strict=True)])

    def ids_of(sts: list[str]) -> list[int]:
        return [j for s_ in sts for j in by_setting[s_]]

    rows = []
    for th in thread_list:
        spj: dict[tuple[str, str], float] = {}
        for method in ("naive", "same_start"):
            got = answers[th][(method, 0, "")]
            for st in [*settings, "single+all"]:
                sts = settings if st == "single+all" else [st]
                ids = ids_of(sts)
                timed = [j for j in naive_ids if j in ids]
                spj[(method, st)] = secs(th, method, 0, "", sts) / len(timed)
                rows.append({
                    "method": method, "kernel": None, "threads": th, "chunk": None, "setting": st,
                    "n_jobs": len(ids), "timed_jobs": len(timed), "seconds": spj[(method, st)] * len(ids),
                    "jobs_per_s": 1.0 / spj[(method, st)], "s_per_job": spj[(method, st)],
                    "speedup_vs_naive": None, "speedup_vs_same_start": None,
                    "max_abs_diff": (None if method == "naive"
                                     else max(float(np.abs(got[j] - reference[j]).max()) for j in timed)),
                    "max_abs_delta": float(np.abs(np.stack([got[j] for j in timed])).max()),
                    "repeats": repeats,
                    "note": f"timed on {len(timed)} of {len(ids)} jobs "
                            f"({'each from θ_0' if method == 'naive' else 'each from its start checkpoint'}), "
                            "extrapolated per job",
                })
        for r in rows:
            if r["threads"] == th and r["method"] in ("naive", "same_start"):
                r["speedup_vs_naive"] = spj[("naive", r["setting"])] / r["s_per_job"]
                r["speedup_vs_same_start"] = spj[("same_start", r["setting"])] / r["s_per_job"]
        for c, plan_sts, kernel in plans[th]:
            delta = answers[th][("batched", c, kernel)]
            groups = [*plan_sts, "single+all"] if len(plan_sts) == len(settings) else list(plan_sts)
            for st in groups:
                sts = settings if st == "single+all" else [st]
                ids = ids_of(sts)
                sec = secs(th, "batched", c, kernel, sts)
                timed = [j for j in naive_ids if j in ids]
                n_chunks = len(tsloo.chunks_of([jobs[j] for j in ids], c))
                rows.append({
                    "method": "batched", "kernel": kernel, "threads": th, "chunk": c, "setting": st,
                    "n_jobs": len(ids), "timed_jobs": len(ids), "seconds": sec, "jobs_per_s": len(ids) / sec,
                    "s_per_job": sec / len(ids), "speedup_vs_naive": spj[("naive", st)] / (sec / len(ids)),
                    "speedup_vs_same_start": spj[("same_start", st)] / (sec / len(ids)),
                    "max_abs_diff": max(float(np.abs(delta[j] - reference[j]).max()) for j in timed),
                    "max_abs_delta": float(np.abs(delta[ids]).max()), "repeats": repeats,
                    "note": f"all {len(ids)} jobs in {n_chunks} chunk(s); diff vs naive on {len(timed)} of them",
                })
    return rows


# ----------------------------------------------------------------------------- bench lm
LM_NOTES = [
    "All measurements in one process on a freshly initialised model (speed does not depend on "
    "training progress); step times are medians over `steps` rounds, and inside a round the plain "
    "step and the capturing step run one right after the other (same load).",
    "`capture_overhead` = capturing step ÷ plain step (aim ≤ 1.1 on pythia_tiny): the hooks keep every "
    "captured linear's input and output gradient, and the fused Kronecker projection turns them into "
    "p̃ float32 numbers per sequence (no extra backward); the rows go to a background writer.",
    "Capture profile: `hooked_step_s` = the capturing step's forward + backward + update with the hooks "
    "on (compare `plain_step_s`), `project_s` = its projection, `queue_wait_s` = time blocked on the "
    "row writer; `*_1t` the same at 1 torch thread, in the same rounds.",
    "`alg1_pts_per_s`: Algorithm 1 with one M per layer (embed.blocks=layer) on float32 rows of "
    "`alg1_steps` steps; `mem_alg1_bytes` (analytic) = per-layer M's (Σ p̃_l²·8) + one chunk of 64 "
    "steps of rows and embeddings; `mem_full_M_bytes` = one p̃×p̃ float64 M over all layers.",
    "`storage_bytes_per_point` = p̃·4 (float32 rows); `storage_run_bytes` for the experiment's "
    "training set. The recompute-at-θ_T alternative (LoGra-style) stores the same rows; its cost is "
    "one gradient pass over the training set at θ_T (`recompute_pts_per_s`).",
    "`query_pts_per_s`: projected gradients of validation sequences at θ and their scores against "
    "every stored embedding row (a dot product each).",
    "`capture_layers` says which weights are captured (`model.capture_layers`; pythia_tiny: every "
    "weight matrix — the block linears, the output head and the token embedding; the LayerNorms "
    "are left out), `captured_params` how many parameters they hold.",
]
LM_COLS = [
    "model", "params", "capture_layers", "captured_params", "device", "dtype", "batch", "seq_len", "p_tilde",
    "plain_step_s", "capture_step_s", "capture_overhead", "hooked_step_s", "project_s", "queue_wait_s",
    "plain_step_1t_s", "capture_step_1t_s", "capture_overhead_1t", "hooked_step_1t_s", "project_1t_s",
    "queue_wait_1t_s", "train_pts_per_s", "capture_pts_per_s",
    "alg1_steps", "alg1_pts_per_s", "mem_alg1_bytes", "mem_full_M_bytes", "peak_gpu_bytes",
    "storage_bytes_per_point", "storage_run_bytes", "query_pts_per_s", "recompute_pts_per_s",
]


class _Rows:
    """An in-memory stand-in for the gradient store (benchmarks write nothing to disk)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def write(self, t, rows, curv=None, start=0, whole=True):
        self.rows.append(rows.detach().to("cpu", torch.float32))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lm_row(overrides: list[str], steps: int, alg1_steps: int = 64, queries: int = 16,
           other_threads: Sequence[int] = ()) -> dict:
    """One benchmark row for the language model named by ``overrides`` (composed on top of
    ``experiment=pythia_tiny`` unless they name another experiment). ``other_threads``: torch
    thread counts at which the plain and the capturing step are timed too, in the same rounds
    (columns ``*_{n}t``)."""
    from dve_repro import embedding
    from dve_repro.capture import Featurizer
    from dve_repro.config import compose
    from dve_repro.embed_stage import query_features
    from dve_repro.optim import init_state
    from dve_repro.projection import Projector
    from dve_repro.tasks import build_task, initial_params, resolve_device
    from dve_repro.train import _TrainCapture, capture_blocks, train_step

    base = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=pythia_tiny"]
    cfg = compose([*base, "runtime.progress=false", *overrides])
    device = resolve_device(cfg.runtime.device)
    task = build_task(cfg, device)
    blocks = capture_blocks(task)
    proj = Projector(cfg.projection, blocks)
    feat = Featurizer(task, blocks, proj, "hooks")
    store = _Rows()
    cap = _TrainCapture(feat, store, "ef", 1, 0)
    params = initial_params(task)
    state = init_state(params, cfg.optim)
    B = cfg.train.batch_size
    x, y = task.batch(np.arange(B))
    w = torch.full((B,), 1.0 / B, dtype=task.weight_dtype, device=x.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def plain():
        out = train_step(task, params, state, 0, x, y, w, 1e-4, cfg)
        _sync(device)
        return out

    def capture():
        out = cap.step(task, params, state, 0, x, y, w, 1e-4, cfg)
        _sync(device)
        return out

    plain(), capture()  # warm-up (lazy init, allocator, projection matrices)
    main = torch.get_num_threads()
    thread_list = [main, *[t for t in other_threads if t != main]]
    times: dict[str, list[float]] = {}
    for r in range(steps):
        for th in thread_list:
            torch.set_num_threads(th)
            tag = "" if th == main else f"_{th}t"
            for kind in (("plain", "capture") if r % 2 == 0 else ("capture", "plain")):
                before = cap.profile()
                times.setdefault(f"{kind}{tag}", []).append(_timed(plain if kind == "plain" else capture)[0])
                if kind == "capture":
                    for k, v in cap.profile().items():
                        times.setdefault(f"{k}{tag}", []).append(v - before[k])
    torch.set_num_threads(main)
    cap.store.flush()
    t_plain, t_cap = times["plain"], times["capture"]
    per_thread = {}
    for th in thread_list:
        tag = "" if th == main else f"_{th}t"
        pl, cp = _median(times[f"plain{tag}"]), _median(times[f"capture{tag}"])
        if tag:
            per_thread |= {f"plain_step{tag}_s": pl, f"capture_step{tag}_s": cp, f"capture_overhead{tag}": cp / pl}
        per_thread |= {f"hooked_step{tag}_s": _median(times[f"step_s{tag}"]),
                       f"project{tag}_s": _median(times[f"project_s{tag}"]),
                       f"queue_wait{tag}_s": _median(times[f"queue_wait_s{tag}"])}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    p = proj.out_dim
    # Algorithm 1 on alg1_steps steps of (tiled) captured rows: its cost does not depend on values.
    rows = torch.cat(store.rows)
    G = rows.repeat(math.ceil(alg1_steps * B / rows.shape[0]), 1)[: alg1_steps * B].numpy()
    offsets = np.arange(alg1_steps + 1) * B
    wts = np.full(alg1_steps, 1e-4 / B)
    slices = proj.block_slices()
    t_alg1, _ = _timed(lambda: embedding.algorithm1(G, offsets, wts, blocks=slices, max_matrix_gb=64.0))
    sizes = [s.stop - s.start for s in slices]
    mem_alg1 = sum(d * d for d in sizes) * 8 + 2 * min(64, alg1_steps) * B * p * 8
    # Queries: projected validation gradients at θ, scored against every stored row.
    xq, yq = task.x_val[:queries], task.y_val[:queries]
    E = torch.from_numpy(G)

    def query():
        q = query_features(feat, params, xq, yq).float().cpu()
        _sync(device)
        return E @ q.T

    query()
    t_query, _ = _timed(query)
    xr, yr = task.batch(np.arange(B))
    feat.features(params, xr, yr)
    t_re, _ = _timed(lambda: (feat.features(params, xr, yr), _sync(device)))
    n_captured = sum(b.size for b in blocks)
    return {
        "model": cfg.model.preset, "params": sum(v.numel() for v in params.values()),
        "capture_layers": cfg.model.capture_layers, "captured_params": n_captured, "device": device, "dtype": cfg.train.dtype, "batch": B,
        "seq_len": cfg.data.seq_len, "p_tilde": p,
        "plain_step_s": _median(t_plain), "capture_step_s": _median(t_cap),
        "capture_overhead": _median(t_cap) / _median(t_plain), **per_thread,
        "train_pts_per_s": B / _median(t_plain), "capture_pts_per_s": B / _median(t_cap),
        "alg1_steps": alg1_steps, "alg1_pts_per_s": alg1_steps * B / t_alg1,
        "mem_alg1_bytes": mem_alg1, "mem_full_M_bytes": p * p * 8, "peak_gpu_bytes": peak,
        "storage_bytes_per_point": p * 4, "storage_run_bytes": p * 4 * task.n_train,
        "query_pts_per_s": xq.shape[0] / t_query, "recompute_pts_per_s": B / t_re,
    }


def bench_lm(out_dir: Path, quick: bool = False, *, threads: int = 2, steps: int | None = None) -> pd.DataFrame:
    """E2 on the CPU: capture, Algorithm 1, storage, queries and the recompute-at-θ_T
    alternative for pythia_tiny and pythia_14m → ``<out_dir>/lm.{csv,md}``."""
    steps = steps or (2 if quick else 5)
    specs = [("pythia_tiny", ["data.n_train=256", "data.seq_len=32"] if quick else ["data.n_train=1024"])]
    if not quick:
        specs.append(("pythia_14m", ["model=pythia_14m", "data.n_train=1024"]))
    with _Session(out_dir, threads, keep_runs=False) as sess:
        rows = []
        for name, ov in specs:
            sess.say(f"bench lm: {name}")
            rows.append(lm_row([*ov, "runtime.device=cpu", "train.dtype=float32"], steps,
                               alg1_steps=16 if quick else 64, other_threads=(1,)))
        df = pd.DataFrame(rows, columns=LM_COLS)
        header = _header("dve bench lm" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
    col = LM_COLS.index
    overhead = ["model", "p_tilde", *LM_COLS[col("plain_step_s") : col("queue_wait_1t_s") + 1]]
    throughput = [*LM_COLS[: col("capture_overhead") + 1],
                  *LM_COLS[col("train_pts_per_s") : col("alg1_pts_per_s") + 1], "query_pts_per_s", "recompute_pts_per_s"]
    memory = ["model", "p_tilde", *LM_COLS[col("mem_alg1_bytes") : col("storage_run_bytes") + 1]]
    _write_outputs(out_dir, "lm", df, header, LM_NOTES,
                   [("Capture overhead and profile", overhead), ("Throughput", throughput),
                    ("Memory and storage", memory)])
    _print_table("bench lm", df, ["model", "p_tilde", "plain_step_s", "capture_overhead", "capture_overhead_1t",
                                  "project_s", "capture_pts_per_s", "alg1_pts_per_s", "query_pts_per_s",
                                  "recompute_pts_per_s", "storage_bytes_per_point"])
    return df

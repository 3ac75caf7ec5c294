"""``dve bench embed``: capture, Algorithm 1 / 2 and the LoGra-style alternative on the MNIST MLP.

For a few trajectory lengths T and projection sizes p̃: training with and without gradient
capture, Algorithm 1 (with its GFLOP/s next to a plain matmul of the same shape),
Algorithm 2 in-process and with two worker processes, and the LoGra-style alternative
(recompute every training point's projected gradient at θ_T), in interleaved rounds
(:mod:`dve_repro.bench.harness`). Memory is computed analytically (stated in the
``mem_method`` column). The two trainings are also timed at one thread (``*_1t`` columns):
on a shared two-core machine, small-op training at two threads can be many times slower
than at one. Writes ``embed.csv`` / ``embed.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dve_repro.bench.harness import (
    Session,
    header,
    median,
    print_table,
    timed,
    write_outputs,
)
from dve_repro.train import run_training

K_SEGMENTS = 4  # Algorithm 2 segments

EMBED_NOTES = [
    "Times are medians over `repeats` rounds; inside a round every alternative runs once, one after "
    "the other (same machine load; the order rotates between rounds). Training times are the training "
    "loop of `run_training` (its DONE `seconds`: excludes data loading; includes waiting for the last "
    "rows to be written); `capture_overhead_wall` uses the whole call.",
    "`capture_overhead` = capture training ÷ plain training (aim ≤ 1.3 at p̃ = 4,426) with float32 rows "
    "(`embed.storage_dtype` default, projected in float32); `capture_overhead_f64` with float64 rows "
    "(the storage the float64 oracle experiments pin; the Algorithm 1/2 and LoGra columns use that run's G).",
    "Capture profile: per-step milliseconds of the float32-row capture (see `_capture_profile` in "
    "bench/embed.py): the training step with and without the hooks, the projection, time blocked on the "
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
    fresh training (profile: see ``_TrainCapture.profile``; ``step_s`` alone without capture),
    at the overrides' ``runtime.threads`` (the caller's thread count is restored after it)."""
    from dve_repro import artifacts
    from dve_repro.config import compose

    cfg = compose(overrides)
    wall, path = timed(lambda: Path(run_training(cfg, force=True)))
    done = artifacts.read_json(Path(path) / artifacts.DONE)
    return float(done.get("seconds", wall)), wall, Path(path), dict(done.get("profile", {}))


def _embed_warmup(sess: Session, spec: dict) -> None:
    """Untimed: first data load and lazy imports (one plain training), and the forkserver
    that Algorithm 2's worker pools fork from (started once per process)."""
    from dve_repro import embedding

    _train_once(sess.overrides(f"experiment={spec['experiment']}", f"train.epochs={spec['epochs']}"))
    g = torch.randn(16, 4, dtype=torch.float64)
    embedding.algorithm2(g, list(range(0, 17, 2)), [0.1] * 8, [0, 4, 8], workers=2)


def _embed_round(sess: Session, cfg, spec_ov: list[str], train_threads: list[int], flip: int,
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
    assert cap_path is not None

    # Algorithm 1 / 2 on the captured G, in memory, float64
    G = torch.from_numpy(np.load(cap_path / "grads" / "G.npy"))
    traj = Trajectory.load(cap_path)
    offsets, w, T = traj.offsets(), traj.lrs / traj.sizes(), len(traj)
    n_occ, p = G.shape
    batch = int(cfg.train.batch_size)
    s, (E1, _) = timed(lambda: embedding.algorithm1(G, offsets, w))
    add("alg1_s", s)
    add("matmul_s", _matmul_seconds(batch, p))
    bounds = [round(k * T / K_SEGMENTS) for k in range(K_SEGMENTS + 1)]
    scale = float(E1.abs().max()) or 1.0
    rel = []
    for workers in (0, 2):
        s, res = timed(lambda wk=workers: embedding.algorithm2(G, offsets, w, bounds, workers=wk))
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
    s, rows = timed(lambda: query_features(feat, final, run.task.x_train, run.task.y_train))
    add("logra_s", s)
    proj_bytes = sum(8 * x.numel() for i in range(len(feat.blocks))
                     for x in feat.projector.kron_factors(i, torch.float64, "cpu") if x is not None)
    info.update(T=T, N_occ=n_occ, p_tilde=p, batch=batch, n_train=run.task.n_train, proj_bytes=proj_bytes,
                G_bytes_disk=os.path.getsize(cap_path / "grads" / "G.npy"),
                logra_bytes=int(rows.shape[0] * rows.shape[1] * 8))


def _embed_row(sess: Session, spec: dict, repeats: int, row_budget_s: float,
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

    med = {k: median(v) for k, v in m.items()}
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
    ms = lambda k: 1e3 * median(m.get(k, [])) / T  # noqa: E731
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
    with Session(out_dir, threads, keep_runs) as sess:
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
        head = header("dve bench embed" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
        write_outputs(out_dir, "embed", df, head, EMBED_NOTES,
                      [("Capture overhead (capture training ÷ plain training)", capture_cols),
                       ("Capture profile (ms per step, float32 rows)", profile_cols),
                       ("Speed", speed_cols), ("Memory and storage", EMBED_MEM_COLS)])
        if sess.show:
            print_table("dve bench embed — capture overhead", df, capture_cols)
            print_table("dve bench embed — capture profile (ms per step)", df, profile_cols)
            print_table("dve bench embed — speed", df, speed_cols)
            print_table("dve bench embed — memory and storage", df, EMBED_MEM_COLS)
    return df


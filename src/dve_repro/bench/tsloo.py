"""``dve bench tsloo``: batched ground-truth retraining against one retraining per point.

The batched fast path (:func:`dve_repro.tsloo.batched_delta`) against the naive
one-retraining-per-job reference (:func:`dve_repro.tsloo.naive_delta`, from θ_0 and from
the job's own start checkpoint) on the same jobs, with the largest difference between their
answers, for several chunk sizes and thread counts, in interleaved rounds
(:mod:`dve_repro.bench.harness`). Writes ``tsloo.csv`` / ``tsloo.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dve_repro import torch_state
from dve_repro.bench.harness import (
    Session,
    header,
    median,
    print_table,
    timed,
    write_outputs,
)
from dve_repro.train import run_training

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
            s, answers[m][j] = timed(lambda j=j, start=start: tsloo.naive_delta(run, jobs[j], base, start=start))
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
            s, delta[gids] = timed(lambda gids=gids, kernel=kernel: tsloo.batched_delta(
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

    out_dir = Path(out_dir)
    repeats = repeats or (1 if quick else 3)
    n_points = n_points or (4 if quick else 128)
    naive_per_setting = naive_per_setting or (1 if quick else 4)
    settings = ["single", "all"]
    with Session(out_dir, threads, keep_runs) as sess:
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
                with torch_state.threads(th):
                    got = _tsloo_round(run, jobs, naive_ids, base, plans[th], settings,
                                       lambda k, v, th=th: timings.setdefault((th, *k), []).append(v))
                if r == 0:
                    answers[th] = got
            sess.say(f"  round {r + 1}/{repeats} done ({time.perf_counter() - sess.started:.0f}s)")
        rows = _tsloo_rows(jobs, by_setting, naive_ids, settings, thread_list, plans, timings, answers, repeats)
        df = pd.DataFrame(rows, columns=TSLOO_COLS)
        df["chunk"] = df["chunk"].astype("Int64")
        floors = {}
        for th in thread_list:
            with torch_state.threads(th):
                floors[th] = _first_layer_floor(run, jobs, chunk, repeats)
        notes = _tsloo_notes(experiment, run, n_points, jobs, chunk, chunk == cfg.tsloo.chunk_size,
                             other_chunks, sweep, fast)
        closing = _tsloo_summary(df, thread_list, chunk, fast, floors)
        head = header("dve bench tsloo" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
        write_outputs(out_dir, "tsloo", df, head, notes, [("Ground-truth retraining", TSLOO_COLS)], closing)
        if sess.show:
            print_table("dve bench tsloo", df, [c for c in TSLOO_COLS if c != "note"])
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
    times = [timed(lambda: (x @ stack.T, dz.T @ x))[0] for _ in range(max(3, repeats))]
    per_copy_step = median(times) / a
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
        return median([sum(x) for x in zip(*(timings[(th, method, c, kernel, s_)] for s_ in sts), strict=True)])

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


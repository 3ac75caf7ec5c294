"""Benchmarks: each one runs end to end in its quick mode and writes a well-formed table."""

from __future__ import annotations

import pandas as pd
import torch

from dve_repro import torch_state
from dve_repro.bench import EMBED_MEM_COLS, EMBED_SPEED_COLS, TSLOO_COLS, bench_embed, bench_tsloo


def _positive(df: pd.DataFrame, cols: list[str]) -> None:
    for c in cols:
        values = pd.to_numeric(df[c], errors="coerce").dropna()
        assert len(values), c
        assert (values > 0).all(), (c, values.tolist())


def test_quick_benchmarks_write_positive_tables(tmp_path):
    with torch_state.threads(2):  # each benchmark puts the caller's thread count back
        embed = bench_embed(tmp_path, quick=True, threads=1)  # one thread: fastest for tiny models
        assert torch.get_num_threads() == 2
        ts = bench_tsloo(tmp_path, quick=True, threads=1)
        assert torch.get_num_threads() == 2
    assert len(embed) == 1
    assert set(EMBED_SPEED_COLS) | set(EMBED_MEM_COLS) <= set(embed.columns)
    _positive(embed, [c for c in EMBED_SPEED_COLS + EMBED_MEM_COLS
                      if c not in ("experiment", "mem_method", "alg2_vs_alg1_rel_diff")])
    assert (embed["alg2_vs_alg1_rel_diff"] < 1e-8).all()
    # the capture profile: every part measured
    _positive(embed, ["capture_overhead_f64", "plain_step_ms", "capture_step_ms", "project_ms", "writer_ms"])
    assert (embed["queue_wait_ms"] >= 0).all()
    assert embed["G_bytes_disk"].iloc[0] >= embed["N_occ"].iloc[0] * embed["p_tilde"].iloc[0] * 8

    assert list(ts.columns) == TSLOO_COLS
    assert set(ts["method"]) == {"naive", "same_start", "batched"}
    assert set(ts["setting"]) == {"single", "all", "single+all"}
    assert set(ts["kernel"].dropna()) == {"stacked", "vmap"}
    _positive(ts, ["threads", "n_jobs", "timed_jobs", "seconds", "jobs_per_s", "s_per_job",
                   "speedup_vs_naive", "speedup_vs_same_start", "max_abs_delta", "repeats"])
    assert (ts.loc[ts["method"] != "naive", "max_abs_diff"] < 1e-10).all()
    naive = ts[ts["method"] == "naive"]
    assert (naive["speedup_vs_naive"] == 1.0).all()
    same = ts[ts["method"] == "same_start"]
    assert (same["speedup_vs_same_start"] == 1.0).all()
    # both ratios of a row are its seconds per job against the two one-at-a-time rows of its setting
    for _, row in ts[ts["method"] == "batched"].iterrows():
        ref = {m: ts[(ts["method"] == m) & (ts["threads"] == row["threads"]) & (ts["setting"] == row["setting"])]
               for m in ("naive", "same_start")}
        assert abs(row["speedup_vs_naive"] - ref["naive"]["s_per_job"].item() / row["s_per_job"]) < 1e-9
        assert abs(row["speedup_vs_same_start"] - ref["same_start"]["s_per_job"].item() / row["s_per_job"]) < 1e-9
    summary = (tmp_path / "tsloo.md").read_text().split("## Summary", 1)[1]
    main = ts[(ts["method"] == "batched") & (ts["kernel"] == "stacked") & (ts["chunk"] == 4)
              & (ts["setting"] == "single+all")]
    assert f"single+all {main['speedup_vs_naive'].item():.3g}× / {main['speedup_vs_same_start'].item():.3g}×" in summary
    assert "Floor:" in summary

    for name in ("embed", "tsloo"):
        assert (tmp_path / f"{name}.csv").is_file()
        md = (tmp_path / f"{name}.md").read_text()
        assert f"`dve bench {name} --quick`" in md and "torch threads" in md and "cpu count" in md
        if name == "embed":
            assert "## Capture overhead" in md and "## Capture profile" in md
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) == len(embed if name == "embed" else ts)
    assert not (tmp_path / "_runs").exists()  # scratch runs are cleaned up

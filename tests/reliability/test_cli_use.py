"""What a new user meets: `dve score` by the embed overrides with a summary, progress lines
when stderr is not a terminal."""

from __future__ import annotations

import pandas as pd
from rel_helpers import invoke, ok, one_error_line, tiny_args

from dve_repro import ui


def test_score_takes_the_embed_overrides_and_prints_a_summary(work):
    res = invoke("score", *tiny_args(work["root"]), "--split", "val", "--top", "3")
    out = ok(res)
    assert out == work["embed"] / "query-val" / "scores.parquet"
    assert "most helpful:" in res.stderr and "most harmful:" in res.stderr
    own = pd.read_parquet(work["embed"] / "scores.parquet")
    pd.testing.assert_series_equal(pd.read_parquet(out)["score"], own["score"], rtol=1e-10)
    assert invoke("verify", out.parent).exit_code == 0
    one_error_line(
        invoke("score", *tiny_args(work["root"], "projection.k_in=7")),
        "no finished embedding",
        "dve embed",
    )


def test_progress_lines_when_not_on_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("DVE_QUIET")
    monkeypatch.setenv("DVE_PROGRESS_EVERY", "0")
    monkeypatch.setattr(ui, "_enabled", True)
    with ui.bar("train", total=3, unit="step") as bar:
        for _ in range(3):
            bar.update(1, loss=0.5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 4 and lines[0].startswith("train: 1/3 step (33%)") and "loss=0.5" in lines[0]
    )
    assert lines[-1].startswith("train: 3/3 step (100%)")

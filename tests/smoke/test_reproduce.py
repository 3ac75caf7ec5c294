"""`dve reproduce` and `dve report`: the pipeline on the tiny profile, failure handling, and the
committed REPORT.md / README table as exactly what `dve report` writes from the committed results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dve_repro import reproduce
from dve_repro.cli import app
from dve_repro.report import BEGIN, CLAIMS, END, VERDICTS, judge_all, render, top_table

ROOT = Path(__file__).resolve().parents[2]


def _rows(report: str) -> dict[str, str]:
    """Top-table claim id → verdict, from a REPORT.md's text."""
    out = {}
    for line in report.splitlines():
        if line.startswith("| [") and "**" in line:
            claim = line.split("]", 1)[0][3:]
            out[claim] = line.rsplit("**", 2)[-2]
    return out


def test_committed_report_is_what_dve_report_writes():
    """REPORT.md byte for byte from the committed small results, and README's table from it."""
    committed = (ROOT / "results" / "REPORT.md").read_text()
    assert render(ROOT / "results") == committed
    readme = (ROOT / "README.md").read_text()
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == "\n".join(top_table(judge_all(ROOT / "results"), link_prefix="results/REPORT.md"))
    rows = _rows(committed)
    assert set(rows) == {c.id for c in CLAIMS if not c.beyond}
    assert all(v in VERDICTS for v in rows.values())


def test_report_without_results_says_not_run_here(tmp_path):
    res = CliRunner().invoke(app, ["report", "--results-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _rows((tmp_path / "REPORT.md").read_text())
    assert set(rows) == {c.id for c in CLAIMS if not c.beyond} and set(rows.values()) == {"not run here"}
    res = CliRunner().invoke(app, ["report", "--results-root", str(tmp_path / "absent")])
    assert res.exit_code == 2 and res.output.startswith("error:")


def test_tiny_profile_refuses_the_committed_results():
    res = CliRunner().invoke(app, ["reproduce", "--profile", "tiny"])
    assert res.exit_code == 2 and "error:" in res.output and "results" in res.output
    res = CliRunner().invoke(app, ["reproduce", "--only", "e1,bogus", "--dry-run"])
    assert res.exit_code == 2 and "bogus" in res.output


def test_dry_run_lists_every_stage_as_committed():
    res = CliRunner().invoke(app, ["reproduce", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == len(reproduce.STAGES)
    for line, st in zip(lines, reproduce.STAGES, strict=True):
        assert st.name in line and " ".join(st.args) in line and "--results" not in line


def test_a_failing_stage_does_not_stop_the_others(tmp_path, monkeypatch):
    """A stage that fails is reported with its error line; the next one still runs; exit 1;
    the report marks the failed stage's claims "failed"."""
    bad = reproduce.Stage("e1", ("E1-single", "E1-all", "E1-if"), ("compare-tsloo", "experiment=no_such_experiment"),
                          "mnist_mlp")
    good = next(s for s in reproduce.STAGES if s.name == "e3")
    monkeypatch.setattr(reproduce, "STAGES", (bad, good))
    root = tmp_path / "results"
    res = CliRunner().invoke(app, ["reproduce", "--profile", "tiny", "--results-root", str(root)])
    assert res.exit_code == 1, res.output
    assert "e1         FAILED" in res.output and "error:" in res.output and "e3         ok" in res.output
    status = json.loads((root / "reproduce.json").read_text())
    assert status["stages"]["e1"]["status"] == "failed" and "no_such_experiment" in status["stages"]["e1"]["error"]
    assert status["stages"]["e3"]["status"] == "ok"
    rows = _rows((root / "REPORT.md").read_text())
    assert rows["E1-single"] == "failed" and rows["E3"] in VERDICTS and rows["E3"] not in ("failed", "not run here")
    timings = (root / "runs" / "reproduce" / "timings.csv").read_text().splitlines()
    assert timings[0] == "run_started,profile,stage,exit_code,seconds" and len(timings) == 3


@pytest.mark.slow
def test_tiny_profile_end_to_end(tmp_path):
    """Every stage on the tiny profile; REPORT.md has a row with a verdict for every claim, none
    failed; a second run reuses every finished stage and writes the same report."""
    root = tmp_path / "results"
    res = CliRunner().invoke(app, ["reproduce", "--profile", "tiny", "--results-root", str(root)])
    assert res.exit_code == 0, res.output
    first = (root / "REPORT.md").read_text()
    rows = _rows(first)
    assert set(rows) == {c.id for c in CLAIMS if not c.beyond}
    assert all(v in VERDICTS and v != "failed" for v in rows.values()), rows
    for claim in ("E1-single", "E1-all", "E1-if", "E3", "E4", "E6"):
        assert rows[claim] != "not run here", claim
    shutil.rmtree(root / "runs" / "reproduce")
    res = CliRunner().invoke(app, ["reproduce", "--profile", "tiny", "--results-root", str(root)])
    assert res.exit_code == 0, res.output
    assert (root / "REPORT.md").read_text() == first


def test_a_damaged_result_file_is_reported_failed_not_trusted(tmp_path):
    (tmp_path / "mnist_mlp").mkdir()
    (tmp_path / "mnist_mlp" / "summary.csv").write_text("method,setting\n")  # columns missing
    res = CliRunner().invoke(app, ["report", "--results-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _rows((tmp_path / "REPORT.md").read_text())
    assert rows["E1-single"] == "failed" and rows["E3"] == "not run here"


def test_stages_start_when_their_inputs_ended_and_a_benchmark_runs_alone():
    from dve_repro.reproduce import Stage, _ready

    a, b = Stage("a", (), ("x",), "r"), Stage("b", (), ("x",), "r", after=("a",))
    c, bench = Stage("c", (), ("x",), "r"), Stage("bench", (), ("x",), None, alone=True)
    order = [a, b, c, bench]
    assert _ready(order, {}, 2) == [a, c]  # b reads a's folders: it waits
    assert _ready([b, bench], {"c": (c,)}, 2) == [b]  # a ended
    assert _ready([bench], {"b": (b,)}, 2) == []  # the benchmark is timed with nothing beside it
    assert _ready([bench], {}, 2) == [bench]
    assert _ready([c], {"bench": (bench,)}, 2) == []
    assert _ready(order, {}, 1) == [a]

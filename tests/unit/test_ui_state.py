"""The progress switch is the caller's: stages never change it, blocks restore it."""

from __future__ import annotations

import pytest

from dve_repro import ui
from dve_repro.config import compose


def test_progress_block_restores_after_exit_and_error():
    with ui.progress(True):
        with ui.progress(False):
            assert not ui._enabled
        assert ui._enabled
        with pytest.raises(RuntimeError), ui.progress(False):
            raise RuntimeError("boom")
        assert ui._enabled


def test_only_rank_zero_reports(monkeypatch):
    monkeypatch.delenv("DVE_QUIET", raising=False)
    with ui.progress(True):
        monkeypatch.setenv("RANK", "1")
        assert not ui.enabled()
        monkeypatch.setenv("RANK", "0")
        assert ui.enabled()
        monkeypatch.setenv("DVE_QUIET", "1")
        assert not ui.enabled()


def test_a_stage_leaves_the_callers_choice(tiny, one_thread):
    from dve_repro.train import run_training

    with ui.progress(True):
        run_training(compose(tiny("runtime.progress=false")))  # the stage's own config says quiet
        assert ui._enabled, "run_training switched the process's progress bars off"

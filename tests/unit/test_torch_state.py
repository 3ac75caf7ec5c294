"""Scoped torch process state (``dve_repro.torch_state``): the thread count and deterministic
mode are set only inside a block and restored after it, also by training and replay."""

from __future__ import annotations

import json

import pytest
import torch

from dve_repro import torch_state
from dve_repro.config import compose
from dve_repro.replay import TrainedRun, replay
from dve_repro.train import run_training


@pytest.fixture
def caller_state():
    """The caller's settings made unusual (1 thread, deterministic off), restored after the test."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn)


def state() -> tuple[int, bool, bool]:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.usefixtures("caller_state")
@pytest.mark.parametrize("fail", [False, True], ids=["normal-exit", "exception"])
def test_blocks_restore_the_previous_settings(fail):
    before = state()
    try:
        with torch_state.threads(2), torch_state.deterministic():
            assert state() == (2, True, False)
            with torch_state.deterministic(False), torch_state.threads(0):  # 0: leave as is
                assert state() == (2, False, False)
            assert state() == (2, True, False)
            if fail:
                raise RuntimeError("inside the block")
    except RuntimeError:
        assert fail
    assert state() == before


@pytest.mark.usefixtures("caller_state")
def test_deterministic_restores_warn_only():
    torch.use_deterministic_algorithms(True, warn_only=True)
    with torch_state.deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.usefixtures("caller_state")
def test_training_and_replay_leave_the_callers_settings(tiny):
    before = state()
    run_dir = run_training(compose(tiny("runtime.threads=2")))
    assert state() == before, "run_training changed the caller's torch settings"
    assert json.loads((run_dir / "env.json").read_text())["torch_threads"] == 2  # trained on 2

    run = TrainedRun.load(run_dir)
    assert run.threads == 2
    seen: list[tuple[int, bool, bool]] = []
    params, _ = replay(run, before_step=lambda t, p: seen.append(state()))
    assert state() == before, "replay changed the caller's torch settings"
    assert seen and set(seen) == {(2, True, False)}, "replay steps ran without training's settings"
    for k, v in run.final_params().items():
        assert torch.equal(params[k], v), f"{k}: replay is not bit-exact"

    with pytest.raises(RuntimeError, match="hook"):
        replay(run, before_step=lambda t, p: (_ for _ in ()).throw(RuntimeError("hook")))
    assert state() == before, "a failed replay changed the caller's torch settings"

"""SIGKILL in the middle of a stage, then the same command: the result is byte-identical to a
clean run and verifies (the lock died with the process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rel_helpers import invoke, ok, tiny_args

from dve_repro.trajectory import ckpt_path

DVE = Path(sys.executable).parent / "dve"
LONG = ["train.epochs=60", "trajectory.checkpoint_every=16"]  # 480 steps: seconds, killed midway


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    proc = subprocess.Popen(
        [str(DVE), *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"DVE_QUIET": "1", "PATH": str(DVE.parent)},
    )
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{cmd[0]} finished before it could be killed")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("stage never reached the kill point")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # a full `dve` process and 960 steps: ~30 s on two cores
def test_sigkill_during_training_then_resume(tmp_path):
    clean = ok(invoke("train", *tiny_args(tmp_path / "clean", *LONG)))
    root = tmp_path / "killed"
    run = root / clean.relative_to(tmp_path / "clean")
    _kill_when(["train", *tiny_args(root, *LONG)], lambda: ckpt_path(run, 64).is_file())
    assert not (run / "DONE").exists()
    assert ok(invoke("train", *tiny_args(root, *LONG))) == run
    last = 480
    assert ckpt_path(run, last).read_bytes() == ckpt_path(clean, last).read_bytes()
    assert invoke("verify", run).exit_code == 0


@pytest.mark.slow
def test_sigkill_during_gradient_capture_then_resume(pristine, tmp_path):
    root = tmp_path / "runs"
    args = tiny_args(root, *LONG)
    ok(invoke("train", *args))
    grads = root / "tiny_mlp"
    _kill_when(
        ["embed", *args], lambda: any((g / "done.npy").is_file() for g in grads.glob("grads-*"))
    )
    emb = ok(invoke("embed", *args))
    clean_root = tmp_path / "clean"
    ok(invoke("train", *tiny_args(clean_root, *LONG)))
    clean = ok(invoke("embed", *tiny_args(clean_root, *LONG)))
    assert np.array_equal(np.load(emb / "E.npy"), np.load(clean / "E.npy"))
    assert invoke("verify", root).exit_code == 0

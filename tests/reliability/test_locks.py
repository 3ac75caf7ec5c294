"""Run-folder locks: a second process refuses with one line naming the holder; a killed
holder leaves no stale lock; two real `dve embed` started together never give a wrong result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rel_helpers import invoke, ok, one_error_line, snapshot, tiny_args

DVE = Path(sys.executable).parent / "dve"
HOLD = (
    "import sys, time; from dve_repro.artifacts import FolderLock; "
    "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"
)


def test_held_lock_refuses_and_a_killed_holder_leaves_no_stale_lock(work):
    train, args = work["train"], tiny_args(work["root"])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(train)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(train)
        one_error_line(
            invoke("train", *args, "--force"), "is in use by pid", str(holder.pid), "dve"
        )
        one_error_line(invoke("train", *args), "is in use by pid")
        assert snapshot(train) == before, "a refused process touched the locked folder"
    finally:
        holder.kill()
        holder.wait()
    lock = train.parent / f".{train.name}.lock"
    assert lock.is_file(), "the killed holder's lock file stays behind..."
    assert ok(invoke("train", *args, "--force")) == train  # ...but the kernel released its lock
    assert not lock.exists()


@pytest.mark.slow  # two full `dve` processes: ~30 s on two cores
def test_two_embeds_at_once_never_mark_a_wrong_result_done(work, pristine):
    """The issue's race: two `dve embed --force` of one config. Each exits 0 or refuses with one
    line; the folder left behind verifies and holds the clean run's scores."""
    args = tiny_args(work["root"])
    env = {"DVE_QUIET": "1", "PATH": str(DVE.parent)}
    procs = [
        subprocess.Popen(
            [str(DVE), "embed", *args, "--force"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert {rc for rc, _, _ in outs} <= {0, 2} and any(rc == 0 for rc, _, _ in outs), outs
    for rc, _out, err in outs:
        if rc == 2:
            lines = err.strip().splitlines()
            assert (
                len(lines) == 1
                and lines[0].startswith("error: ")
                and "is in use by pid" in lines[0]
            ), err
    emb = work["embed"]
    assert subprocess.run([str(DVE), "verify", str(emb)], env=env).returncode == 0
    got = pd.read_parquet(emb / "scores.parquet")
    pd.testing.assert_frame_equal(got, pd.read_parquet(pristine["embed"] / "scores.parquet"))
    assert not list(emb.parent.glob(".*.new-*")), "a staging folder was left behind"

"""A full disk: refused up front with the numbers when the sizes are known, one `error:` line
with the path when a write fails (ENOSPC from `posix_fallocate` or a checkpoint write), nothing
finished lost, and a rerun after freeing space resumes to the same bytes."""

from __future__ import annotations

import errno
import os
from collections import namedtuple

import safetensors.torch
from rel_helpers import invoke, ok, one_error_line, snapshot, tiny_args

from dve_repro import artifacts
from dve_repro.trajectory import ckpt_path

T = 16


def test_too_little_free_space_is_refused_before_any_work(work, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    before = snapshot(work["embed"])
    one_error_line(
        invoke("embed", *tiny_args(work["root"]), "--force"),
        "not enough disk space",
        "needs",
        "free",
    )
    assert snapshot(work["embed"]) == before


def test_enospc_while_allocating_an_array_is_one_line_and_loses_nothing(work, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, "posix_fallocate", full)
    before = snapshot(work["embed"])
    one_error_line(
        invoke("embed", *tiny_args(work["root"]), "--force"), "No space left on device", "E.npy"
    )
    assert snapshot(work["embed"]) == before, "the finished embedding was touched"
    assert not list(work["embed"].parent.glob(".*.new-*"))
    monkeypatch.undo()
    ok(invoke("embed", *tiny_args(work["root"]), "--force"))
    assert invoke("verify", work["embed"]).exit_code == 0


def test_enospc_while_writing_a_checkpoint_then_resume(pristine, tmp_path, monkeypatch):
    real, calls = safetensors.torch.save_file, []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    root = tmp_path / "runs"
    one_error_line(
        invoke("train", *tiny_args(root)),
        "No space left on device",
        "step_0000008.safetensors",
        "free some space",
    )
    run = root / pristine["train"].relative_to(pristine["root"])
    assert ckpt_path(run, 4).is_file() and not (run / "DONE").exists()  # finished steps kept
    monkeypatch.undo()
    assert ok(invoke("train", *tiny_args(root))) == run
    assert ckpt_path(run, T).read_bytes() == ckpt_path(pristine["train"], T).read_bytes()

"""Shared fixtures: quiet output, a temporary matplotlib folder, tiny trained runs."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
os.environ["DVE_QUIET"] = "1"


@pytest.fixture
def out_root(tmp_path):
    return str(tmp_path / "runs")


@pytest.fixture
def tiny(out_root):
    """Overrides for a seconds-long MNIST run (embedded digits) writing under ``out_root``."""

    def make(*extra: str) -> list[str]:
        return ["experiment=tiny_mlp", f"runtime.out_root={out_root}", "runtime.progress=false", *extra]

    return make


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread (and far faster than two on a busy machine);
    the previous count is restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

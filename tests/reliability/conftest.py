"""Fixtures of the reliability tests: a tiny trained run, its embedding and its
captured-gradient twin, made once per session and copied into each test that damages them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rel_helpers import invoke, ok, tiny_args


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A finished tiny training run, its embedding and its captured-gradient twin (read only)."""
    root = tmp_path_factory.mktemp("pristine") / "runs"
    train = ok(invoke("train", *tiny_args(root)))
    emb = ok(invoke("embed", *tiny_args(root)))
    cap = ok(invoke("train", *tiny_args(root, "trajectory.capture=true")))
    return {"root": root, "train": train, "embed": emb, "capture": cap}


@pytest.fixture
def work(pristine, tmp_path) -> dict[str, Path]:
    """A private copy of the pristine runs, to damage."""
    root = tmp_path / "runs"
    shutil.copytree(pristine["root"], root)
    return {
        k: (root / v.relative_to(pristine["root"]) if k != "root" else root)
        for k, v in pristine.items()
    }

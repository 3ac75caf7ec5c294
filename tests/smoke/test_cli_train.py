"""`dve train` through the command line: Typer's CliRunner in-process, and the installed
``dve`` script and ``python -m dve_repro`` as subprocesses (what a user runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dve_repro import artifacts
from dve_repro.cli import app
from dve_repro.config import list_experiments

DVE = Path(sys.executable).parent / "dve"
BAD_INPUTS = {
    "unknown-key": ["foo=1"],
    "unknown-group-option": ["data=nope"],
    "wrong-type": ["optim.lr=abc"],
    "negative-lr": ["optim.lr=-0.1"],
    "batch-size-0": ["train.batch_size=0"],
    "label-noise-1": ["data.label_noise=1.0"],
    "missing-data-folder": ["data.source=torchvision", "data.root=/nonexistent"],
}


@pytest.fixture
def runner():
    return CliRunner()


def user_env() -> dict[str, str]:
    """The environment of a user's shell: progress output on (no DVE_QUIET), a wide terminal."""
    env = {k: v for k, v in os.environ.items() if k != "DVE_QUIET"}
    env["COLUMNS"] = "200"
    return env


def assert_one_error_line(output: str) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert lines[0].startswith("error: ") and "Traceback" not in output


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- success


def test_train_through_cli_runner(runner, tiny, out_root):
    result = runner.invoke(app, ["train", *tiny(), "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert result.stdout.strip().splitlines() == [str(path)]
    assert path.is_dir() and path.is_relative_to(out_root)
    for name in ("config.json", "env.json", "metrics.csv", "trajectory.parquet", "DONE"):
        assert (path / name).is_file(), name
    before = snapshot(path)
    again = runner.invoke(app, ["train", *tiny(), "runtime.threads=1"])
    assert again.exit_code == 0 and again.stdout.strip() == str(path)
    assert snapshot(path) == before, "a second `dve train` rewrote the finished run"


def test_train_through_the_installed_script(tmp_path):
    out_root = tmp_path / "runs"
    proc = subprocess.run(
        [
            str(DVE),
            "train",
            "experiment=tiny_mlp",
            f"runtime.out_root={out_root}",
            "runtime.threads=1",
        ],
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be the run directory only:\n{proc.stdout}"
    path = Path(lines[0])
    assert path.parent == out_root / "tiny_mlp" and (path / artifacts.DONE).is_file()
    assert json.loads((path / artifacts.DONE).read_text())["steps"] == 16
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command", [[str(DVE)], [sys.executable, "-m", "dve_repro"]], ids=["dve", "python-m"]
)
def test_help_lists_commands_and_experiments(command):
    top = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, env=user_env(), timeout=60
    )
    assert top.returncode == 0, top.stderr
    assert "train" in top.stdout
    sub = subprocess.run(
        [*command, "train", "--help"], capture_output=True, text=True, env=user_env(), timeout=60
    )
    assert sub.returncode == 0, sub.stderr
    text = " ".join(sub.stdout.split())
    assert "Experiments:" in text
    for name in list_experiments():
        assert name in text, f"`train --help` does not list experiment {name}"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_error_line(runner, tiny, out_root, overrides):
    result = runner.invoke(app, ["train", *tiny(), *overrides])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert_one_error_line(result.output)
    assert not Path(out_root).exists(), "a refused command left a run directory behind"


def test_bad_input_through_the_installed_script(tmp_path):
    out_root = tmp_path / "runs"
    proc = subprocess.run(
        [
            str(DVE),
            "train",
            "experiment=tiny_mlp",
            f"runtime.out_root={out_root}",
            *BAD_INPUTS["wrong-type"],
        ],
        capture_output=True,
        text=True,
        env=user_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr)
    assert "optim.lr" in proc.stderr and "abc" in proc.stderr
    assert not out_root.exists()


def test_refused_run_directory_keeps_every_file(runner, tiny):
    """A run dir whose saved config differs is refused, with --force too, and nothing is lost."""
    result = runner.invoke(app, ["train", *tiny(), "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    saved = json.loads((path / "config.json").read_text())
    saved["payload"]["optim"]["lr"] = 0.25
    (path / "config.json").write_text(json.dumps(saved))
    before = snapshot(path)
    for flags in ([], ["--force"]):
        refused = runner.invoke(app, ["train", *flags, *tiny()])
        assert refused.exit_code == 2, refused.output
        assert_one_error_line(refused.output)
        assert "saved=0.25" in refused.output and "requested=0.1" in refused.output
        assert snapshot(path) == before, f"`dve train {' '.join(flags)}` changed the refused run"

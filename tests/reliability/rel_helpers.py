"""Helpers of the reliability tests: CLI calls and the one-error-line contract."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dve_repro.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> Path:
    assert result.exit_code == 0, (result.output, result.exception)
    return Path(result.stdout.strip().splitlines()[-1])


def one_error_line(result, *needles: str, code: int = 2) -> str:
    """Exit ``code`` with exactly one line ``error: …`` on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tiny_args(root: Path, *extra: str) -> list[str]:
    return [
        "experiment=tiny_mlp",
        f"runtime.out_root={root}",
        "runtime.progress=false",
        "trajectory.checkpoint_every=4",
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }

"""Every command in the README's code blocks still exists: each `dve …` line's subcommand answers
`--help`, its overrides compose into a config, and each `make …` line names a Makefile target.
So the README cannot drift from the CLI or the configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dve_repro.cli import app
from dve_repro.config import compose
from dve_repro.sweep import split_overrides

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = {"bench", "analyze"}  # groups whose next word is the command


def _lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("torchrun "):  # torchrun [its options] -m dve_repro <command> …
                line = "dve " + line.split(" -m dve_repro ", 1)[1]
            if line.startswith((".venv/bin/dve ", "dve ", "make ")):
                out.extend(part.strip() for part in line.split("&&"))
    return out


LINES = _lines()


def test_readme_has_commands():
    assert any(x.startswith("make reproduce") for x in LINES) and any("dve report" in x for x in LINES)


@pytest.mark.parametrize("line", [x for x in LINES if not x.startswith("make ")])
def test_dve_line(line):
    words = line.split()[1:]
    command = words[:2] if words[0] in SUBCOMMANDS else words[:1]
    res = CliRunner().invoke(app, [*command, "--help"])
    assert res.exit_code == 0, (line, res.output)
    hydra, ours = split_overrides([w for w in words if "=" in w and not w.startswith("-")])
    overrides = [w for w in ours if "," not in w]
    if any(w.startswith("experiment=") for w in overrides):
        compose(overrides)
    for w in hydra:  # a launcher the README names is installed (its config group resolves)
        if w.startswith("hydra/launcher="):
            assert w.split("=", 1)[1] in ("basic", "joblib", "submitit_slurm", "submitit_local"), line
            if w.endswith("joblib"):
                import hydra_plugins.hydra_joblib_launcher  # noqa: F401


@pytest.mark.parametrize("line", [x for x in LINES if x.startswith("make ")])
def test_make_line(line):
    target = line.split()[1]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), line

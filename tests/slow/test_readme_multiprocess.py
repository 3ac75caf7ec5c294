"""The README's "Several processes, GPUs and a cluster" commands work as written: each line of
that section's code block runs, in order, in an empty working directory (``dve …`` as
``python -m dve_repro …``, ``torchrun …`` as ``python -m torch.distributed.run …``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # five commands on the tiny MLP, two of them on 2 ranks: ~3 min

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Several processes, GPUs and a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    out = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = shlex.split(line)
        head = {"dve": [sys.executable, "-m", "dve_repro"],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[words[0]]
        out.append(head + words[1:])
    return out


def test_readme_multiprocess_commands_run_as_written(tmp_path):
    commands = _commands()
    assert len(commands) >= 5 and any("torch.distributed.run" in c for c in commands)
    env = {**os.environ, "DVE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    for cmd in commands:
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (" ".join(cmd[2:]), res.stderr[-2000:])
    assert (tmp_path / "results" / "tiny_mlp" / "summary.csv").is_file()  # the sharded comparison
    (gt,) = (tmp_path / "results" / "runs" / "tiny_mlp").glob("tsloo-*")
    assert sorted(p.name for p in gt.glob("part-*")) == ["part-0-of-2", "part-1-of-2"]
    # nothing but dve's own folders in the working directory (no Hydra outputs, no logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]

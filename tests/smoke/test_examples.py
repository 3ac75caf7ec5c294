"""The public API as a user meets it: the example script and README's "Use it from Python"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run in an empty working directory ``tmp_path/cwd`` with temporary files under ``tmp_path/tmp``
    (PYTHONPATH and the rest of the environment as they are)."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::UserWarning", "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.run([sys.executable, *args], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True,
                          timeout=300)


def test_own_training_loop_example_explains_a_test_digit(tmp_path):
    out = _run([str(ROOT / "examples" / "own_training_loop.py"), "--tiny"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    # the refusal names the conv parameters, then the opt-in records the Linear layers only
    assert re.search(r"^refused: conv1\.weight, conv1\.bias, conv2\.weight, conv2\.bias are trained but outside",
                     text, re.M), text
    assert "recording layers ['fc', 'head']; left out ['conv1.weight'" in text
    assert "embedding: (768, 416)" in text  # 256 digits × 3 epochs; p̃ = 16·16 + 10·16
    step = float(re.search(r"λ_max\(G_tᵀG_t\) = (\S+)", text).group(1))
    assert 0 < step < 2  # the default settings keep the recursion stable (no warning: warnings are errors)
    for kind in ("helpful", "harmful"):
        line = re.search(rf"most {kind}: (.*)$", text, re.M).group(1)
        points = re.findall(r"(\d+) \(label (\d), ([+-]\d\.\d+e[+-]\d+)\)", line)
        assert len(points) == 5, line
        assert all(0 <= int(i) < 256 for i, _, _ in points)
        scores = [float(v) for _, _, v in points]
        assert scores == sorted(scores, reverse=kind == "helpful"), line
        assert (scores[0] > 0) if kind == "helpful" else (scores[0] < 0)
    run_dir = Path(re.search(r"run directory (\S+)", text).group(1))
    assert run_dir.parent.parent == tmp_path / "tmp" and (run_dir / "DONE").is_file()
    assert not list((tmp_path / "cwd").iterdir())  # nothing written to the working directory


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use it from Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path):
    code = readme_python_block()
    assert len(code.strip().splitlines()) <= 20
    out = _run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"index\s*\n(\s*\d+\s+[-+0-9.e]+\s+[-+0-9.e]+\s*\n){3}", out.stdout + "\n"), out.stdout
    assert not list((tmp_path / "cwd").iterdir())  # it writes only where it says (a temporary folder)
    assert [p.name for p in (tmp_path / "tmp").glob("*/run/DONE")] == ["DONE"]

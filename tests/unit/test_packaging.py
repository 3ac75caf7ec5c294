"""A non-editable install carries everything a command needs: the wheel holds the config tree
(package data), and the package imported from that install composes every experiment from it.

Builds the wheel of this checkout (no dependencies, no build isolation: offline), installs it
into a temporary folder with ``pip install --no-deps --target`` and runs a composition there
in a fresh interpreter whose ``sys.path`` starts with that folder (the editable install's
source tree is not on it)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("dve_repro-*.whl")
    return path


def test_the_wheel_ships_the_configs_and_the_type_marker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "src" / "dve_repro" / "configs"
    for yaml in source.rglob("*.yaml"):
        assert f"dve_repro/configs/{yaml.relative_to(source).as_posix()}" in names
    assert "dve_repro/py.typed" in names


def test_an_installed_wheel_composes_every_experiment_from_its_own_configs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dve_repro.config as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "assert str(c.config_dir()).startswith(sys.argv[1]), c.config_dir(); "
            "names = c.list_experiments(); assert 'mnist_mlp' in names, names; "
            "[c.compose([f'experiment={n}']) for n in names]; print(len(names))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVE_CONFIG_DIR")}
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == len(list((ROOT / "src" / "dve_repro" / "configs" / "experiment").glob("*.yaml")))


def test_an_installed_wheel_trains_and_embeds(wheel, tmp_path):
    """`dve train` and `dve embed` from the installed wheel (not the source tree), in an
    empty working directory: the data, configs and code all come from the install."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dve_repro.cli as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; sys.argv = ['dve', *sys.argv[2:]]; c.main()")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVE_CONFIG_DIR")}
    work = tmp_path / "work"
    work.mkdir()
    for command in ("train", "embed"):
        done = subprocess.run([sys.executable, "-c", code, str(target), command, "experiment=tiny_mlp",
                               "runtime.progress=false", "runtime.out_root=runs"],
                              capture_output=True, text=True, env=env, cwd=work, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert len(list((work / "runs" / "tiny_mlp").glob("embed-*/DONE"))) == 1

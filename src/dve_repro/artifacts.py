"""Run directories and atomic writes: the only interface between pipeline stages.

A run directory holds ``config.json`` (the resolved config and the fingerprint payload of
its stage), ``env.json`` (git SHA, versions, device, threads), the stage's outputs, and a
``DONE`` marker written last. Every file is written to a temporary name in the same
folder and renamed into place, so an interrupted run never leaves a half-written file
under a real name. Reusing a directory whose saved payload differs from the request is
refused with both shown (STYLE habit 5).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dve_repro.errors import ArtifactError

DONE = "DONE"


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt JSON file {path}: {exc}") from None


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"corrupt or truncated safetensors file {path}: {exc}") from None


def check_tensors(path: str | Path) -> None:
    """Check that a safetensors file is complete (header and data) without reading the data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"corrupt or truncated safetensors file {path}: {exc}") from None


def save_table(path: str | Path, df: Any) -> None:
    """Write a pandas DataFrame as parquet (``.parquet``) or CSV (``.csv``), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def load_table(path: str | Path) -> Any:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow raises several types for truncated files
        raise ArtifactError(f"corrupt or truncated table {path}: {type(exc).__name__}") from None


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a reader needs to know to rerun: code version, library versions, hardware."""
    import numpy
    import torch

    env = {
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    return env


def _diff(saved: Any, requested: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(requested, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(requested)):
            out += _diff(saved.get(k), requested.get(k), f"{prefix}{k}.")
        return out
    if saved != requested:
        return [f"{prefix.rstrip('.')}: saved={saved!r} requested={requested!r}"]
    return []


class RunDir:
    """A stage's output folder: ``<out_root>/<experiment>/<stage>-<fingerprint>/``."""

    def __init__(self, path: str | Path, payload: dict[str, Any]):
        self.path = Path(path)
        self.payload = payload

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    def file(self, name: str) -> Path:
        return self.path / name

    def check(self) -> None:
        """Refuse a folder whose saved payload differs from the request (writes nothing)."""
        saved_path = self.path / "config.json"
        if saved_path.is_file():
            saved_obj = read_json(saved_path)
            saved = saved_obj.get("payload") if isinstance(saved_obj, dict) else None
            if saved != self.payload:
                diffs = _diff(saved, self.payload)
                shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                raise ArtifactError(
                    f"{self.path} holds a run with another config ({shown}); "
                    "choose another directory or delete it"
                )

    def prepare(self, config: dict[str, Any], device: str, force: bool = False) -> None:
        """Create the folder (or check an existing one matches) and write config and env."""
        self.check()
        saved_path = self.path / "config.json"
        if force and self.path.exists():
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(saved_path, {"payload": self.payload, "config": config})
        write_json(self.path / "env.json", environment(device))

    def clear(self) -> None:
        """Remove every output so the stage is redone from scratch (``--force``)."""
        import shutil

        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        write_json(self.path / DONE, summary or {})

    def require_done(self, what: str) -> None:
        if not self.done:
            raise ArtifactError(f"{self.path} has no DONE marker: the {what} did not finish; rerun it")


def stage_dir(out_root: str | Path, experiment: str, stage: str, fp: str) -> Path:
    return Path(out_root) / experiment / f"{stage}-{fp}"

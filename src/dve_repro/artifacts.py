"""Run directories, locks, manifests and atomic writes: the only interface between stages.

A run directory holds ``config.json`` (the resolved config and the fingerprint payload of
its stage), ``env.json`` (git SHA, versions, device, threads), the stage's outputs, a
``MANIFEST.json`` (every file's size and BLAKE2b hash) and a ``DONE`` marker written last
(it records the manifest's own hash). Every file is written to a temporary name in the
same folder and renamed into place, so an interrupted run never leaves a half-written
file under a real name (STYLE habits 4, 5, 16):

* **lock** — a stage holds an OS file lock (``flock``) on ``.<folder>.lock`` beside its
  folder for its whole life; a second process refuses with one line naming the holder.
  The kernel drops the lock when its process dies, so a killed run never leaves a stale
  lock behind (the file's text only names the last holder).
* **verify, then trust** — reusing a finished folder checks the manifest (sizes always,
  hashes of files below :data:`FULL_HASH_BELOW`; ``dve verify`` hashes everything) and
  that the folder's name is the fingerprint of its saved payload. Memory maps are opened
  only after the file's size has been checked against its header's shape.
* **force** — ``--force`` (and the rebuild of a damaged folder) builds into a hidden
  sibling folder and swaps it in only when complete; the old result survives until then.
* **disk** — large arrays are allocated up front (``posix_fallocate``) after a free-space
  check, so a full disk is one ``error:`` line, never a bus error inside a memory map.
* Reusing a directory whose saved payload differs from the request is refused with both
  shown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dve_repro.errors import ArtifactError, DveError

DONE = "DONE"
MANIFEST = "MANIFEST.json"
#: Files below this size are hashed on every reuse; larger ones only by ``dve verify``.
FULL_HASH_BELOW = 64 * 2**20
#: Written before any work starts: a refused or empty run can be removed without loss.
BOOKKEEPING = frozenset({"config.json", "env.json", "labels.json", "jobs.parquet", "meta.json"})
# ``<stage>-<fingerprint>``; the stage may have hyphenated parts (``method-unrolled-hessian-<fp>``).
_FP_NAME = re.compile(r"^(?P<stage>[a-z]+(?:-[a-z0-9]+)*?)-(?P<fp>[0-9a-f]{12})$")


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


def save_figure(fig: Any, folder: str | Path, stem: str, formats: tuple[str, ...] = ("png", "pdf")) -> None:
    """``folder/stem.<fmt>`` for each format, written atomically at 130 dpi. Reproducible bytes:
    the PDF carries no creation date, so regenerating a figure from the same numbers leaves the
    committed file unchanged."""
    for ext in formats:
        with atomic_path(Path(folder) / f"{stem}.{ext}") as tmp:
            fig.savefig(tmp, dpi=130, format=ext, metadata={"CreationDate": None} if ext == "pdf" else None)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def record_command(folder: str | Path, key: str, command: str) -> None:
    """Keep one ``key: command`` line per output family in ``folder/COMMAND.txt`` (the other
    families' lines are kept: several commands write into one results folder). Lines are sorted
    by key, so the file does not depend on which command ran last."""
    path = Path(folder) / "COMMAND.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    lines = [ln for ln in lines if not ln.startswith(f"{key}: ")]
    lines.append(f"{key}: {command}")
    write_text(path, "\n".join(sorted(lines)) + "\n")


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    ensure_space(Path(path).parent, need, Path(path).name)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # the Rust side reports ENOSPC and friends this way
            raise ArtifactError(f"cannot write {path}: {_first_line(exc)}") from None


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


#: The ``dve`` command line of this process, recorded once by the CLI before a command runs
#: (:func:`record_invocation`); library code never reads ``sys.argv`` itself.
_invocation: str | None = None


def record_invocation(command: str) -> None:
    """What a run folder's ``environment.json`` and a lock's holder line call this process."""
    global _invocation
    _invocation = command


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
        "command": _invocation,  # None: called as a library, not from the dve command line
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    return env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------- disk space and arrays


def ensure_space(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse (one line, with the numbers) when ``folder``'s filesystem has less than
    ``nbytes`` free: checked before every large allocation."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # not a filesystem that reports its space; the write itself will tell
    if nbytes > free:
        raise ArtifactError(
            f"not enough disk space for {what} in {folder}: it needs {_human(nbytes)}, {_human(free)} are free"
        )


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a ``.npy`` header, or ArtifactError."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ArtifactError(f"corrupt or truncated array {path}: {_first_line(exc)}") from None
    if dtype.hasobject:
        raise ArtifactError(f"{path} holds python objects, not numbers; refusing to read it")
    return tuple(int(s) for s in shape), dtype, offset


def open_npy(path: str | Path, mode: str = "r", shape: tuple | None = None, dtype: Any = None) -> np.ndarray:
    """Memory-map a ``.npy`` file after checking its size against its header (and, when
    given, the expected shape and dtype). ``numpy`` would zero-pad a short file opened
    ``r+``; here a short file is an :class:`ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    got_shape, got_dtype, offset = _npy_layout(path)
    expected = offset + int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ArtifactError(
            f"{path} is truncated or damaged: {size:,} bytes, its header says {expected:,} "
            f"({list(got_shape)} {got_dtype}); delete it to recompute it"
        )
    if shape is not None and tuple(shape) != got_shape:
        raise ArtifactError(f"{path} has shape {got_shape}, expected {tuple(shape)}")
    if dtype is not None and np.dtype(dtype) != got_dtype:
        raise ArtifactError(f"{path} has dtype {got_dtype}, expected {np.dtype(dtype)}")
    if got_shape and int(np.prod(got_shape)) == 0:
        return np.zeros(got_shape, dtype=got_dtype)
    return np.load(path, mmap_mode=mode)


def load_npy(path: str | Path, shape: tuple | None = None) -> np.ndarray:
    """Read a small ``.npy`` file into memory (size-checked; never unpickles)."""
    return np.array(open_npy(path, "r", shape))


def save_npy(path: str | Path, array: Any) -> None:
    """Write an array as ``.npy``, atomically."""
    array = np.asarray(array)
    ensure_space(Path(path).parent, array.nbytes, Path(path).name)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def create_npy(path: str | Path, shape: tuple, dtype: Any) -> np.ndarray:
    """A new ``.npy`` memory map whose blocks are allocated on disk now: a full disk fails
    here with one line instead of a bus error when a page is first written."""
    path = Path(path)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    ensure_space(path.parent, nbytes, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    if nbytes:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, path.stat().st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                del arr
                path.unlink(missing_ok=True)
                raise ArtifactError(f"cannot allocate {_human(nbytes)} for {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
    return arr


# --------------------------------------------------------------------------- manifests


def hash_file(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    """Files a manifest covers: everything but DONE, the manifest, hidden temporaries and
    nested run folders (which carry their own manifest)."""
    out = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d / DONE).exists())
        for name in sorted(files):
            if name.startswith(".") or (here == folder and name in (DONE, MANIFEST)):
                continue
            out.append(here / name)
    return out


def build_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    files = {}
    for p in _listed_files(folder):
        files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "blake2b": hash_file(p)}
    return {"hash": "blake2b-128", "files": files}


def verify(folder: str | Path, full: bool = False) -> list[str]:
    """Problems of a finished run folder (empty when it can be trusted).

    Sizes are always checked; hashes of files below :data:`FULL_HASH_BELOW`, or of every
    file with ``full=True``. The folder's name must be the fingerprint of its payload."""
    folder = Path(folder)
    if not (folder / DONE).is_file():
        return ["no DONE marker: the stage did not finish"]
    if not (folder / MANIFEST).is_file():
        return [f"no {MANIFEST} (written by an older dve, or deleted)"]
    problems: list[str] = []
    try:
        done = json.loads((folder / DONE).read_text())
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"unreadable DONE or {MANIFEST}: {_first_line(exc)}"]
    if not isinstance(done, dict) or done.get("manifest_blake2b") != hash_file(folder / MANIFEST):
        problems.append(f"{MANIFEST} does not match the hash recorded in DONE")
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} has {size:,} bytes, the manifest says {entry['size']:,}")
        elif (full or size < FULL_HASH_BELOW) and hash_file(p) != entry["blake2b"]:
            problems.append(f"{name} changed after the run finished (checksum mismatch)")
    if not problems:
        problems += _check_fingerprint(folder)
    return problems


def _check_fingerprint(folder: Path) -> list[str]:
    """A ``<stage>-<fingerprint>`` folder: the name hashes the saved payload, and the saved
    config still gives that payload."""
    m = _FP_NAME.match(folder.name)
    if not m or not (folder / "config.json").is_file():
        return []
    from dve_repro import config as config_mod
    from dve_repro.errors import DveError

    try:
        saved = json.loads((folder / "config.json").read_text())
        payload = saved["payload"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["config.json is unreadable"]
    if config_mod.fingerprint(payload) != m["fp"]:
        return [f"the folder name says fingerprint {m['fp']} but config.json hashes to {config_mod.fingerprint(payload)}"]
    if m["stage"] in ("train", "embed", "tsloo", "compare") and isinstance(saved.get("config"), dict):
        try:
            again = config_mod.stage_payload(config_mod.from_dict(saved["config"]), m["stage"])
        except DveError as exc:
            return [f"config.json no longer validates: {exc}"]
        if again != payload:
            return ["config.json's config does not give its saved payload"]
    return []


def require_verified(folder: str | Path, what: str, fix: str) -> None:
    """Refuse (one line) to read a finished folder that fails :func:`verify`."""
    problems = verify(folder)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(f"{what} {folder} is damaged: {problems[0]}{more}; {fix}")


# --------------------------------------------------------------------------- locks

_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within one process


def _holder_text() -> str:
    cmd = _invocation or "a dve library call (not the dve command)"
    return f"pid {os.getpid()} on {socket.gethostname()} ({cmd[:160]}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"


def _holder_of(fd: int, tries: int = 40) -> str:
    """The holder's line in a lock file someone else has locked. The holder writes it just
    after taking the lock, so a file read empty is read again for up to a second before it
    is named "another process" (without this, a refusal in that window named no one)."""
    for _ in range(tries):
        text = os.pread(fd, 400, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.025)
    return "another process"


class FolderLock:
    """An exclusive ``flock`` on ``.<folder>.lock`` beside ``folder``.

    A second process refuses with one line naming the holder, or waits up to
    ``$DVE_LOCK_WAIT`` seconds when that is set. The kernel releases the lock when the
    holder dies (Ctrl-C, SIGKILL, power loss), so no stale lock survives its process."""

    def __init__(self, folder: str | Path, min_wait: float = 0.0):
        folder = Path(folder)
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.lock"
        # seconds to wait at least, whatever $DVE_LOCK_WAIT says (a lock held for a moment
        # only, like the merge of ground-truth shards, is waited for rather than refused)
        self.min_wait = min_wait

    def acquire(self) -> None:
        key = str(self.path.absolute())
        if key in _HELD:
            _HELD[key][1] += 1
            return
        made = []  # folders this lock creates: removed again on release when left empty
        probe = self.path.parent
        while not probe.exists() and probe != probe.parent:
            made.append(probe)
            probe = probe.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create the run folder {self.path.parent}: {exc.strerror}") from None
        wait = max(float(os.environ.get("DVE_LOCK_WAIT", "0") or 0), self.min_wait)
        deadline = time.monotonic() + wait
        said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_of(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    if not said:
                        print(f"waiting for {self.folder}: in use by {holder}", file=sys.stderr)
                        said = True
                    time.sleep(0.5)
                    continue
                raise ArtifactError(
                    f"{self.folder} is in use by {holder}; wait for it to finish (or stop it) and rerun"
                ) from None
            # The previous holder unlinks the file on release: make sure ours is still the one at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
        _HELD[key] = [fd, 1, made]

    def release(self) -> None:
        key = str(self.path.absolute())
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(entry[0], fcntl.LOCK_UN)
        os.close(entry[0])
        for folder in entry[2]:  # deepest first; only empty ones go
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- run directories


def _diff(saved: Any, requested: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(requested, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(requested)):
            out += _diff(saved.get(k), requested.get(k), f"{prefix}{k}.")
        return out
    if saved != requested:
        return [f"{prefix.rstrip('.')}: saved={saved!r} requested={requested!r}"]
    return []


def _holds_work(folder: Path) -> bool:
    """Whether a folder holds finished or resumable work (anything a rerun would reuse)."""
    if not folder.is_dir():
        return False
    for p in folder.rglob("*"):
        if p.name == DONE:
            return True
        if p.name == "done.npy":
            try:
                if load_npy(p).any():
                    return True
            except ArtifactError:
                return True
        if p.parent.name == "checkpoints" and p.suffix == ".safetensors" and not p.name.startswith("step_0000000."):
            return True
    return False


class RunDir:
    """A stage's output folder: ``<out_root>/<experiment>/<stage>-<fingerprint>/``.

    The life of a stage::

        rd = RunDir(path, payload)
        rd.check()                       # refuse a folder of another config
        with rd.locked():                # one process at a time
            if rd.reusable(force):       # finished and verified
                return rd.final
            ...validate...
            rd.prepare(config, device, force)
            ...write into rd.path...
            rd.mark_done(summary)        # manifest, DONE, swap a rebuilt folder in
        return rd.final

    ``final`` is the folder's name; ``path`` is where files go: ``final`` itself, or a
    hidden sibling while ``--force`` (or the rebuild of a damaged folder) builds a new one.
    """

    def __init__(self, path: str | Path, payload: dict[str, Any]):
        self.final = Path(path)
        self.path = self.final
        self.payload = payload
        self._lock = FolderLock(self.final)
        self._rebuild = False
        self._staging = False
        self._created = False

    @property
    def done(self) -> bool:
        return (self.final / DONE).is_file()

    def file(self, name: str) -> Path:
        return self.path / name

    def check(self) -> None:
        """Refuse a folder whose saved payload differs from the request (writes nothing)."""
        saved_path = self.final / "config.json"
        if saved_path.is_file():
            saved_obj = read_json(saved_path)
            saved = saved_obj.get("payload") if isinstance(saved_obj, dict) else None
            if saved != self.payload:
                diffs = _diff(saved, self.payload)
                shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                raise ArtifactError(
                    f"{self.final} holds a run with another config ({shown}); "
                    "choose another directory or delete it"
                )

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the folder's lock; on failure remove what this call made and cannot resume."""
        self._lock.acquire()
        try:
            self._recover_swap()
            yield self
        except BaseException as exc:
            self._cleanup(exc)
            raise
        finally:
            self._lock.release()

    def _recover_swap(self) -> None:
        """Undo a swap cut short between its two renames; drop abandoned staging folders."""
        parent, name = self.final.parent, self.final.name
        if not parent.is_dir():
            return
        for old in sorted(parent.glob(f".{name}.old-*")):
            if not self.final.exists() and (old / DONE).is_file():
                os.replace(old, self.final)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for new in parent.glob(f".{name}.new-*"):
            shutil.rmtree(new, ignore_errors=True)

    def _cleanup(self, exc: BaseException) -> None:
        if self._staging:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path, self._staging = self.final, False
        elif self._created and isinstance(exc, DveError | OSError) and not _holds_work(self.final):
            shutil.rmtree(self.final, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.final.parent.rmdir()  # only when empty

    def reusable(self, force: bool = False) -> bool:
        """True for a finished folder that verifies; a damaged one is rebuilt (with a warning)."""
        if not self.done or force:
            return False
        problems = verify(self.final)
        if not problems:
            return True
        from dve_repro import ui

        ui.warn(f"warning: {self.final} is damaged ({problems[0]}); rebuilding it")
        self._rebuild = True
        return False

    def prepare(self, config: dict[str, Any], device: str, force: bool = False) -> None:
        """Create the folder to write into, with ``config.json`` and ``env.json``.

        ``force`` (or a damaged folder) builds a new one beside it, swapped in by
        :meth:`mark_done`; otherwise an unfinished folder is resumed in place and a
        finished one reopened (its DONE removed first)."""
        self.check()
        try:
            if force or self._rebuild:
                if self.final.exists():
                    self.path = self.final.parent / f".{self.final.name}.new-{os.getpid()}"
                    shutil.rmtree(self.path, ignore_errors=True)
                    self._staging = True
                else:
                    self._created = True
            else:
                self._created = self._created or not self.final.exists()
                (self.final / DONE).unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create the run folder {self.path}: {exc.strerror}") from None
        write_json(self.path / "config.json", {"payload": self.payload, "config": config})
        write_json(self.path / "env.json", environment(device))

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        """Write the manifest and DONE (last), then swap a rebuilt folder into place."""
        write_json(self.path / MANIFEST, build_manifest(self.path))
        write_json(self.path / DONE, {**(summary or {}), "manifest_blake2b": hash_file(self.path / MANIFEST)})
        if self._staging:
            if self.final.exists():
                trash = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                os.replace(self.final, trash)
                os.replace(self.path, self.final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.path, self.final)
            self.path, self._staging = self.final, False

    def require_done(self, what: str) -> None:
        if not self.done:
            raise ArtifactError(f"{self.final} has no DONE marker: the {what} did not finish; rerun it")
        require_verified(self.final, what, "rerun the command that made it with --force")


def stage_dir(out_root: str | Path, experiment: str, stage: str, fp: str) -> Path:
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"runtime.out_root={out_root} is a file, not a folder")
    return root / experiment / f"{stage}-{fp}"


# --------------------------------------------------------------------------- dve verify


def run_folders(root: str | Path) -> list[Path]:
    """Every run folder under ``root`` (itself included): folders with a DONE marker or a
    ``config.json``, or a gradient store of their own (``meta.json`` + ``done.npy``)."""
    root = Path(root)
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here_p = Path(here)
        names = set(files)
        if DONE in names or "config.json" in names or ({"meta.json", "done.npy"} <= names and not any(p in found for p in here_p.parents)):
            found.append(here_p)
    return found


def verify_tree(root: str | Path, echo) -> int:
    """``dve verify``: one line per run folder; 0 when all are sound, 1 when any is damaged."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"not a folder: {root}")
    folders = run_folders(root)
    if not folders:
        raise ArtifactError(f"no run folders under {root}")
    bad = 0
    for f in folders:
        if not (f / DONE).is_file():
            lock = f.parent / f".{f.name}.lock"
            holder = lock.read_text().strip() if lock.is_file() else ""
            echo(f"unfinished  {f}" + (f"  (last locked by {holder})" if holder else "  (rerun its command to resume)"))
            continue
        problems = verify(f, full=True)
        if problems:
            bad += 1
            echo(f"DAMAGED     {f}: " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
        else:
            n = len(read_json(f / MANIFEST)["files"])
            echo(f"ok          {f}  ({n} files)")
    return 1 if bad else 0

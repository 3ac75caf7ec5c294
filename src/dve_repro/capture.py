"""Gradient capture: projected per-sample gradients of every step, stored for Algorithm 1.

Artifacts (in a ``grads/`` folder of the training run, or of the embedding run when the
gradients are recomputed after training):

* ``G.npy`` — [N_occ, p̃] memory-mapped, rows in occurrence order (step-major, batch order),
  the projected ``g_t(z) = ∇ℓ(θ_t, z)`` of each occurrence.
* ``F.npy`` — [N_f, p̃] curvature factor rows for Gauss-Newton (``C`` rows per point:
  ``√p_c ∇ℓ(θ_t, z, y=c)``, so that ``Σ_c`` of their outer products is the GN matrix of a
  softmax cross-entropy) or the Monte-Carlo Fisher (``k`` rows per point:
  ``∇ℓ(θ_t, z, ỹ_j)/√k`` with ``ỹ_j`` drawn from the model's prediction). Absent for the
  empirical Fisher, whose factors are ``G`` itself.
* ``done.npy`` — [T] bool done-mask, written (atomically) after the rows it covers are
  written into the map, so an interrupted capture resumes where it stopped.
* ``meta.json`` — projection description, curvature, shapes, dtype.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from dve_repro import artifacts
from dve_repro.errors import ArtifactError, DveError
from dve_repro.grads import (
    FACTOR_KINDS,
    Block,
    LinearFactorHooks,
    per_sample_grads_func,
)
from dve_repro.projection import Projector, check_compatible
from dve_repro.tasks import Task


class Featurizer:
    """Projected per-sample gradients of a task's model: ``[B, p̃]`` rows."""

    def __init__(self, task: Task, blocks: list[Block], projector: Projector, engine: str = "auto"):
        self.task, self.blocks, self.projector = task, blocks, projector
        hookable = all(b.kind in FACTOR_KINDS for b in blocks)
        if engine == "auto":
            engine = "hooks" if hookable else "func"
        if engine == "hooks" and not hookable:
            raise DveError("embed.engine=hooks needs a model whose captured layers are all nn.Linear or "
                           "nn.Embedding; use embed.engine=func")
        self.engine = engine

    def from_factors(self, factors: dict) -> torch.Tensor:
        return self.projector.project_factors(factors)

    def features(self, params: dict, x: torch.Tensor, y: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r_i ∇ℓ(θ, x_i, y_i)`` (``r_i`` = ``row_weights`` or 1), projected: [B, p̃]."""
        task = self.task
        if self.engine == "hooks":
            return self.from_factors(hook_factors(task, self.blocks, params, x, y, row_weights))
        grads = per_sample_grads_func(task.per_sample_loss, params, x, y, self.blocks)
        out = self.projector.project_blocks(grads)
        return out if row_weights is None else out * row_weights[:, None]

    def curvature(self, params: dict, x: torch.Tensor, y: torch.Tensor, kind: str, k: int, seed: int) -> torch.Tensor:
        """Curvature factor rows, point-major: [B·R, p̃] (R = C for gn, k for mc)."""
        rows = [self.features(params, x, labels, weights)
                for labels, weights in curvature_targets(self.task, params, x, y, kind, k, seed)]
        return torch.stack(rows, dim=1).reshape(-1, rows[0].shape[-1])


def store_meta(feat: Featurizer, embed) -> dict:
    """What a gradient store's rows depend on (its ``meta.json``): the projection, the
    curvature with its Monte-Carlo draws, the layers. Training's capture and the embedding's
    replay write the same dict, so an embedding reuses captured rows exactly when they match.
    ``embed``: the config's ``embed`` section."""
    return {"projection": feat.projector.describe(), "curvature": embed.curvature,
            "mc_samples": embed.mc_samples, "mc_seed": embed.mc_seed,
            "engine_layers": [b.name for b in feat.blocks]}


def curvature_targets(task: Task, params: dict, x: torch.Tensor, y: torch.Tensor, kind: str, k: int,
                      seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The R (labels, row weights) pairs whose weighted per-sample gradients are the curvature
    factor rows (module docstring): gn ``(c, √p_c)`` for every class c, mc ``k`` label draws
    from the model's prediction (generator seeded with ``seed``) with weight ``1/√k``."""
    with torch.no_grad():
        logits = task.logits(params, x)
        probs = torch.softmax(logits.double(), dim=-1).to(logits.dtype)
    if kind == "gn":
        if task.kind != "classify":
            raise DveError("embed.curvature=gn is defined for classifiers; use ef or mc for language models")
        return [(torch.full_like(y, c), probs[:, c].sqrt()) for c in range(probs.shape[-1])]
    if kind != "mc":
        raise ValueError(kind)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(k):
        flat = probs.reshape(-1, probs.shape[-1]).double().cpu()
        draw = torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1]).to(y.device)
        if task.kind == "lm":
            # token s+1 is predicted at position s: targets are shifted by one
            draw = torch.cat([y[:, :1], draw[:, :-1]], dim=1)
        out.append((draw, torch.full((x.shape[0],), 1.0 / math.sqrt(k), dtype=probs.dtype, device=x.device)))
    return out


def hook_factors(task: Task, blocks: list[Block], params: dict, x: torch.Tensor, y: torch.Tensor,
                 row_weights: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batched backward of ``Σ_i r_i ℓ(θ, z_i)``: the factors ``{block: (a, b)}`` of each
    sample's gradient ``r_i ∇_W ℓ_i = Σ_s (r_i b_s) a_sᵀ`` (see :class:`LinearFactorHooks`)."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    ones = torch.ones(x.shape[0], dtype=next(iter(p.values())).dtype, device=x.device)
    r = ones if row_weights is None else row_weights
    with LinearFactorHooks(task.model, blocks) as hooks:
        (task.per_sample_loss(p, x, y) * r).sum().backward()
    return hooks.factors(ones)


def curvature_rows_per_point(kind: str, n_classes: int, mc_samples: int) -> int:
    return {"ef": 0, "gn": n_classes, "mc": mc_samples}[kind]


class GradientStore:
    """Memory-mapped per-occurrence rows with a per-step done-mask (see module docstring)."""

    def __init__(self, folder: Path, offsets: np.ndarray, dim: int, meta: dict, rows_per_point: int = 0,
                 dtype: str = "float64"):
        self.folder = Path(folder)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.T = len(self.offsets) - 1
        self.dim = dim
        self.rpp = rows_per_point
        self.meta = {**meta, "dim": dim, "rows_per_point": rows_per_point, "dtype": dtype,
                     "n_rows": int(self.offsets[-1]), "steps": self.T}
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        fresh = not meta_path.is_file()
        if not fresh:
            saved = artifacts.read_json(meta_path)
            if saved != self.meta:
                if saved.get("projection") != self.meta.get("projection"):
                    check_compatible(saved.get("projection", {}), self.meta.get("projection", {}), str(self.folder))
                raise ArtifactError(f"{self.folder} holds gradients of another configuration; delete it or use --force")
            saved_offsets = self.folder / "offsets.npy"
            if saved_offsets.is_file() and not np.array_equal(artifacts.load_npy(saved_offsets), self.offsets):
                raise ArtifactError(f"{self.folder} holds gradients of another configuration (other batch sizes); "
                                    "delete it or use --force")
        done_path = self.folder / "done.npy"
        if fresh or not done_path.is_file():
            self.done = np.zeros(self.T, dtype=bool)
        else:
            self.done = artifacts.load_npy(done_path)
            if self.done.shape != (self.T,) or self.done.dtype != np.bool_:
                raise ArtifactError(f"{done_path} does not match the trajectory ({self.done.shape} vs {self.T} steps); "
                                    "delete it to recompute the gradients")
        np_dtype = np.dtype(dtype)
        mode = "r" if self.done.all() else "r+"  # a finished store is never written again
        self.G = self._open("G.npy", (int(self.offsets[-1]), dim), np_dtype, fresh, mode)
        self.F = (self._open("F.npy", (int(self.offsets[-1]) * rows_per_point, dim), np_dtype, fresh, mode)
                  if rows_per_point else None)
        if fresh:
            artifacts.write_json(meta_path, self.meta)

    def _open(self, name: str, shape: tuple, dtype, fresh: bool, mode: str):
        """A new map (allocated on disk now), or an existing one after its size is checked."""
        path = self.folder / name
        if fresh or not path.is_file():
            if self.done.any():
                raise ArtifactError(f"{path} is missing but {self.folder / 'done.npy'} marks steps done; "
                                    "delete the folder to recompute the gradients")
            return artifacts.create_npy(path, shape, dtype)
        return artifacts.open_npy(path, mode, shape, dtype)

    @classmethod
    def open_existing(cls, folder: Path) -> GradientStore:
        meta = artifacts.read_json(Path(folder) / "meta.json")
        offsets = artifacts.load_npy(Path(folder) / "offsets.npy")
        keep = {k: v for k, v in meta.items() if k not in ("dim", "rows_per_point", "dtype", "n_rows", "steps")}
        return cls(folder, offsets, meta["dim"], keep, meta["rows_per_point"], meta["dtype"])

    def write(self, t: int, rows: torch.Tensor, curv: torch.Tensor | None = None, start: int = 0,
              whole: bool = True) -> None:
        """Step t's rows [B_t, p̃] (and curvature rows [B_t·R, p̃]) into the maps, in the store's dtype.

        ``whole=False``: ``rows`` are the step's rows ``start : start + len(rows)`` only (one
        rank's slice of the global batch, ``distributed.py``); the rank writes them at their
        global positions and the others write the rest."""
        a, b = int(self.offsets[t]), int(self.offsets[t + 1])
        if self.F is not None and curv is None:
            raise ValueError("curvature rows required")
        if (whole and (start or rows.shape[0] != b - a)) or start < 0 or a + start + rows.shape[0] > b:
            raise ValueError(f"step {t} has {b - a} rows, got {rows.shape[0]} at position {start}")
        a += start
        _write_rows(self.G, a, rows)
        if self.F is not None:
            _write_rows(self.F, a * self.rpp, curv)
        self.done[t] = False  # marked by commit()

    def commit(self, steps: list[int] | range) -> None:
        """Record the steps as done (atomic done-mask).

        No msync: the rows written through the shared memory map are in the page cache
        already and outlive the process (Ctrl-C, kill), which is the failure resumption
        guards against — like every other artifact here, which is renamed into place without
        fsync. Flushing cost ~20% of a small model's capturing step (``dve bench embed``).
        """
        for t in steps:
            self.done[t] = True
        artifacts.save_npy(self.folder / "done.npy", self.done)
        if not (self.folder / "offsets.npy").is_file():
            artifacts.save_npy(self.folder / "offsets.npy", self.offsets)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def f_offsets(self) -> np.ndarray | None:
        return None if self.F is None else self.offsets * self.rpp

    def nbytes(self) -> int:
        return int(self.G.nbytes + (self.F.nbytes if self.F is not None else 0))


def _write_rows(mapped: np.ndarray, start: int, rows: torch.Tensor) -> None:
    """``mapped[start : start + len(rows)] = rows`` through ``pwrite`` on the map's file.

    Assigning into the memory map costs a page fault per fresh 4 KiB page (~2.5× slower here
    for a step of mnist_mlp rows, ``dve bench embed``); ``pwrite`` copies into the same page
    cache the map reads (coherent on Linux) in one call, and releases the GIL while it does,
    so the background writer does not hold up the training thread."""
    data = np.ascontiguousarray(rows.detach().to("cpu", _TORCH_DTYPE[mapped.dtype]).numpy())
    if data.shape[1:] != mapped.shape[1:] or start + len(data) > len(mapped):
        raise ValueError(f"rows of shape {tuple(data.shape)} do not fit at row {start} of {mapped.shape}")
    if not mapped.flags.writeable:  # a finished store is opened read-only: never written again
        raise ValueError(f"{getattr(mapped, 'filename', 'the store')} is finished (read-only)")
    if not isinstance(mapped, np.memmap):  # an empty store is an in-memory array
        mapped[start : start + len(data)] = data
        return
    view = memoryview(data).cast("B")
    pos = int(mapped.offset) + start * int(np.prod(mapped.shape[1:], dtype=np.int64)) * mapped.itemsize
    fd = os.open(mapped.filename, os.O_WRONLY)
    try:
        while view:  # a regular file writes everything at once; loop for the rule's sake
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
    finally:
        os.close(fd)


_TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


class AsyncRowWriter:
    """Writes a :class:`GradientStore`'s rows from a background thread, so that the training
    step does not wait for the device→host copy and the disk (paper §5.2: capture during
    training). ``write`` enqueues the (device) tensors and returns; it blocks only while
    ``depth`` steps already wait in the queue (their tensors stay alive until written), which
    bounds the memory the rows can take. ``commit`` first waits for every queued write, so the
    done-mask never marks a step whose rows are not in the map (a killed run resumes from it).
    An error in the thread is raised by the next ``write`` / ``commit`` / ``close``.

    ``waited_s``: seconds the training thread spent blocked here (a full queue, or a commit
    waiting for the queue to drain); ``written_s``: seconds the thread spent writing."""

    def __init__(self, store: GradientStore, depth: int = 16):
        import queue
        import threading

        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.waited_s = self.written_s = 0.0
        self._thread = threading.Thread(target=self._run, name="dve-row-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    t0 = time.perf_counter()
                    t, rows, curv, start, whole = item
                    self.store.write(t, rows, curv, start, whole)
                    self.written_s += time.perf_counter() - t0
            except BaseException as exc:  # handed to the training thread, which raises it
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def write(self, t: int, rows: torch.Tensor, curv: torch.Tensor | None = None, start: int = 0,
              whole: bool = True) -> None:
        self._raise()
        t0 = time.perf_counter()
        self._queue.put((t, rows.detach(), None if curv is None else curv.detach(), start, whole))
        self.waited_s += time.perf_counter() - t0

    def flush(self) -> None:
        t0 = time.perf_counter()
        self._queue.join()
        self.waited_s += time.perf_counter() - t0
        self._raise()

    def commit(self, steps) -> None:
        self.flush()
        self.store.commit(steps)

    def close(self) -> None:
        if self._thread.is_alive():
            t0 = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self.waited_s += time.perf_counter() - t0
        self._raise()


def capture_budget(blocks: list[Block], out_dim: int, n_rows: int, *, rows_per_point: int, storage_dtype: str,
                   compute_dtype: torch.dtype, m_blocks: list[slice] | None, batch: int, tokens: int,
                   factor_bytes: int) -> dict[str, int]:
    """Bytes that capture and the embedding will need (before the first step):

    * ``rows_disk`` — G (and F) on disk: n_rows · (1 + rows_per_point) · p̃ · itemsize;
    * ``m_bytes`` — one M of Algorithm 1 in ``compute_dtype`` (Σ_b p_b² per-layer, p̃² full);
    * ``factor_bytes`` — the hook factors of one step, held until its backward ends:
      batch · tokens · Σ_layers (d_in + d_out) · ``factor_bytes`` (a linear's input is the
      activation autograd keeps anyway; the output gradient is new);
    * ``projected_bytes`` — the step's projected rows, [batch, p̃] float32.
    """
    from dve_repro.embedding import estimate_matrix_bytes

    item = np.dtype(storage_dtype).itemsize
    # an embedding's input factor is its token ids (one int64 per token), not a V-wide row
    widths = sum(int(b.shape[0]) + (int(b.shape[1]) if b.kind != "embedding" else 0) for b in blocks)
    return {
        "rows_disk": n_rows * (1 + rows_per_point) * out_dim * item,
        "m_bytes": estimate_matrix_bytes(out_dim, m_blocks, compute_dtype),
        "factor_bytes": batch * tokens * widths * factor_bytes,
        "projected_bytes": batch * out_dim * 4,
    }

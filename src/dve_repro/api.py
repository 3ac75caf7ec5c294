"""Public API: data value embeddings for a model and training loop that dve does not ship.

Stage: a run directory written from the user's own training loop by :class:`Recorder`
(the same artifact formats as ``dve train``), then Algorithm 1 over its captured rows
(:func:`embed`), query gradients with the same projection (:func:`features`) and scores
(:func:`score`)::

    rec = dve_repro.Recorder(run_dir, model, optimizer, n_train=len(ds), projection=32)
    for indices, x, y in loader:
        with rec.step(indices, targets=y):
            loss = F.cross_entropy(model(x), y)     # the MEAN of per-sample losses
            loss.backward(); optimizer.step(); optimizer.zero_grad()
    rec.close()
    emb = dve_repro.embed(run_dir)                            # E [N_occ, p̃]
    q = dve_repro.features(run_dir, model, x_test, y_test)    # [Q, p̃] at θ_T
    values = dve_repro.score(emb, q)                          # per training index

A recorder's run directory holds

* ``trajectory.parquet`` — every step's batch indices, learning rate and mean loss
  (``trajectory.py``'s format);
* ``checkpoints/step_<t>.safetensors`` — θ_0 and θ_T with the optimizer state
  (``trajectory.save_checkpoint``; AdamW's moments as ``opt.m.<param>`` / ``opt.v.<param>``);
* ``grads/`` — the projected per-sample gradient rows ``g_t(z) = ∇ℓ(θ_t, z)`` of every
  occurrence, captured by hooks on the user's ``nn.Linear`` layers inside the user's own
  backward (a :class:`~dve_repro.capture.GradientStore`);
* ``recorder.json`` — what was captured and what was left out, the projection, the optimizer;
* ``config.json``, ``env.json``, ``MANIFEST.json`` and ``DONE`` (``artifacts.RunDir``).

Limitation: ``dve embed`` / ``dve score`` rebuild the model and the data from a dve config,
which a user's model has not, so they refuse a recorder's folder with a pointer here; the
functions of this module are the supported way to embed and score it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from dve_repro import artifacts, embedding
from dve_repro.capture import GradientStore
from dve_repro.config import ProjectionConfig
from dve_repro.errors import ArtifactError, ConfigError, DveError
from dve_repro.grads import Block, LinearFactorHooks, gradient_layout
from dve_repro.projection import Projector, check_compatible
from dve_repro.tasks import logits_of
from dve_repro.trajectory import (
    TRAJECTORY,
    Trajectory,
    load_checkpoint,
    rows_to_frame,
    save_checkpoint,
)

RECORDER = "recorder.json"
_PAYLOAD = {"stage": "recorder", "format": 1}
_SPILL = ".rows.partial"  # rows of the finished steps, appended raw until T is known
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output [B, ...], target [B, ...]) -> [B]


def per_sample_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The default ``loss_fn``: cross-entropy of each sample, [B]."""
    return F.cross_entropy(output, target, reduction="none")


class Recorder:
    """Records a user's training loop as a dve run directory (module docstring).

    ``model``: a ``torch.nn.Module`` whose trained parameters all live in ``nn.Linear``
    layers (others are refused unless ``leave_out`` accepts leaving them out); inputs and
    every captured layer's activations have the batch first ([B, d] or [B, S, d]).
    ``optimizer``: ``torch.optim.SGD`` without momentum (the DVEmb recursion, paper Eq. 1 /
    Theorem 2, is exact up to its Gauss-Newton substitution) or ``torch.optim.AdamW``
    (embedded only as the paper's SGD proxy), one learning rate for all parameter groups.
    ``n_train``: size of the training set the indices refer to. ``projection``: k for a
    Kronecker projection ``P_out G P_inᵀ`` with k × k factors per layer (capped at the
    layer's sizes), None for the exact gradient, or a :class:`~dve_repro.config.ProjectionConfig`;
    the matrices are drawn from ``seed`` and never stored. ``loss_fn(output, target) → [B]``
    is the per-sample loss ℓ (default cross-entropy); **the training loss must be its mean
    over the batch**, ``L_t = (1/|B_t|) Σ_i ℓ_i`` (SPEC §1): rows are the output gradients
    the hooks see multiplied by |B_t|. Passing ``targets`` to :meth:`step` checks that, on
    every step, against the gradient of the model output. ``layers``: names of the Linear
    modules to capture (default all); ``leave_out``: True, or the names (modules or
    parameters) of the trained parameters outside the captured layers whose influence the
    embedding may ignore. ``storage_dtype``: dtype of the stored rows.

    The rows are written while training runs; :meth:`close` (or leaving ``with Recorder(...)``)
    writes θ_T, the trajectory and DONE. A refused or failed step ends the recording.
    """

    def __init__(self, run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 n_train: int, projection: int | ProjectionConfig | None = 32, seed: int = 0,
                 loss_fn: LossFn | None = None, layers: Sequence[str] | None = None,
                 leave_out: bool | Sequence[str] = False, storage_dtype: str = "float32",
                 overwrite: bool = False):
        if storage_dtype not in ("float32", "float64"):
            raise ConfigError(f"storage_dtype={storage_dtype!r}: use float32 or float64")
        if int(n_train) < 1:
            raise ConfigError(f"n_train={n_train} must be the (positive) size of the training set")
        self.model, self.optimizer, self.n_train = model, optimizer, int(n_train)
        self.loss_fn = loss_fn or per_sample_cross_entropy
        self.storage_dtype = storage_dtype
        self.optim = optimizer_description(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        trained = _trained_parameters(model, optimizer, names)
        self.blocks, self.left_out = capture_layout(model, trained, layers, leave_out)
        self.projector = Projector(projection_config(projection, seed), self.blocks)
        self.run_dir = Path(run_dir)
        self._lock = artifacts.FolderLock(self.run_dir)
        self._lock.acquire()  # held for the whole recording, released by close()
        try:
            self._rd = _open_run_dir(self.run_dir, overwrite)
            self._rd.prepare(None, str(_device_of(model)))
            (self.run_dir / "grads").mkdir(exist_ok=True)
            save_checkpoint(self.run_dir, 0, _params(model), _optimizer_state(optimizer, model))
        except BaseException:
            self._lock.release()
            raise
        self._hooks = LinearFactorHooks(model, self.blocks)
        self._rows: list[dict] = []
        self._epoch, self._pos, self._seen = 0, -1, set()
        self._open, self._error = True, None

    # -- the training loop's side --

    @contextlib.contextmanager
    def step(self, indices, targets: torch.Tensor | None = None, *, epoch: int | None = None) -> Iterator[None]:
        """Record one optimizer step: one forward, one ``backward()`` of the mean batch loss
        and one ``optimizer.step()`` must happen inside the ``with`` block.

        ``indices`` [B]: training-set index of each sample, in batch order. ``targets`` [B, ...]:
        the labels ``loss_fn`` takes; when given, the mean-loss convention is checked and the
        batch's mean loss goes to the trajectory (NaN otherwise). ``epoch``: given, or a new
        epoch starts at the first batch repeating an index of the current one.
        """
        self._require_open()
        idx = self._check_indices(indices)
        if targets is not None and len(targets) != len(idx):
            raise ConfigError(f"rec.step got {len(idx)} indices but {len(targets)} targets")
        probe = _StepProbe(self, len(idx), targets)
        try:
            with self._hooks, probe:
                yield
            probe.check()
            rows = self._project(len(idx))
            loss = probe.mean_loss(self.loss_fn) if targets is not None else float("nan")
        except BaseException as exc:
            self._fail(exc)
            raise
        self._append(idx, rows, probe.lr, loss, epoch)

    def close(self) -> Path:
        """θ_T, the trajectory and the gradient store, then DONE; returns the run directory."""
        self._require_open()
        try:
            if not self._rows:
                raise ConfigError("no steps were recorded; call rec.step(...) around each optimizer step")
            T = len(self._rows)
            save_checkpoint(self.run_dir, T, _params(self.model), _optimizer_state(self.optimizer, self.model))
            artifacts.save_table(self.run_dir / TRAJECTORY, rows_to_frame(self._rows))
            self._finish_store()
            artifacts.write_json(self.run_dir / RECORDER, self._description())
            self._rd.mark_done({"steps": T, "occurrences": sum(len(r["indices"]) for r in self._rows)})
        except BaseException as exc:
            self._fail(exc)
            raise
        self._open = False
        self._lock.release()
        return self.run_dir

    def features(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Query features at the recorded θ_T with this recorder's projection and loss: [Q, p̃]
        (see :func:`features`). Only after :meth:`close`."""
        if self._open:
            raise DveError("rec.features(...) reads the finished run: call rec.close() first")
        return features(self.run_dir, self.model, x, y, loss_fn=self.loss_fn, chunk=chunk)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._open:
            self.close()
        elif self._open:
            self._fail(exc)

    # -- internals --

    def _require_open(self) -> None:
        if self._error is not None:
            raise DveError(f"the recording of {self.run_dir} stopped after an error ({self._error}); "
                           "start a new Recorder in a new folder")
        if not self._open:
            raise DveError(f"the recording of {self.run_dir} is closed")

    def _fail(self, exc: BaseException | None) -> None:
        """End the recording: the model may have moved without a record, so it cannot go on."""
        self._error = str(exc).splitlines()[0] if exc is not None and str(exc) else type(exc).__name__
        self._hooks._inputs.clear()  # what the hooks kept of the failed step
        self._hooks._grads.clear()
        if self._open:
            self._open = False
            self._lock.release()

    def _check_indices(self, indices) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or not len(idx) or not np.issubdtype(idx.dtype, np.integer):
            raise ConfigError(f"rec.step needs a non-empty 1-D array of integer training indices, got "
                              f"shape {idx.shape} dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= self.n_train:
            raise ConfigError(f"rec.step got training indices {int(idx.min())}..{int(idx.max())} outside "
                              f"[0, n_train={self.n_train})")
        return idx.astype(np.int64)

    def _project(self, n: int) -> torch.Tensor:
        """[B, p̃] rows of the step the hooks just saw (as ``train._TrainCapture._rows``)."""
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        row_dtype = torch.float32 if self.storage_dtype == "float32" else None
        if self.projector.kronecker:
            return self.projector.project_captured(self._hooks.captured(), 1.0 / w, row_dtype)
        rows = self.projector.project_factors(self._hooks.factors(w))
        return rows if row_dtype is None else rows.to(row_dtype)

    def _append(self, idx: np.ndarray, rows: torch.Tensor, lr: float, loss: float, epoch: int | None) -> None:
        if epoch is None:
            new = bool(self._seen.intersection(idx.tolist()))
            epoch = self._epoch + 1 if new else self._epoch
        elif epoch < self._epoch:
            raise ConfigError(f"rec.step got epoch={epoch} after epoch {self._epoch}; epochs must not decrease")
        if epoch != self._epoch or self._pos < 0:
            self._seen = set()
            self._pos = -1
        self._epoch, self._pos = epoch, self._pos + 1
        self._seen.update(idx.tolist())
        data = np.ascontiguousarray(rows.detach().to("cpu", _TORCH[self.storage_dtype]).numpy())
        with open(self.run_dir / "grads" / _SPILL, "ab") as fh:
            fh.write(data.tobytes())
        self._rows.append({"step": len(self._rows), "epoch": epoch, "pos": self._pos, "indices": idx.tolist(),
                           "lr": lr, "loss": loss})

    def _finish_store(self) -> None:
        """The spilled rows into a :class:`GradientStore` (its offsets are known only now)."""
        offsets = np.concatenate([[0], np.cumsum([len(r["indices"]) for r in self._rows])]).astype(np.int64)
        folder = self.run_dir / "grads"
        store = GradientStore(folder, offsets, self.projector.out_dim, _store_meta(self.projector),
                              0, self.storage_dtype)
        spill = folder / _SPILL
        rows = np.memmap(spill, dtype=self.storage_dtype, mode="r", shape=(int(offsets[-1]), self.projector.out_dim))
        for t in range(store.T):
            store.write(t, torch.from_numpy(np.array(rows[offsets[t] : offsets[t + 1]])))
        store.commit(range(store.T))
        del rows, store
        os.remove(spill)

    def _description(self) -> dict:
        return {
            "layers": [asdict(b) for b in self.blocks],
            "left_out": self.left_out,
            "projection_config": asdict(self.projector.cfg),
            "projection": self.projector.describe(),
            "optimizer": self.optim,
            "n_train": self.n_train,
            "loss": "mean over the batch of loss_fn(output, target), one optimizer step per recorded step",
            "storage_dtype": self.storage_dtype,
        }


class _StepProbe:
    """The checks of one recorded step, as hooks on the captured layers, the model and the
    optimizer: each captured layer runs forward once on ``n`` samples and receives one
    backward; ``optimizer.step()`` runs once with one learning rate; no gradient is left
    over from before the step; with targets, the output gradient is that of the mean loss."""

    def __init__(self, rec: Recorder, n: int, targets: torch.Tensor | None):
        self.rec, self.n, self.targets = rec, n, targets
        self.calls = dict.fromkeys(rec._hooks.modules, 0)
        self.backwards = dict.fromkeys(rec._hooks.modules, 0)
        self.stale: list[str] = []
        self.opt_steps, self.lr = 0, float("nan")
        self.output = self.output_grad = None
        self._handles: list = []

    def __enter__(self) -> _StepProbe:
        for name, mod in self.rec._hooks.modules.items():
            self._handles.append(mod.register_forward_hook(self._forward(name)))
            for pname, p in mod.named_parameters(recurse=False):
                self._handles.append(p.register_hook(self._stale(f"{name}.{pname}", p)))
        if self.targets is not None:
            self._handles.append(self.rec.model.register_forward_hook(self._model_output))
        self._handles.append(self.rec.optimizer.register_step_pre_hook(self._optimizer_step))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward(self, name: str):
        def hook(mod, inputs, output):
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise ConfigError(f"layer {name!r} was called {self.calls[name]} times in one recorded step "
                                  "(weight sharing, or a second forward); the recorder captures one call per "
                                  "Linear layer per step: run other forwards outside rec.step(...)")
            b = inputs[0].shape[0] if inputs[0].dim() > 1 else 1
            if b != self.n:
                raise ConfigError(f"layer {name!r} saw a batch of {b} samples but rec.step got {self.n} indices "
                                  "(the batch dimension must come first and match the indices)")
            if output.requires_grad:
                output.register_hook(self._backward(name))

        return hook

    def _backward(self, name: str):
        def hook(grad):
            self.backwards[name] += 1
            if self.backwards[name] > 1:
                raise ConfigError(f"backward ran {self.backwards[name]} times through layer {name!r} in one recorded "
                                  "step (gradient accumulation or retain_graph); the recorder needs exactly one "
                                  "backward of the mean batch loss per optimizer step")

        return hook

    def _stale(self, name: str, p: torch.Tensor):
        def hook(grad):
            if p.grad is not None and bool(p.grad.any()):
                self.stale.append(name)

        return hook

    def _model_output(self, mod, inputs, output):
        out = logits_of(output)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self.output = out.detach()
            out.register_hook(lambda g: setattr(self, "output_grad", g.detach()))

    def _optimizer_step(self, optimizer, args, kwargs) -> None:
        self.opt_steps += 1
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        if len(lrs) > 1:
            raise ConfigError(f"the optimizer's parameter groups use different learning rates {sorted(lrs)}; "
                              "the recursion has one η_t per step")
        self.lr = lrs.pop()

    def check(self) -> None:
        """Refuse (one line) a step that the rows would not describe."""
        for name, c in self.calls.items():
            if c == 0:
                raise ConfigError(f"layer {name!r} was not called in this recorded step; leave it out with "
                                  "layers=[...] if the model does not use it")
            if self.backwards[name] == 0:
                raise ConfigError(f"no backward reached layer {name!r} in this recorded step; call "
                                  "loss.backward() inside `with rec.step(...)`")
        if self.stale:
            raise ConfigError(f"{self.stale[0]} held a gradient from before this step (gradient accumulation "
                              "across steps); call optimizer.zero_grad() once per recorded step")
        if self.opt_steps != 1:
            raise ConfigError(f"optimizer.step() ran {self.opt_steps} times in this recorded step; call it "
                              "exactly once inside `with rec.step(...)`")
        if self.targets is not None:
            self._check_mean_loss()

    def _check_mean_loss(self) -> None:
        """The user's loss gradient w.r.t. the model output must be that of mean(loss_fn)."""
        if self.output is None or self.output_grad is None:
            raise ConfigError("with targets, the model's output must be a tensor that the loss is computed from")
        want = self._mean_loss_grad(self.rec.loss_fn)[1]
        got = self.output_grad.to(want.dtype)
        scale = float(want.abs().max())
        if not float((got - want).abs().max()) <= 1e-3 * scale + 1e-12:
            ratio = float((got * want).sum() / (want * want).sum().clamp_min(1e-300))
            raise ConfigError(f"the training loss is not the mean of loss_fn over the batch (its gradient w.r.t. "
                              f"the model output is {ratio:.3g}× the mean's, with other differences); the rows "
                              "assume loss = loss_fn(output, target).mean()")

    def _mean_loss_grad(self, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            out = self.output.detach().requires_grad_(True)
            per = loss_fn(out, self.targets)
            if tuple(per.shape) != (self.n,):
                raise ConfigError(f"loss_fn must return one loss per sample, shape [{self.n}]; got "
                                  f"{tuple(per.shape)} (use reduction='none')")
            mean = per.mean()
            return mean.detach(), torch.autograd.grad(mean, out)[0]

    def mean_loss(self, loss_fn: LossFn) -> float:
        return float(self._mean_loss_grad(loss_fn)[0])


# ----------------------------------------------------------------------------- setup helpers
def projection_config(projection: int | ProjectionConfig | None, seed: int) -> ProjectionConfig:
    """``k`` → Kronecker with k × k factors per layer; None → the exact gradient."""
    if projection is None:
        return ProjectionConfig(kind="none", seed=seed)
    if isinstance(projection, ProjectionConfig):
        return projection
    if isinstance(projection, bool) or not isinstance(projection, int) or projection < 1:
        raise ConfigError(f"projection={projection!r}: give k ≥ 1, None (exact gradients) or a ProjectionConfig")
    return ProjectionConfig(kind="kronecker", k_in=projection, k_out=projection, seed=seed)


def optimizer_description(optimizer: torch.optim.Optimizer) -> dict:
    """What the embedding needs to know of the optimizer; refuses what it cannot represent."""
    groups = optimizer.param_groups
    if any(g.get("maximize") for g in groups):
        raise ConfigError("optimizer with maximize=True: the recorder assumes the loss is minimised")
    if isinstance(optimizer, torch.optim.SGD):
        if any(g["momentum"] or g["nesterov"] for g in groups):
            raise ConfigError("torch.optim.SGD with momentum: the DVEmb recursion is derived for plain SGD; "
                              "use momentum=0 (or torch.optim.AdamW, embedded as an SGD proxy)")
        return {"name": "sgd", "weight_decay": sorted({float(g["weight_decay"]) for g in groups})}
    if isinstance(optimizer, torch.optim.AdamW):
        if any(g["amsgrad"] for g in groups):
            raise ConfigError("torch.optim.AdamW with amsgrad=True is not supported; use amsgrad=False")
        g = groups[0]
        return {"name": "adamw", "betas": list(g["betas"]), "eps": float(g["eps"]),
                "weight_decay": sorted({float(x["weight_decay"]) for x in groups})}
    raise ConfigError(f"{type(optimizer).__name__} is not supported: use torch.optim.SGD (momentum=0) or "
                      "torch.optim.AdamW")


def _trained_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, names: dict) -> set[str]:
    out = set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ConfigError("the optimizer holds a parameter that is not in the model; give the recorder "
                                  "the module whose parameters the optimizer trains")
            if p.requires_grad:
                out.add(names[id(p)])
    return out


def capture_layout(model: nn.Module, trained: set[str], layers: Sequence[str] | None,
                   leave_out: bool | Sequence[str]) -> tuple[list[Block], list[str]]:
    """The Linear blocks to capture (``grads.gradient_layout``) and the trained parameters
    left out; refuses (naming them) left-out parameters that ``leave_out`` does not accept."""
    mods = dict(model.named_modules())
    linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    if layers is not None:
        wrong = [n for n in layers if n not in linear]
        if wrong:
            raise ConfigError(f"layers={wrong[:3]} are not nn.Linear modules of the model (those are {linear[:6]})")
    chosen = []
    for n in (layers if layers is not None else linear):
        own = [f"{n}.{p}" if n else p for p, _ in mods[n].named_parameters(recurse=False)]
        hit = [p for p in own if p in trained]
        if hit and len(hit) != len(own):
            raise ConfigError(f"layer {n!r} has parameters that are not trained ({sorted(set(own) - set(hit))}); "
                              "the recorder captures whole Linear layers")
        if hit:
            chosen.append(n)
    if not chosen:
        raise ConfigError("the model has no trained nn.Linear layer to capture")
    blocks = gradient_layout(model, chosen)
    captured = {p for b in blocks for p in b.params}
    left = sorted(trained - captured, key=list(dict(model.named_parameters())).index)
    accepted = leave_out is True or (not isinstance(leave_out, bool) and all(
        any(p == a or p.startswith(f"{a}.") for a in leave_out) for p in left))
    if left and not accepted:
        shown = ", ".join(left[:4]) + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
        raise ConfigError(f"{shown} are trained but outside the captured nn.Linear layers, so the embedding "
                          "would leave their gradients out; pass leave_out=True (or their names) to accept that")
    return blocks, left


def _open_run_dir(run_dir: Path, overwrite: bool) -> artifacts.RunDir:
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (overwrite and (run_dir / "config.json").is_file()
                and (artifacts.read_json(run_dir / "config.json") or {}).get("payload") == _PAYLOAD):
            raise ArtifactError(f"{run_dir} is not empty; record into a new folder (overwrite=True replaces only "
                                "a previous recording)")
        import shutil

        shutil.rmtree(run_dir)
    rd = artifacts.RunDir(run_dir, dict(_PAYLOAD))
    rd.check()
    return rd


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """dve's names for the state (``optim.init_state``): AdamW's ``m.<p>``/``v.<p>`` (zeros
    before the first step, as torch initialises them); plain SGD has none."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return {}
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        out[f"m.{name}"] = st["exp_avg"].detach().clone() if "exp_avg" in st else torch.zeros_like(p)
        out[f"v.{name}"] = st["exp_avg_sq"].detach().clone() if "exp_avg_sq" in st else torch.zeros_like(p)
    return out


def _store_meta(projector: Projector) -> dict:
    return {"projection": projector.describe(), "curvature": "ef", "engine_layers": [b.name for b in projector.blocks]}


_TORCH = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- reading a recording
@dataclass
class _Recording:
    path: Path
    info: dict
    traj: Trajectory
    store: GradientStore
    projector: Projector


def _load(run_dir: str | Path) -> _Recording:
    path = Path(run_dir)
    if not (path / RECORDER).is_file():
        raise ArtifactError(f"{path} was not written by dve_repro.Recorder (no {RECORDER}); a dve training run "
                            "is embedded with `dve embed`")
    artifacts.require_verified(path, "recording", "record it again")
    info = artifacts.read_json(path / RECORDER)
    blocks = [Block(b["name"], b["kind"], tuple(b["params"]), tuple(b["shape"]), b["has_bias"]) for b in info["layers"]]
    projector = Projector(ProjectionConfig(**info["projection_config"]), blocks)
    check_compatible(info["projection"], projector.describe(), f"recording {path}")
    traj = Trajectory.load(path)
    store = GradientStore.open_existing(path / "grads")
    if not store.complete or not np.array_equal(store.offsets, traj.offsets()):
        raise ArtifactError(f"{path / 'grads'} does not hold every step of {path / TRAJECTORY}; record it again")
    return _Recording(path, info, traj, store, projector)


# ----------------------------------------------------------------------------- embed / features / score
@dataclass
class Embedding:
    """Data value embeddings of a recording.

    ``E`` [N_occ, p̃] float64: DVEmb^{(t)}(z) of every occurrence, step-major in batch order
    (paper Eq. 1, Algorithm 1); ``occurrences``: a DataFrame with one row per row of E:
    ``index`` (training index), ``step``, ``epoch``. A query's predicted TSLOO for an
    occurrence is ``E @ q`` with q its projected loss gradient at θ_T (:func:`features`);
    positive = the point helped. ``estimator`` says whether this is the first-order SGD
    estimate or an SGD proxy; ``left_out`` names the parameters it ignores.
    ``largest_step`` = max_t w_t λ_max(G_tᵀG_t): above 2 a factor (I − w_t H_t) of the
    recursion has an eigenvalue below −1, so the embeddings can grow without bound (the
    empirical Fisher overstates the curvature of a poorly fit model; lower the learning rate
    or raise the batch size, or read the scores with care)."""

    E: torch.Tensor
    occurrences: pd.DataFrame
    projection: dict
    estimator: str
    layers: list[str]
    left_out: list[str]
    run_dir: Path
    largest_step: float


def embed(run_dir: str | Path, *, blocks: str = "full", sgd_proxy: bool = False, dtype: torch.dtype = torch.float64,
          device: str = "cpu", max_matrix_gb: float = 8.0) -> Embedding:
    """Algorithm 1 of the paper over a recording's rows (:func:`dve_repro.embedding.algorithm1`):
    for t = T−1 … 0, ``E_t = w_t (G_t − G_t Mᵀ)``, ``M ← M + E_tᵀ G_t`` with
    ``w_t = η_t/|B_t|`` and the empirical Fisher ``H_t ≈ G_tᵀG_t`` (SPEC §2).

    ``blocks``: ``full`` (one M of p̃ × p̃) or ``layer`` (one M per captured layer).
    An AdamW recording is refused unless ``sgd_proxy=True``: then the SGD recursion runs with
    the recorded learning rates and raw gradients (the paper's "SGD proxy", labelled as such);
    the AdamW-aware embedding (``embed.optimizer_aware``) needs ``dve embed``'s replay of a
    model dve builds, and is not available here. Returns an :class:`Embedding` (E on the CPU).
    """
    rec = _load(run_dir)
    if blocks not in ("full", "layer"):
        raise ConfigError(f"blocks={blocks!r}: use full or layer")
    opt = rec.info["optimizer"]
    if opt["name"] == "adamw" and not sgd_proxy:
        raise ConfigError(f"{rec.path} was trained with AdamW: the DVEmb recursion is derived for SGD; pass "
                          "sgd_proxy=True for the paper's SGD proxy (scheduled η_t, raw gradients)")
    slices = rec.projector.block_slices() if blocks == "layer" else None
    w = rec.traj.lrs / rec.traj.sizes()
    E, _ = embedding.algorithm1(rec.store.G, rec.traj.offsets(), w, blocks=slices, dtype=dtype, device=device,
                                max_matrix_gb=max_matrix_gb)
    largest = largest_step(rec.store.G, rec.traj.offsets(), w)
    if largest > 2:
        warnings.warn(f"the recursion of {rec.path} has a step with w_t λ_max(G_tᵀG_t) = {largest:.3g} > 2: its "
                      "(I − w_t H_t) factor amplifies, so the embeddings may be far off (see Embedding.largest_step)",
                      stacklevel=2)
    return Embedding(E.to("cpu", torch.float64), rec.traj.occurrences(), rec.info["projection"],
                     _estimator(opt), [b.name for b in rec.projector.blocks], list(rec.info["left_out"]), rec.path,
                     largest)


def largest_step(G, offsets, w) -> float:
    """max_t w_t ‖G_t‖₂² = max_t w_t λ_max(G_tᵀG_t) over the rows [N_occ, p̃] of each step."""
    out = 0.0
    for t in range(len(w)):
        g = torch.from_numpy(np.array(G[offsets[t] : offsets[t + 1]], dtype=np.float64))
        out = max(out, float(w[t]) * float(torch.linalg.matrix_norm(g, ord=2)) ** 2)
    return out


def _estimator(opt: dict) -> str:
    if opt["name"] == "adamw":
        return "SGD proxy: the run used adamw; recursion applied with scheduled lr and raw gradients"
    decay = [x for x in opt["weight_decay"] if x]
    note = f"; weight decay {decay} is not in the recursion" if decay else ""
    return f"first-order SGD estimate (ef curvature{note})"


def features(run: str | Path | Embedding, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn: LossFn | None = None, chunk: int = 256) -> torch.Tensor:
    """Projected per-sample loss gradients of queries at the recording's final θ_T: [Q, p̃].

    ``run``: a recorder's run directory or an :class:`Embedding`; ``model``: the recorded
    model's architecture (its weights are not touched: θ_T is read from the checkpoint and
    used through ``torch.func.functional_call``; buffers and train/eval mode are the
    model's own, so call ``model.eval()`` first if it has dropout). ``x`` [Q, ...], ``y`` [Q, ...]:
    queries and targets; ``loss_fn`` as the recorder's (default cross-entropy). Row q is
    ``P ∇_θ ℓ(θ_T, z_q)`` with the recording's projection P over its captured layers.
    """
    from torch.func import functional_call

    rec = _load(run.run_dir if isinstance(run, Embedding) else run)
    loss_fn = loss_fn or per_sample_cross_entropy
    device = _device_of(model)
    params = load_checkpoint(rec.path, len(rec.traj), str(device))[0]
    have = {k: tuple(v.shape) for k, v in model.named_parameters()}
    if have != {k: tuple(v.shape) for k, v in params.items()}:
        raise ConfigError(f"the model's parameters do not match the recording's θ_T in {rec.path}")
    captured = [p for b in rec.projector.blocks for p in b.params]
    hooks = LinearFactorHooks(model, rec.projector.blocks)
    out = []
    for s in range(0, x.shape[0], chunk):
        xb, yb = x[s : s + chunk], y[s : s + chunk]
        p = {k: v.detach().requires_grad_(k in captured) for k, v in params.items()}
        with torch.enable_grad(), hooks:
            per = loss_fn(logits_of(functional_call(model, p, (xb,))), yb)
            if tuple(per.shape) != (xb.shape[0],):
                raise ConfigError(f"loss_fn must return one loss per sample, shape [{xb.shape[0]}]; got "
                                  f"{tuple(per.shape)} (use reduction='none')")
            torch.autograd.grad(per.sum(), [p[k] for k in captured])
        ones = torch.ones(xb.shape[0], dtype=per.dtype, device=per.device)
        out.append(rec.projector.project_factors(hooks.factors(ones)))
    return torch.cat(out)


def score(emb: Embedding, query_features) -> pd.DataFrame:
    """Predicted TSLOO of every training point for the mean loss of the queries.

    ``query_features`` [p̃] or [Q, p̃] (:func:`features`; the mean over Q is the gradient of
    the mean query loss). Per occurrence the score is ``E q`` (SPEC §2: L(θ'_T) − L(θ_T),
    positive = removing the point raises the query loss, i.e. it helped). Returns a
    DataFrame indexed by training index with ``all_epoch`` (sum over the point's
    occurrences: removed from every epoch) and ``single_epoch`` (its last occurrence only).
    """
    q = torch.as_tensor(np.asarray(query_features), dtype=torch.float64)
    if q.dim() == 2:
        q = q.mean(0)
    if q.dim() != 1 or q.shape[0] != emb.E.shape[1]:
        raise DveError(f"query features of shape {tuple(np.shape(query_features))} do not match the embedding's "
                       f"p̃={emb.E.shape[1]} (compute them with dve_repro.features on the same recording)")
    s = emb.E @ q
    occ = emb.occurrences
    idx, total, last = embedding.per_index_views(s, occ["index"].to_numpy(), occ["step"].to_numpy())
    return pd.DataFrame({"all_epoch": total.numpy(), "single_epoch": last.numpy()},
                        index=pd.Index(idx.numpy(), name="index"))

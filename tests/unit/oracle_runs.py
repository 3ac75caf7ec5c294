"""Tiny recorded runs and from-scratch references for the oracle tests (not a test module).

A *synthetic* task (a 4-3-3 tanh MLP on Gaussian inputs, 27 parameters; or a one-layer
GPT-NeoX over a 32-token vocabulary) is trained through the real ``run_training`` and
loaded back as a :class:`TrainedRun`, so every stage (replay, unrolling, baselines,
ground truth, embedding) runs on it unchanged, while the references here can afford
explicit p × p matrices. The references use plain autograd on a flat parameter vector and
never call the code they check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from dve_repro.config import GPTNeoXModelConfig, MLPConfig, compose
from dve_repro.models import build_model
from dve_repro.replay import TrainedRun
from dve_repro.tasks import Task
from dve_repro.train import run_training

Tensors = dict[str, torch.Tensor]


def classifier_task(
    seed: int = 0, n_train: int = 26, n_val: int = 5, d: int = 4, classes: int = 3
) -> Task:
    """27-parameter tanh MLP; logits sharpened so the curvature terms are not negligible."""
    model = build_model(
        MLPConfig(in_features=d, hidden=[3], n_classes=classes, activation="tanh", init_seed=seed)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n_train + n_val, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n_train + n_val,), generator=gen)
    return Task(
        "classify",
        model,
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        classes,
        "synthetic Gaussian classification",
    )


def lm_config(vocab: int = 32) -> GPTNeoXModelConfig:
    return GPTNeoXModelConfig(
        vocab_size=vocab,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        rotary_pct=0.25,
        initializer_range=0.2,
        capture_layers="all+head",
    )


def lm_task(n_train: int = 12, n_val: int = 3, seq_len: int = 6, vocab: int = 32) -> Task:
    """One-layer GPT-NeoX (Pythia layout) on random token sequences, float64."""
    from dve_repro.lm import build_gpt_neox, linear_layers

    model = build_gpt_neox(lm_config(vocab), torch.float64)
    layers, left_out = linear_layers(model, "all+head")
    gen = torch.Generator().manual_seed(7)
    tok = torch.randint(0, vocab, (n_train + n_val, seq_len), generator=gen)
    return Task(
        "lm",
        model,
        tok[:n_train],
        tok[:n_train],
        tok[n_train:],
        tok[n_train:],
        vocab,
        "random token sequences",
        extra={"capture_layers": [n for n, _ in layers], "left_out": left_out},
    )


def overrides(root: Path, task: Task, *extra: str) -> list[str]:
    return [
        "experiment=tiny_mlp",
        f"runtime.out_root={root}",
        "runtime.progress=false",
        f"data.n_train={task.n_train}",
        "trajectory.checkpoint_every=3",
        *extra,
    ]


def train(root: Path, task: Task, *extra: str) -> TrainedRun:
    """Train ``task`` with the tiny_mlp experiment's loop and the given overrides; load it back."""
    torch.set_num_threads(1)
    cfg = compose(overrides(root, task, *extra))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dve_repro.train.build_task", lambda cfg, device="cpu": task)
        mp.setattr("dve_repro.replay.build_task", lambda cfg, device="cpu": task)
        return TrainedRun.load(run_training(cfg))


# ----------------------------------------------------------------------------- flat views
class Flat:
    """A parameter dict as one vector (sorted names), and losses as functions of it."""

    def __init__(self, task: Task, like: Tensors):
        self.task = task
        self.names = sorted(like)
        self.shapes = [like[k].shape for k in self.names]
        self.sizes = [like[k].numel() for k in self.names]

    def vec(self, params: Tensors) -> torch.Tensor:
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def dict(self, v: torch.Tensor) -> Tensors:
        parts = torch.split(v, self.sizes)
        return {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def losses(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.task.model, self.dict(v), (x,))
        logits = out.logits if hasattr(out, "logits") else out
        return self.task.per_sample_loss_from_logits(logits, y)

    def grad(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mean: bool = True
    ) -> torch.Tensor:
        """∇ of the mean loss (``mean``) or the per-sample gradients [B, p], one at a time."""
        if mean:
            vv = v.detach().requires_grad_(True)
            return torch.autograd.grad(self.losses(vv, x, y).mean(), vv)[0]
        rows = []
        for i in range(x.shape[0]):
            vv = v.detach().requires_grad_(True)
            rows.append(
                torch.autograd.grad(self.losses(vv, x[i : i + 1], y[i : i + 1]).sum(), vv)[0]
            )
        return torch.stack(rows)

    def hessian(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact Hessian of the mean loss over (x, y): [p, p]."""
        return torch.autograd.functional.hessian(lambda u: self.losses(u, x, y).mean(), v.detach())

    def logit_jacobian(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∂ logits / ∂θ: [B, C, p]."""

        def logits(u):
            return functional_call(self.task.model, self.dict(u), (x,))

        return torch.autograd.functional.jacobian(logits, v.detach())


def sgd_iterates(run: TrainedRun, removed: dict[int, int] | None = None) -> list[torch.Tensor]:
    """θ_0 … θ_T of the recorded plain-SGD run recomputed by autograd from θ_0 (optionally
    with training index removed[t] given loss weight 0 at step t, keeping the denominator)."""
    task, traj = run.task, run.traj
    wd = run.cfg.optim.weight_decay
    assert (
        run.cfg.optim.name == "sgd" and not run.cfg.optim.momentum and not run.cfg.optim.grad_clip
    )
    flat = Flat(task, run.load_params(0)[0])
    v = flat.vec(run.load_params(0)[0])
    out = [v]
    for t in range(run.T):
        batch = traj.batches[t]
        x, y = task.batch(batch)
        keep = torch.ones(len(batch), dtype=torch.float64)
        if removed and t in removed:
            keep[torch.as_tensor(np.flatnonzero(batch == removed[t]))] = 0.0
        vv = v.detach().requires_grad_(True)
        g = torch.autograd.grad((flat.losses(vv, x, y) * keep).sum() / len(batch), vv)[0]
        v = v - float(traj.lrs[t]) * (g + wd * v)
        out.append(v.detach())
    return out


def query_matrix(flat: Flat, theta, task) -> torch.Tensor:
    """[p, Q]: the mean validation loss's gradient, then each validation point's."""
    mean = flat.grad(theta, task.x_val, task.y_val)
    per = flat.grad(theta, task.x_val, task.y_val, mean=False)
    return torch.cat([mean[None], per]).T


def curvature_matrix(
    flat: Flat, theta, x, y, kind: str, t: int, mc_samples: int, mc_seed: int
) -> torch.Tensor | None:
    """[p, p] curvature C_t of the mean loss over the batch (x, y) at θ (None for ``none``):
    exact Hessian, Gauss-Newton from the logit Jacobian, empirical Fisher from one-at-a-time
    gradients, Monte-Carlo Fisher from gradients at labels drawn with the documented seed."""
    n = x.shape[0]
    if kind == "none":
        return None
    if kind == "hessian":
        return flat.hessian(theta, x, y)
    if kind == "ef":
        g = flat.grad(theta, x, y, mean=False)
        return g.T @ g / n
    if kind == "gn":
        J = flat.logit_jacobian(theta, x)  # [B, C, p]
        with torch.no_grad():
            p = torch.softmax(flat.task.logits(flat.dict(theta), x), -1)
        H_out = (
            torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        )  # softmax-CE Hessian in the logits
        return torch.einsum("bcp,bcd,bdq->pq", J, H_out, J) / n
    # mc: labels drawn from the model's prediction, mc_samples draws from seed mc_seed·1_000_003 + t
    with torch.no_grad():
        probs = torch.softmax(flat.task.logits(flat.dict(theta), x).double(), -1)
    gen = torch.Generator().manual_seed(mc_seed * 1_000_003 + t)
    C = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for _ in range(mc_samples):
        labels = torch.multinomial(probs, 1, generator=gen).view(-1)
        g = flat.grad(theta, x, labels, mean=False)
        C += g.T @ g
    return C / (n * mc_samples)

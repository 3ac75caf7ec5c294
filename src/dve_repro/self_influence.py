"""TracIn self-influence: how much each training point's own loss moved when it was trained on.

``SI(z) = Σ_c η_c ‖∇ℓ(θ_c, z)‖²`` over the recorded checkpoints c < T (η_c the learning rate
of step c), the point's loss taken with its *given* (possibly flipped) label. Pruthi et al.
(2020) rank training points by it to find mislabeled examples: a point the model cannot fit
keeps a large gradient for longer. Higher = more suspicious; it says nothing about any
validation set.

Reads a finished training run (checkpoints, learning rates); returns numbers, writes nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from dve_repro.grads import per_sample_grads
from dve_repro.replay import TrainedRun

Tensors = dict[str, torch.Tensor]


def grad_sq_norms(run: TrainedRun, params: Tensors, chunk: int = 256) -> np.ndarray:
    """‖∇_θ ℓ(θ, z_i)‖² of every training point at ``params``: [n_train] (per-sample
    gradients through ``torch.func``, ``chunk`` points at a time, any model)."""
    task = run.task
    detached = {k: v.detach() for k, v in params.items()}
    out = []
    for s in range(0, task.n_train, chunk):
        x, y = task.batch(np.arange(s, min(s + chunk, task.n_train)))
        g = per_sample_grads(task.per_sample_loss, detached, x, y)
        out.append(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    return torch.cat(out).double().cpu().numpy()


def self_influence(run: TrainedRun) -> np.ndarray:
    """``Σ_{c<T} η_c ‖∇ℓ(θ_c, z)‖²`` for every training point: [n_train]."""
    total = np.zeros(run.task.n_train)
    for c in [c for c in run.checkpoints if c < run.T]:
        total += float(run.traj.lrs[c]) * grad_sq_norms(run, run.load_params(c)[0])
    return total

"""Functional optimizers and learning-rate schedules.

The update rules are written out as pure functions of ``(params, grads, state, lr)`` on
dicts of tensors, not ``torch.optim`` objects, for two reasons: replaying a recorded run
must execute the very same floating-point operations as training (bit-for-bit replay),
and the ground-truth retraining advances many parameter copies at once under
``torch.func.vmap``, which needs stateless code. Semantics follow ``torch.optim.SGD``
(dampening 0, no Nesterov) and ``torch.optim.AdamW``; global-norm clipping follows
``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math

import torch

from dve_repro.config import OptimConfig, ScheduleConfig

Tensors = dict[str, torch.Tensor]


def init_state(params: Tensors, cfg: OptimConfig) -> Tensors:
    """Optimizer state as named tensors (saved in checkpoints beside the parameters)."""
    if cfg.name == "sgd":
        if cfg.momentum == 0:
            return {}
        return {f"buf.{k}": torch.zeros_like(v) for k, v in params.items()}
    state = {f"m.{k}": torch.zeros_like(v) for k, v in params.items()}
    state.update({f"v.{k}": torch.zeros_like(v) for k, v in params.items()})
    return state


def global_norm(grads: Tensors) -> torch.Tensor:
    """‖g‖ over all tensors, summed in sorted-name order: dict order differs between a live
    model (module order) and a checkpoint (sorted), and the rounding of the sum follows it."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[k]) for k in sorted(grads)]))


def clip(grads: Tensors, max_norm: float) -> tuple[Tensors, torch.Tensor]:
    """Scale all gradients by ``min(1, max_norm / (‖g‖ + 1e-6))``; returns the pre-clip norm."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * coef for k, g in grads.items()}, norm


def update(
    params: Tensors, grads: Tensors, state: Tensors, lr: float, step: int, cfg: OptimConfig
) -> tuple[Tensors, Tensors]:
    """One optimizer step. ``step`` counts from 0 (AdamW's bias correction uses step + 1).

    SGD:   b ← μ b + (g + λ θ);   θ ← θ − η b        (b ≡ g + λθ when μ = 0)
    AdamW: θ ← θ(1 − ηλ);  m, v ← EMAs;  θ ← θ − η m̂ / (√v̂ + ε)
    """
    if cfg.grad_clip > 0:  # the norm is only needed to clip (and costs ~6% of a small step)
        grads, _ = clip(grads, cfg.grad_clip)
    new_p: Tensors = {}
    new_s: Tensors = {}
    if cfg.name == "sgd":
        for k, p in params.items():
            g = grads[k]
            if cfg.weight_decay:
                g = g + cfg.weight_decay * p
            if cfg.momentum:
                g = cfg.momentum * state[f"buf.{k}"] + g
                new_s[f"buf.{k}"] = g
            new_p[k] = p - lr * g
        return new_p, new_s
    b1, b2 = cfg.betas
    t = step + 1
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    for k, p in params.items():
        g = grads[k]
        m = b1 * state[f"m.{k}"] + (1 - b1) * g
        v = b2 * state[f"v.{k}"] + (1 - b2) * g * g
        new_s[f"m.{k}"], new_s[f"v.{k}"] = m, v
        p = p * (1 - lr * cfg.weight_decay)
        denom = torch.sqrt(v) / math.sqrt(bc2) + cfg.eps
        new_p[k] = p - (lr / bc1) * (m / denom)
    return new_p, new_s


def is_plain_sgd(cfg: OptimConfig) -> bool:
    """True when the DVEmb recursion is exact (up to its curvature substitution)."""
    return cfg.name == "sgd" and cfg.momentum == 0 and cfg.grad_clip == 0


def lr_schedule(cfg: ScheduleConfig, peak: float, total_steps: int) -> list[float]:
    """The learning rate of every step t = 0..T-1 (recorded in the trajectory)."""
    out = []
    for t in range(total_steps):
        if cfg.kind == "constant":
            f = 1.0
        elif t < cfg.warmup_steps:
            f = (t + 1) / cfg.warmup_steps
        else:
            span = max(1, total_steps - cfg.warmup_steps)
            progress = (t - cfg.warmup_steps) / span
            if cfg.kind in ("cosine", "warmup_cosine"):
                f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            else:  # linear decay
                f = 1.0 - (1 - cfg.min_lr_ratio) * progress
        out.append(peak * f)
    return out

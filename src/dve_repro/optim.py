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


# ---------------------------------------------------------------------------------------
# The linearised AdamW step (SPEC §2 "Adam"): first-order perturbations of (θ, m, v).
#
# Step t maps (θ, m, v) and the batch gradient g (before clipping) to (θ', m', v'):
#     g̃ = c(‖g‖) g,  c = min(1, C/(‖g‖+1e-6))
#     m' = β₁m + (1−β₁)g̃,  v' = β₂v + (1−β₂)g̃²,  v̂ = v'/b2
#     θ' = θ(1−ηλ) − (η/b1) m' / (√v̂ + ε)
# Its tangent map, for perturbations (δθ, δm, δv, δg):
#     δg̃ = c δg − s g (gᵀδg),  s = C / ((‖g‖+1e-6)² ‖g‖)  while clipping is active, else 0
#     δm' = β₁δm + (1−β₁)δg̃,   δv' = β₂δv + 2(1−β₂) g̃∘δg̃
#     δθ' = (1−ηλ)δθ − a D δm' + a K δv',   a = η/b1,  D = 1/(√v̂+ε),
#     K = m' / (2 b2 √v̂ (√v̂+ε)²)   (0 where v' = 0: then m' = 0 and δv' = 0 as well)
# The caller supplies δg = H_t δθ (+ a removal push); the adjoint below is its transpose.
# ---------------------------------------------------------------------------------------


class AdamWLinearization:
    """The coefficients of one AdamW step's tangent map, from the step's inputs.

    ``params``/``state``/``grads`` are θ_t, (m_t, v_t) and the pre-clip batch gradient g_t,
    as dicts of tensors of the parameter shapes. Tangent and adjoint vectors may carry
    leading batch dimensions (e.g. one row per query): coefficients broadcast over them.
    """

    def __init__(self, params: Tensors, state: Tensors, grads: Tensors, lr: float, step: int, cfg: OptimConfig):
        if cfg.name != "adamw":
            raise ValueError(f"AdamWLinearization needs an AdamW run, not {cfg.name!r}")
        b1, b2 = cfg.betas
        t = step + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        self.b1, self.b2, self.bc2, self.eps = b1, b2, bc2, cfg.eps
        self.decay = 1 - lr * cfg.weight_decay
        self.a = lr / bc1
        self.g = grads
        self.c, self.s = 1.0, 0.0
        if cfg.grad_clip > 0:
            norm = float(global_norm(grads))
            if cfg.grad_clip / (norm + 1e-6) < 1.0:  # clipping active: c depends on ‖g‖
                self.c = cfg.grad_clip / (norm + 1e-6)
                self.s = cfg.grad_clip / ((norm + 1e-6) ** 2 * norm)
        self.gt = {k: self.c * g for k, g in grads.items()}
        self.D: Tensors = {}
        self.K: Tensors = {}
        self.m_new: Tensors = {}  # m' and v̂ = v'/b2, for factored approximations
        self.vhat: Tensors = {}
        for k, g in self.gt.items():
            m = b1 * state[f"m.{k}"] + (1 - b1) * g
            v = b2 * state[f"v.{k}"] + (1 - b2) * g * g
            self.m_new[k], self.vhat[k] = m, v / bc2
            root = torch.sqrt(v / bc2)
            self.D[k] = 1.0 / (root + cfg.eps)
            safe = torch.where(root > 0, root, torch.ones_like(root))
            self.K[k] = torch.where(root > 0, m / (2 * bc2 * safe * (root + cfg.eps) ** 2), torch.zeros_like(root))

    def _clip(self, d: Tensors) -> Tensors:
        """δg ↦ δg̃ (self-adjoint: c I − s g gᵀ)."""
        if self.s == 0.0:
            return d if self.c == 1.0 else {k: self.c * x for k, x in d.items()}
        dot = _batched_dot(self.g, d)
        return {k: self.c * x - self.s * _expand(dot, self.g[k]) * self.g[k] for k, x in d.items()}

    def tangent(self, dtheta: Tensors, dm: Tensors, dv: Tensors, dg: Tensors) -> tuple[Tensors, Tensors, Tensors]:
        """(δθ', δm', δv') from (δθ, δm, δv) and the gradient perturbation δg."""
        dgt = self._clip(dg)
        out_t, out_m, out_v = {}, {}, {}
        for k in dtheta:
            mk = self.b1 * dm[k] + (1 - self.b1) * dgt[k]
            vk = self.b2 * dv[k] + 2 * (1 - self.b2) * self.gt[k] * dgt[k]
            out_m[k], out_v[k] = mk, vk
            out_t[k] = self.decay * dtheta[k] - self.a * self.D[k] * mk + self.a * self.K[k] * vk
        return out_t, out_m, out_v

    def adjoint(self, lt: Tensors, lm: Tensors, lv: Tensors) -> tuple[Tensors, Tensors, Tensors, Tensors]:
        """Transpose of :meth:`tangent`: adjoints (λθ, λm, λv) of the outputs ↦ adjoints of
        (θ, m, v) along the direct path and λg, the adjoint of the pre-clip gradient.
        The curvature path (δg = H δθ) is the caller's: λθ_total = λθ + H λg."""
        in_t, in_m, in_v, lgt = {}, {}, {}, {}
        for k in lt:
            mu_m = lm[k] - self.a * self.D[k] * lt[k]
            mu_v = lv[k] + self.a * self.K[k] * lt[k]
            in_t[k] = self.decay * lt[k]
            in_m[k] = self.b1 * mu_m
            in_v[k] = self.b2 * mu_v
            lgt[k] = (1 - self.b1) * mu_m + 2 * (1 - self.b2) * self.gt[k] * mu_v
        return in_t, in_m, in_v, self._clip(lgt)

    def update_remainder(self, k: str, index: torch.Tensor, dm: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        """Exact minus linearised change of θ' through the update term, at the flat
        coordinates ``index`` [n] of parameter ``k``, for perturbations (δm', δv') [n] of the
        moments *after* the step:

            ρ = −a [(m'+δm') / (√((v'+δv')/b2) + ε) − m'/(√v̂ + ε)] − (−a D δm' + a K δv')

        Adam's update is far from linear where δv' is a large share of v' (a removed point
        that fed a coordinate alone: the update is scale-invariant there, so its derivative
        along the point's own gradient is ~0 while leaving the point out removes it all)."""
        m = self.m_new[k].reshape(-1)[index]
        vhat = self.vhat[k].reshape(-1)[index]
        cf = torch.sqrt(torch.clamp(vhat + dv / self.bc2, min=0.0))  # v' + δv' ≥ 0 up to rounding
        exact = -self.a * ((m + dm) / (cf + self.eps) - m / (torch.sqrt(vhat) + self.eps))
        linear = -self.a * self.D[k].reshape(-1)[index] * dm + self.a * self.K[k].reshape(-1)[index] * dv
        return exact - linear

    def coefficients(self) -> tuple[Tensors, Tensors, Tensors]:
        """Per-coordinate (α, γ, D) of the direct path δg̃ ↦ δθ': δθ' ∋ α∘δg̃ with
        α = −a D (1−β₁) + 2 a K (1−β₂) g̃; δv' ∋ γ∘δg̃ with γ = 2(1−β₂) g̃ (Algorithm-1 form)."""
        alpha = {k: -self.a * self.D[k] * (1 - self.b1) + 2 * self.a * self.K[k] * (1 - self.b2) * self.gt[k]
                 for k in self.D}
        gamma = {k: 2 * (1 - self.b2) * self.gt[k] for k in self.D}
        return alpha, gamma, self.D


def _batched_dot(g: Tensors, d: Tensors) -> torch.Tensor:
    """Σ_k ⟨g_k, d_k⟩ over the parameter dims of each tensor; keeps d's leading dims."""
    total = None
    for k, gk in g.items():
        x = d[k] * gk
        x = x.reshape(*x.shape[: x.dim() - gk.dim()], -1).sum(-1)
        total = x if total is None else total + x
    return total


def _expand(dot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return dot.reshape(*dot.shape, *([1] * like.dim()))

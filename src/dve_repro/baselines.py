"""Baseline data-attribution methods, on the TSLOO sign (positive = the point helped).

All take a finished training run and stacked query gradients ``{param: [Q, ...]}`` of
validation losses, and return one value per training index and query ``[n_train, Q]``:

* influence function at θ_T — ``(1/n) g_z(θ_T)ᵀ (H + δI)⁻¹ u`` with H the Hessian of the mean
  training loss, the inverse-Hessian-vector product by conjugate gradient (damping δ in
  ``baselines.if_damping``). Removing z moves θ by about (1/n) H⁻¹ g_z, raising the loss by
  this much. One value per point, whatever the removal setting.
* TracIn (checkpoints) — ``Σ_c η_c g_z(θ_c)ᵀ u(θ_c)`` over the recorded checkpoints c < T,
  with the query gradient recomputed at each checkpoint.
* gradient dot product at θ_T — ``g_z(θ_T)ᵀ u``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from dve_repro import ui
from dve_repro.grads import quiet_forward_ad
from dve_repro.replay import TrainedRun
from dve_repro.unroll import query_gradients

Tensors = dict[str, torch.Tensor]


# Bytes one chunk of training points may take in the batched jvp / forward-over-reverse
# products below (every query at once). A language model's are its logits, S·V numbers per
# sequence, query and buffer: 6.4 MB per 16-token sequence of the Pythia vocabulary in
# float64 (without the cap, pythia_tiny_adamw's 160 sequences took > 22 GB).
CHUNK_BYTES = 2 << 30
LOGIT_BUFFERS = 8  # logit-sized buffers per query alive at once (logits, softmax, tangents, …)


def chunk_size(task, n_queries: int, default: int) -> int:
    """Training points per chunk: ``default``, or fewer where one chunk's logit buffers for
    ``n_queries`` queries would pass ``CHUNK_BYTES`` (a language model's vocabulary-wide
    logits at every position; a classifier's few logits never bind)."""
    per_point = task.n_classes * (int(task.x_train.shape[1]) if task.kind == "lm" else 1)
    itemsize = torch.empty((), dtype=task.weight_dtype).element_size()
    need = per_point * itemsize * max(1, n_queries) * LOGIT_BUFFERS
    return max(1, min(default, CHUNK_BYTES // need))


def _n_queries(V: Tensors) -> int:
    return int(next(iter(V.values())).shape[0])


@quiet_forward_ad
def _dot_rows(run: TrainedRun, params: Tensors, V: Tensors, chunk: int = 512,
              label: str = "gradient dot products") -> np.ndarray:
    """[n_train, Q] of g_z(θ)ᵀ v_q, one jvp of the per-sample loss vector per query, over
    chunks of training points (:func:`chunk_size`); ``label`` names the progress bar."""
    task = run.task
    chunk = chunk_size(task, _n_queries(V), chunk)
    out = []
    with ui.bar(label, total=task.n_train, unit="pt") as bar:
        for s in range(0, task.n_train, chunk):
            idx = np.arange(s, min(s + chunk, task.n_train))
            x, y = task.batch(idx)

            def losses(p, x=x, y=y):
                return task.per_sample_loss(p, x, y)

            out.append(vmap(lambda vq, f=losses: jvp(f, (params,), (vq,))[1])(V).T)
            bar.update(len(idx))
    return torch.cat(out).cpu().numpy()


def grad_dot(run: TrainedRun, queries: Tensors) -> np.ndarray:
    return _dot_rows(run, run.final_params(), queries, label="grad-dot")


def tracin(run: TrainedRun, x_q: torch.Tensor, y_q: torch.Tensor, k: int) -> np.ndarray:
    """TracIn-CP over checkpoints c < T (η_c = the learning rate of step c); queries as in
    :func:`dve_repro.unroll.query_gradients` (mean over (x_q, y_q), then the first k points)."""
    total = None
    for c in [c for c in run.checkpoints if c < run.T]:
        params = run.load_params(c)[0]
        u = {n: v[: 1 + k] for n, v in query_gradients(run, params, x_q, y_q).items()}
        term = float(run.traj.lrs[c]) * _dot_rows(run, params, u, label=f"tracin (checkpoint {c})")
        total = term if total is None else total + term
    return total


@quiet_forward_ad
def _hvp_train(run: TrainedRun, params: Tensors, V: Tensors, chunk: int = 1000) -> Tensors:
    """(H v_q) for the Hessian of the mean training loss, all queries at once."""
    task = run.task
    n = task.n_train
    chunk = chunk_size(task, _n_queries(V), chunk)
    acc = {k: torch.zeros_like(v) for k, v in V.items()}
    for s in range(0, n, chunk):
        idx = np.arange(s, min(s + chunk, n))
        x, y = task.batch(idx)

        def loss(p, x=x, y=y):
            return task.per_sample_loss(p, x, y).sum() / n

        hv = vmap(lambda vq, f=loss: jvp(grad(f), (params,), (vq,))[1])(V)
        for k in acc:
            acc[k] = acc[k] + hv[k]
    return acc


def influence_function(run: TrainedRun, queries: Tensors, damping: float, iters: int, tol: float) -> tuple[np.ndarray, dict]:
    """[n_train, Q] influence values and CG diagnostics (iterations, relative residual)."""
    params = run.final_params()
    n = run.task.n_train

    def A(V):
        hv = _hvp_train(run, params, V)
        return {k: hv[k] + damping * V[k] for k in V}

    def dot(a, b):  # per-query inner products [Q]
        return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)

    b = queries
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rs = dot(r, r)
    b_norm = rs.sqrt()
    it = 0
    with ui.bar("influence (CG)", total=iters, unit="it") as bar:
        for it in range(1, iters + 1):  # noqa: B007 (the count is reported)
            Ap = A(p)
            alpha = rs / dot(p, Ap)
            shape = lambda a, v: a.view(-1, *([1] * (v.dim() - 1)))  # noqa: E731
            x = {k: x[k] + shape(alpha, x[k]) * p[k] for k in x}
            r = {k: r[k] - shape(alpha, r[k]) * Ap[k] for k in r}
            rs_new = dot(r, r)
            bar.update(1)
            if bool((rs_new.sqrt() <= tol * b_norm).all()):
                rs = rs_new
                break
            beta = rs_new / rs
            p = {k: r[k] + shape(beta, r[k]) * p[k] for k in r}
            rs = rs_new
    values = _dot_rows(run, params, x, label="influence (dot products)") / n
    return values, {"cg_iterations": it, "cg_rel_residual": float((rs.sqrt() / b_norm).max())}
